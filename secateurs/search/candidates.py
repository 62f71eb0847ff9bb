"""The candidates of a budget: the grid shapes under it, closest first, or those that meet a latency budget."""

from __future__ import annotations

from secateurs.config import SearchConfig
from secateurs.search.grid import (
    Candidate,
    ParameterCounter,
    SearchError,
    describe_budget,
    grid_shapes,
    parameter_limit,
)
from secateurs.search.latency import within_latency


def enumerate_candidates(counter: ParameterCounter, settings: SearchConfig) -> list[Candidate]:
    """The grid shapes whose parameter count is in `[(1 - tolerance) x limit, limit]`, closest to the budget
    first (at most `max_candidates`, as Model Optimizer keeps the top candidates by parameter count).

    Raises SearchError when the budget is not below the source, or no grid shape meets it."""
    source = counter(counter.source)
    limit = parameter_limit(settings, source)
    budget = describe_budget(settings)
    if limit >= source:
        raise SearchError(f"{budget} allows {limit:,.0f} parameters, not fewer than the source's {source:,}: "
                          "nothing to prune")  # fmt: skip
    counted = [Candidate(shape, counter(shape)) for shape in grid_shapes(counter.source, settings)
               if counter.loadable(shape)]  # fmt: skip
    under = [c for c in counted if c.parameters <= limit]
    if not under:
        smallest = min(c.parameters for c in counted)
        raise SearchError(
            f"{budget} allows {limit:,.0f} parameters, below the smallest candidate shape ({smallest:,}, with "
            "max_pruning and fixed dimensions as given)"
        )
    if settings.latency is not None:
        return within_latency(under, counter, settings)
    band = [c for c in under if c.parameters >= (1 - settings.tolerance) * limit]
    if not band:
        best = max(under, key=lambda c: c.parameters)
        raise SearchError(
            f"no candidate shape within tolerance={settings.tolerance} under the {budget}; the largest under it has "
            f"{best.parameters:,} parameters ({best.parameters / limit:.1%} of the budget): raise tolerance"
        )
    band.sort(key=lambda c: (-c.parameters, c.name))
    return band[: settings.max_candidates]


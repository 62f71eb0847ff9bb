"""The gate before GPU-hours: `compile`, `submit` and `run` refuse a config whose GPU steps cannot fit their GPUs.

The analytic plan (`secateurs.plan`) decides where it puts a step clear of the limit; a step nearer is traced
(`secateurs.trace`, which loads torch: imported only then, so `validate` and `compile` of a config clear of its
limits load no torch)."""

from __future__ import annotations

from secateurs.plan import HEADROOM, PlanError, plan, refusal

# The flagship's analytic plan agrees with its trace within this share on every step (tests/test_plan_trace.py).
AGREEMENT = 0.10


def check(config) -> list:
    """The analytic plan of `config` after refusing (`PlanError`, one line) a step that does not fit its GPUs.

    The analytic plan decides where it is clear of the limit by more than its agreement with the trace; a step it
    puts nearer (or over) is traced, and the trace decides: the refusal names the traced figure. Tracing only
    those steps keeps the check instant for configs that fit with room to spare (all the CPU configs)."""
    plans = plan(config)
    near = {s.task for s in plans if s.available and s.total * (1 + AGREEMENT) > HEADROOM * s.available}
    # Without gradient checkpointing a layer keeps more for backward than the analytic plan counts (1.7x at
    # Llama-3.1-8B's shapes, traced): there the trace is the plan.
    near |= {s.task for s in plans if s.available and s.parallelism != "forward" and not s.checkpointing}
    if not near:
        return plans
    # Not a search's scoring: its candidates' enumeration (`search.enumerate_candidates`, every grid shape
    # validated by transformers) takes minutes at an 8B's grid; the analytic plan, which agreed with its trace
    # within 1% (tests/test_plan_trace.py), decides there.
    near = {t for t in near if not t.startswith("search:")}
    traced_steps = _traced(config, near) if near else {}
    for step in plans:
        traced = traced_steps.get(step.task)
        if traced is not None and not traced.fits():
            from secateurs import trace

            raise PlanError(trace.refusal(traced, config))
        if traced is None and not step.fits():  # a step the trace does not run: the analytic plan decides
            raise PlanError(refusal(step, config))
    return plans


def _traced(config, tasks: set[str]) -> dict:
    """The traced steps of TASKS by task, traced once per config (`compile` then `submit` of one config)."""
    # Imported here, as torch with it: `validate` and `compile` of a config clear of its limits load no torch.
    from secateurs import trace

    key = config.model_dump_json()
    if key not in _TRACED:
        _TRACED[key] = {s.analytic.task: s for s in trace.trace_plan(config, tasks=tasks, roofline=False)}
    return _TRACED[key]


_TRACED: dict[str, dict] = {}  # a config's JSON -> its traced steps by task

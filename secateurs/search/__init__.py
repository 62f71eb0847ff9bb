"""Architecture search: from a parameter, memory or latency budget to the student shape that distils best.

Consumes the model to prune (the teacher, or a parent student), its importance artifact (one importance run serves
every candidate), the KD teacher and a prepared dataset. Produces a search artifact: `candidates.json` (every
candidate's shape, exact parameter count, weight bytes, validation loss right after pruning and, for the `top_k`
distilled, after a short distillation) and the winner's pruned checkpoint, which the full distillation starts from.

The flow (Minitron, arXiv 2407.14679 Sec. 3: candidates ranked after light retraining, because the ranking right
after pruning is a poor guide):
1. enumerate shapes on divisor grids, as NVIDIA Model Optimizer's Minitron search does: hidden and MLP widths in
   multiples of a channel divisor, attention as whole KV groups times query heads per group (so GQA stays valid),
   layers; width and depth mixed, each axis pruned at most `max_pruning` of it. The candidates are the shapes whose
   exact parameter count lies in a band just under the budget (`tolerance`), so the grid does not explode. A
   latency budget (output tokens/s) is measured: an engine of each shape, with random weights, built and
   benchmarked by `secateurs.engine` from the largest shape down, each shape measured once (cached);
2. prune each one from the importance artifact in memory (prune.py's own plan and surgery) and score it by
   validation loss;
3. distil the best `top_k` for `tokens` tokens each with the run's KD settings, as the distill step runs
   (`secateurs.training_launch.train`: in one process, under torchrun, or as a TrainJob), and score them again;
4. pick the lowest validation loss after that short distillation.

The modules: `grid` (shapes, exact parameter counts, the budget), `latency` (engine measurements),
`candidates` (the shapes a budget admits), `scoring` (the three pipeline steps and `run`).

Guarantees: every bad budget, fixed dimension or depth criterion fails in one line before any weight is read; a
candidate's recorded parameter count is the one `families.parameter_count` gives its pruned model (asserted).
"""

from secateurs.search.candidates import enumerate_candidates
from secateurs.search.grid import (
    BYTES_PER_PARAMETER,
    Candidate,
    ParameterCounter,
    SearchError,
    axis_grids,
    grid_shapes,
    parameter_limit,
)
from secateurs.search.latency import check_engine, measure_throughput
from secateurs.search.scoring import (
    CANDIDATES_FILE,
    SCORE_FILE,
    distill_candidate,
    format_table,
    pick_winner,
    run,
    score_candidates,
    short_distill_settings,
)

__all__ = [
    "BYTES_PER_PARAMETER",
    "CANDIDATES_FILE",
    "Candidate",
    "ParameterCounter",
    "SCORE_FILE",
    "SearchError",
    "axis_grids",
    "check_engine",
    "distill_candidate",
    "enumerate_candidates",
    "format_table",
    "grid_shapes",
    "measure_throughput",
    "parameter_limit",
    "pick_winner",
    "run",
    "score_candidates",
    "short_distill_settings",
]

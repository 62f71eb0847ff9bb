"""Which steps a rerun runs, and which recorded artifacts it imports (`secateurs rerun RUN --step STEP`).

A rerun runs tasks again in a new pipeline whose inputs are the artifacts the run recorded in MLflow (brought in
with `dsl.importer`); its outputs land in a new directory, so nothing the run produced changes. One task of a
fan-out step is rerun alone by its item (`--step search-distill:auto/1`: one candidate's short distillation).
"""

from __future__ import annotations

from secateurs.config import PipelineConfig
from secateurs.errors import PipelineError


def rerun_phases(cfg: PipelineConfig, key: str, downstream: bool) -> list[tuple[set[str], bool]]:
    """The pipelines a rerun of task `key` runs, in order: (task keys, with what depends on them).

    One pipeline, except for one item of a fan-out step with `downstream`: that item alone, then the steps that read
    the fan-out's outputs and everything after them (a `dsl.Collected` input gathers one loop's outputs, so the
    rerun item and the recorded others meet only in a second pipeline that imports them all)."""
    from secateurs.pipelines.recipe import recipe
    from secateurs.registry import split_item

    group, item = split_item(key)
    if not (item and downstream):
        return [({key}, downstream)]
    readers = {s.key for s in recipe(cfg) if any(ref[0] == group for ref in s.inputs.values())}
    return [({key}, False), (readers, True)]


def rerun_selection(cfg: PipelineConfig, keys: str | set[str], downstream: bool, recorded: dict[tuple[str, str], str]):
    """The steps a rerun of tasks `keys` runs and the recorded artifacts it imports.

    A key `STEP:STUDENT/ITEM` is one item of a fan-out step: that step is run over this item alone. An output of a
    fan-out step that is imported is a list of URIs, one per item, in item order.

    Untracked steps (the registry's `tracked=False`: the report's row gathering) record nothing to import: they
    are cheap, so any that a rerun step needs is run again too.

    Raises:
        PipelineError: a key is not a task of the config's pipeline, or an input was never recorded.
    """
    import dataclasses

    from secateurs.pipelines.recipe import recipe
    from secateurs.registry import STEPS, split_item

    steps = recipe(cfg)
    by_key = {s.key: s for s in steps}
    items: dict[str, list[str]] = {}  # a fan-out step rerun for some of its items only
    chosen = set()
    for key in {keys} if isinstance(keys, str) else keys:
        group, item = split_item(key)
        step = by_key.get(group)
        if step is None or (item and item not in step.items):
            listed = [k for s in steps for k in dict.fromkeys([s.key, *s.task_keys])]
            raise PipelineError(f"{key!r} is not a step of this pipeline; its steps are: {', '.join(listed)}")
        chosen.add(group)
        if item:
            items.setdefault(group, []).append(item)
    if downstream:
        for s in steps:  # recipe order is topological: one pass reaches every descendant
            if any(ref[0] in chosen for ref in s.inputs.values()):
                chosen.add(s.key)
    pending = list(chosen)
    while pending:  # pull in the untracked steps the chosen ones read
        for ref in by_key[pending.pop()].inputs.values():
            if not STEPS[by_key[ref[0]].kind].tracked and ref[0] not in chosen:
                chosen.add(ref[0])
                pending.append(ref[0])
    selected = [dataclasses.replace(s, items=items[s.key]) if s.key in items else s for s in steps if s.key in chosen]
    imports = {}
    for s in selected:
        for ref in s.inputs.values():
            if ref[0] in chosen:
                continue
            # A fan-out step's output is recorded per item: its reader imports every item's.
            wanted = [(key, ref[1]) for key in by_key[ref[0]].task_keys]
            for task, output in wanted:
                if (task, output) not in recorded:
                    raise PipelineError(
                        f"{s.key} needs {task}.{output}, which the run never finished: rerun {task} first"
                    )
            uris = [recorded[w] for w in wanted]
            imports[ref] = uris if by_key[ref[0]].items else uris[0]
    return selected, imports


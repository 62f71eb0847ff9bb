"""Training data: text in, packed token sequences out, as memory-mapped shards.

`prepare_data` streams each source of a blend (a hub dataset, local `.txt` / `.jsonl` / `.parquet` files, an
`s3://` prefix, the built-in offline corpus `python-docs`, or a dataset prepared before), shuffles documents in a
bounded buffer, tokenizes them in batches (in `num_proc` worker processes), joins them with EOS and packs them into
sequences of exactly `seq_len` tokens. A `.txt` file's documents are its blank-line separated paragraphs (or its
lines: `sample_by`), read a line at a time and cut at `MAX_DOCUMENT_CHARS`: a large file is many documents, never
held whole. The sequences go to shard files of raw token ids (`<source>/<split>-NNNNN.bin`, the smallest unsigned
integer type that holds the vocabulary), listed with their sizes and sha256 in `index.json`.
Memory holds one batch of documents and one sequence per split, whatever the corpus size; a preparation killed at
any point and started again with the same command resumes after its last finished shard and writes the same files.

Validation is held out by whole documents: a document goes to validation when validation holds less than
`val_fraction` of the source's tokens read so far, so no document is split between the two and the held-out share
is exact to within one document.

With a store (a directory on a volume every step mounts, or an `s3://` prefix) the shards are published once
under `<store>/<digest>/`, named by what was prepared (a later preparation of the same settings reuses them), and
the output is a small reference: the manifest and an `index.json` that gives the shards' location and their sizes
and sha256. A pipeline's dataset artifact then stays a few KB however large the corpus, and no step downloads the
shards as a KFP input.

Readers (`load_packed`) memory-map the shards: in place, or, for shards on S3, after fetching them once into the
cache (`storage.localize`: a node fetches only what it lacks, under a file lock). A split is a map-style dataset
over the blend: each source gets its weight's share of the split's sequences (a source whose share exceeds its
size repeats, a smaller share takes a seeded sample), interleaved evenly, so any stretch of the split holds the
sources in proportion. The Trainer's sampler shuffles and shards that index over the processes; each shard's
sha256 is checked the first time a process reads it.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import itertools
import json
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from secateurs.config import DataConfig, DataSource
from secateurs.manifest import CHECKPOINTS_ENV, MANIFEST, publish, read_manifest, write_manifest

if TYPE_CHECKING:
    import torch

BUILTIN_CORPORA = ("python-docs",)
LOCAL_FORMATS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
SPLITS = ("train", "validation")
FORMAT = "secateurs-tokens/1"
INDEX = "index.json"
PROGRESS = "progress.json"  # in the work directory while a preparation runs: what a restart resumes from
# Settings that change how fast a dataset is made, not what it holds: a restart may change them and resume.
_SPEED_SETTINGS = {"num_proc", "batch_documents"}


class DataError(ValueError):
    """A data source or dataset artifact that cannot be used."""


# Rendered in a fresh interpreter (see python_docs_texts). `pkgutil`/`pydoc` are the standard library's own
# module lister and documentation renderer; the script only picks the modules and strips memory addresses.
_RENDER_PYTHON_DOCS = r"""
import json, os, pkgutil, pydoc, re, sys, warnings

os.environ.clear()  # before any module is imported: pydoc would render it (see python_docs_texts)

skip = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "lib2to3", "test", "pydoc_data"}
names = sorted(
    m.name
    for m in pkgutil.iter_modules()
    if m.name in sys.stdlib_module_names and not m.name.startswith("_") and m.name not in skip
)
address = re.compile(r"( at 0x|, handle )[0-9a-fA-F]{8,}")
texts = []
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    for name in names:
        try:
            text = pydoc.render_doc(__import__(name), renderer=pydoc.plaintext)
        except Exception:  # some modules need a display, a platform or optional C libraries
            continue
        # Reprs such as `<object object at 0x7f93ed9a4160>` or `<PyDLL 'None', handle 7faa335e42e0>` carry this
        # process's memory addresses.
        texts.append(address.sub("", text))
json.dump(texts, sys.stdout)
"""


def python_docs_texts() -> list[str]:
    """The standard library's own documentation rendered as plain text: ~4 MB of English prose and signatures
    available on any machine with Python, which is what makes the demo and the tests work offline.

    pydoc renders the state of the process it runs in: `os.environ` (the default of `os` and `cgi` arguments, so every
    environment variable, credentials included), functions that imported libraries patch (torch replaces
    `inspect.getfile`, transformers adds `Logger.info_once`), the warnings registry, and `.pth` hooks of installed
    packages (setuptools' shim swaps the `distutils` page for its own copy). The pages are therefore rendered in a
    fresh isolated interpreter (`-I -S`: no site-packages, no PYTHON* variables) whose environment is emptied before
    any page is rendered: the corpus leaks nothing and is the same from every process on a machine.
    """
    return list(_render_python_docs())


@functools.cache  # the render no longer depends on the calling process: once per process is enough
def _render_python_docs() -> tuple[str, ...]:
    import os
    import subprocess
    import sys

    # Only what the interpreter itself may need to start (a libpython outside the loader's default paths).
    loader = {k: v for k, v in os.environ.items() if k in ("LD_LIBRARY_PATH", "DYLD_LIBRARY_PATH", "SYSTEMROOT")}
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c", _RENDER_PYTHON_DOCS], env=loader, capture_output=True, text=True,
        check=False,
    )  # fmt: skip
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        raise DataError(f"rendering the python-docs corpus failed: {last}")
    return tuple(json.loads(done.stdout))


def tokenizer_identity(tokenizer) -> str:
    """A hash of the vocabulary and special tokens: equal for the same tokenizer saved anywhere."""
    vocab = tokenizer.get_vocab()
    ident = {"vocab": sorted(vocab.items()), "eos": tokenizer.eos_token, "bos": tokenizer.bos_token}
    return hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:16]




# ----------------------------------------------------------------------------------------------- sources

# The longest document read from a .txt file. A file with no blank lines (or a huge line) is still read in pieces,
# and a batch of `batch_documents` such pieces stays ~13 MiB of text (~3M tokens).
MAX_DOCUMENT_CHARS = 1 << 16


def text_file_documents(path: str | Path, sample_by: str = "paragraph") -> Iterator[str]:
    """The documents of one .txt file, read a line at a time: its blank-line separated paragraphs (SAMPLE_BY
    "paragraph"; lines of only whitespace count as blank) or its non-blank lines ("line"), each without its final
    line break, cut at line ends (or inside a line longer than that) into pieces of at most `MAX_DOCUMENT_CHARS`.

    Written here rather than taken from `datasets`' text builder: its `sample_by="document"` reads a file whole,
    and its `sample_by="paragraph"` keeps a paragraph whole however long, splitting the whole growing remainder
    again after every 10 MB read, so a file without blank lines is held whole (in quadratic time).
    """
    piece: list[str] = []
    size = 0
    # Universal newlines, as datasets' builder: "\r\n" and "\r" are read as "\n".
    with open(path, encoding="utf-8") as f:
        while line := f.readline(MAX_DOCUMENT_CHARS):
            blank = not line.strip()
            # The piece so far ends at a blank line, at a line end when documents are lines, and before a line
            # that would take it past the limit.
            if piece and (blank or (sample_by == "line" and piece[-1].endswith("\n"))
                          or size + len(line) > MAX_DOCUMENT_CHARS):  # fmt: skip
                yield "".join(piece).removesuffix("\n")
                piece, size = [], 0
            if not blank:
                piece.append(line)
                size += len(line)
    if piece:
        yield "".join(piece).removesuffix("\n")


def _text_records(files: list[str], sample_by: str):
    for path in files:
        for text in text_file_documents(path, sample_by):
            yield {"text": text}


def _local_files(source: str) -> list[Path] | None:
    """The files of a local source (None when SOURCE is not a local path)."""
    path = Path(source).expanduser()
    if not (path.exists() or path.suffix in LOCAL_FORMATS):
        return None
    files = sorted(p for p in path.rglob("*") if p.suffix in LOCAL_FORMATS) if path.is_dir() else [path]
    if not files or not all(p.is_file() for p in files):
        raise DataError(f"data source {source} does not exist or holds no .txt/.jsonl/.parquet files")
    return files


def _s3_documents(src: DataSource):
    """An `s3://` text source read object by object: each is downloaded to the cache, streamed, and deleted, so
    the disk holds one object at a time, not the corpus.

    Written here because the library that would do it (`datasets` streaming over fsspec's s3fs) needs aiobotocore,
    whose botocore pin conflicts with the boto3 the pipeline pins.
    """
    import datasets

    from secateurs import storage

    objects = {rel: uri for rel, uri in storage.list_objects(src.source).items() if Path(rel).suffix in LOCAL_FORMATS}
    if not objects:
        raise DataError(f"data source {src.source} holds no .txt/.jsonl/.parquet objects")
    formats = {LOCAL_FORMATS[Path(rel).suffix] for rel in objects}
    if len(formats) != 1:
        raise DataError(f"data source {src.source} mixes formats {sorted(formats)}; use one")
    # A list in gen_kwargs makes each object a shard of the stream, so the shuffle also shuffles their order.
    return datasets.IterableDataset.from_generator(
        _s3_records,
        gen_kwargs={"objects": list(objects.values()), "builder": formats.pop(), "sample_by": src.sample_by},
    )


def _s3_records(objects: list[str], builder: str, sample_by: str):
    import tempfile

    import datasets

    from secateurs import storage
    from secateurs.manifest import cache_dir

    (cache_dir() / "streams").mkdir(parents=True, exist_ok=True)
    for uri in objects:
        with tempfile.TemporaryDirectory(dir=cache_dir() / "streams") as tmp:
            path = storage.download(uri, Path(tmp) / "object")
            if builder == "text":
                yield from _text_records([str(path)], sample_by)
            else:
                yield from datasets.load_dataset(builder, data_files=[str(path)], split="train", streaming=True)


def _localized(source: str) -> str:
    if source.startswith("s3://"):
        from secateurs import storage
        from secateurs.manifest import cache_dir

        return str(storage.localize(source, cache_dir()))
    return source


def documents(src: DataSource, seed: int = 0, shuffle_buffer: int = 0):
    """The documents of SRC as a `datasets.IterableDataset` with one `text` column, read as a stream.

    Raises:
        DataError: the source does not exist, has no such text field, or holds no text.
    """
    import datasets

    source = src.source
    if source in BUILTIN_CORPORA:
        ds = datasets.IterableDataset.from_generator(_python_docs_records)
    elif source.startswith("s3://"):
        ds = _s3_documents(src)
    elif (files := _local_files(source)) is not None:
        formats = {LOCAL_FORMATS[p.suffix] for p in files}
        if len(formats) != 1:
            raise DataError(f"data source {src.source} mixes formats {sorted(formats)}; use one")
        builder, paths = formats.pop(), [str(p) for p in files]
        if builder == "text":  # each file a shard of the stream (a list in gen_kwargs), as datasets' builders make it
            kwargs = {"files": paths, "sample_by": src.sample_by}
            ds = datasets.IterableDataset.from_generator(_text_records, gen_kwargs=kwargs)
        else:
            ds = datasets.load_dataset(builder, data_files=paths, split="train", streaming=True)
    else:
        from secateurs.checkpoint import _require_hub

        _require_hub(f"dataset {src.source}")
        ds = datasets.load_dataset(src.source, src.hub_config, split="train", streaming=True)
    # One pass up to the first document with text (the whole source only when it has none).
    for record in ds:
        if src.text_field not in record:
            raise DataError(f"data source {src.source} has no text field {src.text_field!r} (fields: {', '.join(record)})")
        if _text(record[src.text_field]):
            break
    else:
        raise DataError(f"data source {src.source} holds no text")
    ds = ds.select_columns([src.text_field])
    if src.text_field != "text":
        ds = ds.rename_column(src.text_field, "text")
    return ds.shuffle(seed=seed, buffer_size=shuffle_buffer) if shuffle_buffer else ds


def _python_docs_records():
    for text in python_docs_texts():
        yield {"text": text}


def _text(t) -> bool:
    return bool(t and t.strip())


def _prepared(source: str) -> Path | None:
    """The local directory of SOURCE when it is a dataset made by prepare-data (a blend can reuse one)."""
    if source.startswith("s3://"):
        from secateurs import storage

        if not {INDEX, "secateurs.json"} <= set(storage.list_objects(source)):
            return None  # text, streamed object by object
    elif source in BUILTIN_CORPORA or not Path(source).expanduser().is_dir():
        return None
    path = Path(_localized(source)).expanduser()
    return path if (path / INDEX).is_file() and read_manifest(path).get("step") == "prepare-data" else None


# ------------------------------------------------------------------------------------------- tokenizing

_WORKER_TOKENIZER = None


def _init_worker(tokenizer_dir: str) -> None:
    global _WORKER_TOKENIZER
    from secateurs.checkpoint import load_tokenizer

    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: the processes are the parallelism
    _WORKER_TOKENIZER = load_tokenizer(tokenizer_dir)


def _encode_in_worker(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return encode(_WORKER_TOKENIZER, texts)


def encode(tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of TEXTS, each followed by EOS, as one flat array and the documents' lengths."""
    ids = tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        for doc in ids:
            doc.append(tokenizer.eos_token_id)
    lengths = np.fromiter(map(len, ids), np.int64, len(ids))
    return np.fromiter(itertools.chain.from_iterable(ids), np.int64, int(lengths.sum())), lengths


def _encoded(batches: Iterator[tuple[int, list[str]]], tokenizer, tokenizer_dir: Path, num_proc: int):
    """(documents consumed, texts, flat ids, lengths) per batch, in order.

    With several processes at most two batches per process are in flight: a process pool's `map` would read the
    whole stream ahead, which is what bounded memory forbids (hence the hand-kept window).
    """
    if num_proc == 1:
        for consumed, texts in batches:
            yield consumed, texts, *encode(tokenizer, texts)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # fork, as `datasets`' own map does: workers start in milliseconds instead of importing transformers again
    # (seconds). The parent has not tokenized anything, so no tokenizer thread pool is copied mid-state.
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    with ProcessPoolExecutor(num_proc, mp_context=context, initializer=_init_worker,
                             initargs=(str(tokenizer_dir),)) as pool:  # fmt: skip
        window: collections.deque = collections.deque()
        try:
            for consumed, texts in batches:
                window.append((consumed, texts, pool.submit(_encode_in_worker, texts)))
                if len(window) >= 2 * num_proc:
                    consumed, texts, done = window.popleft()
                    yield consumed, texts, *done.result()
            while window:
                consumed, texts, done = window.popleft()
                yield consumed, texts, *done.result()
        finally:
            for *_, pending in window:
                pending.cancel()


# ---------------------------------------------------------------------------------------------- writing


class _SplitWriter:
    """Packs one split of one source into shards of `shard_sequences` sequences.

    Sequences are appended to `<prefix>-NNNNN.bin.partial`, renamed without `.partial` once the shard is full (or
    the source ends). `state()` is what a restart needs: the finished shards, the length of the open one and the
    tokens (fewer than one sequence) still waiting for the next document.
    """

    def __init__(self, root: Path, prefix: str, seq_len: int, dtype: np.dtype, shard_sequences: int,
                 cap: int | None, state: dict | None = None):  # fmt: skip
        self.root, self.prefix, self.seq_len, self.dtype = root, prefix, seq_len, dtype
        self.shard_sequences, self.cap = shard_sequences, cap
        state = state or {"shards": [], "open_sequences": 0, "pending": [], "tokens": 0}
        self.shards: list[dict] = state["shards"]
        self.open_sequences: int = state["open_sequences"]
        self.pending = np.asarray(state["pending"], dtype=dtype)
        self.tokens: int = state["tokens"]  # tokens of the documents given, for the validation rule
        self._file = None
        # A killed run may have written past its last recorded state: finished the open shard, started more.
        current = len(self.shards)
        for path in root.glob(f"{prefix}-*.bin*"):
            if int(path.name.rsplit("-", 1)[1].split(".")[0]) > current:
                path.unlink()
        partial = self._path(current, partial=True)
        if self._path(current).exists():
            os.replace(self._path(current), partial)
        if partial.exists():
            os.truncate(partial, self.open_sequences * seq_len * dtype.itemsize)

    def _path(self, i: int, partial: bool = False) -> Path:
        return self.root / f"{self.prefix}-{i:05d}.bin{'.partial' if partial else ''}"

    @property
    def sequences(self) -> int:
        return sum(s["sequences"] for s in self.shards) + self.open_sequences

    @property
    def full(self) -> bool:
        """No more documents wanted: the tokens given already fill the cap."""
        return self.cap is not None and self.tokens >= self.cap * self.seq_len

    def add(self, tokens: np.ndarray) -> bool:
        """Append TOKENS (whole documents); True when a shard was finished."""
        self.tokens += len(tokens)
        buffer = np.concatenate([self.pending, tokens.astype(self.dtype)])
        n = len(buffer) // self.seq_len
        if self.cap is not None:
            n = min(n, self.cap - self.sequences)
        self.pending = buffer[n * self.seq_len :] if not self.full else buffer[:0]
        sequences, finished = buffer[: n * self.seq_len], False
        while len(sequences):
            take = min(self.shard_sequences - self.open_sequences, len(sequences) // self.seq_len)
            if self._file is None:
                self.root.joinpath(self.prefix).parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self._path(len(self.shards), partial=True), "ab")  # noqa: SIM115 (open across calls)
            self._file.write(sequences[: take * self.seq_len].tobytes())
            self.open_sequences += take
            sequences = sequences[take * self.seq_len :]
            if self.open_sequences == self.shard_sequences:
                self._finish_shard()
                finished = True
        return finished

    def _finish_shard(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        partial, final = self._path(len(self.shards), partial=True), self._path(len(self.shards))
        os.replace(partial, final)
        with open(final, "rb") as f:
            sha256 = hashlib.file_digest(f, "sha256").hexdigest()
        self.shards.append({"file": final.relative_to(self.root).as_posix(), "sequences": self.open_sequences,
                            "sha256": sha256})  # fmt: skip
        self.open_sequences = 0

    def state(self) -> dict:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
        return {"shards": self.shards, "open_sequences": self.open_sequences, "pending": self.pending.tolist(),
                "tokens": self.tokens}  # fmt: skip

    def close(self) -> list[dict]:
        """Finish the open shard (the tokens short of a sequence are dropped) and return the shards."""
        if self.open_sequences:
            self._finish_shard()
        return self.shards


def token_dtype(tokenizer) -> np.dtype:
    """The smallest unsigned integer type that holds every token id of TOKENIZER."""
    return np.dtype(np.uint16 if len(tokenizer) <= 1 << 16 else np.uint32)


@dataclass
class _Plan:
    """What is fixed for one preparation."""

    settings: DataConfig
    tokenizer: object
    tokenizer_dir: Path
    work: Path
    dtype: np.dtype
    shard_sequences: int


def prepare_data(tokenizer_dir: str | Path, out: str | Path, settings: DataConfig,
                 store: str | Path | None = None) -> dict:  # fmt: skip
    """Tokenize, pack and split the sources of `settings` with the tokenizer in TOKENIZER_DIR into OUT.

    OUT may be a local directory or an `s3://` prefix. The work happens in a directory that survives a kill
    (`$SECATEURS_CHECKPOINTS/prepare-data-<digest>` when that is set, else `.<name>.partial` beside a local
    destination or under the cache for S3) and replaces its destination only once complete.

    Args:
        settings: the sources and their weights, text column, sequence length, token cap, validation fraction,
            seed, shuffle buffer, tokenizer processes and shard size; `DataConfig` says each.
        store: None to write the shards into OUT; else a directory every reader can reach (a shared volume) or
            an `s3://` prefix: the shards go to `<store>/<digest[:16]>/` (a complete copy already there, made
            by the same settings, is reused without reading a source), and OUT receives only the manifest and an
            index that records their location and sha256.

    Returns:
        A report: sequences and tokens per split, documents read, and per source its tokens, content hash and
        share of the blend.
    """
    from secateurs import storage
    from secateurs.checkpoint import load_tokenizer
    from secateurs.manifest import cache_dir

    tokenizer = load_tokenizer(tokenizer_dir)
    identity = tokenizer_identity(tokenizer)
    blend = settings.blend()
    config = {**settings.model_dump(exclude=_SPEED_SETTINGS), "sources": [s.model_dump() for s in blend],
              "tokenizer": identity}  # fmt: skip
    digest = _digest(config)
    remote = storage.is_s3_uri(str(out))
    if remote:
        storage.check_access(str(out))
    else:
        out = Path(out).absolute()
    location = _store_location(store, digest)
    if location is not None and (stored := _stored(location, digest)) is not None:
        index, report = stored
        _write_reference(out, location, index, tokenizer_dir, config, report)
        return report
    # Every source is opened (and a prepared one checked) before any tokenizing: a missing or empty source, or
    # one tokenized for another model, fails in one line.
    opened = {}
    for src in blend:
        prepared = _prepared(src.source)
        if prepared is not None:
            opened[src.name] = _check_prepared(prepared, src, identity, settings.seq_len)
        else:
            opened[src.name] = documents(src, settings.seed, settings.shuffle_buffer)
    shards_to = location or out  # where the finished shards go: the store, or the output itself
    # Where the work survives a kill: on a cluster, the volume the pipeline points SECATEURS_CHECKPOINTS at (a
    # retried pod writes its output to a new path, so the work is found by what it prepares, as training finds its
    # checkpoints); else beside a local destination, or in the cache for an S3 one.
    if os.environ.get(CHECKPOINTS_ENV):
        work = Path(os.environ[CHECKPOINTS_ENV]).absolute() / f"prepare-data-{digest[:16]}"
    elif storage.is_s3_uri(str(shards_to)):
        work = cache_dir() / "prepare" / hashlib.sha256(str(shards_to).rstrip("/").encode()).hexdigest()[:16]
    else:
        work = Path(shards_to).parent / f".{Path(shards_to).name}.partial"
    progress = _read_progress(work, digest)
    plan = _Plan(settings, tokenizer, Path(tokenizer_dir), work, token_dtype(tokenizer),
                 max(1, settings.shard_tokens // settings.seq_len))  # fmt: skip

    resumed = sum(v["summary"]["documents"] if v.get("finished") else v.get("consumed", 0)
                  for v in progress["sources"].values())  # fmt: skip
    weights = np.array([s.weight for s in blend], dtype=np.float64)
    total_sequences = None if settings.max_tokens is None else settings.max_tokens // settings.seq_len
    try:
        for src, weight in zip(blend, weights / weights.sum()):
            if progress["sources"].get(src.name, {}).get("finished"):
                continue
            cap = None if total_sequences is None else max(2, int(total_sequences * weight))
            source = opened[src.name]
            if isinstance(source, PackedDataset):
                summary = _copy_prepared(source, src, plan)
            else:
                summary = _prepare_source(src, source, cap, plan, progress)
            progress["sources"][src.name] = {"finished": True, "summary": summary}
            _write_progress(work, progress)
    except DataError:
        shutil.rmtree(work, ignore_errors=True)  # the same command would fail the same way: nothing to resume
        raise

    summaries = [progress["sources"][s.name]["summary"] for s in blend]
    index = _index(plan, blend, summaries)
    report = {
        "train_sequences": index["blend"]["train"]["sequences"],
        "validation_sequences": index["blend"]["validation"]["sequences"],
        "train_tokens": index["blend"]["train"]["sequences"] * settings.seq_len,
        "validation_tokens": index["blend"]["validation"]["sequences"] * settings.seq_len,
        "documents": sum(s["documents"] for s in summaries),
        "resumed_after_documents": resumed,
        "sources": {
            s["name"]: {"tokens": s["tokens"], "documents": s["documents"], "content_sha256": s["content_sha256"],
                        "weight": s["weight"], "train_share": index["blend"]["train"]["shares"][s["name"]]}
            for s in summaries
        },
    }  # fmt: skip
    (work / INDEX).write_text(json.dumps(index, indent=1))
    (work / PROGRESS).unlink()
    write_manifest(work, "prepare-data", inputs={"tokenizer": tokenizer_dir}, config=config, report=report)
    _publish(work, shards_to)
    if location is not None:
        _write_reference(out, location, index, tokenizer_dir, config, report)
    return report


def _digest(config: dict) -> str:
    """What a preparation makes, as a hash: the format and every setting that changes the shards."""
    return hashlib.sha256(json.dumps([FORMAT, config], sort_keys=True).encode()).hexdigest()


def _publish(work: Path, destination: str | Path) -> None:
    """Put the finished directory WORK at DESTINATION: renamed into place, or uploaded (manifest last) to S3."""
    from secateurs import storage

    if storage.is_s3_uri(str(destination)):
        storage.upload(work, str(destination))
        shutil.rmtree(work)
    else:
        publish(work, destination)


def _store_location(store: str | Path | None, digest: str) -> str | None:
    """Where a preparation publishes its shards in STORE: `<store>/<digest[:16]>` (None without a store)."""
    from secateurs import storage

    if store is None or str(store) == "":
        return None
    if storage.is_s3_uri(str(store)):
        storage.check_access(str(store))
        return f"{str(store).rstrip('/')}/{digest[:16]}"
    if str(store).startswith("s3:/"):
        raise DataError(f"data store {store!r} is an S3 URI that was turned into a path; pass it as a string")
    return str(Path(store).expanduser().absolute() / digest[:16])


def _stored(location: str, digest: str) -> tuple[dict, dict] | None:
    """(index, report) of a complete dataset of DIGEST at LOCATION, else None.

    Complete: its manifest is there (it is written last: renamed with the directory, or uploaded last) and every
    shard of its index has the size the index gives. The sha256 are left to the readers, which check them
    anyway: hashing hundreds of GB here would cost as much time as every reuse saves for the next step.
    """
    from secateurs import storage

    if storage.is_s3_uri(location):
        import tempfile

        from secateurs.manifest import cache_dir

        sizes = storage.object_sizes(location, missing_ok=True)
        if not {MANIFEST, INDEX} <= set(sizes):
            return None
        (cache_dir() / "streams").mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache_dir() / "streams") as tmp:
            got = Path(tmp) / "reference"  # the download's ETag record goes beside it, inside tmp
            for name in (MANIFEST, INDEX):
                storage.download(f"{location}/{name}", got)
            manifest, index = read_manifest(got), json.loads((got / INDEX).read_text())
    else:
        root = Path(location)
        if not (root / MANIFEST).is_file() or not (root / INDEX).is_file():
            return None
        manifest, index = read_manifest(root), json.loads((root / INDEX).read_text())
        sizes = {p.relative_to(root).as_posix(): p.stat().st_size for p in root.rglob("*.bin")}
    if manifest.get("step") != "prepare-data" or _digest(manifest.get("config") or {}) != digest:
        return None
    for shard in _shards(index):
        if sizes.get(shard["file"]) != _shard_bytes(index, shard):
            return None  # cut short or removed: prepared again, and replaced
    return index, manifest.get("report") or {}


def _write_reference(out: str | Path, location: str, index: dict, tokenizer_dir: str | Path, config: dict,
                     report: dict) -> None:  # fmt: skip
    """OUT as a reference to the dataset at LOCATION: the same manifest and index, the index with the location;
    no shard."""
    import tempfile

    from secateurs import storage
    from secateurs.manifest import cache_dir

    parent = cache_dir() if storage.is_s3_uri(str(out)) else Path(out).parent
    parent.mkdir(parents=True, exist_ok=True)
    reference = Path(tempfile.mkdtemp(prefix=".reference-", dir=parent))
    (reference / INDEX).write_text(json.dumps({**index, "location": location}, indent=1))
    write_manifest(reference, "prepare-data", inputs={"tokenizer": tokenizer_dir}, config=config, report=report)
    _publish(reference, out)


def _read_progress(work: Path, digest: str) -> dict:
    """The progress of an earlier run of the same preparation, or a fresh start (a stale work dir is removed)."""
    try:
        progress = json.loads((work / PROGRESS).read_text())
    except (OSError, ValueError):
        progress = None
    if progress is None or progress.get("digest") != digest:
        shutil.rmtree(work, ignore_errors=True)
        progress = {"digest": digest, "sources": {}}
        work.mkdir(parents=True)
        _write_progress(work, progress)
    return progress


def _write_progress(work: Path, progress: dict) -> None:
    tmp = work / f"{PROGRESS}.tmp"
    tmp.write_text(json.dumps(progress))
    os.replace(tmp, work / PROGRESS)


def _prepare_source(src: DataSource, stream, cap: int | None, plan: _Plan, progress: dict) -> dict:
    """Stream one text source into its train and validation shards; returns its summary for the index."""
    s = plan.settings
    state = progress["sources"].get(src.name) or {}
    caps = {"train": None, "validation": None}
    if cap is not None:
        n_val = max(1, round(cap * s.val_fraction))
        caps = {"train": cap - n_val, "validation": n_val}
    saved = state.get("writers") or {}
    writers = {
        split: _SplitWriter(plan.work, f"{src.name}/{split}", s.seq_len, plan.dtype, plan.shard_sequences,
                            caps[split], saved.get(split))
        for split in SPLITS
    }  # fmt: skip
    content = hashlib.sha256()  # of the documents used, in order (hash objects cannot be saved: a restart re-reads)
    consumed, documents_used = state.get("consumed", 0), state.get("documents", 0)
    records = iter(stream)
    for record in itertools.islice(records, consumed):
        if _text(record["text"]):
            content.update(record["text"].encode() + b"\0")

    def batches():
        # Batches grow from 8 documents to batch_documents: a small cap is met without tokenizing a whole batch.
        size = min(8, s.batch_documents)
        while chunk := list(itertools.islice(records, size)):
            yield len(chunk), [r["text"] for r in chunk if _text(r["text"])]
            size = min(2 * size, s.batch_documents)

    from tqdm.auto import tqdm

    bar = tqdm(desc=f"tokenizing {src.name}", unit="tok", unit_scale=True, initial=sum(w.tokens for w in writers.values()))
    for n, texts, flat, lengths in _encoded(batches(), plan.tokenizer, plan.tokenizer_dir, s.num_proc):
        ends = np.cumsum(lengths)
        parts: dict[str, list[np.ndarray]] = {"train": [], "validation": []}
        given = {split: w.tokens for split, w in writers.items()}

        def full(split, given=given):
            return caps[split] is not None and given[split] >= caps[split] * s.seq_len

        for i, text in enumerate(texts):
            if full("train") and full("validation"):
                break
            # Validation takes the document when it holds less than its share of the tokens so far.
            held_out = full("train") or (
                not full("validation") and given["validation"] < s.val_fraction * (given["train"] + given["validation"])
            )
            split = "validation" if held_out else "train"
            parts[split].append(flat[ends[i] - lengths[i] : ends[i]])
            given[split] += int(lengths[i])
            content.update(text.encode() + b"\0")
            documents_used += 1
        stop = full("train") and full("validation")
        finished = False
        for split, pieces in parts.items():
            if pieces:
                finished |= writers[split].add(np.concatenate(pieces))
        bar.update(int(sum(len(p) for pieces in parts.values() for p in pieces)))
        consumed += n
        if stop:
            break
        if finished:  # a shard is done: record where the stream is, so that a restart resumes here
            progress["sources"][src.name] = {"consumed": consumed, "documents": documents_used,
                                             "writers": {k: w.state() for k, w in writers.items()}}  # fmt: skip
            _write_progress(plan.work, progress)
    bar.close()
    shards = {split: w.close() for split, w in writers.items()}
    counts = {split: sum(x["sequences"] for x in shards[split]) for split in SPLITS}
    if min(counts.values()) == 0:
        tokens = writers["train"].tokens + writers["validation"].tokens
        raise DataError(
            f"data source {src.source} yields {tokens} tokens in {documents_used} documents: too few for one sequence "
            f"of seq_len={s.seq_len} for training and one for validation from different documents"
        )
    return {"name": src.name, "uri": src.source, "weight": src.weight, "documents": documents_used,
            "tokens": writers["train"].tokens + writers["validation"].tokens, "content_sha256": content.hexdigest(),
            "shards": shards}  # fmt: skip


def _check_prepared(path: Path, src: DataSource, identity: str, seq_len: int) -> PackedDataset:
    """A prepared dataset that a blend reuses, opened; refused when it cannot be reused as it is."""
    config = read_manifest(path).get("config") or {}
    if config.get("tokenizer") != identity:
        raise DataError(
            f"data source {src.source} was tokenized with tokenizer {config.get('tokenizer')}, but this blend's "
            f"tokenizer is {identity}"
        )
    if config.get("seq_len") != seq_len:
        raise DataError(f"data source {src.source} has seq_len={config.get('seq_len')}, this blend {seq_len}")
    return PackedDataset(path)  # its index and shard sizes, wherever its shards are


def _copy_prepared(dataset: PackedDataset, src: DataSource, plan: _Plan) -> dict:
    """A prepared dataset as one source of this blend: its shards (checked) linked or copied in, its sources'
    sequences merged (their weights inside it are not kept: the blend weighs it as a whole)."""
    root, index = dataset.root, dataset.index
    shards: dict[str, list[dict]] = {split: [] for split in SPLITS}
    for sub in index["sources"]:
        for split in SPLITS:
            for shard in sub["shards"][split]:
                _verify_shard(root, shard)
                target = plan.work / src.name / f"{sub['name']}-{Path(shard['file']).name}"
                target.parent.mkdir(parents=True, exist_ok=True)
                target.unlink(missing_ok=True)
                try:
                    os.link(root / shard["file"], target)
                except OSError:  # another file system
                    shutil.copyfile(root / shard["file"], target)
                shards[split].append({**shard, "file": target.relative_to(plan.work).as_posix()})
    sources = index["sources"]
    return {"name": src.name, "uri": src.source, "weight": src.weight,
            "documents": sum(s["documents"] for s in sources), "tokens": sum(s["tokens"] for s in sources),
            "content_sha256": hashlib.sha256("".join(s["content_sha256"] for s in sources).encode()).hexdigest(),
            "shards": shards}  # fmt: skip


def _index(plan: _Plan, blend: list[DataSource], summaries: list[dict]) -> dict:
    s = plan.settings
    weights = [src.weight for src in blend]
    splits = {}
    for split in SPLITS:
        counts = [sum(x["sequences"] for x in summary["shards"][split]) for summary in summaries]
        draws = blend_counts(counts, weights)
        total = int(sum(draws))
        splits[split] = {"sequences": total,
                         "shares": {m["name"]: round(int(d) / total, 6) for m, d in zip(summaries, draws)}}  # fmt: skip
    return {"format": FORMAT, "seq_len": s.seq_len, "dtype": plan.dtype.name, "seed": s.seed, "sources": summaries,
            "blend": splits}  # fmt: skip


# ----------------------------------------------------------------------------------------------- blends


def blend_counts(counts: list[int], weights: list[float]) -> np.ndarray:
    """Sequences drawn from each source for a split of `sum(counts)` sequences: shares proportional to the
    weights of the sources that have sequences, rounded by largest remainder so they sum exactly."""
    counts_a = np.asarray(counts, dtype=np.int64)
    w = np.where(counts_a > 0, np.asarray(weights, dtype=np.float64), 0.0)
    total = int(counts_a.sum())
    if w.sum() <= 0:
        return np.zeros_like(counts_a)
    quota = w / w.sum() * total
    draws = np.floor(quota).astype(np.int64)
    for k in np.argsort(-(quota - draws), kind="stable")[: total - int(draws.sum())]:
        draws[k] += 1
    return draws


def blend_index(counts: list[int], weights: list[float], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """For each position of a blended split, the source and the sequence within it.

    Each source's draws are spread evenly over the split (its j-th draw at (j + 1/2) / draws), so any stretch of
    it holds the sources in proportion. A source used whole is read in order; one drawn more or fewer times than
    it has sequences takes a fresh seeded permutation of them per pass.
    """
    draws = blend_counts(counts, weights)
    times = np.concatenate([(np.arange(d) + 0.5) / d for d in draws if d] or [np.zeros(0)])
    sources = np.concatenate([np.full(d, k, dtype=np.int32) for k, d in enumerate(draws) if d] or [np.zeros(0, np.int32)])
    order = np.lexsort((sources, times))
    source_of = sources[order]
    sample_of = np.empty(len(source_of), dtype=np.int64)
    for k, (d, n) in enumerate(zip(draws, counts)):
        if not d:
            continue
        if d == n:
            picks = np.arange(n)
        else:
            passes = -(-d // n)
            picks = np.concatenate([np.random.default_rng([seed, k, p]).permutation(n) for p in range(passes)])[:d]
        sample_of[source_of == k] = picks
    return source_of, sample_of


# ----------------------------------------------------------------------------------------------- reading


def _shards(index: dict) -> Iterator[dict]:
    """Every shard an index lists."""
    for source in index["sources"]:
        for split in SPLITS:
            yield from source["shards"][split]


def _shard_bytes(index: dict, shard: dict) -> int:
    return shard["sequences"] * index["seq_len"] * np.dtype(index["dtype"]).itemsize


def shard_root(path: Path, index: dict) -> Path:
    """The local directory that holds the shards of the dataset at PATH (whose index is INDEX): PATH itself, or
    the store its index names as `location`: a directory (a shared volume), read in place, or an `s3://` prefix,
    fetched into the cache (only what this machine lacks, one process at a time; the readers check each shard's
    sha256 before using it).

    Raises:
        DataError: the location is a directory this machine does not have.
    """
    location = index.get("location")
    if location is None:
        return path
    if location.startswith("s3://"):
        from secateurs import storage
        from secateurs.manifest import cache_dir

        return storage.localize(location, cache_dir())
    if not Path(location).is_dir():
        raise DataError(f"dataset {path} keeps its shards in {location}, which this machine does not have: mount "
                        f"the volume that holds it (placement.cache_volume), or prepare the data again")  # fmt: skip
    return Path(location)


def _verify_shard(root: Path, shard: dict) -> None:
    with open(root / shard["file"], "rb") as f:
        sha256 = hashlib.file_digest(f, "sha256").hexdigest()
    if sha256 != shard["sha256"]:
        raise DataError(f"shard {root / shard['file']} was altered after preparation: its sha256 is {sha256[:16]}, "
                        f"the index says {shard['sha256'][:16]}")  # fmt: skip


class PackedSplit:
    """One split of a prepared dataset: `len()` sequences, item i = {"input_ids": LongTensor[seq_len]}.

    A map-style dataset (what the Trainer's samplers shuffle and shard over processes) over memory-mapped shards;
    nothing is read until an item is asked for.
    """

    def __init__(self, root: Path, index: dict, split: str):
        self.root, self.split = root, split
        self.seq_len, self.dtype = index["seq_len"], np.dtype(index["dtype"])
        self._shards = [source["shards"][split] for source in index["sources"]]
        for shards in self._shards:
            for shard in shards:
                path = root / shard["file"]
                expected = _shard_bytes(index, shard)
                size = path.stat().st_size if path.is_file() else None
                if size != expected:
                    what = "is missing" if size is None else f"holds {size} bytes, expected {expected}"
                    raise DataError(f"shard {path} {what}: the dataset is truncated or damaged; prepare it again")
        self._starts = [np.cumsum([0] + [s["sequences"] for s in shards]) for shards in self._shards]
        counts = [int(starts[-1]) for starts in self._starts]
        self.source_of, self.sample_of = blend_index(counts, [s["weight"] for s in index["sources"]], index["seed"])
        self._maps: dict[tuple[int, int], np.ndarray] = {}
        self._checked = False  # every shard's sha256 checked by `verify` (by this process or its peers)

    def __len__(self) -> int:
        return len(self.source_of)

    def _sequence(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sequence {i} of a split of {len(self)}")
        k, j = int(self.source_of[i]), int(self.sample_of[i])
        s = int(np.searchsorted(self._starts[k], j, side="right")) - 1
        mapped = self._maps.get((k, s))
        if mapped is None:
            shard = self._shards[k][s]
            if not self._checked:  # once per shard and process, before its first sequence is used
                _verify_shard(self.root, shard)
            mapped = np.memmap(self.root / shard["file"], dtype=self.dtype, mode="r").reshape(-1, self.seq_len)
            self._maps[(k, s)] = mapped
        return mapped[j - int(self._starts[k][s])]

    def __getitem__(self, i: int) -> dict:
        import torch

        return {"input_ids": torch.from_numpy(self._sequence(int(i)).astype(np.int64))}

    def sequences(self, indices) -> torch.Tensor:
        """The sequences at INDICES as one [n, seq_len] LongTensor."""
        import torch

        rows = [self._sequence(int(i)).astype(np.int64) for i in indices]
        return torch.from_numpy(np.stack(rows) if rows else np.zeros((0, self.seq_len), np.int64))

    def head(self, n: int | None) -> torch.Tensor:
        """The first N sequences (all for None)."""
        return self.sequences(range(len(self) if n is None else min(n, len(self))))

    def spread(self, n: int | None) -> torch.Tensor:
        """N sequences spread evenly over the split (all of them for None or N >= its length).

        Documents are packed in order, so the first N sequences of a split are its first one or two documents (a
        python-docs document, one module's documentation, is ~4,300 tokens on average); an even spread reads all
        of them.
        """
        if n is None or n >= len(self):
            return self.head(None)
        return self.sequences(i * len(self) // n for i in range(n))

    def verify(self, rank: int = 0, world: int = 1) -> None:
        """Check the sha256 of every shard of the split before it is read, process RANK of WORLD checking every
        WORLD-th one: a training run reads each byte once more, not once per process. A process whose share fails
        raises, and torchrun stops its peers at their first collective, before a first step completes."""
        shards = [shard for shards in self._shards for shard in shards]
        for shard in shards[rank::world]:
            _verify_shard(self.root, shard)
        self._checked = True


class PackedDataset(dict):
    """A prepared dataset: {"train": PackedSplit, "validation": PackedSplit}, `config` its manifest's config,
    `path` its artifact directory and `root` the directory its shards are read from (`shard_root`)."""

    def __init__(self, path: str | Path):
        path = Path(path)
        manifest = read_manifest(path)
        if not path.is_dir() or manifest.get("step") != "prepare-data":
            raise DataError(f"{path} is not a dataset made by `secateurs prepare-data`")
        if not (path / INDEX).is_file():
            raise DataError(f"dataset {path} was made by an older secateurs (Arrow files, no {INDEX}): prepare it again")
        index = json.loads((path / INDEX).read_text())
        if index.get("format") != FORMAT:
            raise DataError(f"dataset {path} has format {index.get('format')!r}, this secateurs reads {FORMAT!r}")
        root = shard_root(path, index)
        super().__init__({split: PackedSplit(root, index, split) for split in SPLITS})
        for split in SPLITS:
            if len(self[split]) == 0:
                raise DataError(f"dataset {path} has an empty {split} split")
        self.path, self.root, self.index, self.config = path, root, index, manifest["config"]


def load_packed(path: str | Path) -> tuple[PackedDataset, dict]:
    """Open a prepared dataset (a local directory or an `s3://` prefix, holding its shards or a reference to where
    they are: `shard_root`); returns it and its manifest config."""
    dataset = PackedDataset(_localized(str(path)))
    return dataset, dataset.config


def check_matches(data_config: dict, tokenizer, seq_len: int | None = None, where: str = "dataset") -> None:
    """Refuse a dataset made with another tokenizer (or another sequence length when one is required)."""
    ident = tokenizer_identity(tokenizer)
    if data_config.get("tokenizer") != ident:
        raise DataError(
            f"{where} was tokenized with tokenizer {data_config.get('tokenizer')}, but the model's tokenizer is {ident}"
        )
    if seq_len is not None and data_config.get("seq_len") != seq_len:
        raise DataError(f"{where} has seq_len={data_config.get('seq_len')}, expected {seq_len}")

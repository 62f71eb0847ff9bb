"""The prepare-data step: the sources of a blend streamed, tokenized, packed and written, resumable, published once
to a store.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from secateurs.config import DataConfig, DataSource
from secateurs.data.blend import blend_counts
from secateurs.data.format import FORMAT, INDEX, SPLITS, DataError, token_dtype, tokenizer_identity
from secateurs.data.reader import PackedDataset, _shard_bytes, _shards, _verify_shard
from secateurs.data.sources import _prepared, _text, documents
from secateurs.data.tokenizing import _encoded
from secateurs.data.writer import _SplitWriter
from secateurs.files import CHECKPOINTS_ENV, publish
from secateurs.manifest import MANIFEST, json_digest, read_manifest, write_manifest

PROGRESS = "progress.json"  # in the work directory while a preparation runs: what a restart resumes from


# Settings that change how fast a dataset is made, not what it holds: a restart may change them and resume.
_SPEED_SETTINGS = {"num_proc", "batch_documents"}


@dataclass
class _Preparation:
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
    from secateurs.files import cache_dir

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
    prep = _Preparation(settings, tokenizer, Path(tokenizer_dir), work, token_dtype(tokenizer),
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
                summary = _copy_prepared(source, src, prep)
            else:
                summary = _prepare_source(src, source, cap, prep, progress)
            progress["sources"][src.name] = {"finished": True, "summary": summary}
            _write_progress(work, progress)
    except DataError:
        shutil.rmtree(work, ignore_errors=True)  # the same command would fail the same way: nothing to resume
        raise

    summaries = [progress["sources"][s.name]["summary"] for s in blend]
    index = _index(prep, blend, summaries)
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
    return json_digest([FORMAT, config], length=None)


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

        from secateurs.files import cache_dir

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
    from secateurs.files import cache_dir

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


def _prepare_source(src: DataSource, stream, cap: int | None, prep: _Preparation, progress: dict) -> dict:
    """Stream one text source into its train and validation shards; returns its summary for the index."""
    s = prep.settings
    state = progress["sources"].get(src.name) or {}
    caps = {"train": None, "validation": None}
    if cap is not None:
        n_val = max(1, round(cap * s.val_fraction))
        caps = {"train": cap - n_val, "validation": n_val}
    saved = state.get("writers") or {}
    writers = {
        split: _SplitWriter(prep.work, f"{src.name}/{split}", s.seq_len, prep.dtype, prep.shard_sequences,
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
    for n, texts, flat, lengths in _encoded(batches(), prep.tokenizer, prep.tokenizer_dir, s.num_proc):
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
            _write_progress(prep.work, progress)
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


def _copy_prepared(dataset: PackedDataset, src: DataSource, prep: _Preparation) -> dict:
    """A prepared dataset as one source of this blend: its shards (checked) linked or copied in, its sources'
    sequences merged (their weights inside it are not kept: the blend weighs it as a whole)."""
    root, index = dataset.root, dataset.index
    shards: dict[str, list[dict]] = {split: [] for split in SPLITS}
    for sub in index["sources"]:
        for split in SPLITS:
            for shard in sub["shards"][split]:
                _verify_shard(root, shard)
                target = prep.work / src.name / f"{sub['name']}-{Path(shard['file']).name}"
                target.parent.mkdir(parents=True, exist_ok=True)
                target.unlink(missing_ok=True)
                try:
                    os.link(root / shard["file"], target)
                except OSError:  # another file system
                    shutil.copyfile(root / shard["file"], target)
                shards[split].append({**shard, "file": target.relative_to(prep.work).as_posix()})
    sources = index["sources"]
    return {"name": src.name, "uri": src.source, "weight": src.weight,
            "documents": sum(s["documents"] for s in sources), "tokens": sum(s["tokens"] for s in sources),
            "content_sha256": hashlib.sha256("".join(s["content_sha256"] for s in sources).encode()).hexdigest(),
            "shards": shards}  # fmt: skip


def _index(prep: _Preparation, blend: list[DataSource], summaries: list[dict]) -> dict:
    s = prep.settings
    weights = [src.weight for src in blend]
    splits = {}
    for split in SPLITS:
        counts = [sum(x["sequences"] for x in summary["shards"][split]) for summary in summaries]
        draws = blend_counts(counts, weights)
        total = int(sum(draws))
        splits[split] = {"sequences": total,
                         "shares": {m["name"]: round(int(d) / total, 6) for m, d in zip(summaries, draws)}}  # fmt: skip
    return {"format": FORMAT, "seq_len": s.seq_len, "dtype": prep.dtype.name, "seed": s.seed, "sources": summaries,
            "blend": splits}  # fmt: skip

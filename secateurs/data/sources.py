"""Where documents come from: local files, `s3://` prefixes, hub datasets, `python-docs` and datasets prepared before,
streamed and shuffled in a bounded buffer.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from secateurs.config import DataSource
from secateurs.data.format import INDEX, DataError
from secateurs.data.pydocs import python_docs_texts
from secateurs.manifest import read_manifest

BUILTIN_CORPORA = ("python-docs",)


LOCAL_FORMATS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


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
    from secateurs.files import cache_dir

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
        from secateurs.files import cache_dir

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

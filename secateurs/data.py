"""Calibration and training data: text in, packed token sequences out.

`prepare_data` reads text from a hub dataset, local `.txt` / `.jsonl` / `.parquet` files, an `s3://` object, or the
built-in offline corpus `python-docs`, tokenizes it with the model's tokenizer, concatenates documents separated by
EOS, packs them into sequences of exactly `seq_len` tokens and saves a `DatasetDict` (`train`, `validation`, one
column `input_ids`) with `save_to_disk`. Its manifest records `seq_len` and the tokenizer's identity so later steps
read it without re-tokenizing and refuse it for a model with another tokenizer.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
from pathlib import Path

from secateurs.config import DataConfig
from secateurs.manifest import atomic_output, read_manifest, write_manifest

BUILTIN_CORPORA = ("python-docs",)
LOCAL_FORMATS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


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


def load_texts(source: str, text_field: str = "text", hub_config: str | None = None, split: str = "train"):
    """A `datasets.Dataset` with one `text` column for any supported source."""
    import datasets

    if source in BUILTIN_CORPORA:
        return datasets.Dataset.from_dict({"text": python_docs_texts()})
    if source.startswith("s3://"):
        from secateurs import storage
        from secateurs.checkpoint import cache_dir

        source = str(storage.localize(source, cache_dir()))
    path = Path(source).expanduser()
    if path.exists() or path.suffix in LOCAL_FORMATS:
        files = sorted(p for p in path.rglob("*") if p.suffix in LOCAL_FORMATS) if path.is_dir() else [path]
        if not files or not all(p.is_file() for p in files):
            raise DataError(f"data source {source} does not exist or holds no .txt/.jsonl/.parquet files")
        formats = {LOCAL_FORMATS[p.suffix] for p in files}
        if len(formats) != 1:
            raise DataError(f"data source {source} mixes formats {sorted(formats)}; use one")
        builder = formats.pop()
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        ds = datasets.load_dataset(builder, data_files=[str(p) for p in files], split="train", **kwargs)
    else:
        from secateurs.checkpoint import _require_hub

        _require_hub(f"dataset {source}")
        ds = datasets.load_dataset(source, hub_config, split=split)
    if text_field not in ds.column_names:
        raise DataError(f"data source {source} has no text field {text_field!r} (fields: {', '.join(ds.column_names)})")
    return ds.select_columns([text_field]).rename_column(text_field, "text") if text_field != "text" else ds.select_columns(["text"])


def prepare_data(tokenizer_dir: str | Path, out: str | Path, settings: DataConfig) -> dict:
    """Tokenize, pack and split `settings.source` with the tokenizer in TOKENIZER_DIR into OUT.

    Args:
        settings: source, text column, sequence length, token cap, validation fraction and shuffle seed;
            `DataConfig` says each.

    Returns:
        A report: sequences and tokens per split, documents read.
    """
    import datasets

    from secateurs.checkpoint import load_tokenizer

    source, seq_len, max_tokens, seed = settings.source, settings.seq_len, settings.max_tokens, settings.seed
    val_fraction, text_field, hub_config = settings.val_fraction, settings.text_field, settings.hub_config
    tokenizer = load_tokenizer(tokenizer_dir)
    texts = load_texts(source, text_field, hub_config)
    # Shuffle documents, not sequences, so validation is a set of documents the training split never saw
    # (only the one document that straddles the boundary is shared).
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    texts = texts.select(order).filter(lambda t: bool(t and t.strip()), input_columns="text")
    if len(texts) == 0:
        raise DataError(f"data source {source} holds no text")

    eos = tokenizer.eos_token_id

    def tokenize(batch):
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"ids": [x + [eos] if eos is not None else x for x in ids]}

    if max_tokens is not None:
        # Tokenize only as many (shuffled) documents as the cap needs: a 4 MB corpus costs half a minute.
        flat: list[int] = []
        for start in range(0, len(texts), 32):
            for doc in tokenize(texts[start : start + 32])["ids"]:
                flat.extend(doc)
            if len(flat) >= max_tokens:
                break
        flat = flat[:max_tokens]
    else:
        tokens = texts.map(tokenize, batched=True, remove_columns=["text"], desc="tokenizing")
        # Packing is a concatenate-and-split no library offers for a DatasetDict in one call; it is one line.
        flat = [t for doc in tokens["ids"] for t in doc]
    n_seq = len(flat) // seq_len
    if n_seq < 2:
        raise DataError(
            f"data source {source} yields {len(flat)} tokens: fewer than 2 sequences of seq_len={seq_len} "
            "(one for training, one for validation)"
        )
    sequences = [flat[i * seq_len : (i + 1) * seq_len] for i in range(n_seq)]
    n_val = max(1, round(n_seq * val_fraction))
    dd = datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"input_ids": sequences[: n_seq - n_val]}),
        validation=datasets.Dataset.from_dict({"input_ids": sequences[n_seq - n_val :]}),
    )
    report = {
        "train_sequences": n_seq - n_val,
        "validation_sequences": n_val,
        "train_tokens": (n_seq - n_val) * seq_len,
        "validation_tokens": n_val * seq_len,
        "documents": len(texts),
    }
    config = {
        "source": source,
        "seq_len": seq_len,
        "max_tokens": max_tokens,
        "val_fraction": val_fraction,
        "text_field": text_field,
        "seed": seed,
        "tokenizer": tokenizer_identity(tokenizer),
    }
    with atomic_output(out) as tmp:
        dd.save_to_disk(str(tmp))
        write_manifest(tmp, "prepare-data", inputs={"tokenizer": tokenizer_dir}, config=config, report=report)
    return report


def load_packed(path: str | Path):
    """Open a prepared dataset; returns (DatasetDict, its manifest config)."""
    import datasets

    path = Path(path)
    manifest = read_manifest(path)
    if not path.is_dir() or manifest.get("step") != "prepare-data":
        raise DataError(f"{path} is not a dataset made by `secateurs prepare-data`")
    dd = datasets.load_from_disk(str(path))
    for split in ("train", "validation"):
        if split not in dd or len(dd[split]) == 0:
            raise DataError(f"dataset {path} has an empty {split} split")
    return dd.with_format("torch"), manifest["config"]


def spread(split, n: int | None):
    """N sequences of SPLIT spread evenly over it (all of them for None or N >= its length).

    Documents are packed in order, so the first N sequences of a split are its first one or two documents (a
    python-docs document, one module's documentation, is ~4,300 tokens on average); an even spread reads all of them.
    """
    if n is None or n >= len(split):
        return split
    return split.select([i * len(split) // n for i in range(n)])


def check_matches(data_config: dict, tokenizer, seq_len: int | None = None, where: str = "dataset") -> None:
    """Refuse a dataset made with another tokenizer (or another sequence length when one is required)."""
    ident = tokenizer_identity(tokenizer)
    if data_config.get("tokenizer") != ident:
        raise DataError(
            f"{where} was tokenized with tokenizer {data_config.get('tokenizer')}, but the model's tokenizer is {ident}"
        )
    if seq_len is not None and data_config.get("seq_len") != seq_len:
        raise DataError(f"{where} has seq_len={data_config.get('seq_len')}, expected {seq_len}")

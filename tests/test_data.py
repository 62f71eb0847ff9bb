"""prepare-data: local formats and the built-in corpus, packing, splitting, refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from secateurs.checkpoint import load_tokenizer
from secateurs.config import DataConfig
from secateurs.data import DataError, load_packed, prepare_data, tokenizer_identity


def _write_sources(tmp_path, docs):
    (tmp_path / "a.txt").write_text("\n\n".join(docs))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"body": d}) for d in docs))
    import datasets

    datasets.Dataset.from_dict({"text": docs}).to_parquet(str(tmp_path / "c.parquet"))


def test_local_formats_pack_exact_sequences(tokenizer_dir, docs_txt, tmp_path):
    docs = docs_txt.read_text().split("\n\n")[:30]
    _write_sources(tmp_path, docs)
    tok = load_tokenizer(tokenizer_dir)
    for name, field in (("a.txt", "text"), ("b.jsonl", "body"), ("c.parquet", "text")):
        out = tmp_path / f"out-{name}"
        report = prepare_data(tokenizer_dir, out, DataConfig(source=str(tmp_path / name), seq_len=16, val_fraction=0.25, text_field=field))
        dd, config = load_packed(out)
        assert config["seq_len"] == 16 and config["tokenizer"] == tokenizer_identity(tok)
        assert all(len(x) == 16 for x in dd["train"]["input_ids"])
        assert report["validation_sequences"] == round((report["train_sequences"] + report["validation_sequences"]) * 0.25)
    # jsonl and parquet hold the same documents one per record: identical token streams.
    a = load_packed(tmp_path / "out-b.jsonl")[0]["train"][:]["input_ids"]
    b = load_packed(tmp_path / "out-c.parquet")[0]["train"][:]["input_ids"]
    assert a.tolist() == b.tolist()


def test_packed_tokens_are_the_documents_joined_by_eos(tokenizer_dir, tmp_path):
    tok = load_tokenizer(tokenizer_dir)
    docs = ["alpha beta gamma delta", "one two three four five six", "x y z"]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    prepare_data(tokenizer_dir, tmp_path / "o", DataConfig(source=str(tmp_path / "d.jsonl"), seq_len=4, val_fraction=0.3, seed=0))
    dd, _ = load_packed(tmp_path / "o")
    stream = dd["train"][:]["input_ids"].flatten().tolist() + dd["validation"][:]["input_ids"].flatten().tolist()
    import random

    order = list(range(3))
    random.Random(0).shuffle(order)
    expected = [t for i in order for t in tok(docs[i], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    assert stream == expected[: len(stream)] and len(expected) - len(stream) < 4


def test_python_docs_builtin_and_max_tokens(tokenizer_dir, tmp_path):
    report = prepare_data(tokenizer_dir, tmp_path / "p", DataConfig(source="python-docs", seq_len=64, max_tokens=64 * 50))
    assert report["train_sequences"] + report["validation_sequences"] == 50


def test_bad_data_inputs(tokenizer_dir, tmp_path):
    (tmp_path / "empty.txt").write_text("   \n\n  ")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(DataError, match="holds no text"):
        prepare_data(tokenizer_dir, out, DataConfig(source=str(tmp_path / "empty.txt"), seq_len=8))
    (tmp_path / "short.txt").write_text("just a few words")
    with pytest.raises(DataError, match="fewer than 2 sequences of seq_len=64"):
        prepare_data(tokenizer_dir, out, DataConfig(source=str(tmp_path / "short.txt"), seq_len=64))
    with pytest.raises(DataError, match="does not exist"):
        prepare_data(tokenizer_dir, out, DataConfig(source=str(tmp_path / "missing.jsonl"), seq_len=8))
    (tmp_path / "x.jsonl").write_text(json.dumps({"content": "hello there"}))
    with pytest.raises(DataError, match="no text field 'text'"):
        prepare_data(tokenizer_dir, out, DataConfig(source=str(tmp_path / "x.jsonl"), seq_len=8))
    assert (out / "keep").read_text() == "x"
    with pytest.raises(DataError, match="not a dataset made by"):
        load_packed(tmp_path)


def test_python_docs_corpus_is_the_same_in_every_process_and_holds_no_environment(tmp_path):
    """pydoc renders its process's state (memory addresses, os.environ as a default argument value, functions that
    torch and transformers patch, the warnings registry): none of it may reach the corpus."""
    script = "import hashlib; from secateurs.data import python_docs_texts; t = '\\0'.join(python_docs_texts()); " \
             "print(hashlib.sha256(t.encode()).hexdigest(), 'hunter2' in t, len(t) > 1_000_000)"
    plain = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    loaded = "import warnings; warnings.filterwarnings('ignore', 'x'); import torch, transformers; " + script
    other = subprocess.run([sys.executable, "-c", loaded], capture_output=True, text=True, check=True, cwd=tmp_path,
                           env={**os.environ, "SECATEURS_TEST_TOKEN": "hunter2"}).stdout
    assert plain == other
    assert plain.split()[1:] == ["False", "True"]

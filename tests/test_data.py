"""prepare-data: local formats and the built-in corpus, packing, splitting, refusals."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from secateurs.checkpoint import load_tokenizer
from secateurs.config import DataConfig
from secateurs.data import DataError, load_packed, prepare_data, tokenizer_identity


def _write_sources(tmp_path, docs):
    (tmp_path / "a").mkdir()
    for i, d in enumerate(docs):
        (tmp_path / "a" / f"{i:03d}.txt").write_text(d)
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"body": d}) for d in docs))
    import datasets

    datasets.Dataset.from_dict({"text": docs}).to_parquet(str(tmp_path / "c.parquet"))


def _documents(tok, docs):
    return [tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for d in docs]


def _pack(docs, seq_len):
    """Packing before shards: documents joined (each followed by EOS) and cut into sequences, the tail dropped."""
    flat = [t for doc in docs for t in doc]
    return [flat[i * seq_len : (i + 1) * seq_len] for i in range(len(flat) // seq_len)]


def _held_out(lengths, val_fraction):
    """The documents validation takes: each one read while it holds less than val_fraction of the tokens."""
    taken, val, total = [], 0, 0
    for i, n in enumerate(lengths):
        if val < val_fraction * total:
            taken.append(i)
            val += n
        total += n
    return taken


def test_shards_equal_the_packing_of_each_split_s_documents(tokenizer_dir, docs_dir, tmp_path):
    # Each document one paragraph (no blank lines, under MAX_DOCUMENT_CHARS), so that each .txt file is one.
    docs = ["\n".join(line for line in p.read_text()[:50_000].splitlines() if line.strip())
            for p in sorted(docs_dir.iterdir())][:30]  # fmt: skip
    _write_sources(tmp_path, docs)
    tok = load_tokenizer(tokenizer_dir)
    tokens = _documents(tok, docs)
    val_docs = _held_out([len(d) for d in tokens], 0.25)
    expected = {
        "train": _pack([d for i, d in enumerate(tokens) if i not in val_docs], 16),
        "validation": _pack([tokens[i] for i in val_docs], 16),
    }
    for name, field in (("a", "text"), ("b.jsonl", "body"), ("c.parquet", "text")):
        out = tmp_path / f"out-{name}"
        settings = DataConfig(source=str(tmp_path / name), text_field=field, seq_len=16, val_fraction=0.25,
                              shuffle_buffer=0, shard_tokens=16 * 50)  # fmt: skip
        report = prepare_data(tokenizer_dir, out, settings)
        dd, config = load_packed(out)
        assert config["seq_len"] == 16 and config["tokenizer"] == tokenizer_identity(tok)
        for split in ("train", "validation"):
            assert dd[split].head(None).tolist() == expected[split], (name, split)
        assert report["documents"] == 30 and report["train_sequences"] == len(expected["train"])
        # Several shards per split, each of the smallest integer type that holds the vocabulary (49,152 tokens).
        index = json.loads((out / "index.json").read_text())
        (source,) = index["sources"]
        assert index["dtype"] == "uint16" and len(source["shards"]["train"]) == -(-len(expected["train"]) // 50)
        assert (out / source["shards"]["train"][0]["file"]).stat().st_size == 50 * 16 * 2
    # The held-out share of the tokens is val_fraction to within one document.
    val_tokens = sum(len(tokens[i]) for i in val_docs)
    assert abs(val_tokens - 0.25 * sum(map(len, tokens))) <= max(map(len, tokens))


def _paragraphs(docs_dir, n):
    """N paragraphs of 1-6 non-blank lines of real text, in order."""
    lines = [line for p in sorted(docs_dir.iterdir()) for line in p.read_text().splitlines() if line.strip()]
    out, i = [], 0
    while len(out) < n:
        k = 1 + len(out) % 6
        out.append("\n".join(lines[i : i + k]))
        i += k
    return out


def test_one_text_file_is_a_corpus_of_its_paragraphs(tokenizer_dir, docs_dir, tmp_path):
    """A corpus that comes as one .txt file prepares: its documents are its blank-line separated paragraphs (or
    its lines), not the whole file."""
    paragraphs = _paragraphs(docs_dir, 120)
    separators = ["\n\n", "\n\n\n", "\n  \t\n"]  # one blank line, two, one of only whitespace
    text = "".join(p + separators[i % 3] for i, p in enumerate(paragraphs))
    (tmp_path / "corpus.txt").write_text(text)
    tok = load_tokenizer(tokenizer_dir)
    for sample_by, docs in (("paragraph", paragraphs), ("line", [x for p in paragraphs for x in p.split("\n")])):
        tokens = _documents(tok, docs)
        val_docs = set(_held_out([len(d) for d in tokens], 0.1))
        settings = DataConfig(source=str(tmp_path / "corpus.txt"), sample_by=sample_by, seq_len=16,
                              val_fraction=0.1, shuffle_buffer=0)  # fmt: skip
        report = prepare_data(tokenizer_dir, tmp_path / sample_by, settings)
        dd, _ = load_packed(tmp_path / sample_by)
        assert dd["train"].head(None).tolist() == _pack([d for i, d in enumerate(tokens) if i not in val_docs], 16)
        assert dd["validation"].head(None).tolist() == _pack([tokens[i] for i in sorted(val_docs)], 16)
        assert report["documents"] == len(docs)
    # With the default shuffle, the same documents in another order.
    settings = DataConfig(source=str(tmp_path / "corpus.txt"), seq_len=16)
    report = prepare_data(tokenizer_dir, tmp_path / "shuffled", settings)
    assert report["documents"] == len(paragraphs)
    assert report["sources"]["corpus"]["tokens"] == sum(map(len, _documents(tok, paragraphs)))


def test_a_large_text_file_is_read_in_bounded_pieces(tmp_path, monkeypatch):
    """Memory is flat in file size: no document read from a .txt file is longer than MAX_DOCUMENT_CHARS, even
    where the file has no blank line, or a line longer than that, and reading holds no more than a few of them."""
    import tracemalloc

    from secateurs import data, storage
    from secateurs.config import DataSource

    limit = 1 << 16  # data.MAX_DOCUMENT_CHARS, checked last
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    paragraph = "\n".join(" ".join(words[(i + j) % 10] for j in range(60)) for i in range(8))  # ~3 KB
    no_blank_line = "\n".join(" ".join(words[(i + j) % 10] for j in range(50)) for i in range(8_000))  # ~2.5 MB
    long_line = " ".join(words[i % 10] for i in range(30_000))  # ~180 KB
    text = "\n\n".join([paragraph] * 1000 + [no_blank_line, long_line] + [paragraph] * 500) + "\n"
    (tmp_path / "big.txt").write_text(text)
    assert len(text) > 6_500_000

    def read(source):
        tracemalloc.start()
        try:
            longest = 0
            for record in data.documents(DataSource(source=source)):
                longest = max(longest, len(record["text"]))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        return longest, peak

    (tmp_path / "small.txt").write_text(paragraph)
    read(str(tmp_path / "small.txt"))  # the modules the reading needs imported: only the reading itself is traced
    longest, peak = read(str(tmp_path / "big.txt"))
    assert longest <= limit
    assert peak < 2_000_000, peak  # the file is 6.5 MB; measured 0.3 MB
    # Nothing is lost: the documents hold the file's text, in order, cut only at whitespace or inside a long line.
    docs = [r["text"] for r in data.documents(DataSource(source=str(tmp_path / "big.txt")))]
    assert "".join("".join(docs).split()) == "".join(text.split())
    assert docs[:1000] == [paragraph] * 1000 and docs[-500:] == [paragraph] * 500
    assert docs[1000].startswith(no_blank_line[:1000])
    assert len(docs) >= 1500 + (len(no_blank_line) + len(long_line)) // limit

    # The same for an s3:// object, which is downloaded to the cache and read there.
    monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(storage, "list_objects", lambda uri: {"big.txt": uri + "big.txt"})
    monkeypatch.setattr(storage, "download", lambda uri, path: Path(shutil.copyfile(tmp_path / "big.txt", path)))
    longest, _ = read("s3://bucket/corpus/")
    assert longest <= limit
    assert [r["text"] for r in data.documents(DataSource(source="s3://bucket/corpus/"))] == docs
    assert data.MAX_DOCUMENT_CHARS == limit


def test_python_docs_builtin_and_max_tokens(tokenizer_dir, tmp_path):
    report = prepare_data(tokenizer_dir, tmp_path / "p", DataConfig(source="python-docs", seq_len=64, max_tokens=64 * 50))
    assert (report["train_sequences"], report["validation_sequences"]) == (48, 2)
    # Only the documents the cap needs were read: the two splits come from different documents.
    assert 2 <= report["documents"] < 10


def test_tokenizer_processes_write_the_same_shards(tokenizer_dir, docs_dir, tmp_path):
    made = {}
    for procs in (1, 2):
        settings = DataConfig(source=str(docs_dir), seq_len=64, num_proc=procs, batch_documents=4, shard_tokens=64 * 64)
        prepare_data(tokenizer_dir, tmp_path / str(procs), settings)
        made[procs] = json.loads((tmp_path / str(procs) / "index.json").read_text())
    assert made[1] == made[2] and len(made[1]["sources"][0]["shards"]["train"]) > 1


def test_a_weighted_blend_draws_in_proportion_and_the_seed_fixes_the_order(tokenizer_dir, tmp_path):
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    for name, n in (("web", 300), ("code", 500)):
        docs = [" ".join(words[(i * 7 + j) % 10] for j in range(40 + i % 17)) + f" {name} {i}" for i in range(n)]
        (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))

    def blend(out, seed):
        sources = [{"source": str(tmp_path / "web.jsonl"), "weight": 3}, {"source": str(tmp_path / "code.jsonl")}]
        report = prepare_data(tokenizer_dir, tmp_path / out, DataConfig(sources=sources, seq_len=16, seed=seed))
        return report, load_packed(tmp_path / out)[0]["train"]

    report, train = blend("a", 0)
    assert set(report["sources"]) == {"web", "code"}
    assert report["sources"]["web"]["train_share"] == pytest.approx(0.75, abs=1e-3)
    # Any stretch of 1,000 sequences holds the sources 3:1, within one sequence.
    for start in (0, 1234):
        counts = np.bincount(train.source_of[start : start + 1000], minlength=2)
        assert abs(counts[0] - 750) <= 1, counts
    # The web source has fewer sequences than its share: it repeats, each pass a permutation of all of them.
    web = train.sample_of[train.source_of == 0]
    n_web = int(train._starts[0][-1])
    assert len(web) > n_web and sorted(web[:n_web]) == list(range(n_web))
    ids = train.head(50)
    _, again = blend("b", 0)
    assert again.head(50).tolist() == ids.tolist()
    _, other = blend("c", 1)
    assert other.head(50).tolist() != ids.tolist()
    # Each source is identified by the documents read from it.
    assert report["sources"]["web"]["content_sha256"] != report["sources"]["code"]["content_sha256"]


def test_a_prepared_dataset_is_a_source_of_a_blend_only_with_its_tokenizer(tokenizer_dir, tiny_data, tmp_path):
    tok = tmp_path / "tok"
    load_tokenizer(tokenizer_dir).save_pretrained(tok)
    config = json.loads((tok / "tokenizer_config.json").read_text())
    config["eos_token"] = "<|im_start|>"  # another EOS: another tokenizer identity
    (tok / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "more.jsonl").write_text("\n".join(json.dumps({"text": f"line {i} " * 30}) for i in range(40)))
    settings = DataConfig(sources=[str(tiny_data), str(tmp_path / "more.jsonl")], seq_len=32)
    with pytest.raises(DataError, match="was tokenized with tokenizer .* but this blend's tokenizer is"):
        prepare_data(tok, tmp_path / "mixed", settings)
    report = prepare_data(tokenizer_dir, tmp_path / "mixed", settings)
    assert report["sources"]["packed"]["tokens"] == load_packed(tiny_data)[0].index["sources"][0]["tokens"]
    before = load_packed(tiny_data)[0]["train"].head(None)
    mixed = load_packed(tmp_path / "mixed")[0]["train"]
    reused = mixed.sequences(np.flatnonzero(mixed.source_of == 0)).tolist()
    assert len(reused) > len(before)  # half of a blend with more sequences than the prepared dataset: it repeats
    assert {tuple(x) for x in reused} == {tuple(x) for x in before.tolist()}


def test_a_killed_preparation_resumes_and_writes_the_same_shards(tokenizer_dir, tmp_path):
    """As on a cluster: SECATEURS_CHECKPOINTS on a volume that outlives the pod, and the retried pod writing its
    output to a new path, finds the work by what it prepares."""
    command = [sys.executable, "-m", "secateurs", "prepare-data", "--tokenizer", str(tokenizer_dir),
               "--source", "python-docs", "--seq-len", "64", "--shard-tokens", str(64 * 20), "--val-fraction", "0.1",
               "--batch-documents", "8"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole = subprocess.run(command + ["--out", str(tmp_path / "whole")], env=env, capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr[-2000:]

    env["SECATEURS_CHECKPOINTS"] = str(tmp_path / "volume")
    out = tmp_path / "pod-2" / "data"
    run = subprocess.Popen(command + ["--out", str(tmp_path / "pod-1" / "data")], env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and run.poll() is None and not (tmp_path / "volume").exists():
        time.sleep(0.05)
    (progress,) = (tmp_path / "volume").glob("prepare-data-*/progress.json") or [tmp_path / "volume" / "none"]
    while time.monotonic() < deadline and run.poll() is None:
        state = json.loads(progress.read_text()).get("sources", {}) if progress.exists() else {}
        if state.get("python-docs", {}).get("consumed", 0) >= 40:
            break
        time.sleep(0.05)
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert not (tmp_path / "pod-1" / "data").exists() and progress.exists(), "the run ended before the kill"
    killed_at = json.loads(progress.read_text())["sources"]["python-docs"]["consumed"]
    finished = [p for p in progress.parent.rglob("*.bin")]
    stamps = {p: p.stat().st_mtime_ns for p in finished}
    done = subprocess.run(command + ["--out", str(out)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((out / "secateurs.json").read_text())["report"]["resumed_after_documents"] == killed_at
    files = sorted(p.relative_to(out) for p in out.rglob("*.bin"))
    assert files == sorted(p.relative_to(tmp_path / "whole") for p in (tmp_path / "whole").rglob("*.bin"))
    for f in files:
        assert (out / f).read_bytes() == (tmp_path / "whole" / f).read_bytes(), f
    assert json.loads((out / "index.json").read_text()) == json.loads((tmp_path / "whole" / "index.json").read_text())
    # Shards finished before the kill were kept, not written again.
    for p, stamp in stamps.items():
        assert (out / p.relative_to(progress.parent)).stat().st_mtime_ns == stamp
    assert not progress.parent.exists()


def test_an_interrupted_preparation_resumes_from_its_work_directory_beside_the_output(tokenizer_dir, docs_dir,
                                                                                       tmp_path, monkeypatch):
    from secateurs.data import prepare as data  # the step's module, whose names prepare_data calls

    settings = DataConfig(source=str(docs_dir), seq_len=64, shard_tokens=64 * 16, batch_documents=2)
    prepare_data(tokenizer_dir, tmp_path / "whole", settings)
    write = data._write_progress

    def interrupted(work, progress):
        write(work, progress)
        if progress["sources"].get("docs", {}).get("consumed", 0) >= 10:
            raise KeyboardInterrupt  # as a kill right after a shard was recorded

    monkeypatch.setattr(data, "_write_progress", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(tokenizer_dir, tmp_path / "out", settings)
    assert (tmp_path / ".out.partial" / "progress.json").is_file() and not (tmp_path / "out").exists()
    monkeypatch.setattr(data, "_write_progress", write)
    report = prepare_data(tokenizer_dir, tmp_path / "out", settings)
    assert report["resumed_after_documents"] >= 10 and not (tmp_path / ".out.partial").exists()
    assert (tmp_path / "out" / "index.json").read_text() == (tmp_path / "whole" / "index.json").read_text()


def test_bad_data_inputs(tokenizer_dir, tmp_path):
    (tmp_path / "empty.txt").write_text("   \n\n  ")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(DataError, match="holds no text"):
        prepare_data(tokenizer_dir, out, DataConfig(source=str(tmp_path / "empty.txt"), seq_len=8))
    (tmp_path / "short.jsonl").write_text(json.dumps({"text": "just a few words"}))
    with pytest.raises(DataError, match="too few for one sequence of seq_len=64 for training and one for validation"):
        prepare_data(tokenizer_dir, out, DataConfig(source=str(tmp_path / "short.jsonl"), seq_len=64))
    with pytest.raises(DataError, match="does not exist"):
        prepare_data(tokenizer_dir, out, DataConfig(source=str(tmp_path / "missing.jsonl"), seq_len=8))
    (tmp_path / "x.jsonl").write_text(json.dumps({"content": "hello there"}))
    with pytest.raises(DataError, match="no text field 'text'"):
        prepare_data(tokenizer_dir, out, DataConfig(source=str(tmp_path / "x.jsonl"), seq_len=8))
    # A blend with one good source and one missing fails before the good one is tokenized.
    (tmp_path / "good.jsonl").write_text("\n".join(json.dumps({"text": f"words {i} " * 20}) for i in range(30)))
    with pytest.raises(DataError, match="missing.jsonl does not exist"):
        prepare_data(tokenizer_dir, out, DataConfig(sources=[str(tmp_path / "good.jsonl"), str(tmp_path / "missing.jsonl")], seq_len=8))
    assert not (tmp_path / ".out.partial").exists()
    assert [p.name for p in out.iterdir()] == ["keep"]
    with pytest.raises(DataError, match="not a dataset made by"):
        load_packed(tmp_path)


def test_altered_or_truncated_shards_are_refused_on_read(tokenizer_dir, tmp_path):
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": f"entry {i} " * 25}) for i in range(60)))
    out = tmp_path / "data"
    prepare_data(tokenizer_dir, out, DataConfig(source=str(tmp_path / "d.jsonl"), seq_len=16, shard_tokens=16 * 10))
    shard = out / "d" / "train-00001.bin"
    data = bytearray(shard.read_bytes())
    data[5] ^= 1
    shard.write_bytes(bytes(data))
    train = load_packed(out)[0]["train"]
    train.head(10)  # the first shard is intact
    with pytest.raises(DataError, match=r"shard .*train-00001.bin was altered after preparation"):
        train.head(11)
    with pytest.raises(DataError, match="was altered after preparation"):
        load_packed(out)[0]["train"].verify()
    shard.write_bytes(bytes(data[:-2]))
    with pytest.raises(DataError, match=r"train-00001.bin holds 318 bytes, expected 320: the dataset is truncated"):
        load_packed(out)


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


def test_a_work_directory_on_another_file_system_is_published(tmp_path):
    """On a cluster the work directory is on the cache volume and the output on the pod's disk."""
    import tempfile

    from secateurs.files import publish

    if os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("/dev/shm is on the same file system as the temp dir here")
    work = Path(tempfile.mkdtemp(dir="/dev/shm"))
    (work / "sub").mkdir()
    (work / "sub" / "shard.bin").write_bytes(b"\x01\x02")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old").write_text("replaced")
    publish(work, tmp_path / "out")
    assert not work.exists() and [p.name for p in (tmp_path / "out").iterdir()] == ["sub"]
    assert (tmp_path / "out" / "sub" / "shard.bin").read_bytes() == b"\x01\x02"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_published_artifact_is_readable_as_the_umask_allows(tmp_path):
    """transformers writes model.safetensors 0o600 and temporary directories are 0o700: an artifact left so could
    be read only by the uid that wrote it, not by the next step running under another uid of its group."""
    from secateurs.files import atomic_output

    old = os.umask(0o002)
    try:
        with atomic_output(tmp_path / "artifact") as tmp:
            (tmp / "sub").mkdir(mode=0o700)
            (tmp / "sub" / "model.safetensors").write_bytes(b"w")
            os.chmod(tmp / "sub" / "model.safetensors", 0o600)
    finally:
        os.umask(old)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in [tmp_path / "artifact", *(tmp_path / "artifact").rglob("*")]}
    assert modes == {"artifact": "0o775", "sub": "0o775", "model.safetensors": "0o664"}


def _same_sequences(a, b):
    """Every sequence of both splits, index by index."""
    for split in ("train", "validation"):
        assert len(a[split]) == len(b[split]) > 0, split
        assert a[split].head(None).tolist() == b[split].head(None).tolist(), split


def test_a_dataset_in_a_store_is_a_small_reference_to_shards_read_in_place(tokenizer_dir, docs_dir, tmp_path,
                                                                          monkeypatch):
    """With a store on a shared directory (a cluster's cache volume, which every step mounts) the shards are
    published there once, named by what was prepared, and the output (the KFP artifact) is the manifest and an index
    with their location and sha256: under 1 MB whatever the corpus, read in place by every reader."""
    from secateurs.data import prepare as data  # the step's module, whose names prepare_data calls

    settings = DataConfig(source=str(docs_dir), seq_len=32, val_fraction=0.2, shard_tokens=32 * 200)
    whole_report = prepare_data(tokenizer_dir, tmp_path / "whole", settings)
    whole = json.loads((tmp_path / "whole" / "index.json").read_text())
    store = tmp_path / "volume" / "datasets"
    report = prepare_data(tokenizer_dir, tmp_path / "artifact", settings, store=store)
    artifact = tmp_path / "artifact"
    files = [p for p in artifact.rglob("*") if p.is_file()]
    assert sorted(p.name for p in files) == ["index.json", "secateurs.json"]
    assert sum(p.stat().st_size for p in files) < 1 << 20
    assert sum(p.stat().st_size for p in (tmp_path / "whole").rglob("*.bin")) > 100_000  # what it leaves out
    # The store holds what a preparation without one writes, under the preparation's digest.
    (stored,) = store.iterdir()
    config = json.loads((artifact / "secateurs.json").read_text())["config"]
    assert stored.name == data._digest(config)[:16] and not list(store.parent.glob(".*"))
    index = json.loads((artifact / "index.json").read_text())
    assert index == {**whole, "location": str(stored)}
    assert json.loads((stored / "index.json").read_text()) == whole
    assert {k: v for k, v in report.items() if k != "resumed_after_documents"} == \
        {k: v for k, v in whole_report.items() if k != "resumed_after_documents"}
    dd = load_packed(artifact)[0]
    assert dd.root == stored and dd.path == artifact
    _same_sequences(dd, load_packed(tmp_path / "whole")[0])
    dd["train"].verify()
    # A prepared dataset given by reference is a source of a blend as any other.
    prepare_data(tokenizer_dir, tmp_path / "blend", DataConfig(sources=[str(artifact)], seq_len=32))
    assert load_packed(tmp_path / "blend")[0]["train"].head(None).tolist() == dd["train"].head(None).tolist()

    # A second preparation of the same settings reuses the store's copy: no source read, no shard rewritten.
    stamps = {p: p.stat().st_mtime_ns for p in stored.rglob("*")}

    def refused(*args, **kwargs):
        raise AssertionError("the store's copy was not reused")

    monkeypatch.setattr(data, "_prepare_source", refused)
    monkeypatch.setattr(data, "documents", refused)
    assert prepare_data(tokenizer_dir, tmp_path / "again", settings, store=store) == report
    assert (tmp_path / "again" / "index.json").read_text() == (artifact / "index.json").read_text()
    assert {p: p.stat().st_mtime_ns for p in stored.rglob("*")} == stamps

    # A shard altered in the store fails its reader in one line, naming it.
    shard = stored / whole["sources"][0]["shards"]["train"][0]["file"]
    original = shard.read_bytes()
    shard.write_bytes(bytes([original[0] ^ 1]) + original[1:])
    with pytest.raises(DataError, match=rf"^shard {stored}/docs/train-00000.bin was altered after preparation") as e:
        load_packed(artifact)[0]["train"].verify()
    assert "\n" not in str(e.value)
    # One cut short is refused on open, and is not reused: the next preparation writes it again.
    shard.write_bytes(original[:-2])
    with pytest.raises(DataError, match=r"train-00000.bin holds .* the dataset is truncated or damaged"):
        load_packed(artifact)
    monkeypatch.undo()
    prepare_data(tokenizer_dir, tmp_path / "again", settings, store=store)
    assert shard.read_bytes() == original
    _same_sequences(load_packed(tmp_path / "again")[0], load_packed(tmp_path / "whole")[0])
    # Where the store is not mounted, the reader says so.
    stored.rename(tmp_path / "elsewhere")
    with pytest.raises(DataError, match=rf"keeps its shards in {stored}, which this machine does not have"):
        load_packed(artifact)

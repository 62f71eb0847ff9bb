"""Data preparation and reading at scale, each figure a ratio against a baseline measured in the same run.

1. Peak RSS of `secateurs prepare-data` at `--small` and `--large` tokens of generated text (documents of sentences
   drawn from python-docs), and at their geometric mean to show where it levels off. Goal: large / small <= 1.2.
   The previous format's preparation (`--baseline`, a git revision run from a temporary worktree) is measured the
   same way, to show what it replaced. The same two sizes again as one `.txt` file (the same documents as
   blank-line separated paragraphs), the case where a whole file used to be one document. Goal: large / small <= 1.2.
2. Tokens per second of `prepare-data` against a plain `datasets` map of the same tokenizer over the same text, with
   the same number of processes. Goal: >= 0.9x.
3. Training input: seconds per step spent reading batches from the shards (the Trainer's own dataloader) against the
   whole training step on a tiny model, at the demo's 128-token sequences (the shortest steps, so the hardest
   case for reading). Goal: < 2%.
4. Shards against Arrow (`datasets.save_to_disk` of the same sequences): bytes on disk and random reads per second.

Then the time and disk for 94B tokens follow from the measured rate.

    python bench/data.py [--small 2e6] [--large 2e7] [--procs 1,2] [--baseline 1c71c21] [--out runs/bench/data.json]
    python bench/data.py --only peak-rss [--baseline '']   # 1. alone
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE_TOKENS = 94e9


def corpus(path: Path, tokens: float, tokenizer) -> Path:
    """Generated documents of ~`tokens` tokens: 2-40 sentences each, drawn from python-docs with a fixed seed."""
    from secateurs.data import python_docs_texts

    sentences = [s.strip() + "." for t in python_docs_texts() for s in t.split(". ") if 20 < len(s) < 400]
    sample = " ".join(sentences[:2000])
    chars_per_token = len(sample) / len(tokenizer(sample, add_special_tokens=False)["input_ids"])
    rng, written = random.Random(0), 0
    with open(path, "w") as f:
        while written < tokens * chars_per_token:
            text = " ".join(rng.choices(sentences, k=rng.randint(2, 40)))
            f.write(json.dumps({"text": text}) + "\n")
            written += len(text)
    return path


def text_file(jsonl: Path, path: Path) -> Path:
    """The documents of a `corpus` as one .txt file of blank-line separated paragraphs (a directory holding it)."""
    path.mkdir()
    with open(jsonl) as src, open(path / "corpus.txt", "w") as f:
        f.writelines(json.loads(line)["text"] + "\n\n" for line in src)
    return path


def measured(cmd: list[str], env: dict | None = None) -> dict:
    """Wall time and peak RSS of CMD, run under a fresh interpreter that reports its only child's peak."""
    probe = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
             "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
             "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", probe, *cmd], env=env, capture_output=True, text=True, check=True,
                          cwd=tempfile.gettempdir())  # fmt: skip
    seconds, kib = done.stdout.split()
    return {"seconds": float(seconds), "peak_rss_mib": int(kib) / 1024}


def prepare_cmd(tokenizer: Path, source: Path, out: Path, procs: int, seq_len: int) -> list[str]:
    return [sys.executable, "-m", "secateurs", "prepare-data", "--tokenizer", str(tokenizer), "--source", str(source),
            "--out", str(out), "--seq-len", str(seq_len), "--num-proc", str(procs)]  # fmt: skip


PLAIN_MAP = """
import sys, datasets
from transformers import AutoTokenizer
datasets.disable_caching()
tok = AutoTokenizer.from_pretrained(sys.argv[1])
ds = datasets.load_dataset("json", data_files=sys.argv[2], split="train", cache_dir=sys.argv[4])
ds.map(lambda b: tok(b["text"], add_special_tokens=False), batched=True, num_proc=int(sys.argv[3]) if sys.argv[3] != "1" else None,
       remove_columns=["text"])
"""


def baseline_tree(revision: str, tmp: Path) -> Path:
    tree = tmp / "baseline"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), revision], check=True,
                   capture_output=True)  # fmt: skip
    for name in ("components", "pipelines"):
        (tree / "secateurs" / name).symlink_to(tree / name)
    return tree


def input_share(tokenizer: Path, data: Path, tmp: Path, steps: int = 50) -> dict:
    """Seconds per step reading batches through the Trainer's dataloader, and seconds per whole training step."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, TrainingArguments, default_data_collator

    from secateurs.checkpoint import load_tokenizer
    from secateurs.data import load_packed
    from secateurs.train import LMTrainer

    torch.set_num_threads(os.cpu_count() or 1)
    vocab = len(load_tokenizer(tokenizer))
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=8)  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    train = load_packed(data)[0]["train"]
    train.verify()
    args = TrainingArguments(output_dir=str(tmp / "trainer"), max_steps=steps, per_device_train_batch_size=8,
                             use_cpu=True, report_to=[], save_strategy="no", logging_steps=steps,
                             disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0)  # fmt: skip
    trainer = LMTrainer(model=model, args=args, train_dataset=train, data_collator=default_data_collator)
    loader = trainer.get_train_dataloader()
    start = time.perf_counter()
    for i, _ in zip(range(steps), loader):
        pass
    read = (time.perf_counter() - start) / steps
    result = trainer.train()
    step = result.metrics["train_runtime"] / steps
    return {"read_s_per_step": read, "step_s": step, "share": read / step, "micro_batch": 8,
            "seq_len": train.seq_len, "model_parameters": sum(p.numel() for p in model.parameters())}


def arrow_against_shards(data: Path, tmp: Path, reads: int = 20000) -> dict:
    """The same training sequences as Arrow (`datasets`, torch format) and as shards: disk and random reads/s."""
    import datasets
    import numpy as np

    from secateurs.data import load_packed

    train = load_packed(data)[0]["train"]
    train.verify()
    arrow_dir = tmp / "arrow"
    datasets.Dataset.from_dict({"input_ids": train.head(None).numpy()}).save_to_disk(str(arrow_dir))
    arrow = datasets.load_from_disk(str(arrow_dir)).with_format("torch")
    order = np.random.default_rng(0).integers(0, len(train), reads)
    rates = {}
    for name, ds in (("shards", train), ("arrow", arrow)):
        start = time.perf_counter()
        for i in order:
            ds[int(i)]["input_ids"]
        rates[name] = reads / (time.perf_counter() - start)
    sizes = {"shards": sum(p.stat().st_size for p in data.rglob("train-*.bin")),
             "arrow": sum(p.stat().st_size for p in arrow_dir.rglob("*.arrow"))}  # fmt: skip
    return {"reads_per_s": rates, "bytes": sizes, "read_ratio": rates["shards"] / rates["arrow"],
            "size_ratio": sizes["shards"] / sizes["arrow"]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=float, default=2e6)
    parser.add_argument("--large", type=float, default=2e7)
    parser.add_argument("--procs", default="1,2", help="tokenizer process counts to compare")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--baseline", default="1c71c21", help="revision with the previous format ('' skips it)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer dir (default: SmolLM2-135M's, imported)")
    parser.add_argument("--out", default=None, help="results (default: runs/bench/data.json, or data-<only>.json)")
    parser.add_argument("--only", choices=["peak-rss"], help="measure only this (1.)")
    args = parser.parse_args()
    args.out = args.out or f"runs/bench/data{'-' + args.only if args.only else ''}.json"

    from secateurs.checkpoint import import_model, load_tokenizer

    results: dict = {"tokens": {"small": args.small, "large": args.large}, "seq_len": args.seq_len}
    with tempfile.TemporaryDirectory(prefix="bench-data-") as name:
        tmp = Path(name)
        tokenizer = Path(args.tokenizer) if args.tokenizer else tmp / "smollm2"
        if not args.tokenizer:
            import_model("smollm2-135m", tokenizer)
        tok = load_tokenizer(tokenizer)
        sizes = {"small": args.small, "mid": (args.small * args.large) ** 0.5, "large": args.large}
        texts = {size: corpus(tmp / f"{size}.jsonl", n, tok) for size, n in sizes.items()}
        env = {**os.environ, "PYTHONPATH": str(ROOT)}

        # 1. Peak memory against the corpus size, one tokenizer process: the documents as paragraphs of one .txt
        # file, then as many documents (a .jsonl file).
        one_file = {}
        for size in ("small", "large"):
            source = text_file(texts[size], tmp / f"txt-{size}")
            one_file[size] = measured(prepare_cmd(tokenizer, source, tmp / f"rss-txt-{size}", 1, args.seq_len), env)
            report = json.loads((tmp / f"rss-txt-{size}" / "secateurs.json").read_text())["report"]
            one_file[size].update(tokens=report["sources"][f"txt-{size}"]["tokens"], documents=report["documents"])
            print(f"prepare-data, one .txt file, {size}: {one_file[size]['peak_rss_mib']:.0f} MiB peak, "
                  f"{one_file[size]['tokens']:,} tokens in {one_file[size]['documents']:,} paragraphs, "
                  f"{one_file[size]['seconds']:.1f} s")  # fmt: skip
        one_file["ratio"] = one_file["large"]["peak_rss_mib"] / one_file["small"]["peak_rss_mib"]
        results["peak_rss_one_text_file"] = one_file
        print(f"peak RSS large/small, one .txt file: x{one_file['ratio']:.2f} (goal <= 1.2)")
        rss = {}
        for size, text in texts.items():
            rss[size] = measured(prepare_cmd(tokenizer, text, tmp / f"rss-{size}", 1, args.seq_len), env)
            print(f"prepare-data, {size}: {rss[size]['peak_rss_mib']:.0f} MiB peak, {rss[size]['seconds']:.1f} s")
        rss["ratio"] = rss["large"]["peak_rss_mib"] / rss["small"]["peak_rss_mib"]
        tokens = json.loads((tmp / "rss-large" / "secateurs.json").read_text())["report"]["sources"]["large"]["tokens"]
        results["tokens"]["large_measured"] = tokens
        if args.baseline:
            tree = baseline_tree(args.baseline, tmp)
            try:
                old_env = {**os.environ, "PYTHONPATH": str(tree)}
                for size, text in ((s, texts[s]) for s in ("small", "large")):
                    rss[f"baseline_{size}"] = measured(prepare_cmd(tokenizer, text, tmp / f"old-{size}", 1, args.seq_len)[:-2], old_env)
                    print(f"baseline {args.baseline}, {size}: {rss[f'baseline_{size}']['peak_rss_mib']:.0f} MiB peak")
                rss["baseline_ratio"] = rss["baseline_large"]["peak_rss_mib"] / rss["baseline_small"]["peak_rss_mib"]
            finally:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
        results["peak_rss"] = rss
        print(f"peak RSS large/small: x{rss['ratio']:.2f} (goal <= 1.2)"
              + (f"; baseline x{rss['baseline_ratio']:.2f}" if args.baseline else ""))  # fmt: skip
        if args.only == "peak-rss":
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(results, indent=1))
            return

        # 2. Throughput against a plain datasets map, same processes, over the large corpus.
        throughput = {}
        for procs in (int(p) for p in args.procs.split(",")):
            ours = measured(prepare_cmd(tokenizer, texts["large"], tmp / f"tp-{procs}", procs, args.seq_len), env)
            plain = measured([sys.executable, "-c", PLAIN_MAP, str(tokenizer), str(texts["large"]), str(procs),
                              str(tmp / f"hf-cache-{procs}")], env)  # fmt: skip
            throughput[procs] = {"prepare_data_tokens_per_s": tokens / ours["seconds"],
                                 "datasets_map_tokens_per_s": tokens / plain["seconds"],
                                 "ratio": plain["seconds"] / ours["seconds"]}  # fmt: skip
            print(f"{procs} process(es): prepare-data {tokens / ours['seconds']:,.0f} tokens/s, datasets map "
                  f"{tokens / plain['seconds']:,.0f} tokens/s: x{throughput[procs]['ratio']:.2f} (goal >= 0.9)")
        results["throughput"] = throughput

        # 3. and 4. Reading.
        subprocess.run(prepare_cmd(tokenizer, texts["small"], tmp / "seq128", 1, 128), env=env, check=True,
                       capture_output=True)  # fmt: skip
        results["input"] = input_share(tokenizer, tmp / "seq128", tmp)
        print(f"training input: {1e3 * results['input']['read_s_per_step']:.2f} ms of a "
              f"{1e3 * results['input']['step_s']:.1f} ms step: {100 * results['input']['share']:.2f}% (goal < 2%)")
        results["format"] = arrow_against_shards(tmp / "rss-large", tmp)
        f = results["format"]
        print(f"shards against Arrow: x{f['read_ratio']:.1f} random reads/s, x{f['size_ratio']:.2f} bytes")

    best = max(throughput.values(), key=lambda t: t["prepare_data_tokens_per_s"])
    rate = best["prepare_data_tokens_per_s"]
    procs = max(throughput, key=lambda p: throughput[p]["prepare_data_tokens_per_s"])
    results["recipe_estimate"] = {
        "tokens": RECIPE_TOKENS, "tokens_per_s": rate, "processes": procs,
        "hours_at_measured_rate": RECIPE_TOKENS / rate / 3600,
        "disk_gb_uint16": RECIPE_TOKENS * 2 / 1e9, "disk_gb_uint32": RECIPE_TOKENS * 4 / 1e9,
    }  # fmt: skip
    e = results["recipe_estimate"]
    print(f"94B tokens: {e['hours_at_measured_rate']:,.0f} h at {rate:,.0f} tokens/s ({procs} processes); "
          f"{e['disk_gb_uint16']:.0f} GB of shards (vocabulary < 65,536) or {e['disk_gb_uint32']:.0f} GB (Llama 3)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

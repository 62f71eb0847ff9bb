"""Our distillation step side by side with the peers a user would pick instead: one run, four implementations.

- ours:  `secateurs.train.distill` (transformers' Trainer, the fused chunked KD loss of `secateurs.losses`);
- nemo:  NeMo AutoModel's KD recipe (nemo-automodel 0.7.0, nemo_automodel/recipes/llm/kd.py), kd_ratio=1;
- trl:   TRL's GKDTrainer (trl 1.16.0) with lmbda=0 (off-policy: never generates) and beta=0 (forward KL);
- plain: a plain PyTorch loop: forward both models, full-vocabulary KL, backward.

The same teacher (SmolLM2-135M, uncorrected), the same pruned students (width; depth), the same sequences at the
same step (the order a Trainer with data_seed=seed draws; ours and TRL draw it themselves and the order they drew
is checked), AdamW (fused, betas 0.9/0.999, eps 1e-8), linear warm-up from 0 then cosine to min_lr, the same
global batch, steps, fp32 and temperature, forward KL only. Each peer runs in its own virtual environment under
.cache/peers/<name>, created here on first use (torch==2.13.0 first, then the peer with a constraints file pinning
that torch). ours and plain run in this environment. Measured per implementation: the training KL per step, the
validation loss (`peer_run.validation_loss`, the same code for all) at the same steps, tokens/s (median of the
steps after warm-up), peak RSS per process, at 1 process (3 seeds) and 2 processes (gloo: DDP; NeMo: its FSDP2).

    python bench/peers.py                                   # the default setting: 20 runs, 8 minutes (docs/peers.md)
    python bench/peers.py --steps 2 --seeds 0 --processes 1 --students width --impls plain,ours   # a smoke run

Writes bench/results/cpu/peers.json and docs/images/peers.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
PEERS = ROOT / ".cache" / "peers"
IMPLS = ["ours", "nemo", "nemo-loss", "trl", "plain"]
# NeMo AutoModel's recipe builds its models on CUDA only (bench/peer_run.py `run_nemo`); on CPU its KDLoss and LR
# scheduler run in the plain loop instead (`nemo-loss`).
DEFAULT_IMPLS = {"cpu": "ours,nemo-loss,trl,plain", "cuda": "ours,nemo,trl,plain"}
VENV_OF = {"nemo": "nemo", "nemo-loss": "nemo", "trl": "trl"}
# Each peer's pins. torch==2.13.0 is the only torch this machine installs as a CPU build; every other version pulls
# a multi-GB CUDA build, so each environment gets it first and a constraints file keeps it.
VENVS = {"nemo": ["nemo-automodel==0.7.0"], "trl": ["trl==1.16.0"]}
TORCH = "torch==2.13.0"
# Removed after installing: flashoptim (a nemo-automodel dependency) pulls triton 3.9, whose autotuner rejects the
# `key` of nemo_automodel/components/_peft/lora_kernel.py at import ("key contains names that are not kernel
# arguments: S"); without triton that module takes its own no-triton path (HAVE_TRITON = False), as on any CPU box.
UNINSTALL = {"nemo": ["triton"]}
# The width student of bench/kd_vs_ce.py (half the hidden and MLP widths, 6 of 9 heads) and a depth student
# keeping 20 of 30 layers.
STUDENTS = {
    "width": {"hidden_size": 384, "ffn_hidden_size": 1024, "num_attention_heads": 6},
    "depth": {"num_layers": 20},
}
# Random-weight Llama shapes for the GPU setting: teacher, and each student as overrides of it. The 8B teacher and
# the Llama-3.1-Minitron-4B-Width/-Depth shapes (arXiv 2408.11796) need ~100 GB with full-vocabulary peers (the
# student's fp32 weights, gradients and AdamW state alone are 72 GB): an H200. Llama-3.2-3B shapes fit an H100.
_LLAMA = {"num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
          "rope_theta": 500000.0, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5}
RANDOM_SHAPES = {
    "llama31-8b": {"teacher": {**_LLAMA, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32},
                   "width": {"hidden_size": 3072, "intermediate_size": 9216}, "depth": {"num_hidden_layers": 16}},
    "llama32-3b": {"teacher": {**_LLAMA, "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28,
                               "num_attention_heads": 24},
                   "width": {"hidden_size": 2048, "intermediate_size": 6144}, "depth": {"num_hidden_layers": 14}},
    "tiny": {"teacher": {**_LLAMA, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4,
                         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 49152},
             "width": {"hidden_size": 96, "intermediate_size": 192}, "depth": {"num_hidden_layers": 2}},
}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # The default: 20 runs (4 implementations x 3 seeds, 2 processes, the depth student), most of each its
    # start-up and model loading: 7 min 44 s in all on a quiet 2-core machine, 18-29 s a run (docs/peers.md), once
    # the peers' environments exist (about 4 minutes the first time). Other work on the cores makes it minutes a run.
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--global-batch", type=int, default=4, help="sequences per optimizer step")
    parser.add_argument("--micro-batch", type=int, default=2, help="sequences per forward pass and process")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--min-lr", type=float, default=5e-5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--eval-every", type=int, default=4)
    parser.add_argument("--val-sequences", type=int, default=8)
    parser.add_argument("--warmup-steps-untimed", type=int, default=2, help="steps left out of the tokens/s median")
    parser.add_argument("--seeds", default="0,1,2", help="seeds of the 1-process width runs")
    parser.add_argument("--processes", default="1,2")
    parser.add_argument("--students", default="width,depth", help="depth runs at 1 process, the first seed")
    parser.add_argument("--impls", default=None, help=f"comma list of {IMPLS} (default: {DEFAULT_IMPLS})")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--random-shapes", choices=["auto", *RANDOM_SHAPES], default=None,
                        help="random-weight teacher and students of these shapes instead of SmolLM2 and its pruned "
                        "students (for speed and memory at GPU scale; auto: by the GPU's memory)")
    parser.add_argument("--peer-site", action="append", default=[], metavar="NAME=DIR",
                        help="run peer environment NAME (nemo, trl) with this python and DIR first on PYTHONPATH "
                        "instead of creating .cache/peers/NAME (a machine without network: bench/gpu_check.sh)")
    parser.add_argument("--work", type=Path, default=PEERS / "work")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/cpu/peers.json")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs/images/peers.png")
    parser.add_argument("--timeout", type=int, default=900, help="seconds one run may take")
    args = parser.parse_args()
    args.impls = args.impls or DEFAULT_IMPLS[args.device]
    if args.random_shapes == "auto":
        import torch

        memory = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else 0
        args.random_shapes = "llama31-8b" if memory > 120 * 2**30 else "llama32-3b" if memory else "tiny"
    impls, seeds = args.impls.split(","), [int(s) for s in args.seeds.split(",")]
    unknown = sorted(set(impls) - set(IMPLS))
    if unknown:
        sys.exit(f"--impls: unknown {unknown}; choose from {IMPLS}")
    if args.global_batch % args.micro_batch or args.global_batch % (2 * args.micro_batch):
        sys.exit(f"--global-batch {args.global_batch} must be a multiple of 2 x --micro-batch {args.micro_batch}")

    sites = dict(item.split("=", 1) for item in args.peer_site)
    if not 0 <= args.warmup < args.steps:
        # NeMo's OptimizerParamScheduler asserts lr_warmup_steps < lr_decay_steps (components/optim/scheduler.py).
        sys.exit(f"--warmup {args.warmup} must be below --steps {args.steps}")
    pythons = {impl: peer_python(impl, sites) for impl in impls}
    work = prepare(args)
    runs = []
    versions = peer_versions(pythons)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for student, processes, seed in plan(args, seeds):
        tokens = write_tokens(work, args, seed)
        for impl in impls:
            python, site = pythons[impl]
            runs.append(run_one(impl, python, site, student, processes, seed, tokens, work, args))
            # Written after every run: a long run cut short keeps what it measured.
            report = summarise(runs, args, impls, versions)
            args.out.write_text(json.dumps(report, indent=1) + "\n")
    print_table(report)
    print(f"wrote {args.out}")
    plot(report, args.plot)
    failed = [r["name"] for r in runs if r.get("error")]
    if failed:
        print(f"failed runs: {failed}", file=sys.stderr)
    return 1 if failed else 0


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def plan(args, seeds: list[int]) -> list[tuple[str, int, int]]:
    """(student, processes, seed) of every run: width at 1 process for each seed, width at 2 processes for the
    first seed, depth at 1 process for the first seed."""
    students, processes = args.students.split(","), [int(p) for p in args.processes.split(",")]
    runs = []
    if "width" in students:
        runs += [("width", 1, s) for s in seeds] if 1 in processes else []
        runs += [("width", p, seeds[0]) for p in processes if p > 1]
    if "depth" in students and 1 in processes:
        runs.append(("depth", 1, seeds[0]))
    return runs


# ---- environments ----------------------------------------------------------------------------------------------


def peer_python(impl: str, sites: dict[str, str]) -> tuple[Path, str | None]:
    """The python that runs IMPL and a directory to put first on its PYTHONPATH: this python for ours and plain;
    for a peer, its environment under .cache/peers (made here), or this python with the peer's `--peer-site`."""
    if impl not in VENV_OF:
        return Path(sys.executable), None
    name = VENV_OF[impl]
    if name in sites:
        return Path(sys.executable), sites[name]
    venv = PEERS / name
    marker = venv / "secateurs-pins.txt"
    pins = "\n".join([TORCH, *VENVS[name]])
    if not marker.exists() or marker.read_text() != pins:
        log(f"creating {venv} ({', '.join(VENVS[name])}); minutes")
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        pip = [str(venv / "bin/python"), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, TORCH], check=True)
        constraints = venv / "constraints.txt"
        constraints.write_text(TORCH + "\n")
        subprocess.run([*pip, "-c", str(constraints), *VENVS[name]], check=True)
        if UNINSTALL.get(name):
            subprocess.run([str(venv / "bin/python"), "-m", "pip", "uninstall", "-y", "-q", *UNINSTALL[name]],
                           check=True)  # fmt: skip
        marker.write_text(pins)
    return venv / "bin/python", None


def installed_versions(python: Path, site: str | None, names: list[str]) -> dict:
    code = ("import json, importlib.metadata as m; print(json.dumps({n: m.version(n) for n in %r}))" % names)
    env = {**os.environ, **({"PYTHONPATH": site} if site else {})}
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True, env=env)
    return json.loads(done.stdout)


# ---- inputs ----------------------------------------------------------------------------------------------------


def prepare(args) -> Path:
    """Teacher, data and the pruned students under args.work (kept between runs: preparing is minutes)."""
    from secateurs import prune
    from secateurs.checkpoint import import_model
    from secateurs.config import DataConfig, ImportanceConfig
    from secateurs.data import prepare_data
    from secateurs.chain import prune_student

    smollm2 = args.work / "teacher"
    if not smollm2.exists():
        import_model("smollm2-135m", smollm2)
    work, teacher = args.work, smollm2
    if args.random_shapes:
        work = args.work / f"random-{args.random_shapes}"
        teacher = work / "teacher"
        make_random_models(work, args.random_shapes, args.students.split(","), smollm2)
    # Enough training sequences that every run stays within the sampler's first epoch.
    needed = args.steps * args.global_batch + args.val_sequences
    data = work / f"data-{args.seq_len}-{needed}"
    if not data.exists():
        sequences = int(needed * 1.25) + 8
        settings = DataConfig(source="python-docs", seq_len=args.seq_len, max_tokens=args.seq_len * sequences,
                              val_fraction=0.1)  # fmt: skip
        prepare_data(teacher, data, settings)
    if args.random_shapes:
        return work
    # The students are pruned once, from importance scored on a calibration set of their own (the same whatever
    # --steps or --seq-len say), and kept: every run of every implementation starts from these weights.
    calibration = work / "calibration"
    if not calibration.exists():
        prepare_data(teacher, calibration, DataConfig(source="python-docs", seq_len=128, max_tokens=128 * 40,
                                                      val_fraction=0.1))  # fmt: skip
    # Small on purpose (a few minutes on 2 cores): the comparison needs fixed students, not the best ones.
    scoring = ImportanceConfig(samples=16, batch_size=8, block_sizes=[29], depth_samples=2)
    for name in args.students.split(","):
        if not student_dir(work, name).exists():
            prune_student(teacher, calibration, work / "students", prune.PruneTarget(**STUDENTS[name]), scoring,
                          name=name)  # fmt: skip
    return work


def make_random_models(work: Path, shapes: str, students: list[str], smollm2: Path) -> None:
    """Random-weight Llama teacher and students of RANDOM_SHAPES[shapes], with SmolLM2's tokenizer (token ids below
    its 49,152 are valid in any of these vocabularies); kept in WORK."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from secateurs.checkpoint import load_tokenizer

    tokenizer = load_tokenizer(smollm2)
    shape = RANDOM_SHAPES[shapes]
    for name, overrides in [("teacher", {}), *[(s, shape[s]) for s in students]]:
        out = work / "teacher" if name == "teacher" else student_dir(work, name)
        if out.exists():
            continue
        config = LlamaConfig(**{**shape["teacher"], **overrides}, tie_word_embeddings=False, use_cache=False)
        torch.manual_seed(0)
        # bf16 on disk (what a GPU run loads the teacher in; the students are read into fp32 weights).
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        del model



def student_dir(work: Path, name: str) -> Path:
    return work / "students" / name


def trainer_order(n: int, seed: int) -> list[int]:
    """The order in which a stock transformers Trainer with data_seed=SEED draws a map-style dataset of N items
    (accelerate's SeedableRandomSampler), read from the Trainer's own dataloader."""
    import tempfile

    import torch
    from transformers import Trainer, TrainingArguments

    class Index(torch.utils.data.Dataset):
        def __len__(self):
            return n

        def __getitem__(self, i):
            return {"index": i}

    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(output_dir=tmp, per_device_train_batch_size=1, seed=seed, data_seed=seed,
                                  use_cpu=True, report_to=[], remove_unused_columns=False)  # fmt: skip
        loader = Trainer(model=torch.nn.Linear(1, 1), args=targs, train_dataset=Index()).get_train_dataloader()
        return [int(b["index"][0]) for b in loader]


def write_tokens(work: Path, args, seed: int) -> dict:
    """The token files every run of SEED reads: the training split as stored, the rows each step uses in order,
    and the validation sequences."""
    from secateurs.data import load_packed

    data = next(work.glob(f"data-{args.seq_len}-{args.steps * args.global_batch + args.val_sequences}"))
    dd = load_packed(data)[0]
    split = dd["train"].head(None).numpy()
    order = trainer_order(len(split), seed)
    steps_rows = order[: args.steps * args.global_batch]
    paths = {"data": str(data), "order": steps_rows,
             "train_split_tokens": work / "train_split.npy", "train_tokens": work / f"train_seed{seed}.npy",
             "val_tokens": work / "val.npy"}  # fmt: skip
    np.save(paths["train_split_tokens"], split)
    np.save(paths["train_tokens"], split[steps_rows])
    np.save(paths["val_tokens"], dd["validation"].spread(args.val_sequences).numpy())
    return {k: str(v) if isinstance(v, Path) else v for k, v in paths.items()}


# ---- one run ---------------------------------------------------------------------------------------------------


def run_one(impl, python, site, student, processes, seed, tokens, work, args) -> dict:
    name = f"{impl}-{student}-p{processes}-seed{seed}"
    out = work / "runs" / name
    if out.exists():
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True)
    cores = os.cpu_count() or 1
    eval_steps = sorted({*range(args.eval_every, args.steps + 1, args.eval_every), args.steps})
    spec = {
        "teacher": str(work / "teacher"), "student": str(student_dir(work, student)), "data": tokens["data"],
        "train_tokens": tokens["train_tokens"], "train_split_tokens": tokens["train_split_tokens"],
        "val_tokens": tokens["val_tokens"], "steps": args.steps, "global_batch": args.global_batch,
        "micro_batch": args.micro_batch, "lr": args.lr, "min_lr": args.min_lr, "warmup": args.warmup,
        "weight_decay": 0.0, "max_grad_norm": args.max_grad_norm, "temperature": args.temperature, "seed": seed,
        "eval_steps": eval_steps, "out": str(out), "parallelism": "ddp", "nemo_strategy": "fsdp2",
        "device": args.device,
        "threads_per_process": max(1, cores // processes),
    }  # fmt: skip
    (out / "spec.json").write_text(json.dumps(spec, indent=1))
    runner = str(ROOT / "bench" / "peer_run.py")
    if processes == 1:
        command = [str(python), runner, impl, str(out / "spec.json")]
    else:
        command = [str(python), "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
                   runner, impl, str(out / "spec.json")]  # fmt: skip
    path = os.pathsep.join([*([site] if site else []), str(ROOT)])
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads_per_process"]), "PYTHONPATH": path,
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}  # fmt: skip
    log(f"{name}: running")
    started = time.perf_counter()
    with open(out / "log.txt", "w") as logfile:
        try:
            rc = subprocess.run(command, env=env, stdout=logfile, stderr=subprocess.STDOUT, timeout=args.timeout,
                                cwd=out).returncode  # fmt: skip
        except subprocess.TimeoutExpired:
            rc = "timeout"
    wall = time.perf_counter() - started
    ranks = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    run = {"name": name, "impl": impl, "student": student, "processes": processes, "seed": seed,
           "wall_seconds": wall, "spec": {k: v for k, v in spec.items() if k not in ("out",)}}  # fmt: skip
    if rc != 0 or len(ranks) != processes:
        tail = (out / "log.txt").read_text()[-3000:]
        run["error"] = f"exit {rc}, {len(ranks)} of {processes} result files; log tail:\n{tail}"
        log(f"{name}: FAILED ({rc}); see {out / 'log.txt'}")
        return run
    main_rank = ranks[0]
    timed = main_rank["step_seconds"][args.warmup_steps_untimed :] or main_rank["step_seconds"]
    step_s = statistics.median(timed)
    run.update({
        "train_kl": main_rank["train_kl"], "lr": main_rank["lr"], "validation": main_rank["validation"],
        "step_seconds": main_rank["step_seconds"], "median_step_seconds": step_s,
        "tokens_per_s": args.global_batch * args.seq_len / step_s,
        "peak_rss_mib": [r["peak_rss_mib"] for r in ranks], "notes": main_rank["notes"],
        "peak_cuda_mib": [r.get("peak_cuda_mib") for r in ranks],
    })  # fmt: skip
    if main_rank["order"] is not None:
        run["order_matches"] = order_matches([r["order"] for r in ranks], tokens["order"], args.global_batch)
    log(f"{name}: {wall:.0f} s, KL {run['train_kl'][0]:.3f} -> {run['train_kl'][-1]:.3f}, "
        f"{run['tokens_per_s']:.0f} tokens/s")  # fmt: skip
    return run


def order_matches(rank_orders: list[list[int]], expected: list[int], global_batch: int) -> bool:
    """Whether each optimizer step of a Trainer-based run used exactly the rows EXPECTED gives that step: the
    processes' own orders, dealt micro-batch by micro-batch, joined step by step."""
    per_process = global_batch // len(rank_orders)
    steps = len(expected) // global_batch
    for k in range(steps):
        used = sorted(i for order in rank_orders for i in order[k * per_process : (k + 1) * per_process])
        if used != sorted(expected[k * global_batch : (k + 1) * global_batch]):
            return False
    return True


# ---- results ---------------------------------------------------------------------------------------------------


def peer_versions(pythons: dict) -> dict:
    versions = {}
    for impl, (python, site) in pythons.items():
        names = {"ours": ["torch", "transformers", "accelerate"], "plain": ["torch", "transformers"],
                 "trl": ["torch", "transformers", "accelerate", "trl"],
                 "nemo": ["torch", "transformers", "nemo-automodel"],
                 "nemo-loss": ["torch", "transformers", "nemo-automodel"]}[impl]  # fmt: skip
        try:
            versions[impl] = installed_versions(python, site, names)
        except subprocess.CalledProcessError as error:
            versions[impl] = {"error": error.stderr[-300:]}
    return versions


def summarise(runs: list[dict], args, impls: list[str], versions: dict) -> dict:
    ok = [r for r in runs if not r.get("error")]
    summary = {}
    for impl in impls:
        width1 = [r for r in ok if r["impl"] == impl and r["student"] == "width" and r["processes"] == 1]
        if not width1:
            continue
        last = [r["validation"][str(args.steps)] for r in width1]
        kl_last = [r["train_kl"][-1] for r in width1]
        entry = {
            "tokens_per_s_1p": statistics.median(r["tokens_per_s"] for r in width1),
            "peak_rss_mib_1p": statistics.median(max(r["peak_rss_mib"]) for r in width1),
            **({"peak_cuda_mib_1p": statistics.median(max(r["peak_cuda_mib"]) for r in width1)}
               if args.device == "cuda" else {}),
            "final_validation_mean": statistics.mean(last),
            "final_validation_spread": max(last) - min(last),
            "final_train_kl_mean": statistics.mean(kl_last),
            "final_train_kl_spread": max(kl_last) - min(kl_last),
        }
        for r in ok:
            if r["impl"] == impl and r["student"] == "width" and r["processes"] > 1:
                entry[f"tokens_per_s_{r['processes']}p"] = r["tokens_per_s"]
                entry[f"peak_rss_mib_per_process_{r['processes']}p"] = max(r["peak_rss_mib"])
            if r["impl"] == impl and r["student"] == "depth":
                entry["depth_final_validation"] = r["validation"][str(args.steps)]
                entry["depth_tokens_per_s"] = r["tokens_per_s"]
        summary[impl] = entry
    ratios = {}
    if "ours" in summary:
        for impl, entry in summary.items():
            if impl == "ours":
                continue
            ratios[f"ours/{impl}"] = {
                key: summary["ours"][key] / entry[key]
                for key in entry
                if key in summary["ours"] and key.startswith(("tokens_per_s", "peak_rss", "peak_cuda"))
            }  # fmt: skip
    return {
        "command": " ".join(["python", "bench/peers.py", *sys.argv[1:]]),
        "machine": {"processor": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version()},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "versions": versions, "summary": summary, "ratios": ratios, "runs": runs,
    }  # fmt: skip


def print_table(report: dict) -> None:
    summary, ratios = report["summary"], report["ratios"]
    keys = sorted({k for entry in summary.values() for k in entry})
    print(f"{'':38}" + "".join(f"{impl:>12}" for impl in summary))
    for key in keys:
        cells = [summary[impl].get(key) for impl in summary]
        print(f"{key:38}" + "".join(f"{c:>12.4g}" if c is not None else f"{'-':>12}" for c in cells))
    for name, values in ratios.items():
        print(name + ": " + ", ".join(f"{k} x{v:.3f}" for k, v in values.items()))


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"ours": "C0", "nemo": "C2", "nemo-loss": "C2", "trl": "C1", "plain": "C7"}
    # Ours, NeMo's loss and the plain loop compute the same KL: dashes keep the lines drawn over each other visible.
    styles = {"ours": "-", "nemo": "--", "nemo-loss": "--", "trl": "-", "plain": ":"}
    fig, (kl_ax, val_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for run in report["runs"]:
        if run.get("error") or run["student"] != "width" or run["processes"] != 1:
            continue
        label = run["impl"] if run["seed"] == report["runs"][0]["seed"] else None
        steps = range(1, len(run["train_kl"]) + 1)
        kl_ax.plot(steps, run["train_kl"], styles[run["impl"]], color=colours[run["impl"]], alpha=0.7,
                   label=label)  # fmt: skip
        points = sorted((int(k), v) for k, v in run["validation"].items())
        val_ax.plot([p[0] for p in points], [p[1] for p in points], "o" + styles[run["impl"]],
                    color=colours[run["impl"]], alpha=0.7, label=label)  # fmt: skip
    kl_ax.set(xlabel="optimizer step", ylabel="training KL(teacher || student), nats/token", yscale="log")
    val_ax.set(xlabel="optimizer step", ylabel="validation cross-entropy, nats/token")
    for ax in (kl_ax, val_ax):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle("SmolLM2-135M -> width student, 1 process, each seed a line")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())

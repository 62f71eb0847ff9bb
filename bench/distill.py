"""Benchmark one distillation step: the memory-lean KD loss against the naive full-logits KL, same run.

A step is: teacher forward under no_grad, student forward + backward, AdamW step, at one micro-batch. Methods:
- naive:   both models return full-vocabulary logits ([tokens, V] each), loss = `losses.forward_kl`.
- chunked: both models return final hidden states, loss = `losses.chunked_kd_loss` (LM heads fused, chunked).
- liger:   same, through Liger-Kernel's fused linear JSD at beta=0 (CUDA with liger_kernel only).
"ours" is what `losses.fused_kd_loss` picks by default (`kd_backend="auto"`: chunked); liger is measured beside it
wherever it can run (CUDA with liger_kernel).

Models are `LlamaForCausalLM` built from a `LlamaConfig` with random weights (no download). Before timing, every
method computes the loss and gradients at the same weights and they are compared (exit code 1 on disagreement).
Prints a table and the ratios ours/naive, and writes everything as JSON to --out.

    python bench/distill.py --preset tiny --out runs/distill-tiny.json                    # CPU
    python bench/distill.py --preset llama31-8b-4b-width --out out/distill-8b.json       # one H100/H200
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from secateurs import losses
from secateurs.families import compile_decoder_layers

# Teacher shapes; the student is the teacher with the `student` overrides (a width-pruned student keeps heads,
# KV groups, head_dim and depth; hidden and MLP widths shrink).
PRESETS = {
    "tiny": {
        "teacher": {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 4,
                        "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 32000},
        "student": {"hidden_size": 192, "intermediate_size": 768},
        "batch": 2, "seq_len": 512, "dtype": "float32", "gradient_checkpointing": False, "chunk_size": 256,
    },
    # Llama-3.1-8B teacher and the Llama-3.1-Minitron-4B-Width student shape (arXiv 2408.11796).
    "llama31-8b-4b-width": {
        "teacher": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                        "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "rope_theta": 500000.0,
                        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5},
        "student": {"hidden_size": 3072, "intermediate_size": 9216},
        "batch": 2, "seq_len": 2048, "dtype": "bfloat16", "gradient_checkpointing": True, "chunk_size": 2048,
    },
}  # fmt: skip

# Dense bf16 peak of an H100 / H200 SXM (NVIDIA datasheets: 989 TFLOP/s without sparsity).
DEFAULT_PEAK_TFLOPS = 989.0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed steps per method (default 1 CPU, 2 GPU)"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="timed steps per method (default 2 CPU, 3 GPU)"
    )
    parser.add_argument(
        "--chunk-size", type=int, default=None, help="tokens per chunk (default: the preset's)"
    )
    parser.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="recompute the student's layer activations in backward (default: the preset's)",
    )
    parser.add_argument("--peak-tflops", type=float, default=DEFAULT_PEAK_TFLOPS, help="GPU dense bf16 peak")
    parser.add_argument(
        "--seq-len", type=int, default=None, help="tokens per sequence (default: the preset's)"
    )
    parser.add_argument(
        "--model-kernels",
        choices=["hf", "liger"],
        default="hf",
        help="transformers' own Llama layers, or Liger's RMSNorm/SwiGLU/RoPE kernels patched into both models "
        "(the same for every method; for the MFU)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile every decoder layer of both models (the same for every method; for the MFU)",
    )
    parser.add_argument(
        "--activation-memory-budget",
        type=float,
        default=None,
        help="with --compile: fraction of the student's activations the compiled backward may keep; the "
        "partitioner recomputes the cheapest ops for the rest (torch._functorch.config.activation_memory_budget)",
    )
    parser.add_argument(
        "--methods", default=None, help="comma-separated subset of naive,chunked,liger (default: all that run here)"
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON results file")
    args = parser.parse_args()

    preset = dict(PRESETS[args.preset])
    if args.seq_len:
        preset["seq_len"] = args.seq_len
    if args.gradient_checkpointing is not None:
        preset["gradient_checkpointing"] = args.gradient_checkpointing
    device = torch.device(args.device)
    dtype = getattr(torch, preset["dtype"])
    chunk_size = args.chunk_size or preset["chunk_size"]
    warmup = args.warmup if args.warmup is not None else (2 if device.type == "cuda" else 1)
    timed = args.steps if args.steps is not None else (3 if device.type == "cuda" else 2)
    if device.type == "cpu" and args.preset != "tiny":
        sys.exit(
            f"preset {args.preset} needs a GPU (its models alone take ~25 GB and 12 B parameters of compute)"
        )

    torch.manual_seed(0)
    log(f"building {args.preset} teacher and student on {device}")
    teacher, student = build_models(preset, device, dtype)
    if args.model_kernels == "liger":
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        for model in (teacher, student):
            apply_liger_kernel_to_llama(fused_linear_cross_entropy=False, cross_entropy=False, model=model)
    if args.activation_memory_budget is not None:
        import torch._functorch.config as functorch_config

        functorch_config.activation_memory_budget = args.activation_memory_budget
    if args.compile:
        compile_decoder_layers(teacher, student)  # what `compile_layers: true` does in training
    if preset["gradient_checkpointing"]:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = make_optimizer(student, device)
    tokens = preset["batch"] * preset["seq_len"]
    input_ids = torch.randint(
        0, preset["teacher"]["vocab_size"], (preset["batch"], preset["seq_len"]), device=device
    )

    methods = ["naive", "chunked"]
    try:
        methods.append(losses.kd_backend(device, backend="liger"))
    except ValueError:
        pass  # no CUDA or no liger_kernel here
    if args.methods:
        wanted = args.methods.split(",")
        methods = [m for m in methods if m in wanted]
    ours = losses.kd_backend(device)
    steps = {name: make_step(name, teacher, student, input_ids, chunk_size) for name in methods}

    log(f"checking that {', '.join(methods)} agree at the same weights")
    agreement = check_agreement(steps, student)
    results = {}
    for name in methods:
        log(f"measuring {name}: {warmup} warm-up + {timed} timed steps")
        results[name] = measure(steps[name], optimizer, device, tokens, warmup, timed)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    n_student, n_teacher = matmul_parameters(student), matmul_parameters(teacher)
    flops_per_token = 6 * n_student + 2 * n_teacher
    # The same count with every parameter, input embeddings included (how "6N" is often quoted); reported beside.
    flops_all_params = 6 * sum(p.numel() for p in student.parameters()) + 2 * sum(
        p.numel() for p in teacher.parameters()
    )
    for r in results.values():
        if device.type == "cuda" and "tokens_per_s" in r:
            r["mfu"] = r["tokens_per_s"] * flops_per_token / (args.peak_tflops * 1e12)
            r["mfu_all_parameters"] = r["tokens_per_s"] * flops_all_params / (args.peak_tflops * 1e12)

    report = {
        "preset": args.preset,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "device_type": device.type,
        "dtype": preset["dtype"],
        "micro_batch": [preset["batch"], preset["seq_len"]],
        "tokens_per_step": tokens,
        "chunk_size": chunk_size,
        "gradient_checkpointing": preset["gradient_checkpointing"],
        "model_kernels": args.model_kernels,
        "compiled_layers": args.compile,
        "activation_memory_budget": args.activation_memory_budget,
        "warmup_steps": warmup,
        "timed_steps": timed,
        "parameters": {
            "student": sum(p.numel() for p in student.parameters()),
            "teacher": sum(p.numel() for p in teacher.parameters()),
            "student_matmul": n_student,
            "teacher_matmul": n_teacher,
        },
        "flops_per_token": flops_per_token,
        "flops_per_token_all_parameters": flops_all_params,
        "peak_tflops": args.peak_tflops if device.type == "cuda" else None,
        "memory_measure": MEMORY_MEASURE[device.type],
        "ours": ours,
        "agreement": agreement,
        "methods": results,
        "ratios": ratios(results, ours),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
            "liger_kernel": liger_version(),
        },
    }
    report["goals"] = goals(report)
    print_report(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    failed = not agreement["ok"] or any("error" in r for r in results.values())
    return 1 if failed else 0


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---- models and steps ----------------------------------------------------------------------------------------


def build_models(preset: dict, device: torch.device, dtype: torch.dtype):
    """Random-weight teacher and width-pruned student, created directly on `device` in `dtype`."""
    teacher_cfg = LlamaConfig(**preset["teacher"], tie_word_embeddings=False, use_cache=False)
    student_cfg = LlamaConfig(
        **{**preset["teacher"], **preset["student"]}, tie_word_embeddings=False, use_cache=False
    )
    # Allocated on the device in the target dtype directly (not fp32 on CPU, then cast and moved: 8B is 32 GB).
    with torch.device(device):
        teacher = AutoModelForCausalLM.from_config(teacher_cfg, dtype=dtype)
        student = AutoModelForCausalLM.from_config(student_cfg, dtype=dtype)
    teacher.eval().requires_grad_(False)
    student.train()
    return teacher, student


def make_optimizer(student: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    # The fused AdamW kernel makes no parameter-sized temporaries, so the step's memory is the loss's, not the
    # optimizer's (foreach AdamW would add a transient as large as all gradients to both methods).
    try:
        return torch.optim.AdamW(student.parameters(), lr=1e-5, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(student.parameters(), lr=1e-5, foreach=False)


def make_step(method: str, teacher, student, input_ids: torch.Tensor, chunk_size: int):
    """A closure computing the loss of one micro-batch and its gradients (no optimizer step)."""

    def naive() -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = teacher(input_ids=input_ids).logits  # [B, S, V]
        student_logits = student(input_ids=input_ids).logits  # [B, S, V]
        loss = losses.forward_kl(student_logits, teacher_logits)
        loss.backward()
        return loss.detach()

    def fused() -> torch.Tensor:
        with torch.no_grad():
            teacher_hidden = teacher.model(input_ids=input_ids).last_hidden_state  # [B, S, H_t]
        student_hidden = student.model(input_ids=input_ids).last_hidden_state  # [B, S, H_s]
        loss = losses.fused_kd_loss(
            student_hidden,
            student.lm_head.weight,
            teacher_hidden,
            teacher.lm_head.weight,
            chunk_size=chunk_size,
            backend=method,
        )
        loss.backward()
        return loss.detach()

    return naive if method == "naive" else fused


def check_agreement(steps: dict, student: torch.nn.Module) -> dict:
    """Loss and two gradients of every method at the same weights, compared with the naive method's."""
    probes = {
        "lm_head": student.lm_head.weight,
        "layers.0.mlp.down_proj": student.model.layers[0].mlp.down_proj.weight,
    }
    seen = {}
    for name, step in steps.items():
        student.zero_grad(set_to_none=True)
        try:
            loss = step()
        except torch.OutOfMemoryError:
            seen[name] = None
            continue
        seen[name] = (loss.item(), {k: p.grad.detach().float().clone() for k, p in probes.items()})
    student.zero_grad(set_to_none=True)
    # bf16 weights: logits and gradients carry bf16 rounding, differently ordered in each method.
    float32 = next(student.parameters()).dtype == torch.float32
    loss_tol, grad_tol = (1e-5, 1e-4) if float32 else (1e-2, 5e-2)
    reference = seen.get("naive")
    out = {"loss_rtol": loss_tol, "grad_rtol": grad_tol, "ok": True, "methods": {}}
    if reference is None:
        out["note"] = "naive ran out of memory; methods compared with each other only"
        reference = next(v for v in seen.values() if v is not None)
    for name, value in seen.items():
        if value is None:
            out["methods"][name] = "oom"
            continue
        loss_rel = abs(value[0] - reference[0]) / abs(reference[0])
        grad_rel = {
            k: ((g - reference[1][k]).norm() / reference[1][k].norm()).item() for k, g in value[1].items()
        }
        ok = loss_rel <= loss_tol and all(v <= grad_tol for v in grad_rel.values())
        out["methods"][name] = {
            "loss": value[0],
            "loss_rel_diff": loss_rel,
            "grad_rel_diff": grad_rel,
            "ok": ok,
        }
        out["ok"] &= ok
    return out


# ---- measurement ---------------------------------------------------------------------------------------------

MEMORY_MEASURE = {
    "cuda": "torch.cuda.max_memory_allocated() during the step minus torch.cuda.memory_allocated() before it "
    "(weights, gradients and optimizer states exist before the step, so this is activations + loss)",
    "cpu": "peak resident set size (Linux VmHWM, reset through /proc/self/clear_refs) during the step minus the "
    "resident size before it, after returning freed heap pages with malloc_trim",
}


def measure(
    step, optimizer: torch.optim.Optimizer, device: torch.device, tokens: int, warmup: int, timed: int
) -> dict:
    """Median step time and peak extra memory of `timed` full steps after `warmup` untimed ones."""
    times, extras, peaks, loss = [], [], [], None
    try:
        for i in range(warmup + timed):
            memory = PeakMemory(device)
            with memory:
                start = time.perf_counter()
                loss = step()
                optimizer.step()
                # Keep gradient buffers allocated (zeroed) between steps: they are the same for every method and
                # belong to the persistent state, like weights and optimizer moments.
                optimizer.zero_grad(set_to_none=False)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                elapsed = time.perf_counter() - start
            if i >= warmup:
                times.append(elapsed)
                extras.append(memory.extra)
                peaks.append(memory.peak)
    except torch.OutOfMemoryError as error:
        optimizer.zero_grad(set_to_none=False)
        return {"error": "out of memory", "detail": str(error).splitlines()[0]}
    step_s = statistics.median(times)
    return {
        "loss": loss.item(),
        "step_s": step_s,
        "step_times_s": times,
        "tokens_per_s": tokens / step_s,
        "extra_memory_bytes": max(extras),
        "peak_memory_bytes": max(peaks),
    }


class PeakMemory:
    """Peak memory a block adds over what was allocated when it started (`extra`), and the absolute `peak`.

    CUDA: the caching allocator's own counters. CPU: tracemalloc cannot see torch's allocations, so this reads the
    kernel's resident-set high-water mark (VmHWM), which `echo 5 > /proc/self/clear_refs` resets to the current
    resident size; torch's CPU allocator returns large blocks to the kernel on free, and malloc_trim returns the
    freed small ones, so RSS tracks live tensors. Where clear_refs is not writable, a thread samples RSS every
    millisecond instead (it can miss a peak shorter than that).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.extra = self.peak = 0

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
            return self
        _malloc_trim()
        self.before = _rss()
        self.sampler = None
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.sampler = _RssSampler()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif self.sampler is not None:
            self.peak = self.sampler.stop()
        else:
            self.peak = _status_kib("VmHWM") * 1024
        self.extra = self.peak - self.before
        return False


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def _rss() -> int:
    return _status_kib("VmRSS") * 1024


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (
        OSError,
        AttributeError,
    ):  # not glibc: RSS may include freed heap pages, the measure stays an upper bound
        pass


class _RssSampler:
    def __init__(self):
        import psutil  # only for this fallback

        self.process, self.peak, self.running = psutil.Process(), 0, True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.001)

    def stop(self) -> int:
        self.running = False
        self.thread.join()
        return max(self.peak, self.process.memory_info().rss)


# ---- reporting -----------------------------------------------------------------------------------------------


def matmul_parameters(model: LlamaForCausalLM) -> int:
    """Parameters that take part in matmuls: all but the input embedding (a lookup). The LM head counts."""
    return sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()


def ratios(results: dict, ours: str) -> dict:
    naive = results.get("naive", {})
    out = {}
    for name, r in results.items():
        if name == "naive" or "error" in r or "error" in naive:
            continue
        out[name] = {
            "memory_ours_over_naive": r["extra_memory_bytes"] / naive["extra_memory_bytes"],
            "tokens_per_s_ours_over_naive": r["tokens_per_s"] / naive["tokens_per_s"],
        }
    out["ours"] = out.get(ours)
    return out


def goals(report: dict) -> dict:
    """The targets: extra memory <= half the naive's, tokens/s >= the naive's, and >= 55% MFU on GPU."""
    ours = report["methods"][report["ours"]]
    ratio = report["ratios"]["ours"]
    out = {
        "memory_at_most_half_of_naive": None if ratio is None else ratio["memory_ours_over_naive"] <= 0.5,
        "tokens_per_s_at_least_naive": None
        if ratio is None
        else ratio["tokens_per_s_ours_over_naive"] >= 1.0,
    }
    if report["device_type"] == "cuda":
        out["mfu_at_least_55_percent"] = ours.get("mfu", 0.0) >= 0.55
    return out


def liger_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("liger-kernel")
    except Exception:  # noqa: BLE001 - not installed, or installed without metadata
        return None


def print_report(report: dict) -> None:
    gib = 1024**3
    print(
        f"\ndistillation step, preset {report['preset']} on {report['device']} ({report['dtype']}), "
        f"micro-batch {report['micro_batch'][0]}x{report['micro_batch'][1]} = {report['tokens_per_step']} tokens, "
        f"chunk {report['chunk_size']}, gradient checkpointing {report['gradient_checkpointing']}, "
        f"model kernels {report['model_kernels']}, compiled layers {report['compiled_layers']}"
        + (
            f" (activation memory budget {report['activation_memory_budget']})"
            if report["activation_memory_budget"] is not None
            else ""
        )
    )
    print(
        f"parameters: student {report['parameters']['student'] / 1e9:.3f} B, "
        f"teacher {report['parameters']['teacher'] / 1e9:.3f} B; memory: {report['memory_measure']}"
    )
    header = f"{'method':<9} {'loss':>9} {'step s':>8} {'tokens/s':>10} {'extra GiB':>10} {'peak GiB':>9} {'MFU':>6}"
    print(header)
    print("-" * len(header))
    for name, r in report["methods"].items():
        if "error" in r:
            print(f"{name:<9} {r['error']}")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-"
        mark = " <- ours" if name == report["ours"] else ""
        print(
            f"{name:<9} {r['loss']:>9.5f} {r['step_s']:>8.3f} {r['tokens_per_s']:>10.0f} "
            f"{r['extra_memory_bytes'] / gib:>10.3f} {r['peak_memory_bytes'] / gib:>9.3f} {mfu:>6}{mark}"
        )
    for name, r in report["ratios"].items():
        if name != "ours" and r is not None:
            print(
                f"{name}/naive: extra memory x{r['memory_ours_over_naive']:.3f}, "
                f"tokens/s x{r['tokens_per_s_ours_over_naive']:.3f}"
            )
    agreement = report["agreement"]
    for name, a in agreement["methods"].items():
        if isinstance(a, dict):
            print(
                f"agreement {name}: loss rel diff {a['loss_rel_diff']:.2e}, grad rel diff "
                + ", ".join(f"{k} {v:.2e}" for k, v in a["grad_rel_diff"].items())
                + (" ok" if a["ok"] else " FAIL")
            )
    print("goals:", ", ".join(f"{k}={v}" for k, v in report["goals"].items()))


if __name__ == "__main__":
    sys.exit(main())

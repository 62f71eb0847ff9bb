"""Knowledge-distillation losses of the Minitron recipe (arXiv 2408.11796, distillation; docs/steps.md).

Consumes student and teacher outputs of one micro-batch: either full logits, or the final hidden states
(after the final norm, i.e. `model.model(...).last_hidden_state`) together with the LM-head weights, plus
the per-layer hidden states for the intermediate-state loss. Produces scalar losses ready for `backward()`.

Guarantees:
- Every logit loss is forward KL(teacher || student) per token, averaged over the unmasked tokens and
  multiplied by T^2, computed in fp32 whatever the input dtype. The teacher never receives gradients.
- Teacher and student vocabularies that differ only by padding (Qwen2.5: 152064 vs 151936) are cut to the
  shared size, the first `min(V_student, V_teacher)` entries.
- `chunked_kd_loss` equals `forward_kl` on the full logits, value and gradients, while holding logits of only
  `chunk_size` tokens at a time; `fused_kd_loss` runs the chunked path, or Liger-Kernel's fused linear JSD at beta=0 (the same
  forward KL) on request (CUDA with `liger_kernel`).
- The intermediate-state loss is `1 - cos(P h_s, h_t)` averaged over tokens then over layer pairs, rescaled to
  the logit loss by `rescale_intermediate`.
"""

from __future__ import annotations

import functools
import itertools
import warnings
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

# Label value that marks a token without a cross-entropy target (the transformers / torch convention).
IGNORE_INDEX = -100

KDBackend = Literal["auto", "liger", "chunked"]

# Half-precision CUDA matmuls with an fp32 output (`out_dtype=`) exist from torch 2.8; the project allows 2.6.
_MM_OUT_DTYPE = torch.torch_version.TorchVersion(torch.__version__) >= "2.8"


# --------------------------------------------------------------------------------------------------------------
# Logit losses on full logits (the plain reference path)
# --------------------------------------------------------------------------------------------------------------
# Training runs `chunked_kd_loss`; `forward_kl` stays in the library as the definition it is held equal to (the
# tests) and as the full-logits baseline it is measured against (bench/distill.py): one copy for both.


def forward_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
) -> torch.Tensor:
    """Forward KL(teacher || student) per token, averaged over unmasked tokens, times T^2.

    For each token, with p = softmax(teacher / T) and q = softmax(student / T) over the shared vocabulary
    (or over the `top_k` largest teacher logits, both sides renormalised over those K indices),
    `KL = sum_v p_v (log p_v - log q_v)`. The loss is `T^2 * sum_tokens(mask * KL) / sum_tokens(mask)`; the
    T^2 factor keeps gradient magnitudes independent of T (Hinton et al., 2015). With every token masked the
    loss is 0.

    Args:
        student_logits: [..., V_s] logits of the student (any float dtype; computed in fp32).
        teacher_logits: [..., V_t] logits of the teacher, same leading shape; detached (no gradient).
        mask: [...] (the leading shape), bool or 0/1; tokens where it is false/0 are left out. None = all.
        temperature: T > 0, applied to both sides.
        top_k: if set, keep only the K largest teacher logits per token (1 <= K <= shared vocabulary).

    Returns:
        Scalar fp32 loss.
    """
    _check_kd_arguments(student_logits.shape[:-1], teacher_logits.shape[:-1], mask, temperature)
    vocab = min(student_logits.shape[-1], teacher_logits.shape[-1])
    _check_top_k(top_k, vocab)
    student = student_logits[..., :vocab].float()
    teacher = teacher_logits[..., :vocab].detach().float()
    if temperature != 1.0:
        student = student / temperature
        teacher = teacher / temperature
    if top_k is not None:
        top_idx = teacher.topk(top_k, dim=-1).indices
        teacher = teacher.gather(-1, top_idx)
        student = student.gather(-1, top_idx)
    log_p = F.log_softmax(teacher, dim=-1)
    log_q = F.log_softmax(student, dim=-1)
    per_token = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
    return _masked_mean(per_token, mask) * temperature**2


# --------------------------------------------------------------------------------------------------------------
# Memory-lean logit loss: LM head + KL fused, chunked over tokens
# --------------------------------------------------------------------------------------------------------------


def chunked_kd_loss(
    student_hidden: torch.Tensor,
    student_lm_head_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_lm_head_weight: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    chunk_size: int = 1024,
    labels: torch.Tensor | None = None,
    ce_alpha: float = 0.0,
) -> torch.Tensor:
    """`forward_kl(h_s @ W_s^T, h_t @ W_t^T, ...)` without materialising the logits of the whole batch.

    Tokens are processed `chunk_size` at a time: the chunk's logits of both models are computed, the loss and
    its gradient with respect to the student logits are formed at once, and that gradient is immediately
    contracted into the gradients of the student hidden states and LM-head weight, which are all backward needs.
    Peak extra memory is a few `[chunk_size, V]` fp32 buffers plus one LM-head-sized gradient, instead of
    several `[tokens, V]` buffers per model. Gradients equal autograd of the full-logits computation.
    Masked tokens are skipped before any matmul.

    With `ce_alpha > 0` the same pass also forms the student's cross-entropy against `labels` (at temperature 1,
    averaged over tokens whose label is not -100) and returns `(1 - ce_alpha) * kd + ce_alpha * ce`, so the
    optional CE term costs no second LM-head pass.

    Args:
        student_hidden: [..., H_s] final student hidden states (after the final norm).
        student_lm_head_weight: [V_s, H_s] student LM-head weight (no bias).
        teacher_hidden: [..., H_t] final teacher hidden states, same leading shape; detached.
        teacher_lm_head_weight: [V_t, H_t] teacher LM-head weight; detached.
        mask: [...] bool or 0/1, tokens that count for the distillation loss. None = all.
        temperature: T > 0; the KL term is multiplied by T^2.
        top_k: optional number of largest teacher logits per token to keep (both sides renormalised).
        chunk_size: tokens per chunk.
        labels: [...] next-token ids aligned with the positions (already shifted), -100 = no target.
            Required when ce_alpha > 0, ignored otherwise.
        ce_alpha: weight of the cross-entropy term in [0, 1].

    Returns:
        Scalar fp32 loss.
    """
    lead_s, lead_t = student_hidden.shape[:-1], teacher_hidden.shape[:-1]
    _check_kd_arguments(lead_s, lead_t, mask, temperature)
    _check_lm_head(student_hidden, student_lm_head_weight, "student")
    _check_lm_head(teacher_hidden, teacher_lm_head_weight, "teacher")
    vocab = min(student_lm_head_weight.shape[0], teacher_lm_head_weight.shape[0])
    _check_top_k(top_k, vocab)
    _check_alpha(ce_alpha)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if ce_alpha > 0 and (labels is None or labels.shape != lead_s):
        raise ValueError(
            f"ce_alpha={ce_alpha} needs labels of shape {tuple(lead_s)}, got "
            f"{None if labels is None else tuple(labels.shape)}"
        )
    flat_mask = None if mask is None else mask.reshape(-1).to(torch.bool)
    flat_labels = labels.reshape(-1) if ce_alpha > 0 else None
    grad_enabled = torch.is_grad_enabled()
    return _ChunkedKD.apply(
        student_hidden.reshape(-1, student_hidden.shape[-1]),
        student_lm_head_weight,
        teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).detach(),
        teacher_lm_head_weight.detach(),
        flat_mask,
        flat_labels,
        float(temperature),
        top_k,
        chunk_size,
        float(ce_alpha),
        grad_enabled and student_hidden.requires_grad,
        grad_enabled and student_lm_head_weight.requires_grad,
    )


class _ChunkedKD(torch.autograd.Function):
    """Fused LM head + forward KL (+ optional CE), gradients formed in the forward pass chunk by chunk.

    Written by hand because no library in the core dependencies fuses the teacher's and the student's LM heads
    with a top-K, masked, vocabulary-cut KL; Liger-Kernel covers the plain case on CUDA only (see
    `fused_kd_loss`). Computing the gradients during the forward pass (as Liger does) costs no recomputation:
    what backward then needs is only the two finished gradients, `[tokens, H_s]` and `[V_s, H_s]`.
    """

    @staticmethod
    def forward(
        ctx,
        s_hidden: torch.Tensor,  # [N, H_s]
        s_weight: torch.Tensor,  # [V_s, H_s]
        t_hidden: torch.Tensor,  # [N, H_t]
        t_weight: torch.Tensor,  # [V_t, H_t]
        mask: torch.Tensor | None,  # [N] bool
        labels: torch.Tensor | None,  # [N] int, only with ce_alpha > 0
        temperature: float,
        top_k: int | None,
        chunk_size: int,
        ce_alpha: float,
        need_grad_hidden: bool,
        need_grad_weight: bool,
    ) -> torch.Tensor:
        vocab = min(s_weight.shape[0], t_weight.shape[0])
        s_w, t_w = s_weight[:vocab], t_weight[:vocab]
        device = s_hidden.device

        # Per-token weights that turn sums into the two masked means; rows with neither weight are dropped.
        kd_rows = torch.ones(s_hidden.shape[0], dtype=torch.bool, device=device) if mask is None else mask
        kd_weight = kd_rows.float() / kd_rows.sum().clamp_min(1)
        rows = kd_rows
        ce_weight = None
        if ce_alpha > 0:
            ce_rows = labels != IGNORE_INDEX
            ce_weight = ce_rows.float() / ce_rows.sum().clamp_min(1)
            rows = kd_rows | ce_rows
        row_idx = rows.nonzero().squeeze(1)  # [n] data-dependent, one host sync per micro-batch

        grad_hidden = torch.zeros_like(s_hidden) if need_grad_hidden else None
        # The LM-head gradient sums over all chunks: accumulate in fp32 like one full matmul would, not with a
        # rounding to bf16 after every chunk.
        grad_weight = torch.zeros_like(s_weight, dtype=torch.float32) if need_grad_weight else None
        loss = torch.zeros((), dtype=torch.float32, device=device)
        # The plain KL (no top-K, no CE) on CUDA: one compiled kernel set instead of ~10 eager passes per chunk.
        compiled = _compiled_plain_kd() if device.type == "cuda" and top_k is None and ce_alpha == 0 else None
        for start in range(0, row_idx.numel(), chunk_size):
            idx = row_idx[start : start + chunk_size]
            h_s = s_hidden.index_select(0, idx)  # [c, H_s]
            student_logits = _logits_fp32(h_s, s_w)  # [c, V]
            teacher_logits = _logits_fp32(t_hidden.index_select(0, idx), t_w)  # [c, V]
            if compiled is not None:
                chunk_loss, grad_logits = compiled(
                    student_logits, teacher_logits, kd_weight.index_select(0, idx), temperature
                )
            else:
                chunk_loss, grad_logits = _kd_chunk(
                    student_logits=student_logits,
                    teacher_logits=teacher_logits,
                    kd_weight=kd_weight.index_select(0, idx),
                    labels=None if labels is None else labels.index_select(0, idx),
                    ce_weight=None if ce_weight is None else ce_weight.index_select(0, idx),
                    temperature=temperature,
                    top_k=top_k,
                    ce_alpha=ce_alpha,
                )
            del student_logits, teacher_logits
            loss += chunk_loss
            if grad_hidden is None and grad_weight is None:
                continue
            low_precision = grad_logits.to(s_w.dtype)  # [c, V]: the matmuls run in the model's dtype
            if grad_hidden is not None:
                grad_hidden.index_copy_(0, idx, low_precision @ s_w)
            if grad_weight is not None:
                _accumulate_weight_grad(grad_weight[:vocab], grad_logits, low_precision, h_s)
        if grad_weight is not None:
            grad_weight = grad_weight.to(s_weight.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        # The loss is usually the final node (grad_output == 1): skip an LM-head-sized multiply then.
        if grad_output.item() != 1.0:
            grad_hidden = None if grad_hidden is None else grad_hidden * grad_output.to(grad_hidden.dtype)
            grad_weight = None if grad_weight is None else grad_weight * grad_output.to(grad_weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None, None, None, None


def _logits_fp32(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`hidden @ weight^T` as fp32 [c, V]; on CUDA a half-precision matmul writes fp32 directly (`out_dtype`),
    which skips a [c, V] half-precision buffer and its rounding."""
    if (
        _MM_OUT_DTYPE
        and hidden.is_cuda
        and hidden.dtype in (torch.bfloat16, torch.float16)
        and weight.dtype == hidden.dtype
    ):
        return torch.mm(hidden, weight.T, out_dtype=torch.float32)
    return (hidden @ weight.T).float()


def _accumulate_weight_grad(
    acc: torch.Tensor, grad_logits: torch.Tensor, low_precision: torch.Tensor, hidden: torch.Tensor
) -> None:
    """`acc += grad_logits^T @ hidden` into the fp32 accumulator `acc` [V, H], at the model dtype's speed.

    fp32 weights: a plain addmm. Half precision on CUDA: the half-precision matmul writing fp32 output
    (`out_dtype`, torch >= 2.8, tensor cores kept). Half precision elsewhere (CPU has no `out_dtype` kernel, older
    torch has none at all): an fp32 matmul, exact and slower.
    """
    if hidden.dtype == torch.float32:
        acc.addmm_(grad_logits.T, hidden)
    elif acc.is_cuda and _MM_OUT_DTYPE and low_precision.dtype == hidden.dtype:
        torch.addmm(acc, low_precision.T, hidden, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(grad_logits.T, hidden.float())


def _plain_kd_chunk(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, kd_weight: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`_kd_chunk` without top-K or CE, written out-of-place so that `torch.compile` fuses it into a few
    reductions and one elementwise pass (the eager in-place version makes ~10 passes over the [c, V] buffers)."""
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    p = log_p.exp()
    scale = temperature**2
    loss = scale * (kd_weight * (p * (log_p - log_q)).sum(-1)).sum()
    grad = (log_q.exp() - p) * ((scale / temperature) * kd_weight).unsqueeze(-1)
    return loss, grad


@functools.cache
def _compiled_plain_kd():
    """`_plain_kd_chunk` through torch.compile (CUDA only; chunk lengths vary, so shapes are dynamic)."""
    return torch.compile(_plain_kd_chunk, dynamic=True)


def _kd_chunk(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kd_weight: torch.Tensor,
    labels: torch.Tensor | None,
    ce_weight: torch.Tensor | None,
    temperature: float,
    top_k: int | None,
    ce_alpha: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and its gradient w.r.t. the raw student logits for one chunk of tokens.

    Args:
        student_logits: [c, V] fp32 raw student logits (consumed: modified in place).
        teacher_logits: [c, V] fp32 raw teacher logits (consumed).
        kd_weight: [c] per-token weight of the KL term (mask / number of KD tokens).
        labels: [c] next-token ids, only with ce_alpha > 0.
        ce_weight: [c] per-token weight of the CE term (valid / number of CE tokens), only with ce_alpha > 0.
        temperature, top_k, ce_alpha: as in `chunked_kd_loss`.

    Returns:
        (scalar fp32 loss of the chunk, [c, V] fp32 gradient of that loss w.r.t. student_logits).
    """
    kd_scale = (1.0 - ce_alpha) * temperature**2
    ce_term = None
    if ce_alpha > 0:
        # CE uses the temperature-1 student distribution over the whole (shared) vocabulary.
        log_q1 = F.log_softmax(student_logits, dim=-1)  # [c, V]
        picked = log_q1.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)  # [c]
        ce_loss = -ce_alpha * (ce_weight * picked).sum()
        # d CE / d z = softmax(z) - onehot(label), per token weight ce_weight.
        ce_grad = log_q1.exp_()
        ce_grad.scatter_add_(-1, labels.clamp_min(0).unsqueeze(-1), -torch.ones_like(picked).unsqueeze(-1))
        ce_grad.mul_((ce_alpha * ce_weight).unsqueeze(-1))
        ce_term = (ce_loss, ce_grad)

    if temperature != 1.0:
        student_logits = student_logits.div_(temperature)
        teacher_logits = teacher_logits.div_(temperature)
    top_idx = None
    if top_k is not None:
        top_idx = teacher_logits.topk(top_k, dim=-1).indices  # [c, K]
        teacher_logits = teacher_logits.gather(-1, top_idx)
        dense_student = student_logits
        student_logits = student_logits.gather(-1, top_idx)
    log_p = F.log_softmax(teacher_logits, dim=-1)
    del teacher_logits
    p = log_p.exp()
    log_q = student_logits.sub_(student_logits.logsumexp(-1, keepdim=True))  # in place: log-softmax
    # KL per token = sum_v p (log p - log q), the product formed in log_p's buffer (no third [c, V] buffer) and
    # summed by a reduction: a batched dot product (bmm) accumulates the V terms in sequence in fp32 on CPU, and
    # with a peaked teacher the many small terms after a large one are lost (1.5e-4 of SmolLM2-135M's KL, V=49152;
    # bench/peers.py found it against the plain loop). The gradient below never read this value.
    per_token = log_p.sub_(log_q).mul_(p).sum(-1)  # [c]
    loss = kd_scale * (kd_weight * per_token).sum()
    del log_p
    # d/dz of T^2 * KL(p || softmax(z / T)) = T * (q - p), per token weight kd_weight.
    grad = log_q.exp_().sub_(p).mul_((kd_scale / temperature) * kd_weight.unsqueeze(-1))
    if top_idx is not None:
        grad = torch.zeros_like(dense_student).scatter_(-1, top_idx, grad)
    if ce_term is not None:
        loss = loss + ce_term[0]
        grad += ce_term[1]
    return loss, grad


# --------------------------------------------------------------------------------------------------------------
# Backend choice: Liger's fused linear JSD on CUDA, the chunked path elsewhere
# --------------------------------------------------------------------------------------------------------------


def kd_backend(
    device: torch.device | str,
    top_k: int | None = None,
    ce_alpha: float = 0.0,
    backend: KDBackend = "auto",
) -> Literal["liger", "chunked"]:
    """Which implementation `fused_kd_loss` runs for these settings.

    "auto" picks "chunked": on an H200 with Llama-3.1-8B -> 4B-width shapes (bench/results/gpu) the chunked path
    ran at the naive loss's speed (x0.99 tokens/s) with x0.31 of its extra memory, while Liger's fused linear JSD
    used less memory (x0.21) but ran at x0.90. "liger" selects Liger and raises if it cannot serve (it needs
    CUDA, `liger_kernel`, and the plain loss: no top-K, no CE term).
    """
    if backend in ("chunked", "auto"):
        return "chunked"
    if backend != "liger":
        raise ValueError(f"backend must be 'auto', 'liger' or 'chunked', got {backend!r}")
    reason = None
    if torch.device(device).type != "cuda":
        reason = f"tensors are on {torch.device(device).type}, Liger's kernels need CUDA"
    elif top_k is not None or ce_alpha > 0:
        reason = "Liger's fused linear JSD has no top-K or CE term"
    elif _liger_fused_linear_jsd() is None:
        reason = "liger_kernel is not importable"
    if reason is not None:
        raise ValueError(f"backend='liger' unavailable: {reason}")
    return "liger"


def fused_kd_loss(
    student_hidden: torch.Tensor,
    student_lm_head_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_lm_head_weight: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    chunk_size: int = 1024,
    labels: torch.Tensor | None = None,
    ce_alpha: float = 0.0,
    backend: KDBackend = "auto",
) -> torch.Tensor:
    """The memory-lean logit loss through the best available implementation (see `kd_backend`).

    Same arguments, value and gradients as `chunked_kd_loss`; `backend` forces "liger" or "chunked".
    """
    if kd_backend(student_hidden.device, top_k, ce_alpha, backend) == "chunked":
        return chunked_kd_loss(
            student_hidden, student_lm_head_weight, teacher_hidden, teacher_lm_head_weight,
            mask, temperature, top_k, chunk_size, labels, ce_alpha,
        )  # fmt: skip
    return _liger_kd_loss(
        student_hidden, student_lm_head_weight, teacher_hidden, teacher_lm_head_weight, mask, temperature
    )


@functools.cache
def _liger_fused_linear_jsd():
    """Liger's functional fused linear JSD, or None when liger_kernel (or triton) does not import."""
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_jsd
    except ImportError:
        return None
    except Exception as error:  # noqa: BLE001 - installed but broken (e.g. a triton it does not support)
        warnings.warn(
            f"liger_kernel is installed but does not import ({error!r}); using the chunked KD loss",
            stacklevel=2,
        )
        return None
    return liger_fused_linear_jsd


def _liger_kd_loss(
    student_hidden: torch.Tensor,
    student_lm_head_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_lm_head_weight: torch.Tensor,
    mask: torch.Tensor | None,
    temperature: float,
) -> torch.Tensor:
    """Forward KL through `liger_kernel`'s fused linear JSD (liger-kernel 0.8.5, ops/fused_linear_jsd.py).

    Its semantics, read from the source: with `jsd_beta=0` the per-element loss is `P_t (log P_t - log Q_s)`,
    i.e. forward KL(teacher || student); both logit sets are divided by `temperature` before log-softmax and no
    T^2 factor is applied (we apply it); rows whose `shift_labels` equal `ignore_index` get no loss and no
    gradient, and the sum is divided by the number of other rows (our masked token mean); the teacher inputs get
    no gradient. Vocabularies are cut by slicing the weights.
    """
    lead = student_hidden.shape[:-1]
    _check_kd_arguments(lead, teacher_hidden.shape[:-1], mask, temperature)
    _check_lm_head(student_hidden, student_lm_head_weight, "student")
    _check_lm_head(teacher_hidden, teacher_lm_head_weight, "teacher")
    vocab = min(student_lm_head_weight.shape[0], teacher_lm_head_weight.shape[0])
    shift_labels = None
    if mask is not None:
        flat_mask = mask.reshape(-1).to(torch.bool)
        if not bool(flat_mask.any()):
            # Liger divides by the number of unmasked rows; keep our "all masked = 0" convention instead.
            return (student_hidden.sum() + student_lm_head_weight.sum()).float() * 0.0
        # Liger only compares labels with ignore_index: any other value marks a token that counts.
        shift_labels = torch.where(flat_mask, 0, IGNORE_INDEX)
    loss = _liger_fused_linear_jsd()(
        student_hidden.reshape(-1, student_hidden.shape[-1]),
        student_lm_head_weight[:vocab],
        teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).detach(),
        teacher_lm_head_weight[:vocab].detach(),
        shift_labels,
        jsd_beta=0.0,
        ignore_index=IGNORE_INDEX,
        temperature=float(temperature),
        # As in the chunked path, sum the LM-head gradient over chunks in fp32 (Liger's default is the weight's
        # dtype, rounding after each of its ~32 chunks at 128k vocabulary).
        accum_dtype=torch.float32 if student_lm_head_weight.dtype != torch.float32 else None,
    )
    return loss.float() * temperature**2


# --------------------------------------------------------------------------------------------------------------
# Intermediate-state loss (depth-pruned students)
# --------------------------------------------------------------------------------------------------------------


def default_layer_mapping(
    num_student_layers: int,
    num_teacher_layers: int,
    kept_layers: Sequence[int] | None = None,
) -> list[tuple[int, int]]:
    """Pairs (student layer, teacher layer), 0-based, whose outputs the intermediate-state loss compares.

    With `kept_layers` (the teacher layers a depth-pruned student kept, in order, so student layer i *is*
    teacher layer kept_layers[i]): the pairs are `(i, kept_layers[i])` for every student layer i that comes
    right after a removed block, i.e. `i == 0 and kept_layers[0] > 0` or `i > 0 and kept_layers[i] >
    kept_layers[i - 1] + 1`, plus the last student layer `(S - 1, kept_layers[S - 1])`, in increasing i without
    duplicates. These are the places where the student must make up for what was cut; a layer before any cut
    starts equal to its teacher layer. Example, Llama-3.1-Minitron-4B-Depth (kept 0..14 and 31 of 32):
    `[(15, 31)]`; kept [0, 1, 4, 5, 7] of 8: `[(2, 4), (4, 7)]`.

    Without `kept_layers` (e.g. a width-pruned student, or depths without correspondence): every student layer
    maps to the teacher layer that ends the same fraction of the depth, `(i, (i + 1) * T // S - 1)` for i in
    0..S-1 (integer floor division), with S, T the student and teacher layer counts; the last pair is always
    `(S - 1, T - 1)`. Example: 16 of 32 layers gives `(i, 2 i + 1)`.

    Returns:
        List of (student_layer, teacher_layer) pairs.
    """
    if num_student_layers < 1 or num_teacher_layers < 1:
        raise ValueError(
            f"layer counts must be >= 1, got student={num_student_layers} teacher={num_teacher_layers}"
        )
    if num_student_layers > num_teacher_layers:
        raise ValueError(
            f"the student has more layers ({num_student_layers}) than the teacher ({num_teacher_layers})"
        )
    if kept_layers is None:
        return [
            (i, (i + 1) * num_teacher_layers // num_student_layers - 1) for i in range(num_student_layers)
        ]
    kept = list(kept_layers)
    if len(kept) != num_student_layers:
        raise ValueError(f"kept_layers has {len(kept)} entries, the student has {num_student_layers} layers")
    if any(b <= a for a, b in itertools.pairwise(kept)) or kept[0] < 0 or kept[-1] >= num_teacher_layers:
        raise ValueError(
            f"kept_layers must be strictly increasing teacher layers in [0, {num_teacher_layers}), got {kept}"
        )
    after_cut = [i for i in range(num_student_layers) if kept[i] > (kept[i - 1] if i else -1) + 1]
    chosen = sorted(set(after_cut) | {num_student_layers - 1})
    return [(i, kept[i]) for i in chosen]


def intermediate_projections(
    student_width: int, teacher_width: int, num_pairs: int, dtype: torch.dtype | None = None
) -> nn.ModuleList | None:
    """The learned maps P of the intermediate loss: one `nn.Linear(H_s, H_t, bias=False)` per layer pair.

    Returns None when the widths are equal (no projection is needed). They are initialised by nn.Linear's
    default and must be handed to the optimizer together with the student's parameters.
    """
    if student_width == teacher_width:
        return None
    return nn.ModuleList(
        nn.Linear(student_width, teacher_width, bias=False, dtype=dtype) for _ in range(num_pairs)
    )


def intermediate_cosine_loss(
    student_states: Sequence[torch.Tensor],
    teacher_states: Sequence[torch.Tensor],
    pairs: Sequence[tuple[int, int]],
    projections: Sequence[nn.Module] | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over layer pairs of `1 - cos(P h_s, h_t)`, each averaged over the unmasked tokens.

    The states follow transformers' `output_hidden_states=True` convention: L + 1 tensors, entry 0 the
    embeddings, entry i + 1 the output of layer i (the last entry is after the final norm, on both sides).
    Pair (i, j) compares student entry i + 1 with teacher entry j + 1. Cosines are taken in fp32; the teacher
    is detached.

    Args:
        student_states: L_s + 1 tensors [B, S, H_s].
        teacher_states: L_t + 1 tensors [B, S, H_t].
        pairs: (student_layer, teacher_layer) pairs, e.g. from `default_layer_mapping`.
        projections: one module per pair mapping H_s -> H_t (see `intermediate_projections`); required when
            H_s != H_t, None when the widths are equal.
        mask: [B, S] bool or 0/1, tokens that count. None = all.

    Returns:
        Scalar fp32 loss.
    """
    if not pairs:
        raise ValueError("intermediate_cosine_loss needs at least one (student, teacher) layer pair")
    if projections is not None and len(projections) != len(pairs):
        raise ValueError(f"{len(projections)} projections for {len(pairs)} layer pairs")
    for s_layer, t_layer in pairs:
        if not (0 <= s_layer < len(student_states) - 1 and 0 <= t_layer < len(teacher_states) - 1):
            raise ValueError(
                f"layer pair ({s_layer}, {t_layer}) out of range for {len(student_states) - 1} student and "
                f"{len(teacher_states) - 1} teacher layers"
            )
    s_width, t_width = student_states[0].shape[-1], teacher_states[0].shape[-1]
    if projections is None and s_width != t_width:
        raise ValueError(f"student width {s_width} != teacher width {t_width}: pass one projection per pair")
    terms = []
    for n, (s_layer, t_layer) in enumerate(pairs):
        h_s = student_states[s_layer + 1]
        if projections is not None:
            h_s = projections[n](h_s)
        cos = F.cosine_similarity(h_s.float(), teacher_states[t_layer + 1].detach().float(), dim=-1)  # [B, S]
        terms.append(_masked_mean(1.0 - cos, mask))
    return torch.stack(terms).mean()


def rescale_intermediate(l_logits: torch.Tensor, l_int: torch.Tensor) -> torch.Tensor:
    """The intermediate loss rescaled to the logit loss's magnitude each step: `l_int * (l_logits / l_int)`.

    The ratio is detached, so the value equals `l_logits` while the gradient is that of `l_int` times the
    ratio. A zero `l_int` (student already equal to the teacher) stays zero instead of dividing by zero.
    """
    ratio = l_logits.detach() / l_int.detach().clamp_min(torch.finfo(l_int.dtype).tiny)
    return l_int * ratio


# --------------------------------------------------------------------------------------------------------------
# Shared checks and reductions
# --------------------------------------------------------------------------------------------------------------


def _masked_mean(per_token: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of `per_token` over the tokens where mask is set; 0 when none is."""
    if mask is None:
        return per_token.mean()
    weight = mask.to(per_token.dtype)
    return (per_token * weight).sum() / weight.sum().clamp_min(1)


def _check_kd_arguments(
    student_lead: torch.Size, teacher_lead: torch.Size, mask: torch.Tensor | None, temperature: float
) -> None:
    if student_lead != teacher_lead:
        raise ValueError(
            f"student and teacher token shapes differ: {tuple(student_lead)} vs {tuple(teacher_lead)}"
        )
    if mask is not None and mask.shape != student_lead:
        raise ValueError(f"mask shape {tuple(mask.shape)} != token shape {tuple(student_lead)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _check_lm_head(hidden: torch.Tensor, weight: torch.Tensor, who: str) -> None:
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{who} LM-head weight {tuple(weight.shape)} does not match hidden width {hidden.shape[-1]}"
        )


def _check_top_k(top_k: int | None, vocab: int) -> None:
    if top_k is not None and not 1 <= top_k <= vocab:
        raise ValueError(f"top_k must be in [1, {vocab}] (the shared vocabulary), got {top_k}")


def _check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"cross-entropy weight alpha must be in [0, 1], got {alpha}")

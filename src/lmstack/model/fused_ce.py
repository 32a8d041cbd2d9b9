"""Fused linear + cross-entropy: the LM head and its loss without ever holding the full logits.

The unfused path computes logits = hidden @ W^T for all N tokens, a (N, V) fp32 tensor, then
cross-entropy; autograd keeps the logits (and softmax) for the backward. At V = 128k and N = 8k
tokens that is 4 GiB per copy, more than the rest of a small model's activations together.

Here the tokens are processed in chunks of C rows. For each chunk, inside one autograd.Function's
forward: logits_c = h_c @ W^T (+ b), optional softcap, padded rows set to PAD_LOGIT (the same rule as
the model's head, see vocab.py), logsumexp, the chunk's loss, then the gradient of the mean loss with
respect to the logits, (softmax - onehot) / n_counted, turned at once into grad_h_c = g @ W and
accumulated into grad_W += g^T h_c; the chunk's logits are then freed. Backward only scales the stored
gradients by the incoming grad (the loss is a scalar, so that is exact). Peak extra memory is one
(C, V) chunk instead of several (N, V) tensors, and the matmul count is the same as unfused (logits,
grad_h, grad_W), so speed is about unchanged. The idea is Liger-Kernel's FusedLinearCrossEntropy,
written here in plain torch.

Targets equal to ignore_index count neither in the loss nor in the mean, exactly like
F.cross_entropy(ignore_index=...). The chunk size defaults to about 2^23 logits per chunk
(32 MiB of fp32), i.e. 64 rows at V = 128k and 256 rows at V = 32k.

Usage:
    from lmstack.model.fused_ce import fused_linear_cross_entropy
    loss = fused_linear_cross_entropy(hidden, model.lm_head.weight, targets, n_real=cfg.real_vocab_size)
    loss, correct = fused_linear_cross_entropy(hidden, w, targets, return_correct=True)  # + argmax hits
"""
from __future__ import annotations

import torch

from lmstack.errors import LmstackError
from lmstack.model.vocab import PAD_LOGIT

CHUNK_LOGITS = 1 << 23


def auto_chunk(vocab: int) -> int:
    """Rows per chunk so that one chunk of fp32 logits is about CHUNK_LOGITS elements."""
    return max(16, min(8192, CHUNK_LOGITS // max(1, vocab)))


class _FusedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index, n_real, chunk, softcap):
        n, v = hidden.shape[0], weight.shape[0]
        counted = targets != ignore_index
        denom = max(int(counted.sum()), 1)
        need_h, need_w = hidden.requires_grad, weight.requires_grad
        need_b = bias is not None and bias.requires_grad
        grad_h = torch.zeros_like(hidden) if need_h else None
        # accumulate grad_W in fp32 whatever the weight's dtype: it sums over every token
        acc = torch.promote_types(weight.dtype, torch.float32)
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(v, dtype=acc, device=weight.device) if need_b else None
        loss = torch.zeros((), dtype=acc, device=hidden.device)
        correct = torch.zeros((), dtype=torch.long, device=hidden.device)
        for s in range(0, n, chunk):
            h, t, c = hidden[s:s + chunk], targets[s:s + chunk], counted[s:s + chunk]
            logits = h @ weight.t()
            if logits.dtype in (torch.float16, torch.bfloat16):  # softmax math in fp32 (fp64 stays fp64)
                logits = logits.float()
            if bias is not None:
                logits += bias.to(logits.dtype)
            if softcap:
                logits.div_(softcap).tanh_()
                dcap = 1 - logits.square()  # d(cap*tanh(x/cap))/dx, from the tanh value
                logits.mul_(softcap)
            if n_real < v:
                logits[:, n_real:] = PAD_LOGIT
            lse = torch.logsumexp(logits, dim=-1)
            safe_t = torch.where(c, t, torch.zeros_like(t))
            target_logit = logits.gather(1, safe_t[:, None])[:, 0]
            loss += ((lse - target_logit) * c).sum()
            correct += ((logits.argmax(-1) == t) & c).sum()
            if not (need_h or need_w or need_b):
                continue
            g = logits.sub_(lse[:, None]).exp_()  # softmax, in place: the logits are not needed any more
            g[torch.arange(g.shape[0], device=g.device), safe_t] -= 1.0
            g.mul_((c.to(g.dtype) / denom)[:, None])  # d(mean loss)/d logits; 0 for ignored rows
            if softcap:
                g.mul_(dcap)
                del dcap
            if need_h:
                grad_h[s:s + chunk] = (g.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_w:
                grad_w.addmm_(g.t(), h.to(acc))
            if need_b:
                grad_b += g.sum(0).to(acc)
            del g, logits
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(correct)
        return loss / denom, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        scale = lambda g, dtype: None if g is None else (g * grad_loss).to(dtype)  # noqa: E731
        return (scale(grad_h, grad_h.dtype if grad_h is not None else None), scale(grad_w, w_dtype),
                scale(grad_b, b_dtype), None, None, None, None, None)


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               bias: torch.Tensor | None = None, *, ignore_index: int = -100,
                               n_real: int | None = None, chunk_size: int | None = None,
                               softcap: float = 0.0, return_correct: bool = False):
    """Mean cross-entropy of softmax(hidden @ weight^T + bias) against targets, never materialising (N, V).

    hidden (N, D) or (B, T, D); weight (V, D); targets (N,) or (B, T) ints. n_real: logits of rows >= n_real
    are padding (PAD_LOGIT, zero probability, zero gradient). softcap: Gemma-2 style cap*tanh(logits/cap).
    With return_correct, also the number of counted tokens whose argmax equals the target."""
    if hidden.dim() == 3:
        hidden, targets = hidden.flatten(0, 1), targets.flatten()
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise LmstackError(f"fused cross-entropy needs hidden (N, D) and weight (V, D), got {tuple(hidden.shape)} "
                           f"and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1] or targets.dtype.is_floating_point:
        raise LmstackError(f"fused cross-entropy needs integer targets of shape ({hidden.shape[0]},), got "
                           f"{tuple(targets.shape)} {targets.dtype}")
    v = weight.shape[0]
    n_real = v if n_real is None else int(n_real)
    if not 1 <= n_real <= v:
        raise LmstackError(f"n_real={n_real} must lie in 1..{v} (the weight's rows)")
    counted = targets[targets != ignore_index]
    if counted.numel() and (int(counted.min()) < 0 or int(counted.max()) >= n_real):
        raise LmstackError(f"targets must lie in [0, {n_real}) or equal ignore_index={ignore_index}; got ids in "
                           f"[{int(counted.min())}, {int(counted.max())}]")
    chunk = auto_chunk(v) if chunk_size is None else int(chunk_size)
    if chunk < 1:
        raise LmstackError(f"chunk_size must be >= 1, got {chunk_size}")
    loss, correct = _FusedLinearCE.apply(hidden, weight, bias, targets, ignore_index, n_real, chunk,
                                         float(softcap or 0.0))
    return (loss, correct) if return_correct else loss

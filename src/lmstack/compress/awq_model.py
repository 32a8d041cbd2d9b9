"""AWQ for a whole model, in the storable form: the scales folded into the model, then plain round to nearest.

awq.py finds, for one Linear, per-input-channel scales s such that Q(W diag(s)) diag(s)^-1 loses less than
Q(W) on the calibration inputs. A quantized checkpoint (compressed-tensors pack-quantized) holds only codes,
scales and zeros per Linear, so the diag(s)^-1 must be absorbed by the op that produces the Linear's input,
as AutoAWQ and llm-compressor do. Per block, in this order:

- q/k/v (or the fused qkv_proj): one s shared by the three, since they read the same normed input; searched
  on the stacked [Wq; Wk; Wv] (the summed output error of all three); 1/s goes into the attention norm's
  weight (and bias);
- o_proj: its input channel h*head_dim + d is the attention output of head h, dim d, which is linear in v
  row g*head_dim + d of the K/V head g = h // (n_heads / n_kv_heads) that head reads; so 1/s goes into
  v_proj's rows (and bias). With grouped K/V heads one v row feeds several o_proj channels, which must then
  share one scale: the search runs on mean|x| averaged over each group's heads (tie_gqa, the default), so
  s is equal within a group and folds exactly, the error still measured with o_proj's own Hessian.
  tie_gqa=False leaves o_proj unscaled under GQA instead, as AutoAWQ does. Non-softmax attention: o_proj
  unscaled. Every Linear left unscaled is recorded, with the reason, in AwqFolds.skipped;
- gate/up (or gate_up_proj): one shared s, into the MLP norm;
- down_proj: its input is act(gate) * up, linear in up's rows, so 1/s goes into up's rows (and bias). A
  plain MLP down(act(up)) allows it only for ReLU (relu(x / s) = relu(x) / s for s > 0); otherwise down is
  left unscaled and the reason recorded.

Each search uses the layer's statistics from the unfolded model: a fold is exact, so it changes no layer's
input except the one it scales (x becomes x / s), and that layer's search is already done. fold_stats gives
the statistics of the folded model (mean|x| / s, H / (s s^T), ...) for anything that runs after, e.g. GPTQ on
the folded weights. Later folds scale rows of weights searched earlier (v by o's s, up by down's s); round
to nearest is exact under scaling a row, so the earlier choice stays what it was.

Then every block Linear is rounded to nearest at the same bits and group size: AWQ's recipe. Refused: post-norm
blocks (no norm before the linears), mixture-of-experts MLPs (their norm also feeds the router), norms
without a weight. Gemma's (1 + w) RMSNorm is folded as (1 + w) / s - 1 (smoothquant.fold_into_norm).

Usage:
    from lmstack.compress.awq_model import awq_model
    stats = collect_stats(model, calib_ids)                  # calibration.py, from the unfolded model
    codes = awq_model(model, stats, bits=4, group_size=128)  # changes model's norms and weights in place
    codes["blocks.0.attn.q_proj"]                            # QuantizedWeight of the folded weight
    folds = awq_fold(model2, stats)                          # only the folds: folds.scales, folds.skipped
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lmstack.compress.awq import N_GRID, awq_quantize
from lmstack.compress.calibration import LayerStats, block_linears
from lmstack.compress.quantize_rtn import QuantizedWeight, check_group, quantize_rtn
from lmstack.compress.smoothquant import fold_into_norm
from lmstack.errors import LmstackError


@dataclass
class AwqFolds:
    """What awq_fold did: s per scaled Linear (its weight now holds W diag(s), its input is x / s), the chosen
    alpha per search (keyed by the first Linear of the group), and why a Linear was left unscaled."""
    scales: dict[str, torch.Tensor] = field(default_factory=dict)
    alphas: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def scaled_stats(st: LayerStats, s: torch.Tensor) -> LayerStats:
    """The statistics of the inputs x / s, from those of x (every one of them is exact under the division)."""
    s64 = s.double().to(st.abs_sum.device)
    xtx = None if st.xtx is None else st.xtx / (s64[:, None] * s64[None, :])
    return LayerStats(st.in_features, st.n, xtx, st.abs_sum / s64, st.sq_sum / s64.square(),
                      st.max_abs / s.float().to(st.max_abs.device))


def fold_stats(stats: dict[str, LayerStats], folds: AwqFolds) -> dict[str, LayerStats]:
    """The calibration statistics of the folded model (a new dict; `stats` is not changed)."""
    return {name: scaled_stats(st, folds.scales[name]) if name in folds.scales else st
            for name, st in stats.items()}


def _parts(module: nn.Module, fused: str, names: tuple[str, ...], prefix: str) -> list[tuple[str, nn.Linear]]:
    """(full name, Linear) of the fused Linear when there is one, else of each named one present."""
    if getattr(module, fused, None) is not None:
        return [(prefix + fused, getattr(module, fused))]
    return [(prefix + n, getattr(module, n)) for n in names if getattr(module, n, None) is not None]


def _o_proj_refusal(cfg, attn: nn.Module, tie_gqa: bool) -> str | None:
    """Why o_proj's input cannot be scaled through v_proj's rows, or None when it can."""
    if cfg.attention != "softmax":
        return f"attention={cfg.attention!r}: its output is not checked to be per-channel linear in v"
    if attn.n_kv_heads != attn.n_heads and not tie_gqa:
        return (f"grouped K/V heads (n_kv_heads={attn.n_kv_heads} < n_heads={attn.n_heads}): one v row feeds "
                f"{attn.n_heads // attn.n_kv_heads} o_proj input channels, which would want different scales")
    return None


def _down_refusal(cfg, mlp: nn.Module) -> str | None:
    if getattr(mlp, "gated", False):
        return None
    if cfg.mlp == "relu":
        return None
    return f"plain MLP with {cfg.mlp!r}: act(up(x)) / s is not act(up(x) / s), so no row of up can take 1/s"


@torch.no_grad()
def _scale_rows(lin: nn.Linear, start: int, s: torch.Tensor) -> None:
    """Divide output rows start .. start + len(s) of lin (weight and bias) by s."""
    stop = start + s.numel()
    lin.weight[start:stop] /= s.to(lin.weight)[:, None]
    if lin.bias is not None:
        lin.bias[start:stop] /= s.to(lin.bias)


def _check(model: nn.Module, stats: dict[str, LayerStats], group_size: int | None, bits: int) -> None:
    """Every refusal before anything is changed, so a bad call leaves the model as it was."""
    linears = block_linears(model)
    for b, block in enumerate(model.blocks):
        if block.norm_position == "post":
            raise LmstackError("AWQ folds 1/s into the norm before q/k/v and gate/up; a post-norm model "
                               "(norm_position='post') has none there")
        if getattr(block.mlp, "router", None) is not None:
            raise LmstackError(f"blocks.{b} has a mixture-of-experts MLP: its norm also feeds the router and "
                               "the experts are not nn.Linear; AWQ folding supports dense MLPs only")
        for norm_name in ("attn_norm", "mlp_norm"):
            if getattr(getattr(block, norm_name), "weight", None) is None:
                raise LmstackError(f"blocks.{b}.{norm_name} has no weight to fold the AWQ scales into")
    for name, lin in linears.items():
        if name not in stats:
            raise LmstackError(f"no calibration statistics for {name}; collect them from this model "
                               "(calibration.collect_stats) before folding")
        if stats[name].in_features != lin.in_features:
            raise LmstackError(f"statistics for {name} have {stats[name].in_features} input features, the "
                               f"layer has {lin.in_features}; they come from another model")
        check_group(lin.in_features, group_size, bits)


def _search(group: list[tuple[str, nn.Linear]], stats: dict[str, LayerStats], bits: int,
            group_size: int | None, n_grid: int, heads: tuple[int, int, int] | None = None
            ) -> tuple[torch.Tensor, float]:
    """One s for the Linears of `group` (they read the same input): AWQ on their stacked weights. heads =
    (n_kv_heads, heads per K/V head, head_dim) for o_proj under GQA: s tied across each K/V group's heads."""
    st = stats[group[0][0]]
    w = torch.cat([lin.weight.detach().float() for _, lin in group], dim=0)
    x = st.mean_abs.to(w.device)
    if heads is not None:  # channel (h, d); the heads of one K/V group are adjacent (h // per_kv)
        x = x.view(heads).mean(dim=1, keepdim=True).expand(heads).reshape(-1)
    r = awq_quantize(w, x, st.hessian.to(w.device), bits, group_size, n_grid=n_grid)
    return r.input_scale, r.alpha


@torch.no_grad()
def awq_fold(model: nn.Module, stats: dict[str, LayerStats], bits: int = 4, group_size: int | None = 128,
             n_grid: int = N_GRID, tie_gqa: bool = True) -> AwqFolds:
    """Search AWQ scales for every block of `model` and fold them in, in place. The fp32 function of the model
    does not change (up to rounding). stats: calibration.collect_stats of the model before this call."""
    _check(model, stats, group_size, bits)
    cfg = model.config
    folds = AwqFolds()

    def scale_inputs(group, s, alpha):
        for name, lin in group:
            lin.weight.mul_(s.to(lin.weight)[None, :])
            folds.scales[name] = s
        folds.alphas[group[0][0]] = alpha

    for b, block in enumerate(model.blocks):
        attn, mlp, p = block.attn, block.mlp, f"blocks.{b}."
        # q/k/v: one s into the attention norm
        qkv = _parts(attn, "qkv_proj", ("q_proj", "k_proj", "v_proj"), p + "attn.")
        s, alpha = _search(qkv, stats, bits, group_size, n_grid)
        fold_into_norm(block.attn_norm, s.to(block.attn_norm.weight))
        scale_inputs(qkv, s, alpha)

        # o_proj: into v's rows (the last kv rows of a fused qkv_proj)
        o = [(p + "attn.o_proj", attn.o_proj)]
        reason = _o_proj_refusal(cfg, attn, tie_gqa)
        if reason:
            folds.skipped[o[0][0]] = reason
        else:
            per_kv = attn.n_heads // attn.n_kv_heads
            heads = (attn.n_kv_heads, per_kv, attn.head_dim)
            s, alpha = _search(o, stats, bits, group_size, n_grid, heads if per_kv > 1 else None)
            s_v = s.view(heads)[:, 0].reshape(-1)  # one per v row (all heads of a group have the same s)
            v, start = (attn.qkv_proj, attn.qkv_proj.out_features - s_v.numel()) if attn.qkv_proj is not None \
                else (attn.v_proj, 0)
            _scale_rows(v, start, s_v)
            scale_inputs(o, s, alpha)

        # gate/up (or a plain MLP's up): one s into the MLP norm
        gate_up = _parts(mlp, "gate_up_proj", ("gate_proj", "up_proj"), p + "mlp.")
        s, alpha = _search(gate_up, stats, bits, group_size, n_grid)
        fold_into_norm(block.mlp_norm, s.to(block.mlp_norm.weight))
        scale_inputs(gate_up, s, alpha)

        # down_proj: into up's rows (the second half of a fused gate_up_proj)
        down = [(p + "mlp.down_proj", mlp.down_proj)]
        reason = _down_refusal(cfg, mlp)
        if reason:
            folds.skipped[down[0][0]] = reason
        else:
            s, alpha = _search(down, stats, bits, group_size, n_grid)
            up, start = (mlp.gate_up_proj, mlp.gate_up_proj.out_features - s.numel()) \
                if mlp.gate_up_proj is not None else (mlp.up_proj, 0)
            _scale_rows(up, start, s)
            scale_inputs(down, s, alpha)
    return folds


def awq_model(model: nn.Module, stats: dict[str, LayerStats], bits: int = 4, group_size: int | None = 128,
              n_grid: int = N_GRID, tie_gqa: bool = True) -> dict[str, QuantizedWeight]:
    """AWQ the whole model: fold the scales in (model's norms and block weights change in place; they keep
    the folded fp32 weights, not the rounded ones) and return {block Linear name: round-to-nearest codes of
    its folded weight}, names as calibration.block_linears gives them."""
    awq_fold(model, stats, bits, group_size, n_grid, tie_gqa)
    return {name: quantize_rtn(lin.weight, bits, group_size) for name, lin in block_linears(model).items()}

"""The model's own decode step is the engine's (infer/fast_decode.py is gone), so it is kept cheap: these pin
the number of torch ops one decoded token costs per layer, and the fused RMSNorm's bitwise equality."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lmstack.model import ModelConfig, Transformer
from lmstack.model.norms import RMSNorm


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def ops_per_token(n_layers: int, fused: bool) -> int:
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("llama-tiny", n_layers=n_layers, fused_projections=fused)).eval()
    cache = model.new_cache(1, 16)
    with torch.inference_mode():
        model(torch.tensor([[1, 2, 3]]), cache=cache)
        with CountOps() as count:
            model(torch.tensor([[4]]), cache=cache, return_hidden=True)
    return count.n


def test_a_decode_step_costs_few_ops_per_layer():
    # per layer: the difference between 3 and 2 layers, so the per-forward constant drops out
    fused = ops_per_token(3, True) - ops_per_token(2, True)
    split = ops_per_token(3, False) - ops_per_token(2, False)
    # 2 fused RMSNorms, 4 matmuls, RoPE on q and k at once, the cache write and SDPA, SwiGLU, 2 residual adds,
    # and the views between them (39 when written); the written-out RMSNorm alone was 8 ops, an inactive dropout 1,
    # the SDPA backend re-checked its shared mask in every layer (4 ops), before issue 18
    assert fused <= 39, fused
    assert split > fused  # the split layout runs 3 more matmuls and RoPE twice


def test_the_fused_rms_norm_is_bitwise_the_written_out_one():
    torch.manual_seed(1)
    for shape in ((1, 1, 64), (3, 7, 100), (2, 4, 5, 768)):
        norm = RMSNorm(shape[-1], eps=1e-5)
        torch.nn.init.normal_(norm.weight)
        x = torch.randn(shape) * 3
        written_out = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
        assert torch.equal(norm(x), written_out)
    # bf16 keeps the fp32 computation (the Llama reference's rounding)
    norm = RMSNorm(64)
    x = torch.randn(2, 64).bfloat16()
    want = norm.weight.bfloat16() * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16()
    assert torch.equal(norm.bfloat16()(x), want)

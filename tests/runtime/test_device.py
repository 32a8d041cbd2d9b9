"""lmstack.runtime.device: what 'auto' means for devices and dtypes, and the errors for bad names."""
import pytest
import torch

from lmstack.errors import LmstackError
from lmstack.runtime.device import pick_device, resolve_device, resolve_dtype


def test_auto_device_is_cuda_when_visible_else_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device() == torch.device("cuda")


def test_named_devices_pass_through_and_bad_names_are_refused():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(LmstackError, match=r"device='gpu' is not allowed; choose auto, cpu, cuda or cuda:N"):
        resolve_device("gpu")


def test_auto_dtype_is_bf16_only_on_cuda():
    assert resolve_dtype("auto", torch.device("cpu")) is torch.float32  # bf16 matmul crawls on CPU
    assert resolve_dtype("auto", "cuda:0") is torch.bfloat16
    for name, want in (("bf16", torch.bfloat16), ("float16", torch.float16), ("fp32", torch.float32)):
        assert resolve_dtype(name, "cpu") is want
    with pytest.raises(LmstackError, match=r"dtype='fp8' is not allowed; choose auto or one of float32, fp32, "):
        resolve_dtype("fp8", "cpu")


def test_pick_device_gives_the_engine_a_name_and_a_dtype(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto", "auto") == ("cpu", torch.float32)
    assert pick_device("auto", "bf16") == ("cpu", torch.bfloat16)
    assert pick_device("cuda:0", "auto") == ("cuda:0", torch.bfloat16)  # resolved, not moved: no GPU needed

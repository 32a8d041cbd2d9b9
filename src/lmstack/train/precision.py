"""Mixed precision: bf16 autocast on CUDA, fp16 with a gradient scaler, fp32 on CPU by default.

On this kind of CPU bf16 matmul is ~300x slower than fp32, so "auto" never picks bf16 on CPU.

Usage:
    prec = Precision.resolve("auto", device)
    with prec.autocast(): loss = model(x)...
    prec.backward(loss); prec.step(optimizer)        # scaler-aware
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass
class Precision:
    name: str  # fp32 | bf16 | fp16
    device: torch.device
    scaler: torch.amp.GradScaler | None = None

    @classmethod
    def resolve(cls, name: str, device: torch.device) -> "Precision":
        if name == "auto":
            name = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
        if name not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision={name!r} is not allowed; choose auto, fp32, bf16 or fp16")
        scaler = torch.amp.GradScaler(device.type) if name == "fp16" else None
        return cls(name, device, scaler)

    def autocast(self):
        if self.name == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.name == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale(self, optimizer) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer) -> None:
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()

"""Reading safetensors checkpoints lazily: memory-mapped tensors, and only the shards that are asked for.

A safetensors file is an 8-byte header length, a JSON header (dtype, shape, byte range of every
tensor) and the raw bytes. We parse the header ourselves and hand out tensors that are views of a
copy-on-write memory map, so "loading" a checkpoint reads nothing until a weight is touched and
peak memory stays near one copy of the weights (seed VIII.13, serverless cold starts). With a
sharded checkpoint (model.safetensors.index.json) a shard file is opened only when one of its tensors
is requested, so a process that needs a subset of layers reads only their shards.

Usage:
    reader = CheckpointReader("model_dir")
    reader.keys()                       # every tensor name
    w = reader.get("model.norm.weight") # zero-copy view of the mapped file
    reader.opened                       # shard files actually opened so far
"""
from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path

import torch

from lmstack.errors import LmstackError

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


class SafetensorsFile:
    """One memory-mapped .safetensors file with its parsed header."""

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise LmstackError(f"{path} is truncated: shorter than a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100_000_000:
                raise LmstackError(f"{path} is truncated or not a safetensors file (header length {n}, file size {size})")
            try:
                self.header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise LmstackError(f"{path} has a corrupt safetensors header") from None
            self.header.pop("__metadata__", None)
            self.data_start = 8 + n
            need = self.data_start + max((v["data_offsets"][1] for v in self.header.values()), default=0)
            if size < need:
                raise LmstackError(f"{path} is truncated: the header promises {need} bytes, the file has {size}")
            # ACCESS_COPY: copy-on-write, so tensors are writable and the file can never be modified.
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size else None

    def get(self, name: str) -> torch.Tensor:
        info = self.header[name]
        if info["dtype"] not in DTYPES:
            raise LmstackError(f"{self.path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        dtype, shape = DTYPES[info["dtype"]], info["shape"]
        start, end = info["data_offsets"]
        numel = 1
        for s in shape:
            numel *= s
        if numel == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(self.map, dtype=dtype, count=numel, offset=self.data_start + start).view(shape)


class CheckpointReader:
    """All tensors of a model directory (single file or sharded), opened lazily."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        index = self.dir / "model.safetensors.index.json"
        single = self.dir / "model.safetensors"
        if index.exists():
            try:
                self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError):
                raise LmstackError(f"{index} is corrupt: expected JSON with a 'weight_map'") from None
            missing = sorted({f for f in self.weight_map.values() if not (self.dir / f).exists()})
            if missing:
                raise LmstackError(f"{self.dir} is missing shard files listed in its index: {', '.join(missing)}")
        elif single.exists():
            self.weight_map = {k: single.name for k in SafetensorsFile(single).header}
        else:
            hint = " (pytorch_model.bin is pickle, which lmstack never loads; convert it to safetensors)" \
                if (self.dir / "pytorch_model.bin").exists() else ""
            raise LmstackError(f"no model.safetensors or model.safetensors.index.json in {self.dir}{hint}")
        self._files: dict[str, SafetensorsFile] = {}

    @property
    def opened(self) -> list[str]:
        return sorted(self._files)

    def keys(self) -> set[str]:
        return set(self.weight_map)

    def get(self, name: str) -> torch.Tensor:
        fname = self.weight_map[name]
        if fname not in self._files:
            self._files[fname] = SafetensorsFile(self.dir / fname)
        f = self._files[fname]
        if name not in f.header:
            raise LmstackError(f"{self.dir / fname} lacks tensor {name!r} that the index assigns to it")
        return f.get(name)

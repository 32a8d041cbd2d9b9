"""Reading safetensors checkpoints lazily: memory-mapped tensors, and only the shards that are asked for.

A safetensors file is an 8-byte header length, a JSON header (dtype, shape, byte range of every
tensor) and the raw bytes. We parse the header ourselves and hand out tensors that are views of a
copy-on-write memory map, so "loading" a checkpoint reads nothing until a weight is touched and
peak memory stays near one copy of the weights (seed VIII.13, serverless cold starts). With a
sharded checkpoint (model.safetensors.index.json) a shard file is opened only when one of its tensors
is requested, so a process that needs a subset of layers reads only their shards.

The files are untrusted (issue 15): every header is checked against the file before any tensor is handed
out, with the rules of the safetensors library itself (dtype known, byte count = numel x dtype size,
offsets inside the file, tensors packed without overlap or gap), and every file the index names must stay
inside the model directory (load_guard.resolve_inside). Errors never quote the file's bytes.

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
from lmstack.model.load_guard import check_regular, read_json, resolve_inside

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
# the rest of the safetensors spec, where this torch has the type
DTYPES.update({k: getattr(torch, v) for k, v in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"),
                                                 ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"))
               if hasattr(torch, v)})
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own cap


def _bad(path: Path, what: str) -> LmstackError:
    return LmstackError(f"{path} is not a valid safetensors file: {what}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parse_header(path: Path, head: bytes, size: int) -> tuple[dict, int]:
    """(tensor entries, start of the data section) from a header, or LmstackError naming what is wrong.

    The checks mirror the safetensors library's: a JSON object; each tensor a known dtype, a shape of
    non-negative ints and data_offsets [start, end] with end - start == numel x dtype size; sorted by
    start the tensors tile the data section exactly (no overlap, no gap, nothing past the end)."""
    try:
        header = json.loads(head.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _bad(path, "its header is not JSON") from None
    if not isinstance(header, dict):
        raise _bad(path, "its header is not a JSON object")
    header.pop("__metadata__", None)
    data_start, data_size = 8 + len(head), size - 8 - len(head)
    spans = []
    for name, info in header.items():
        where = f"tensor {name!r:.100}"
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise _bad(path, f"{where} needs exactly dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPES:
            raise _bad(path, f"{where} has dtype {dtype!r:.20}; supported: {', '.join(DTYPES)}")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise _bad(path, f"{where} has a shape that is not a list of non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise _bad(path, f"{where} has data_offsets that are not [start, end] with 0 <= start <= end")
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * torch.empty((), dtype=DTYPES[dtype]).element_size()
        if offsets[1] - offsets[0] != nbytes:
            raise _bad(path, f"{where} is {dtype} of shape {shape} = {nbytes:,} bytes but its data_offsets span "
                             f"{offsets[1] - offsets[0]:,} bytes")
        spans.append((offsets[0], offsets[1], name))
    end = 0
    for start, stop, name in sorted(spans, key=lambda s: (s[0], s[1])):
        if start < end:
            raise _bad(path, f"tensor {name!r:.100} overlaps the tensor before it (bytes {start:,}..{stop:,})")
        if start > end:
            raise _bad(path, f"there is a gap of {start - end:,} unclaimed bytes before tensor {name!r:.100}")
        end = stop
    if end != data_size:
        if end > data_size:
            raise _bad(path, f"the header claims {end:,} data bytes but the file holds {data_size:,} (truncated?)")
        raise _bad(path, f"{data_size - end:,} bytes after the last tensor belong to no tensor")
    return header, data_start


class SafetensorsFile:
    """One memory-mapped .safetensors file, its header validated against the file (parse_header)."""

    def __init__(self, path: Path):
        self.path = path
        size = check_regular(path, "safetensors file")
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _bad(path, f"it is {size} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            # n comes from the file: compare it, never print it (it is the file's first 8 bytes).
            if n > size - 8:
                raise _bad(path, f"its header length points past the end of the file ({size:,} bytes)")
            if n > MAX_HEADER_BYTES:
                raise _bad(path, f"its header length is over the {MAX_HEADER_BYTES:,}-byte limit")
            self.header, self.data_start = parse_header(path, f.read(n), size)
            # ACCESS_COPY: copy-on-write, so tensors are writable and the file can never be modified.
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size else None

    def get(self, name: str) -> torch.Tensor:
        info = self.header[name]
        dtype, shape = DTYPES[info["dtype"]], info["shape"]
        start, end = info["data_offsets"]
        itemsize = torch.empty((), dtype=dtype).element_size()
        numel = (end - start) // itemsize  # parse_header checked end - start == numel(shape) * itemsize
        if numel == 0:
            return torch.empty(shape, dtype=dtype)
        offset = self.data_start + start
        if offset % itemsize:
            # Writers that do not align tensors: copy out instead of a misaligned view.
            return torch.frombuffer(bytearray(self.map[offset:self.data_start + end]), dtype=dtype).view(shape)
        return torch.frombuffer(self.map, dtype=dtype, count=numel, offset=offset).view(shape)


class CheckpointReader:
    """All tensors of a model directory (single file or sharded), opened lazily."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        self._files: dict[str, SafetensorsFile] = {}
        index = resolve_inside(self.dir, "model.safetensors.index.json", "weight index")
        single = resolve_inside(self.dir, "model.safetensors", "weights file")
        self.indexed = index.exists()
        if self.indexed:
            data = read_json(self.dir, "model.safetensors.index.json", "weight index")
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise LmstackError(f"{index} is corrupt: expected a JSON object whose 'weight_map' maps tensor "
                                   "names to file names")
            self.weight_map: dict[str, str] = weight_map
            self._paths: dict[str, Path] = {}
            for tensor, fname in weight_map.items():
                if fname not in self._paths:
                    path = resolve_inside(self.dir, fname, f"shard of tensor {tensor!r:.100} in the weight index")
                    if not fname.endswith(".safetensors"):
                        raise LmstackError(f"{index}: shard {fname!r:.200} of tensor {tensor!r:.100} is not a "
                                           ".safetensors file; lmstack loads safetensors only")
                    self._paths[fname] = path
            missing = sorted(f for f, p in self._paths.items() if not p.exists())
            if missing:
                tensors = [t for t, f in weight_map.items() if f == missing[0]]
                raise LmstackError(f"{index}: weight_map names shard {missing[0]!r:.200} (for {len(tensors)} "
                                   f"tensors, e.g. {tensors[0]!r:.100}), which is not in {self.dir}"
                                   + (f"; {len(missing) - 1} more shards are missing too" if len(missing) > 1 else "")
                                   + "; the download or copy is incomplete")
        elif single.exists():
            self._paths = {single.name: single}
            self.weight_map = {k: single.name for k in self._open(single.name).header}
        else:
            hint = " (pytorch_model.bin is pickle, which lmstack never loads; convert it to safetensors)" \
                if (self.dir / "pytorch_model.bin").exists() else ""
            raise LmstackError(f"no model.safetensors or model.safetensors.index.json in {self.dir}{hint}")

    def _open(self, fname: str) -> SafetensorsFile:
        if fname not in self._files:
            self._files[fname] = SafetensorsFile(self._paths[fname])
        return self._files[fname]

    @property
    def opened(self) -> list[str]:
        return sorted(self._files)

    @property
    def files(self) -> list[Path]:
        """Every weight file, resolved inside the directory."""
        return [self._paths[f] for f in sorted(self._paths)]

    def keys(self) -> set[str]:
        return set(self.weight_map)

    def validate_all(self) -> None:
        """Open (and so check the header of) every file now, not when its first tensor is read."""
        for fname in self._paths:
            self._open(fname)

    def get(self, name: str) -> torch.Tensor:
        fname = self.weight_map[name]
        f = self._open(fname)
        if name not in f.header:
            raise LmstackError(f"{f.path} lacks tensor {name!r:.100} that the index assigns to it")
        return f.get(name)

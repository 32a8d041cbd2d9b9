"""Opening untrusted model directories safely: files stay inside the directory, shapes stay sane, and the
memory a config.json asks for is estimated before anything is allocated.

Every loader of a model directory (load_model, read_config, CheckpointReader, load_tokenizer, and the side
files: PEFT adapters, reward heads, AdapterFusion sources) goes through these functions, and LLMEngine
checks its KV pool here, so one hostile directory cannot
- read a file outside itself: a name that is absolute, holds '..', or resolves (through symlinks) outside
  the directory is refused (one exception: a Hugging Face cache snapshot, snapshots/<rev>/, may link into
  its repo's blobs/), and so is anything that is not a regular file (a FIFO or /dev/zero would hang or
  fill memory);
- stall the loader: shapes beyond SHAPE_LIMITS (far above any released model) are refused before any
  module is built, so `num_hidden_layers: 10**6` fails in milliseconds;
- allocate without asking: parameters x dtype bytes (by formula, blocks measured on the meta device) plus
  the position tables built at load (and the engine's KV pool) must fit max_model_gib (default: 64 GiB or
  the machine's RAM, whichever is smaller; `--max_model_gib` or the loader's keyword raises it).
Error messages name the file, the field and the numbers, never the bytes of a file.

Usage:
    path = resolve_inside(model_dir, "config.json")        # Path, or LmstackError if it escapes / is no file
    data = read_json(model_dir, "config.json", "model config")
    spec = read_json_file("tok/tokenizer.json", "tokenizer file", want_object=True)   # a file named directly
    check_config_shapes(cfg, "config.json")                # instant, whatever the numbers are
    est = estimate_memory(cfg, torch.bfloat16)             # MemoryEstimate: total_bytes, parts
    check_memory(cfg, torch.bfloat16, max_model_gib=16, source="dir/config.json")
    set_max_model_gib(200)                                 # what the CLI's --max_model_gib does
    tensors = load_safetensors(adapter_dir, "adapter_model.safetensors")   # side files, same checks
    check_kv_pool(cfg, num_blocks, block_size, torch.float32, max_model_len)  # LLMEngine, before allocating
"""
from __future__ import annotations

from dataclasses import dataclass, field
import json
import os
from pathlib import Path, PurePosixPath, PureWindowsPath
import stat
from typing import Any

from safetensors.torch import load_file
import torch

from lmstack.errors import LmstackError
from lmstack.model.counting import block_params, kv_bytes_per_token, model_stats
from lmstack.model.positions import initial_table_length
from lmstack.model.transformer import Block

GIB = 1024**3
DEFAULT_MAX_MODEL_GIB = 64.0  # the default limit is this or the machine's RAM, whichever is smaller
_max_model_gib: float | None = None  # None: the default; set_max_model_gib (--max_model_gib) overrides it

# JSON files of a model directory are small; the caps stop a multi-GB "config" from being parsed at all.
JSON_MAX_BYTES = {"model config": 16 << 20, "weight index": 256 << 20, "generation config": 16 << 20,
                  "tokenizer file": 1 << 30, "tokenizer config": 64 << 20}

# Hard bounds on shapes (lmstack's field names). Each is 10x or more beyond any released model; they keep
# the checks instant and the products far from integer overflow. The memory limit is the real budget.
SHAPE_LIMITS = {"n_layers": 4096, "vocab_size": 1 << 24, "d_model": 1 << 20, "d_ff": 1 << 22, "moe_d_ff": 1 << 22,
                "n_heads": 1 << 14, "n_kv_heads": 1 << 14, "head_dim": 1 << 14, "max_seq_len": 1 << 28,
                "n_experts": 1 << 14, "moe_top_k": 1 << 14, "n_shared_experts": 1 << 14, "type_vocab_size": 1 << 20,
                "n_unique_layers": 4096, "performer_features": 1 << 20, "linformer_k": 1 << 20,
                "lsh_n_buckets": 1 << 20, "lsh_chunk_size": 1 << 20, "lsh_n_hashes": 1 << 10,
                "attn_block_size": 1 << 20, "sliding_window": 1 << 28, "rope_original_max_seq_len": 1 << 28}


def set_max_model_gib(gib: float | None) -> None:
    """Set the process-wide default of load_model's max_model_gib (the CLI's --max_model_gib); None restores
    the default (min(64 GiB, this machine's RAM))."""
    global _max_model_gib
    if gib is not None and (not isinstance(gib, (int, float)) or isinstance(gib, bool) or not gib > 0):
        raise LmstackError(f"max_model_gib must be a positive number of GiB, got {gib!r}")
    _max_model_gib = None if gib is None else float(gib)


def machine_gib() -> float | None:
    """Physical memory of this machine in GiB (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    except (ValueError, OSError, AttributeError):
        return None


def limit_gib() -> float:
    """The limit in force: set_max_model_gib's value, else min(64 GiB, RAM): more than the machine holds
    could only end in the kernel's OOM killer, mid-load, taking the process (and neighbours) with it."""
    if _max_model_gib is not None:
        return _max_model_gib
    ram = machine_gib()
    return min(DEFAULT_MAX_MODEL_GIB, ram) if ram else DEFAULT_MAX_MODEL_GIB


# ---------------------------------------------------------------- paths
def resolve_inside(directory: str | os.PathLike, name: Any, what: str = "file") -> Path:
    """`directory/name` with symlinks resolved, refused (LmstackError) unless it stays inside `directory`.

    `name` comes from an untrusted file (an index's weight_map): it must be a relative path with no '..'
    component. The result may not exist yet; callers check that (see open_regular)."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise LmstackError(f"{directory}: {what} name {name!r:.80} is not a usable file name")
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute() or PureWindowsPath(name).drive:
        raise LmstackError(f"{directory}: {what} {name!r:.200} is an absolute path; files of a model directory "
                           "must be named relative to it; refused")
    if ".." in name.replace("\\", "/").split("/"):
        raise LmstackError(f"{directory}: {what} {name!r:.200} climbs out with '..'; refused")
    root = Path(directory).resolve()
    target = (root / name).resolve()
    allowed = [root]
    if root.parent.name == "snapshots":
        # The Hugging Face hub cache: snapshots/<revision>/<file> are symlinks into the repo's blobs/.
        allowed.append(root.parent.parent / "blobs")
    if not any(target == a or a in target.parents for a in allowed):
        raise LmstackError(f"{directory}: {what} {name!r:.200} is a symlink that leads outside the model "
                           "directory; refused")
    return target


def check_regular(path: Path, what: str, max_bytes: int | None = None) -> int:
    """Size of `path`, refusing anything but a regular file (FIFOs, devices, directories) or one too large."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise LmstackError(f"{what} {path} cannot be read: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise LmstackError(f"{what} {path} is not a regular file (a directory, FIFO or device); refused")
    if max_bytes is not None and st.st_size > max_bytes:
        raise LmstackError(f"{what} {path} is {st.st_size:,} bytes, more than the {max_bytes:,} a {what} may be")
    return st.st_size


def check_model_dir(path: str | os.PathLike, what: str,
                    files: tuple[str, ...] = ("config.json", "model.safetensors", "tokenizer.json")) -> Path:
    """`path` as a Path when it is a directory holding every one of `files`; else an LmstackError saying
    "<path> is not <what> directory: ..." with the missing piece (`what` carries its article: "an ASR model")."""
    path = Path(path)
    if not path.is_dir():
        raise LmstackError(f"{path} is not {what} directory: no such directory")
    for name in files:
        if not (path / name).is_file():
            raise LmstackError(f"{path} is not {what} directory: {name} is missing")
    return path


def read_json(directory: str | os.PathLike, name: str, what: str, want_object: bool = False) -> Any:
    """Parse directory/name (kept inside the directory, size-capped). Errors give line and column, never text."""
    path = resolve_inside(directory, name, what)
    if not path.exists():
        raise LmstackError(f"{Path(directory) / name} not found")
    return read_json_file(path, what, want_object)


def read_json_file(path: str | os.PathLike, what: str, want_object: bool = False) -> Any:
    """The one guarded JSON reader: a regular file under JSON_MAX_BYTES[what] (16 MiB if unlisted), UTF-8,
    parsed; want_object=True also refuses anything but a JSON object. Every error names `what` and the file."""
    path = Path(path)
    check_regular(path, what, JSON_MAX_BYTES.get(what, 16 << 20))
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise LmstackError(f"{what} {path} is not valid UTF-8 (byte offset {e.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise LmstackError(f"{what} {path} is not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}") from None
    except RecursionError:
        raise LmstackError(f"{what} {path} is nested too deeply to be a {what}") from None
    except ValueError:  # e.g. an integer literal past Python's digit limit
        raise LmstackError(f"{what} {path} holds a number too large to parse") from None
    if want_object and not isinstance(data, dict):
        raise LmstackError(f"{what} {path} must hold a JSON object, got {type(data).__name__}")
    return data


# ---------------------------------------------------------------- shapes
def check_int_fields(values: dict[str, Any], limits: dict[str, int], source: str) -> None:
    """Each present key must be an int in 0..limit (bools and floats refused); ModelConfig checks the rest."""
    for key, limit in limits.items():
        v = values.get(key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int):
            raise LmstackError(f"{source}: {key} must be an integer, got {type(v).__name__}")
        if v < 0 or v > limit:
            raise LmstackError(f"{source}: {key}={v} is outside lmstack's shape limit 0..{limit:,} "
                               "(far beyond any released model); refused before allocating anything")


def check_config_shapes(cfg: Any, source: str, names: dict[str, str] | None = None) -> None:
    """SHAPE_LIMITS on a ModelConfig; `names` maps our field names to the file's (e.g. n_layers ->
    num_hidden_layers) so the message names the field the user can see."""
    names = names or {}
    check_int_fields({names.get(k, k): getattr(cfg, k) for k in SHAPE_LIMITS},
                     {names.get(k, k): v for k, v in SHAPE_LIMITS.items()}, source)
    for key in ("sliding_window_layers", "moe_layers"):  # layer lists: membership tests stay cheap
        layers = getattr(cfg, key)
        if layers is not None and len(layers) > cfg.n_layers:
            raise LmstackError(f"{source}: {names.get(key, key)} lists {len(layers):,} layers but the model has "
                               f"{cfg.n_layers}")


# ---------------------------------------------------------------- memory
@dataclass
class MemoryEstimate:
    total_bytes: int
    parameters: int
    dtype_bytes: int
    parts: dict[str, int] = field(default_factory=dict)
    """bytes per part: embeddings and head, blocks, position tables."""
    fields: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """the config fields each part grows with."""


def _block_numel(cfg: Any, index: int) -> tuple[int, int]:
    """(parameter elements, buffer bytes) of block `index`, built on the meta device: exact for every
    attention and MLP kind, and free (meta tensors hold no memory)."""

    with torch.device("meta"):
        block = Block(cfg, index)
    params = sum(p.numel() for p in block.parameters())
    buffers = sum(b.numel() * b.element_size() for b in block.buffers())
    return params, buffers


def estimate_memory(cfg: Any, dtype: "torch.dtype | None" = None) -> MemoryEstimate:
    """Bytes load_model allocates for cfg in `dtype` (None: the checkpoint's, assumed 4 bytes): parameters by
    formula (blocks counted on the meta device, once per kind of block) plus position tables built at load.
    Runs in milliseconds for any config that passed check_config_shapes."""

    size = torch.empty((), dtype=dtype).element_size() if dtype is not None else 4
    n_blocks = cfg.n_unique_layers or cfg.n_layers
    # Sets, not cfg.is_moe_layer: a long moe_layers list would make that quadratic.
    listed = set(cfg.moe_layers) if cfg.moe_layers is not None else None
    moe = [i for i in range(n_blocks) if cfg.n_experts > 0 and (listed is None or i in listed)]
    moe_set, kinds = set(moe), {}
    if len(moe) < n_blocks:
        kinds[next(i for i in range(n_blocks) if i not in moe_set)] = n_blocks - len(moe)
    if moe:
        kinds[moe[0]] = len(moe)
    block_params_total, block_buffers, formula_blocks = 0, 0, 0
    for index, count in kinds.items():
        p, b = _block_numel(cfg, index)
        block_params_total += count * p
        block_buffers += count * b
        formula_blocks += count * block_params(cfg, index)[0]
    # Embeddings, output head, final norm: the counting formula's total minus its own block count.
    other = model_stats(cfg).total_params - formula_blocks
    tables = 0
    length = initial_table_length(cfg)
    if cfg.position == "rope":
        tables = 2 * length * cfg.head_dim * 4  # cos and sin, fp32
    elif cfg.position == "sinusoidal":
        tables = length * cfg.d_model * 4
    parts = {"embeddings and head": other * size, "blocks": block_params_total * size + block_buffers,
             "position tables": tables}
    fields = {"embeddings and head": ("vocab_size", "d_model", "max_seq_len" if cfg.position == "learned" else ""),
              "blocks": ("n_layers", "d_model", "d_ff", "n_heads", "head_dim")
              + (("n_experts", "moe_d_ff") if moe else ()),
              "position tables": ("max_seq_len", "head_dim" if cfg.position == "rope" else "d_model")}
    fields = {k: tuple(f for f in v if f) for k, v in fields.items()}
    return MemoryEstimate(sum(parts.values()), other + block_params_total, size, parts, fields)


def check_memory(cfg: Any, dtype: torch.dtype | None, max_model_gib: float | None = None, source: str = "config",
                 names: dict[str, str] | None = None) -> MemoryEstimate:
    """Refuse (LmstackError naming the fields and the estimate) when cfg needs more than max_model_gib."""
    limit = max_model_gib if max_model_gib is not None else limit_gib()
    est = estimate_memory(cfg, dtype)
    if est.total_bytes > limit * GIB:
        names = names or {}
        part = max(est.parts, key=est.parts.get)
        shown = ", ".join(f"{names.get(f, f)}={getattr(cfg, f)}" for f in est.fields[part])
        raise LmstackError(
            f"{source}: loading needs about {est.total_bytes / GIB:,.1f} GiB ({est.parameters:,} parameters x "
            f"{est.dtype_bytes} bytes + position tables), over the {limit:g} GiB limit; most of it is the "
            f"{part} ({est.parts[part] / GIB:,.1f} GiB, from {shown}). Raise the limit with --max_model_gib "
            "(or load_model(..., max_model_gib=...)) if this is intended")
    return est


def load_safetensors(directory: str | os.PathLike, name: str, what: str = "safetensors file") -> dict:
    """Every tensor of directory/name, a file kept inside the directory whose header passes the checks of
    checkpoint.parse_header (side files such as adapters and reward heads load through here)."""

    # lazy: cycle (lmstack.model.lazy_safetensors imports this module)
    from lmstack.model.lazy_safetensors import SafetensorsFile

    path = resolve_inside(directory, name, what)
    if not path.exists():
        raise LmstackError(f"{Path(directory) / name} not found")
    SafetensorsFile(path)  # validates the header against the file; raises LmstackError
    return load_file(str(path))


def load_state_checked(module: "torch.nn.Module", tensors: dict, source: str, prefix: str = "") -> None:
    """Load `tensors` into `module` only when every name and shape matches; otherwise an LmstackError naming
    `source` and the first mismatches (load_state_dict's own error is a wall of names, and strict=False would
    silently keep random weights). `prefix` is only for the message: the saved names carry it, `tensors` do not."""
    want = module.state_dict()
    missing, extra = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
    if missing or extra:
        raise LmstackError(f"{source} does not match its config (another model's weights?): missing "
                           f"{[prefix + k for k in missing[:3]]}, unexpected {[prefix + k for k in extra[:3]]}")
    bad = [k for k in want if tensors[k].shape != want[k].shape]
    if bad:
        raise LmstackError(f"{source} does not match its config: {prefix}{bad[0]} has shape "
                           f"{tuple(tensors[bad[0]].shape)}, the config wants {tuple(want[bad[0]].shape)}")
    module.load_state_dict(tensors)


def check_kv_pool(cfg: Any, num_blocks: int, block_size: int, dtype: "torch.dtype", max_model_len: int,
                  max_model_gib: float | None = None, bytes_per_token: int | None = None) -> int:
    """Bytes of a paged KV pool (K and V, every layer), refused together with the weights' estimate when over
    max_model_gib. The engine sizes its pool to hold at least one max_model_len sequence, and max_model_len
    defaults to the config's max_position_embeddings, so without this check that field alone could ask
    for a pool of any size. bytes_per_token: the pool's own per-token size when it is not the weights' dtype
    (an int8 KV cache, infer/kv_quant.py)."""

    limit = max_model_gib if max_model_gib is not None else limit_gib()
    item = torch.empty((), dtype=dtype).element_size()
    pool = (bytes_per_token or kv_bytes_per_token(cfg, item)) * block_size * num_blocks
    weights = estimate_memory(cfg, dtype).total_bytes
    if pool + weights > limit * GIB:
        raise LmstackError(
            f"the KV cache pool needs {pool / GIB:,.1f} GiB ({num_blocks:,} blocks of {block_size} tokens, enough "
            f"for one sequence of max_model_len={max_model_len:,}, which defaults to the model's "
            f"max_position_embeddings) on top of {weights / GIB:,.1f} GiB of weights, over the {limit:g} GiB "
            "limit; pass a smaller --max_model_len or --num_blocks, or raise --max_model_gib")
    return pool

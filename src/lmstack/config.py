"""Dataclass configs: strict loading from dicts/YAML/JSON, and saving.

Every component has a plain dataclass config. This module turns dicts (from YAML recipes, JSON
files or `config.json`) into those dataclasses and back, refusing unknown keys and values that
are not among a `Literal`'s choices, with a message that names the key and what is allowed.

Usage:
    from lmstack.config import from_dict, to_dict, load_config, save_config
    cfg = from_dict(ModelConfig, {"d_model": 64, "position": "rope"})
    save_config(cfg, "run/config.yaml")
    cfg = load_config(ModelConfig, "run/config.yaml")
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
import json
import os
from pathlib import Path
import stat
import tempfile
import types
import typing
from typing import Any, Callable, Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml

from lmstack.errors import LmstackError

T = TypeVar("T")


class ConfigError(LmstackError, ValueError):
    """A config key or value is not allowed. The message names the key and the allowed values."""


def _check_value(path: str, hint: Any, value: Any, base: Any = None) -> Any:
    origin = get_origin(hint)
    if hint is Any:
        return value
    if origin is Literal:
        choices = get_args(hint)
        if value not in choices:
            raise ConfigError(f"{path}={value!r} is not allowed; choose one of {', '.join(map(repr, choices))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(path, arg, value)
            except (ConfigError, TypeError) as e:
                errors.append(str(e))
        raise ConfigError(f"{path}={value!r} does not match {hint}: {'; '.join(errors)}")
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path} must be a mapping of {hint.__name__} fields, got {value!r}")
        return from_dict(hint, value, _prefix=path + ".", _base=base if isinstance(base, hint) else None)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path} must be a list, got {value!r}")
        args = get_args(hint)
        item = args[0] if args else Any
        items = [_check_value(f"{path}[{i}]", item, v) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path} must be a mapping, got {value!r}")
        return dict(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path} must be a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{path} must be an integer, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path} must be true or false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path} must be a string, got {value!r}")
        return value
    return value


def derived_fields(cfg: Any) -> dict[str, Any]:
    """{field: sentinel} of the fields `cfg` derived from others in __post_init__ (e.g. ModelConfig's
    head_dim = d_model // n_heads when given 0). A config class opts in by recording `_derived`."""
    return dict(getattr(cfg, "_derived", None) or {})


def unresolved(cfg: Any) -> dict[str, Any]:
    """The init arguments that rebuild `cfg`, with every derived field back at its sentinel, so that
    rebuilding after an override (say d_model) derives head_dim and d_ff again."""
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.init}
    values.update(derived_fields(cfg))
    return values


def _field_default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def renamed_keys(cls: type) -> dict[str, str]:
    """{old key: new dotted key} of a config class whose fields were renamed or nested (its `renamed_keys`
    class attribute): the old names are refused with the new one, in flags, recipe files and dicts alike, so
    that an old flag never silently means nothing."""
    return dict(getattr(cls, "renamed_keys", None) or {})


def check_renamed(cls: type, args: list[str], command: str) -> None:
    """ConfigError "<command>: --steps is now --train.steps" for the first old flag in `args` (dashes already
    turned into underscores), or for an old top-level key in a --config file they name."""
    table = renamed_keys(cls)
    if not table:
        return
    for i, arg in enumerate(args):
        name, eq, value = arg.partition("=")
        if name in ("--config", "--config+"):
            value = value if eq else args[i + 1] if i + 1 < len(args) else ""
            path = Path(value)
            keys = read_mapping(path) if value and path.is_file() else {}
            old = next((k for k in keys if k in table), None)
            if old:
                raise ConfigError(f"{command}: key '{old}' in {path} is now '{table[old]}' "
                                  f"(--{old} is now --{table[old]})")
        elif name.startswith("--") and name[2:] in table:
            raise ConfigError(f"{command}: --{name[2:]} is now --{table[name[2:]]}")
        elif name.startswith("--no_") and name[5:] in table:  # a negated boolean: --no_progress
            raise ConfigError(f"{command}: --{name[2:]} is now --no_{table[name[5:]]}")


def from_dict(cls: type[T], data: dict[str, Any], _prefix: str = "", _base: Any = None) -> T:
    """Build dataclass `cls` from `data`, refusing unknown keys and ill-typed values.

    A partial mapping for a nested config is merged into that field's default (as the CLI and a recipe
    YAML do), with derived fields re-derived: {"pretrain": {"model": {"d_model": 512}}} keeps the
    speedrun's default model and changes only its width (and so its head_dim and d_ff)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{_prefix or cls.__name__} must be a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    renamed = [k for k in unknown if k in renamed_keys(cls)]
    if renamed:
        raise ConfigError(f"key {_prefix}{renamed[0]!r} of {cls.__name__} is now "
                          f"{_prefix}{renamed_keys(cls)[renamed[0]]!r}")
    if unknown:
        raise ConfigError(
            f"unknown key {_prefix}{unknown[0]!r} for {cls.__name__}; allowed keys: {', '.join(sorted(fields))}"
        )
    kwargs = unresolved(_base) if _base is not None else {}
    for k, v in data.items():
        base = None
        if isinstance(v, dict) and dataclasses.is_dataclass(hints[k]):
            base = getattr(_base, k) if _base is not None else _field_default(fields[k])
        kwargs[k] = _check_value(_prefix + k, hints[k], v, base)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain dict (lists, not tuples) of a dataclass, recursively."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def atomic_save_figure(fig: Any, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Save a matplotlib figure as PNG via a temporary file and a rename, close it, return the path."""
    # lazy: heavy (matplotlib), which this module does not import at its top
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _current_umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it and put it back
    os.umask(mask)
    return mask


_UMASK = _current_umask()  # read once at import: set-and-restore is not safe to do while other threads create files


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` via a temporary file and a rename, so readers never see half a file."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` via a temporary file and a rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file private (0600); give it the mode a plain open() would (the umask's default), or
        # keep the mode of the file it replaces, so a rewrite never changes who can read it
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
        except FileNotFoundError:
            mode = 0o666 & ~_UMASK
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_mapping(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML or JSON file that must hold a mapping; errors name the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not valid UTF-8 (byte {e.start})") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"config file {path} is malformed: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level, got {type(data).__name__}")
    return data


def load_config(cls: type[T], path: str | os.PathLike) -> T:
    """Load dataclass `cls` from a YAML or JSON file, strictly."""
    return from_dict(cls, read_mapping(path))


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Save a dataclass as YAML (or JSON if the suffix is .json), atomically."""
    data = to_dict(cfg)
    text = json.dumps(data, indent=2) + "\n" if str(path).endswith(".json") else yaml.safe_dump(data, sort_keys=False)
    atomic_write_text(path, text)


def _derived_defaults(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """{"model.head_dim": 0, ...}: the sentinels of every derived field in a config tree."""
    out = {prefix + k: v for k, v in derived_fields(cfg).items()}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            out.update(_derived_defaults(value, f"{prefix}{f.name}."))
    return out


@dataclass(frozen=True)
class ConfigCommand:
    """A CLI command configured by one dataclass: its fields are the flags, a recipe YAML fills them.

    `lmstack.cli` parses `--config recipe.yaml --a.b value` into the dataclass and calls `run(cfg)`.
    `--print_config` prints the resolved config that would run (derived fields filled in) and exits."""

    config: type
    run: Callable[[Any], Any]

    def parse(self, args: list[str], prog: str = "lmstack", parser_class: type | None = None) -> Any:
        """The config that `args` describe: defaults, then --config files, then flags, then derivation."""
        # lazy: heavy (jsonargparse), which this module does not import at its top
        from jsonargparse import ActionConfigFile, ArgumentParser

        parser = (parser_class or ArgumentParser)(
            prog=prog, description=(self.run.__doc__ or "").strip().split("\n")[0])
        parser.add_argument("--config", action=ActionConfigFile, help="a recipe YAML holding these fields")
        parser.add_class_arguments(self.config, nested_key=None, as_group=False)
        # jsonargparse takes each nested default from an instance, whose derived fields are already
        # resolved (head_dim 16 for d_model 64). Put the sentinels back so they are derived after the
        # overrides, exactly as from_dict and the Python constructors do.
        parser.set_defaults(_derived_defaults(self.config()))
        values = parser.instantiate(parser.parse_args(args)).as_dict()
        values.pop("config", None)
        return self.config(**values)

    def __call__(self, args: list[str], prog: str, parser_class: type | None = None) -> Any:
        check_renamed(self.config, args, prog.removeprefix("lmstack "))
        flags = [a for a in args if a.split("=")[0] in ("--print_config", "--print-config")]
        cfg = self.parse([a for a in args if a not in flags], prog, parser_class)
        if flags:
            print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
            return None
        return self.run(cfg)

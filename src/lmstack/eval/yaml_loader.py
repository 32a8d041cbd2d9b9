"""Read lm-evaluation-harness task YAMLs from a directory (`lmstack eval --include_path DIR`), safely.

Every *.yaml / *.yml under DIR is read with yaml.safe_load semantics. A file with a string `task:` key is
a task; `include:` merges a base file first (lm-eval's rule: the including file's keys win). Files with
neither `task` nor `group` are templates for `include` and are not tasks.

What we do not support is refused, never run, with an error naming the file and the key:
  - `!function` anywhere: that is user Python (process_docs, doc_to_text, metrics, ...); we do not
    import or execute code from a task directory;
  - data that is not a local json / csv file (`dataset_path` other than json or csv means the
    Hugging Face hub, which we do not download from), `dataset_name`, `custom_dataset`, other
    `dataset_kwargs` than data_files;
  - groups (`group:` files, `task:` lists, aggregate_metric_list), promptsource `use_prompt`, images and
    audio, gen_prefix, repeats > 1, code execution (`unsafe_code`), and keys lm-eval does not know.
A refused task is kept under its name with the reason, so asking for it gives that reason while the other
tasks of the directory still load.

Usage:
    from lmstack.eval.yaml_loader import load_task_dir
    found = load_task_dir("my_tasks/")       # TaskDir: .configs {name: (config, file)}, .refused {name: why}
    task = found.get("my_mc")                 # a YamlTask (lmstack.eval.tasks.yaml_task)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmstack.errors import LmstackError

# TaskConfig's keys (lm_eval/config/task.py) we read, and those we read and ignore because they change
# no score (labels, bookkeeping, decontamination).
SUPPORTED = {"task", "include", "dataset_path", "dataset_kwargs", "training_split", "validation_split",
             "test_split", "fewshot_split", "doc_to_text", "doc_to_target", "doc_to_choice", "description",
             "target_delimiter", "fewshot_delimiter", "fewshot_config", "num_fewshot", "metric_list",
             "output_type", "generation_kwargs", "filter_list", "repeats", "unsafe_code", "dataset_name"}
IGNORED = {"tag", "task_alias", "metadata", "should_decontaminate", "doc_to_decontamination_query"}
REFUSED = {
    "group": "task groups (with their aggregation) are not supported; list the tasks in --tasks instead",
    "aggregate_metric_list": "group aggregation is not supported",
    "custom_dataset": "custom datasets are Python code, which we do not run",
    "process_docs": "process_docs is Python code, which we do not run; preprocess the data file instead",
    "process_results": "process_results is Python code, which we do not run",
    "use_prompt": "promptsource prompts are not supported; write doc_to_text / doc_to_target",
    "doc_to_image": "image inputs are not supported",
    "doc_to_audio": "audio inputs are not supported",
    "gen_prefix": "gen_prefix is not supported",
    "class": "task classes are Python code, which we do not run",
}
FEWSHOT_KEYS = ("sampler", "split", "samples", "doc_to_text", "doc_to_target", "doc_to_choice", "target_delimiter",
                "fewshot_delimiter")
OUTPUT_TYPES = ("multiple_choice", "loglikelihood", "loglikelihood_rolling", "generate_until")
DATA_FORMATS = ("json", "csv")


class FunctionTag:
    """What a `!function module.name` tag loads as: a marker we refuse, never an import."""

    def __init__(self, target: str):
        self.target = target


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `!function x` as a FunctionTag (so the refusal can name its key)."""


_Loader.add_constructor("!function", lambda loader, node: FunctionTag(str(loader.construct_scalar(node))))


class RefusedTask(LmstackError):
    """A task file uses something the reader does not support; the message names the file and the key."""


def refuse(path: Path | str, key: str, why: str) -> RefusedTask:
    return RefusedTask(f"{path}: key {key!r}: {why}")


def _find_function(value: Any, where: str) -> str | None:
    """The key path of the first FunctionTag inside `value`, else None."""
    if isinstance(value, FunctionTag):
        return where
    if isinstance(value, dict):
        for k, v in value.items():
            hit = _find_function(v, f"{where}.{k}" if where else str(k))
            if hit:
                return hit
    if isinstance(value, list):
        for i, v in enumerate(value):
            hit = _find_function(v, f"{where}.{i}")
            if hit:
                return hit
    return None


def read_yaml(path: Path) -> dict:
    """One YAML file as a dict (safe loading); a syntax error names the file and line."""
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise LmstackError(f"{path}: not valid YAML: {e}") from None
    except UnicodeDecodeError:
        raise LmstackError(f"{path}: not UTF-8 text") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LmstackError(f"{path}: a task file must be a mapping of keys, got {type(data).__name__}")
    return data


def resolve(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """The file's keys with its `include` chain merged in (the including file wins)."""
    if path in seen:
        raise LmstackError(f"{path}: key 'include' makes a cycle: {' -> '.join(map(str, seen + (path,)))}")
    data = read_yaml(path)
    base = data.pop("include", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise refuse(path, "include", "must be one file name")
    base_path = (path.parent / base).resolve()
    if not base_path.is_file():
        raise refuse(path, "include", f"{base_path} does not exist")
    return {**resolve(base_path, seen + (path,)), **data}


def check_config(cfg: dict, path: Path) -> None:
    """Raise RefusedTask naming the file and key of the first thing the reader does not support."""
    hit = _find_function(cfg, "")
    if hit:
        raise refuse(path, hit, "!function hooks are user Python, which lmstack never imports or runs; "
                                "express it in Jinja or preprocess the data file")
    for key, value in cfg.items():
        if key in REFUSED and value not in (None, [], {}):
            raise refuse(path, key, REFUSED[key])
        if key not in SUPPORTED and key not in IGNORED and key not in REFUSED:
            raise refuse(path, key, "not a key lm-eval's TaskConfig has (or not one this reader supports)")
    if cfg.get("dataset_path") not in DATA_FORMATS:
        raise refuse(path, "dataset_path", f"{cfg.get('dataset_path')!r}: only local files are read "
                                           f"(dataset_path: json or csv with dataset_kwargs.data_files); "
                                           "Hugging Face hub datasets are not downloaded")
    if cfg.get("dataset_name") is not None:
        raise refuse(path, "dataset_name", "dataset configs are a hub feature; use dataset_kwargs.data_files")
    kwargs = cfg.get("dataset_kwargs") or {}
    if not isinstance(kwargs, dict) or set(kwargs) - {"data_files"} or "data_files" not in kwargs:
        extra = sorted(set(kwargs) - {"data_files"}) if isinstance(kwargs, dict) else []
        raise refuse(path, f"dataset_kwargs.{extra[0]}" if extra else "dataset_kwargs",
                     "only dataset_kwargs.data_files (a file, a list, or {split: file}) is supported")
    if cfg.get("output_type", "generate_until") not in OUTPUT_TYPES:
        raise refuse(path, "output_type", f"{cfg.get('output_type')!r}; choose one of {', '.join(OUTPUT_TYPES)}")
    if cfg.get("repeats", 1) != 1:
        raise refuse(path, "repeats", "repeats > 1 (several samples per item) is not supported")
    if cfg.get("unsafe_code"):
        raise refuse(path, "unsafe_code", "tasks that execute model-written code are not supported here")
    fewshot = cfg.get("fewshot_config") or {}
    if not isinstance(fewshot, dict):
        raise refuse(path, "fewshot_config", "must be a mapping")
    for key, value in fewshot.items():
        if key == "sampler" and value not in ("default", "first_n"):
            raise refuse(path, "fewshot_config.sampler", f"{value!r}; supported: default, first_n")
        if key == "samples" and not (isinstance(value, list) and all(isinstance(d, dict) for d in value)):
            raise refuse(path, "fewshot_config.samples", "must be a list of documents (mappings)")
        if key not in FEWSHOT_KEYS:
            raise refuse(path, f"fewshot_config.{key}", f"supported: {', '.join(FEWSHOT_KEYS)}")


@dataclass
class TaskDir:
    """What a task directory holds: configs by task name (with their file), and refused names with why."""

    root: Path
    configs: dict[str, tuple[dict, Path]] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)

    def names(self) -> list[str]:
        return sorted(set(self.configs) | set(self.refused))

    def __contains__(self, name: str) -> bool:
        return name in self.configs or name in self.refused

    def get(self, name: str, **kwargs: Any):
        """A fresh YamlTask for `name` (kwargs override its settings, as task arguments do)."""
        # lazy: a cycle (yaml_task imports refuse from here), and the lmstack.eval.tasks package imports every
        # built-in task (~1 s), which listing or `lmstack eval --help` does not need
        from lmstack.eval.tasks.yaml_task import YamlTask

        if name in self.refused:
            raise LmstackError(self.refused[name])
        if name not in self.configs:
            raise LmstackError(f"no task {name!r} in {self.root}; it has: {', '.join(self.names()) or '(none)'}")
        cfg, path = self.configs[name]
        return YamlTask(cfg, path, **kwargs)


def load_task_dir(root: str | Path) -> TaskDir:
    """Every task of the YAML files under `root` (recursively); see the module docstring."""
    root = Path(root)
    if not root.is_dir():
        raise LmstackError(f"--include_path {root} is not a directory")
    found = TaskDir(root)
    files = sorted(p for p in root.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())
    for path in files:
        raw = read_yaml(path)
        name = raw.get("task")
        if name is None:
            group = raw.get("group")
            if isinstance(group, str):
                found.refused[group] = str(refuse(path, "group", REFUSED["group"]))
            continue  # a template for `include`, not a task
        if not isinstance(name, str):
            # A task list is how a group names its members.
            why = refuse(path, "task", "a list of tasks is a group; groups are not supported, name the tasks "
                                       "in --tasks instead")
            found.refused.setdefault(str(raw.get("group") or path.stem), str(why))
            continue
        if name in found:
            other = found.configs[name][1] if name in found.configs else "another file"
            raise LmstackError(f"{path}: task {name!r} is also defined in {other}")
        try:
            cfg = resolve(path)
            check_config(cfg, path)
        except RefusedTask as e:
            found.refused[name] = str(e)
            continue
        found.configs[name] = (cfg, path)
    return found

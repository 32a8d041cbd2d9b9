"""YamlTask: one lm-evaluation-harness task YAML (already checked by yaml_loader) as an lmstack Task.

Semantics follow lm_eval/api/task.py (ConfigurableTask) so scores agree with lm-eval's:
  - data: `dataset_path: json` (JSON Lines, or a JSON list of rows) or `csv` (columns typed as pandas
    would: all-int -> int, all-number -> float, True/False -> bool), from dataset_kwargs.data_files
    (a file or list -> split "train", or {split: file or list}; glob patterns expand). A relative path is
    taken from the current directory when it exists there (as `datasets` does), else from the YAML's directory.
  - eval split: test_split, else validation_split; few-shot pool: fewshot_config.split or fewshot_split,
    else fewshot_config.samples (shots written in the YAML), else training, validation, test; fewshot_config's
    doc_to_text / doc_to_target / doc_to_choice / target_delimiter / fewshot_delimiter apply to the shots. fewshot_config.sampler first_n takes the pool's first n (lm-eval's
    draw exactly); the default sampler draws at random with a fixed seed (our draw, not lm-eval's).
  - doc_to_text / doc_to_target / doc_to_choice: a field name, a Jinja template ({{...}}, rendered in a
    sandbox with StrictUndefined and lm-eval's regex_replace filter), an int, or a list. A rendered target
    of digits is an index when there are choices; "[...]" renders to a list; choices render with
    ast.literal_eval.
  - prompt = description + shots (text + target_delimiter + answer + fewshot_delimiter) + text.
  - output types: multiple_choice (acc, acc_norm, acc_bytes, exact_match = gold is greedy, f1 of label 1 and
    mcc over (gold, prediction) pairs), loglikelihood (acc,
    perplexity), loglikelihood_rolling over doc_to_target (word_perplexity, byte_perplexity,
    bits_per_byte), generate_until (exact_match with ignore_case / ignore_punctuation / ignore_numbers /
    regexes_to_ignore; generation_kwargs until, max_gen_toks, do_sample, temperature, top_p).
  - filter_list: pipelines of regex (regex_pattern, group_select, fallback), take_first, lowercase,
    uppercase, remove_whitespace. With one pipeline metrics keep their plain names; with several they are
    named "metric,filter" as lm-eval names them.

Usage:
    from lmstack.eval.yaml_loader import load_task_dir
    task = load_task_dir("my_tasks/").get("my_mc")
    evaluate(lm, [task])
"""
from __future__ import annotations

import ast
import csv
import json
import math
from pathlib import Path
import re
import string
from typing import Any, Callable

from jinja2 import StrictUndefined, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lmstack.errors import LmstackError
from lmstack.eval import metrics as M
from lmstack.eval.lm import GenArgs, GenerateUntil, Loglikelihood, Request, Rolling
from lmstack.eval.task import Task, TaskDataMissing, read_jsonl
from lmstack.eval.yaml_loader import refuse

_ENV = ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True)
_ENV.filters["regex_replace"] = lambda s, pattern, repl, count=0: re.sub(pattern, repl, s, count=count)

# metric -> (output types it applies to, its aggregation, higher is better)
METRICS = {
    "acc": (("multiple_choice", "loglikelihood"), "mean", True),
    "acc_norm": (("multiple_choice",), "mean", True),
    "acc_bytes": (("multiple_choice",), "mean", True),
    "f1": (("multiple_choice",), "f1", True),
    "mcc": (("multiple_choice",), "matthews_corrcoef", True),
    "exact_match": (("multiple_choice", "generate_until"), "mean", True),
    "perplexity": (("loglikelihood",), "perplexity", False),
    "word_perplexity": (("loglikelihood_rolling",), "weighted_perplexity", False),
    "byte_perplexity": (("loglikelihood_rolling",), "weighted_perplexity", False),
    "bits_per_byte": (("loglikelihood_rolling",), "bits_per_byte", False),
}
DEFAULT_METRICS = {"multiple_choice": ["acc", "acc_norm"], "loglikelihood": ["perplexity", "acc"],
                   "loglikelihood_rolling": ["word_perplexity", "byte_perplexity", "bits_per_byte"],
                   "generate_until": ["exact_match"]}
EM_OPTIONS = ("ignore_case", "ignore_punctuation", "ignore_numbers", "regexes_to_ignore")
FILTERS = ("regex", "take_first", "lowercase", "uppercase", "remove_whitespace")
GEN_KEYS = ("until", "max_gen_toks", "do_sample", "temperature", "top_p")
SAMPLES_SPLIT = "fewshot_config.samples"
"""The few-shot pool's name when fewshot_config.samples lists the shots inline."""


def binary_f1(items: list) -> float:
    """F1 of label 1 over (gold, pred) pairs: sklearn's f1_score default, which lm-eval's f1 aggregates with."""
    tp = sum(g == 1 and p == 1 for g, p in items)
    wrong = sum((g == 1) != (p == 1) for g, p in items)
    return 2 * tp / (2 * tp + wrong) if tp else 0.0


def matthews_corrcoef(items: list) -> float:
    """Multiclass Matthews correlation over (gold, pred) pairs (sklearn's formula; 0 when undefined)."""
    n = len(items)
    correct = sum(g == p for g, p in items)
    labels = {x for pair in items for x in pair}
    t = {k: sum(g == k for g, _ in items) for k in labels}
    p = {k: sum(q == k for _, q in items) for k in labels}
    cov = correct * n - sum(t[k] * p[k] for k in labels)
    denom = math.sqrt((n * n - sum(v * v for v in p.values())) * (n * n - sum(v * v for v in t.values())))
    return cov / denom if denom else 0.0


def _aggregate(kind: str) -> Callable[[list], float]:
    if kind == "f1":
        return binary_f1
    if kind == "matthews_corrcoef":
        return matthews_corrcoef
    if kind == "perplexity":
        return lambda xs: math.exp(-M.mean([float(x) for x in xs]))
    if kind == "weighted_perplexity":
        return lambda xs: math.exp(-sum(ll for ll, _ in xs) / sum(n for _, n in xs))
    if kind == "bits_per_byte":
        return lambda xs: -sum(ll for ll, _ in xs) / sum(n for _, n in xs) / math.log(2)
    return M.mean


def _typed_column(values: list[str]) -> list[Any]:
    """A CSV column typed as pandas types it (what `datasets`' csv loader gives lm-eval)."""
    present = [v for v in values if v != ""]
    if not present:
        return values
    for cast in (int, float):
        try:
            for v in present:
                cast(v)
        except ValueError:
            continue
        return [cast(v) if v != "" else None for v in values]
    if all(v in ("True", "False") for v in present):
        return [None if v == "" else v == "True" for v in values]
    return values


def read_rows(path: Path, fmt: str) -> list[dict]:
    if fmt == "csv":
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows:
            return []
        columns = {k: _typed_column([r.get(k) or "" for r in rows]) for k in rows[0]}
        return [{k: columns[k][i] for k in columns} for i in range(len(rows))]
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise LmstackError(f"{path} is not valid JSON: {e.msg}") from None
    else:
        rows = read_jsonl(path)
    if not all(isinstance(r, dict) for r in rows):
        raise LmstackError(f"{path}: every row must be a JSON object")
    return rows


class YamlTask(Task):
    """One lm-eval task YAML. Settings a task argument may override: the Task ones (eval_split,
    fewshot_split, description, delimiters) and num_fewshot."""

    num_fewshot: int = 0
    """Few-shot examples when the command line does not set --num_fewshot (the YAML's num_fewshot)."""

    def __init__(self, cfg: dict, path: Path, **kwargs: Any):
        self.cfg, self.file = dict(cfg), Path(path)
        self.name = cfg["task"]
        self.kind = cfg.get("output_type", "generate_until")
        splits = {s: cfg.get(f"{s}_split") for s in ("training", "validation", "test")}
        eval_split = splits["test"] or splits["validation"]
        if eval_split is None:
            raise refuse(path, "test_split", "a task needs test_split or validation_split")
        self.fewshot_cfg = fewshot = dict(cfg.get("fewshot_config") or {})
        # lm-eval's FewshotConfig: its doc_to_* override the task's for the shots only.
        self.shot_cfg = {**cfg, **{k: v for k, v in fewshot.items() if k.startswith("doc_to_")}}
        pool = (fewshot.get("split") or cfg.get("fewshot_split")
                or (SAMPLES_SPLIT if fewshot.get("samples") is not None else None)
                or splits["training"] or splits["validation"] or splits["test"])
        self.first_n = fewshot.get("sampler") == "first_n"
        self.files = self._data_files(cfg["dataset_kwargs"]["data_files"])
        metrics, self.em_options, self.higher = self._metrics(cfg.get("metric_list"))
        self.filters = self._filters(cfg.get("filter_list"))
        self.gen = self._gen_args(cfg.get("generation_kwargs"))
        defaults = {"eval_split": eval_split, "fewshot_split": pool,
                    "output_type": "rolling" if self.kind == "loglikelihood_rolling" else self.kind,
                    "default_metrics": tuple(metrics), "description": cfg.get("description") or "",
                    "num_fewshot": int(cfg.get("num_fewshot") or 0)}
        for key in ("target_delimiter", "fewshot_delimiter"):
            if key in cfg:
                if not isinstance(cfg[key], str):
                    raise refuse(path, key, "must be a string")
                defaults[key] = cfg[key]
        super().__init__(**{**defaults, **kwargs})

    # -- config pieces -------------------------------------------------------------------------------
    def _data_files(self, spec: Any) -> dict[str, list[Path]]:
        if isinstance(spec, (str, list)):
            spec = {"train": spec}
        if not isinstance(spec, dict):
            raise refuse(self.file, "dataset_kwargs.data_files", "must be a file, a list or {split: file}")
        out = {}
        for split, files in spec.items():
            files = [files] if isinstance(files, str) else files
            if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
                raise refuse(self.file, f"dataset_kwargs.data_files.{split}", "must be a file name or a list")
            out[str(split)] = [p for f in files for p in self._expand(f)]
        return out

    def _expand(self, name: str) -> list[Path]:
        """A data file (or glob pattern, as `datasets` takes): from the current directory when it is there
        (as `datasets` reads it), else from the YAML's directory."""
        p = Path(name)
        if not any(c in name for c in "*?["):
            return [p if p.is_absolute() or p.exists() else self.file.parent / p]
        for base in ([Path(p.anchor)] if p.is_absolute() else [Path.cwd(), self.file.parent]):
            hits = sorted(base.glob(str(p.relative_to(p.anchor)) if p.is_absolute() else name))
            if hits:
                return hits
        return [p]  # matches nothing: docs() reports the missing file

    def _metrics(self, spec: Any) -> tuple[list[str], dict, dict]:
        if spec is None:
            return DEFAULT_METRICS[self.kind], {}, {}
        if not isinstance(spec, list) or not spec:
            raise refuse(self.file, "metric_list", "must be a non-empty list of {metric: name, ...}")
        names, options, higher = [], {}, {}
        for i, entry in enumerate(spec):
            where = f"metric_list.{i}"
            name = entry.get("metric") if isinstance(entry, dict) else None
            if name not in METRICS or self.kind not in METRICS[name][0]:
                ok = [m for m, (kinds, _, _) in METRICS.items() if self.kind in kinds]
                raise refuse(self.file, f"{where}.metric", f"{name!r} is not supported for {self.kind} "
                                                           f"(supported: {', '.join(ok)})")
            for key, value in entry.items():
                if key == "aggregation" and value != METRICS[name][1]:
                    raise refuse(self.file, f"{where}.aggregation", f"{value!r}; {name} aggregates by "
                                                                    f"{METRICS[name][1]}")
                if key == "higher_is_better":
                    higher[name] = bool(value)
                elif key not in ("metric", "aggregation") and not (name == "exact_match" and key in EM_OPTIONS):
                    raise refuse(self.file, f"{where}.{key}", f"not an option of {name} this reader supports")
            names.append(name)
            options[name] = {k: v for k, v in entry.items() if k in EM_OPTIONS}
        return names, options, higher

    def _filters(self, spec: Any) -> list[tuple[str, list[tuple[str, dict]]]]:
        if spec is None:
            return [("none", [])]
        if self.kind != "generate_until":
            raise refuse(self.file, "filter_list", "filters apply to generate_until tasks only here")
        if not isinstance(spec, list) or not spec:
            raise refuse(self.file, "filter_list", "must be a list of {name, filter: [...]}")
        out = []
        for i, pipe in enumerate(spec):
            if not isinstance(pipe, dict) or not isinstance(pipe.get("filter"), list):
                raise refuse(self.file, f"filter_list.{i}", "must be {name: ..., filter: [{function: ...}]}")
            steps = []
            for j, step in enumerate(pipe["filter"]):
                fn = step.get("function") if isinstance(step, dict) else None
                if fn not in FILTERS:
                    raise refuse(self.file, f"filter_list.{i}.filter.{j}.function",
                                 f"{fn!r}; supported: {', '.join(FILTERS)}")
                args = {k: v for k, v in step.items() if k != "function"}
                allowed = ("regex_pattern", "group_select", "fallback") if fn == "regex" else ()
                bad = [k for k in args if k not in allowed]
                if bad:
                    raise refuse(self.file, f"filter_list.{i}.filter.{j}.{bad[0]}", f"not an option of {fn}")
                if fn == "regex":
                    try:
                        args["regex"] = re.compile(args.get("regex_pattern", r"#### (\-?[0-9\.\,]+)"))
                    except re.error as e:
                        raise refuse(self.file, f"filter_list.{i}.filter.{j}.regex_pattern", str(e)) from None
                steps.append((fn, args))
            out.append((str(pipe.get("name", f"filter{i}")), steps))
        return out

    def _gen_args(self, spec: Any) -> GenArgs:
        spec = dict(spec or {})
        bad = [k for k in spec if k not in GEN_KEYS]
        if bad:
            raise refuse(self.file, f"generation_kwargs.{bad[0]}", f"supported: {', '.join(GEN_KEYS)}")
        until = spec.get("until", [self.cfg.get("fewshot_delimiter", "\n\n")])
        sample = bool(spec.get("do_sample", False))
        try:
            return GenArgs(until=[until] if isinstance(until, str) else list(until),
                           max_gen_toks=int(spec.get("max_gen_toks", 256)),
                           temperature=float(spec.get("temperature", 1.0 if sample else 0.0)) if sample else 0.0,
                           top_p=float(spec.get("top_p", 1.0)))
        except (TypeError, ValueError) as e:
            raise refuse(self.file, "generation_kwargs", str(e)) from None

    # -- data ----------------------------------------------------------------------------------------
    def docs(self, split: str) -> list[dict]:
        if split == SAMPLES_SPLIT:
            return list(self.fewshot_cfg["samples"])
        if split not in self.files:
            raise refuse(self.file, "dataset_kwargs.data_files", f"has no split {split!r} "
                                                                 f"(it has {', '.join(self.files)})")
        rows = []
        for path in self.files[split]:
            if not path.is_file():
                raise TaskDataMissing(f"task {self.name!r} ({self.file}): data file {path} is missing")
            rows += read_rows(path, self.cfg["dataset_path"])
        return rows

    def fewshot_docs(self, doc: dict, num_fewshot: int, seed: int = 1234, exclude: dict | None = None):
        if not self.first_n or num_fewshot <= 0:
            return super().fewshot_docs(doc, num_fewshot, seed, exclude)
        pool = self.cached_docs(self.fewshot_split)
        if self.fewshot_split == self.eval_split:  # lm-eval's rm_eval_doc
            pool = [d for d in pool if d is not doc and d != doc and d is not exclude]
        if len(pool) < num_fewshot:
            raise LmstackError(f"task {self.name!r}: asked for {num_fewshot} few-shot examples but split "
                               f"{self.fewshot_split!r} has {len(pool)}")
        return pool[:num_fewshot]

    # -- prompts -------------------------------------------------------------------------------------
    def _render(self, key: str, doc: dict, cfg: dict | None = None) -> Any:
        spec = (cfg or self.cfg).get(key)
        if spec is None:
            raise refuse(self.file, key, f"a {self.kind} task needs {key}")
        if isinstance(spec, (int, list)) and not isinstance(spec, bool):
            return spec
        if isinstance(spec, dict) and key == "doc_to_choice":
            return list(spec.values())
        if not isinstance(spec, str):
            raise refuse(self.file, key, "must be a field name, a Jinja template, an int or a list")
        if spec in doc:
            return doc[spec]
        try:
            return _ENV.from_string(spec).render(**doc)
        except TemplateError as e:
            raise LmstackError(f"{self.file}: key {key!r}: the template failed on a document: {e}") from None

    def doc_to_choice(self, doc: dict, cfg: dict | None = None) -> list[str]:
        choices = self._render("doc_to_choice", doc, cfg)
        if isinstance(choices, str):
            try:
                choices = ast.literal_eval(choices)
            except (ValueError, SyntaxError):
                raise LmstackError(f"{self.file}: key 'doc_to_choice' rendered {choices[:80]!r}, "
                                   "which is not a list") from None
        if not isinstance(choices, (list, tuple)) or not all(isinstance(c, str) for c in choices):
            raise LmstackError(f"{self.file}: key 'doc_to_choice' must give a list of strings, got {choices!r:.80}")
        return list(choices)

    def doc_to_text(self, doc: dict, cfg: dict | None = None) -> str:
        cfg = cfg or self.cfg
        text = self._render("doc_to_text", doc, cfg)
        if not isinstance(text, str) or (text.isdigit() and "doc_to_choice" in cfg
                                          and cfg.get("doc_to_text") not in doc):
            raise refuse(self.file, "doc_to_text", "gives an index: multiple-input (Winogrande-style) tasks "
                                                   "are not supported")
        return text

    def doc_to_target(self, doc: dict, cfg: dict | None = None) -> Any:
        cfg = cfg or self.cfg
        spec = cfg.get("doc_to_target")
        target = self._render("doc_to_target", doc, cfg)
        if isinstance(target, str) and not (isinstance(spec, str) and spec in doc):
            if target.isdigit() and "doc_to_choice" in cfg:
                return int(target)
            if len(target) >= 2 and target[0] == "[" and target[-1] == "]":
                try:
                    return ast.literal_eval(target)
                except (ValueError, SyntaxError):
                    return target
        return target

    def target_text(self, doc: dict, cfg: dict | None = None) -> str:
        """The answer as a shot shows it (lm-eval's build_qa_turn)."""
        cfg = cfg or self.cfg
        target = self.doc_to_target(doc, cfg)
        if isinstance(target, int) and "doc_to_choice" in cfg:
            return self.doc_to_choice(doc, cfg)[target]
        if isinstance(target, list):
            return str(target[0])
        return str(target)

    def fewshot_context(self, doc: dict, num_fewshot: int = 0, seed: int = 1234, chat=None, exclude=None) -> str:
        raw = self.cfg.get("description") or ""
        if "{{" in raw or "{%" in raw:
            # lm-eval renders a templated description per document; the base class reads self.description.
            self.description = _ENV.from_string(raw).render(**doc)
        if chat is not None:
            return super().fewshot_context(doc, num_fewshot, seed, chat=chat, exclude=exclude)
        # lm-eval's text: description + (shot text + target_delimiter + answer + fewshot_delimiter) per shot
        # + the question, where fewshot_config may override the shots' fields and delimiters.
        tgt = self.fewshot_cfg.get("target_delimiter", self.target_delimiter)
        few = self.fewshot_cfg.get("fewshot_delimiter", self.fewshot_delimiter)
        shots = self.fewshot_docs(doc, num_fewshot, seed, exclude)
        return self.description + "".join(
            self.doc_to_text(s, self.shot_cfg) + tgt + self.target_text(s, self.shot_cfg) + few for s in shots
        ) + self.doc_to_text(doc)

    # -- requests and results ------------------------------------------------------------------------
    def requests(self, doc: dict, context: str) -> list[Request]:
        if self.kind == "loglikelihood":
            return [Loglikelihood(context, str(self.doc_to_target(doc)))]
        if self.kind == "loglikelihood_rolling":
            return [Rolling(str(self.doc_to_target(doc)))]
        if self.kind == "generate_until":
            return [GenerateUntil(context, self.gen)]
        return [Loglikelihood(context, self.target_delimiter + c) for c in self.doc_to_choice(doc)]

    def _gold_index(self, doc: dict, choices: list[str]) -> int | list[int]:
        gold = self.doc_to_target(doc)
        if isinstance(gold, str):
            return choices.index(gold) if gold in choices else -100
        if isinstance(gold, list):
            return [g if isinstance(g, int) and g < len(choices) else -100 for g in gold]
        return gold if isinstance(gold, int) and 0 <= gold < len(choices) else -100

    def _exact_match(self, prediction: str, references: list[str]) -> float:
        opts = self.em_options.get("exact_match", {})

        def norm(s: str) -> str:
            for pattern in opts.get("regexes_to_ignore") or []:
                s = re.sub(pattern, "", s)
            if opts.get("ignore_case"):
                s = s.lower()
            if opts.get("ignore_punctuation"):
                s = s.translate(str.maketrans("", "", string.punctuation))
            if opts.get("ignore_numbers"):
                s = s.translate(str.maketrans("", "", string.digits))
            return s

        return float(any(norm(prediction) == norm(r) for r in references))

    def _filter(self, steps: list[tuple[str, dict]], text: str) -> str:
        for fn, args in steps:
            if fn == "regex":
                found = args["regex"].findall(text)
                if not found:
                    text = args.get("fallback", "[invalid]")
                    continue
                match = found[args.get("group_select", 0)]
                if isinstance(match, tuple):
                    match = next((m for m in match if m), args.get("fallback", "[invalid]"))
                text = match.strip()
            elif fn == "lowercase":
                text = text.lower()
            elif fn == "uppercase":
                text = text.upper()
            elif fn == "remove_whitespace":
                text = text.strip()
            # take_first: one response per item here (repeats is 1), so it is that response.
        return text

    def process_results(self, doc: dict, responses: list) -> dict:
        want = self.default_metrics
        if self.kind == "loglikelihood":
            ll, greedy = responses[0]
            return {k: v for k, v in (("perplexity", float(ll)), ("acc", float(greedy))) if k in want}
        if self.kind == "loglikelihood_rolling":
            text = str(self.doc_to_target(doc))
            words, n_bytes = len(re.split(r"\s+", text)), len(text.encode("utf-8"))
            ll = float(responses[0])
            out = {"word_perplexity": (ll, words), "byte_perplexity": (ll, n_bytes), "bits_per_byte": (ll, n_bytes)}
            return {k: v for k, v in out.items() if k in want}
        if self.kind == "multiple_choice":
            choices = self.doc_to_choice(doc)
            lls = [float(r[0]) for r in responses]
            greedy = [bool(r[1]) for r in responses]
            gold = self._gold_index(doc, choices)
            golds = gold if isinstance(gold, list) else [gold]
            pred = M._argmax(lls)
            pred_norm = M._argmax([ll / max(len(c), 1) for ll, c in zip(lls, choices)])
            pred_bytes = M._argmax([ll / max(len(c.encode("utf-8")), 1) for ll, c in zip(lls, choices)])
            out = {"acc": float(pred in golds), "acc_norm": float(pred_norm in golds),
                   "acc_bytes": float(pred_bytes in golds), "f1": (golds[0], pred), "mcc": (golds[0], pred),
                   "exact_match": float(any(greedy[g] for g in golds if g != -100))}
            return {k: v for k, v in out.items() if k in want}
        # generate_until
        gold = self.doc_to_target(doc)
        if "doc_to_choice" in self.cfg and isinstance(gold, int):
            gold = self.doc_to_choice(doc)[gold]
        refs = [str(g) for g in gold] if isinstance(gold, list) else [str(gold)]
        out = {}
        for fname, steps in self.filters:
            answer = self._filter(steps, responses[0])
            for metric in want:
                out[metric if len(self.filters) == 1 else f"{metric},{fname}"] = self._exact_match(answer, refs)
        return out

    def aggregation(self) -> dict[str, Callable[[list], float]]:
        aggs = {m: _aggregate(METRICS[m][1]) for m in self.default_metrics}
        if len(self.filters) > 1:
            aggs = {f"{m},{f}": a for m, a in aggs.items() for f, _ in self.filters}
        return aggs

    def higher_is_better(self) -> dict[str, bool]:
        out = {m: self.higher.get(m, METRICS[m][2]) for m in self.default_metrics}
        if len(self.filters) > 1:
            out = {f"{m},{f}": h for m, h in out.items() for f, _ in self.filters}
        return out

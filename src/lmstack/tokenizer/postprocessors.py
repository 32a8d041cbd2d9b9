"""Post-processors: add special tokens around an encoded sequence when `add_special_tokens=True`.

Our tokenizers use TemplateProcessing ("<|bos|> $A"); HF files also bring BertProcessing ([CLS] A [SEP]),
RobertaProcessing (<s> A </s>) and ByteLevel (which changes only offsets, so nothing here).

Usage:
    pp = postprocessor_from_json(spec["post_processor"])
    pp([5, 6, 7])                    # e.g. -> [101, 5, 6, 7, 102]
"""
from __future__ import annotations

from lmstack.errors import LmstackError


class PostProcessor:
    def __init__(self, **_):
        pass  # fields HF writes but this step does not use

    def __call__(self, ids: list[int]) -> list[int]:
        raise NotImplementedError


class TemplateProcessing(PostProcessor):
    def __init__(self, single: list, special_tokens: dict, pair: list | None = None, **_):
        self.template = []
        for item in single:
            if "Sequence" in item:
                self.template.append(None)
            elif "SpecialToken" in item:
                name = item["SpecialToken"]["id"]
                if name not in special_tokens:
                    raise LmstackError(f"TemplateProcessing uses {name!r}, which is not in its special_tokens")
                self.template.append(list(special_tokens[name]["ids"]))
            else:
                raise LmstackError(f"TemplateProcessing item {item!r} is neither Sequence nor SpecialToken")

    def __call__(self, ids):
        out = []
        for part in self.template:
            out.extend(ids if part is None else part)
        return out


class BertProcessing(PostProcessor):
    def __init__(self, sep: list, cls: list, **_):
        self.sep, self.cls = sep[1], cls[1]

    def __call__(self, ids):
        return [self.cls, *ids, self.sep]


class ByteLevel(PostProcessor):
    def __init__(self, **_):
        pass

    def __call__(self, ids):
        return list(ids)


class Sequence(PostProcessor):
    def __init__(self, processors: list, **_):
        self.steps = [postprocessor_from_json(p) for p in processors]

    def __call__(self, ids):
        for step in self.steps:
            ids = step(ids)
        return ids


POSTPROCESSORS = {"TemplateProcessing": TemplateProcessing, "BertProcessing": BertProcessing,
                  "RobertaProcessing": BertProcessing, "ByteLevel": ByteLevel, "Sequence": Sequence}


def postprocessor_from_json(spec: dict | None) -> PostProcessor | None:
    if spec is None:
        return None
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind not in POSTPROCESSORS:
        raise LmstackError(f"unsupported post_processor type {kind!r}; supported: {', '.join(POSTPROCESSORS)}")
    try:
        return POSTPROCESSORS[kind](**{k: v for k, v in spec.items() if k != "type"})
    except (TypeError, KeyError, IndexError) as e:
        raise LmstackError(f"post_processor {kind} has bad fields: {e}") from None

"""The Tokenizer: a tokenizer.json pipeline run in Python (the reference), with a fast path through `tokenizers`.

A tokenizer *is* its HF `tokenizer.json` dict (`spec`) plus a `tokenizer_config.json` dict (`config`: special
token roles, chat template, our training-time regularisation). The pipeline is HF's:
added tokens are cut out first, each remaining segment is normalized, pre-tokenized into pieces, and each
piece goes through the subword model; `add_special_tokens=True` runs the post-processor.

`encode` is our Python reference encoder. `encode_batch` runs the same spec through the Rust `tokenizers`
runtime when it can load it (same ids; tests check this), else falls back to `encode`.

Usage:
    tok = load_tokenizer("out/tok")                  # dir with tokenizer.json, or the file itself
    ids = tok.encode("Hello world")                  # deterministic
    ids = tok.encode("Hello world", train=True)      # BPE-dropout / unigram sampling if configured
    tok.decode(ids) == "Hello world"
    tok.save("out/tok2")
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
import json
from pathlib import Path
import random
from typing import Any, Iterable

import regex

from lmstack.config import atomic_write_text
from lmstack.errors import LmstackError
from lmstack.tokenizer import chat_template
from lmstack.tokenizer.jinja_chat import JinjaChatTemplate, find_template
from lmstack.tokenizer.decoders import decoder_from_json
from lmstack.tokenizer.models import model_from_json
from lmstack.tokenizer.normalizers import normalizer_from_json
from lmstack.tokenizer.postprocessors import postprocessor_from_json
from lmstack.tokenizer.sentencepiece import convert_sentencepiece
from lmstack.tokenizer.special_tokens import resolve_tokenizer_files
from lmstack.tokenizer.pretokenizers import pretokenizer_from_json, split_counting_stages

_CACHE_MAX = 500_000  # pieces remembered by the deterministic encoder
_CACHE_PIECE_MAX = 256  # longer pieces are not cached (HF uses the same bound)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")  # what load_tokenizer reads, in that order
_ROLE_KEYS = {"bos": "bos_token", "eos": "eos_token", "pad": "pad_token", "unk": "unk_token", "mask": "mask_token"}


@dataclass
class AddedToken:
    id: int
    content: str
    special: bool = False
    lstrip: bool = False
    rstrip: bool = False
    single_word: bool = False
    normalized: bool = False


def _added_regex(tokens: list[AddedToken]) -> regex.Pattern | None:
    if not tokens:
        return None
    # Longest first: at the leftmost position the longest token wins (HF's LeftmostLongest matching).
    contents = sorted({t.content for t in tokens}, key=len, reverse=True)
    return regex.compile("|".join(regex.escape(c) for c in contents))


class Tokenizer:
    def __init__(self, spec: dict, config: dict | None = None, source: str = "tokenizer.json",
                 directory: str | Path | None = None, generation_eos_ids: Iterable[int] = ()):
        """directory: where chat_template.jinja / .json are looked for; generation_eos_ids: the
        eos_token_id list of the model's generation_config.json (every one of them stops generation)."""
        self.directory = None if directory is None else Path(directory)
        self.generation_eos_ids = [int(i) for i in generation_eos_ids]
        if not isinstance(spec, dict):
            raise LmstackError(f"{source} must hold a JSON object, got {type(spec).__name__}")
        if "model" not in spec:
            raise LmstackError(f"{source} is not a tokenizer.json: it has no 'model' entry")
        self.spec, self.config, self.source = spec, dict(config or {}), source
        self._build()

    # -- construction ----------------------------------------------------------------------------------
    def _build(self) -> None:
        spec = self.spec
        self.normalizer = normalizer_from_json(spec.get("normalizer"))
        self.pre_tokenizer = pretokenizer_from_json(spec.get("pre_tokenizer"))
        self.model = model_from_json(spec["model"])
        self.decoder = decoder_from_json(spec.get("decoder"))
        self.post_processor = postprocessor_from_json(spec.get("post_processor"))
        self.added: dict[str, AddedToken] = {}
        for k, t in enumerate(spec.get("added_tokens") or []):
            if not isinstance(t, dict) or not isinstance(t.get("id"), int) or not isinstance(t.get("content"), str):
                raise LmstackError(f"{self.source}: added_tokens[{k}] must have an integer 'id' and a 'content'")
            if t["content"]:
                self.added[t["content"]] = AddedToken(
                    t["id"], t["content"], bool(t.get("special")), bool(t.get("lstrip")), bool(t.get("rstrip")),
                    bool(t.get("single_word")), bool(t.get("normalized")))
        self._id_to_token = {i: s for s, i in self.model.vocab.items()}
        self._id_to_token.update({t.id: t.content for t in self.added.values()})
        self._token_to_id = dict(self.model.vocab)
        self._token_to_id.update({t.content: t.id for t in self.added.values()})
        self._special_ids = {t.id for t in self.added.values() if t.special}
        self._raw_rx = _added_regex([t for t in self.added.values() if not t.normalized])
        self._norm_rx = _added_regex([t for t in self.added.values() if t.normalized])
        self._head, self._tail = split_counting_stages(self.pre_tokenizer)
        self._cache: dict[str, list[int]] = {}
        self._fast: Any = None
        self._template: Any = None
        self.special_tokens = self._find_specials()
        lm = self.config.get("lmstack") or {}
        self._rng = random.Random(lm.get("seed", 0))
        self.set_regularization(dropout=lm.get("dropout", 0.0), sample_alpha=lm.get("sample_alpha"))
        # Char-level style models (no normalizer/pre-tokenizer, no unk): the fast runtime silently drops unknown
        # characters while our encoder raises; check the alphabet first so both paths agree.
        m = spec["model"]
        self._alphabet = None
        if (self.normalizer is None and self.pre_tokenizer is None and m.get("type", "BPE") == "BPE"
                and m.get("unk_token") is None and not m.get("byte_fallback")):
            self._alphabet = {s for s in self.model.vocab if len(s) == 1}

    def _find_specials(self) -> dict[str, str]:
        found: dict[str, str] = {}
        for name in chat_template.SPECIAL_NAMES + [chat_template.UNK_NAME]:
            content = chat_template.special_token(name)
            if content in self._token_to_id:
                found[name] = content
        for name, key in _ROLE_KEYS.items():
            value = self.config.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str) and value in self._token_to_id:
                found[name] = value
        for name, content in ((self.config.get("lmstack") or {}).get("special_tokens") or {}).items():
            if content in self._token_to_id:
                found[name] = content
        return found

    def set_regularization(self, dropout: float | None = None, sample_alpha: float | None = None) -> None:
        """Configure subword regularisation used by `encode(..., train=True)` (never at inference)."""
        dropout = float(dropout or 0.0)
        if not 0.0 <= dropout < 1.0:
            raise LmstackError(f"dropout={dropout} must be in [0, 1)")
        if sample_alpha is not None and sample_alpha <= 0:
            raise LmstackError(f"sample_alpha={sample_alpha} must be > 0 (or None to switch sampling off)")
        self.dropout, self.sample_alpha = dropout, sample_alpha
        if hasattr(self.model, "dropout"):
            self.model.dropout = dropout
        if hasattr(self.model, "sample_alpha"):
            self.model.sample_alpha = sample_alpha
        self.regularized = (dropout > 0 and hasattr(self.model, "dropout")) or (
            sample_alpha is not None and hasattr(self.model, "sample_alpha"))

    def __getstate__(self):
        return {"spec": self.spec, "config": self.config, "source": self.source, "directory": self.directory,
                "generation_eos_ids": self.generation_eos_ids}

    def __setstate__(self, state):
        self.spec, self.config, self.source = state["spec"], state["config"], state["source"]
        self.directory, self.generation_eos_ids = state.get("directory"), state.get("generation_eos_ids", [])
        self._build()

    # -- vocabulary ------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return max(self._id_to_token) + 1 if self._id_to_token else 0

    def get_vocab(self) -> dict[str, int]:
        return dict(self._token_to_id)

    def token_to_id(self, token: str) -> int | None:
        return self._token_to_id.get(token)

    def id_to_token(self, i: int) -> str | None:
        return self._id_to_token.get(int(i))

    def special_id(self, name: str) -> int | None:
        content = self.special_tokens.get(name)
        return None if content is None else self._token_to_id.get(content)

    bos_id = property(lambda self: self.special_id("bos"))
    eos_id = property(lambda self: self.special_id("eos"))
    pad_id = property(lambda self: self.special_id("pad"))
    unk_id = property(lambda self: self.special_id("unk"))
    mask_id = property(lambda self: self.special_id("mask"))

    @property
    def special_ids(self) -> set[int]:
        return set(self._special_ids)

    def added_specials(self) -> list[str]:
        """The text of every special added token (what a chat template writes around turns)."""
        return [t.content for t in self.added.values() if t.special]

    @property
    def type(self) -> str:
        return (self.config.get("lmstack") or {}).get("type") or self.spec["model"].get("type", "BPE")

    # -- encoding --------------------------------------------------------------------------------------
    def _split_added(self, text: str, rx, allow_special: bool):
        """Yield (segment, None, start) for plain text and (None, id, start) for added tokens."""
        if rx is None:
            if text:
                yield text, None, 0
            return
        pos = 0
        for m in rx.finditer(text):
            tok = self.added[m.group()]
            if tok.special and not allow_special:
                continue
            start, stop = m.span()
            if tok.single_word and ((start > 0 and regex.match(r"\w", text[start - 1]))
                                    or (stop < len(text) and regex.match(r"\w", text[stop]))):
                continue
            if tok.lstrip:
                start = max(len(regex.sub(r"\s*$", "", text[:start])), pos)
            if tok.rstrip:
                stop += len(text[stop:]) - len(regex.sub(r"^\s*", "", text[stop:]))
            if pos < start:
                yield text[pos:start], None, pos
            yield None, tok.id, start
            pos = stop
        if pos < len(text):
            yield text[pos:], None, pos

    def _encode_pieces(self, s: str, first: bool, rng, out: list[int]) -> None:
        pieces = self._head(s, first)
        tail, enc = self._tail, self.model.encode_word
        if rng is not None:
            for p in pieces:
                out.extend(enc(tail(p) if tail else p, rng))
            return
        cache = self._cache
        for p in pieces:
            ids = cache.get(p)
            if ids is None:
                ids = enc(tail(p) if tail else p)
                if len(p) < _CACHE_PIECE_MAX:
                    if len(cache) >= _CACHE_MAX:
                        cache.clear()
                    cache[p] = ids
            out.extend(ids)

    def encode(self, text: str, add_special_tokens: bool = False, train: bool = False,
               allow_special: bool = True) -> list[int]:
        """Text -> ids. `allow_special=False` encodes special-token text as plain text (no forging).
        `train=True` applies the configured subword regularisation (BPE-dropout, unigram sampling)."""
        if not isinstance(text, str):
            raise LmstackError(f"encode() takes a str, got {type(text).__name__}")
        rng = self._rng if train and self.regularized else None
        ids: list[int] = []
        for seg, tid, start in self._split_added(text, self._raw_rx, allow_special):
            if tid is not None:
                ids.append(tid)
                continue
            s = self.normalizer(seg) if self.normalizer else seg
            if self._norm_rx is None:
                self._encode_pieces(s, start == 0, rng, ids)
                continue
            for sub, sub_id, sub_start in self._split_added(s, self._norm_rx, allow_special):
                if sub_id is not None:
                    ids.append(sub_id)
                else:
                    self._encode_pieces(sub, start == 0 and sub_start == 0, rng, ids)
        if add_special_tokens and self.post_processor is not None:
            ids = self.post_processor(ids)
        return ids

    def fast(self):
        """The `tokenizers.Tokenizer` built from our spec (None when it cannot load it)."""
        if self._fast is None:
            spec = copy.deepcopy(self.spec)
            spec["truncation"], spec["padding"] = None, None  # length handling is the caller's job
            if isinstance(spec["model"], dict) and spec["model"].get("dropout") is not None:
                spec["model"]["dropout"] = None  # inference stays deterministic
            try:
                # lazy: guarded: any failure here, the import included, falls back to the Python path
                from tokenizers import Tokenizer as RustTokenizer

                self._fast = RustTokenizer.from_str(json.dumps(spec))
            except Exception:  # noqa: BLE001 - any failure means: use the Python path
                self._fast = False
        return self._fast or None

    def encode_batch(self, texts: Iterable[str], add_special_tokens: bool = False, train: bool = False,
                     allow_special: bool = True) -> list[list[int]]:
        """Many texts -> ids, through the Rust runtime when possible; identical to `encode` on each text."""
        texts = list(texts)
        for k, t in enumerate(texts):
            if not isinstance(t, str):
                raise LmstackError(f"encode_batch() item #{k} is a {type(t).__name__}, not a str")
        fast = None if (train and self.regularized) else self.fast()
        if fast is None:
            return [self.encode(t, add_special_tokens, train, allow_special) for t in texts]
        if self._alphabet is not None:
            missing = set().union(*map(set, texts)) - self._alphabet
            if missing:
                c = min(missing)
                raise LmstackError(f"character {c!r} (U+{ord(c):04X}) is not in the vocabulary and the "
                                   "tokenizer has no unk token or byte fallback")
        fast.encode_special_tokens = not allow_special
        encodings = fast.encode_batch_fast(texts, add_special_tokens=add_special_tokens)
        return [e.ids for e in encodings]

    # -- decoding --------------------------------------------------------------------------------------
    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        tokens = []
        for i in ids:
            t = self._id_to_token.get(int(i))
            if t is None:
                raise LmstackError(f"token id {i} is not in this tokenizer (vocab size {self.vocab_size})")
            if skip_special_tokens and int(i) in self._special_ids:
                continue
            tokens.append(t)
        return self.decoder(tokens) if self.decoder is not None else " ".join(tokens)

    # -- chat ------------------------------------------------------------------------------------------
    @property
    def chat_template(self) -> chat_template.ChatTemplate | None:
        """The model's own template (HF Jinja) or lmstack's for tokenizers it trains; None when there is none.
        A template file that cannot be used (a dict with no default, bad syntax) raises here, on first use."""
        if self._template is None:
            found = find_template(self.directory, self.config)
            source = found[0] if found else None
            if chat_template.is_lmstack_template(self, source):
                self._template = chat_template.LmstackChatTemplate(self)
            elif found is not None:
                self._template = JinjaChatTemplate(source, self, origin=found[1])
            else:
                self._template = False
        return self._template or None

    def _template_or_raise(self) -> chat_template.ChatTemplate:
        t = self.chat_template
        if t is None:
            where = self.directory or self.source
            raise LmstackError(f"this tokenizer has no chat template: it has no <|bos|> token (lmstack's own "
                               f"template, trained with special_tokens='chat') and {where} has no chat_template "
                               "(tokenizer_config.json, chat_template.jinja or chat_template.json)")
        return t

    def render_messages(self, messages, add_generation_prompt: bool = False, tools=None, documents=None,
                        **kwargs):
        """messages -> RenderedChat(text, ids, mask) through the chat template."""
        return self._template_or_raise().render(messages, add_generation_prompt, tools, documents, **kwargs)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False, tools=None,
                            documents=None, **kwargs) -> tuple[list[int], list[int]]:
        r = self.render_messages(messages, add_generation_prompt, tools, documents, **kwargs)
        return r.ids, r.mask

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, tools=None, documents=None,
                    **kwargs) -> str:
        return self.render_messages(messages, add_generation_prompt, tools, documents, **kwargs).text

    def encode_prompt(self, text: str) -> list[int]:
        """A text prompt's ids with the post-processor's special tokens, except a second BOS: a rendered chat
        template (render_chat) already opens with it, and a model never saw two."""
        ids = self.encode(text, add_special_tokens=True)
        bos = self.bos_id
        if bos is not None and len(ids) > 1 and ids[0] == ids[1] == bos:
            ids = ids[1:]
        return ids

    def append_turn_ids(self, history: list[dict], new: list[dict], add_generation_prompt: bool = True
                        ) -> list[int]:
        """The ids that `new` messages add after a rendered `history` (multi-turn decoding appends them to
        the ids it already holds): the id difference when the template is a concatenation of turns, else
        the text difference encoded."""
        before = self.render_messages(history, False)
        after = self.render_messages(list(history) + list(new), add_generation_prompt)
        if after.ids[:len(before.ids)] == before.ids:
            return after.ids[len(before.ids):]
        if after.text.startswith(before.text):
            return self.encode(after.text[len(before.text):], allow_special=True)
        raise LmstackError(f"{self._template_or_raise().origin}: rendering more turns rewrites the earlier text, "
                           "so new turns cannot be appended to a conversation's ids")

    def end_of_turn_ids(self) -> list[int]:
        """Ids that close an assistant turn in the chat template ([] without a template)."""
        t = self.chat_template
        return t.end_of_turn_ids() if t is not None else []

    def stop_ids(self) -> list[int]:
        """Every id that ends generation: EOS, generation_config.json's eos_token_id list and the template's
        end-of-turn token. The engine, the server and LLM.chat all stop on this set."""
        ids = [i for i in [self.eos_id, *self.generation_eos_ids] if i is not None]
        try:
            ids += self.end_of_turn_ids()
        except LmstackError:
            pass  # a broken template fails where it is rendered, with its own message; stopping still works
        return sorted(set(ids))

    # -- files -----------------------------------------------------------------------------------------
    def tokenizer_config(self) -> dict:
        """tokenizer_config.json: HF keys (so `transformers` loads it) plus our own under 'lmstack'."""
        cfg = dict(self.config)
        for name, key in _ROLE_KEYS.items():
            if name in self.special_tokens:
                cfg[key] = self.special_tokens[name]
        cfg.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        cfg.setdefault("clean_up_tokenization_spaces", False)
        if chat_template.is_lmstack_template(self, self.config.get("chat_template")):
            cfg["chat_template"] = chat_template.JINJA_TEMPLATE
            cfg["additional_special_tokens"] = [self.special_tokens[n] for n in chat_template.SPECIAL_NAMES
                                                if n in self.special_tokens and n not in _ROLE_KEYS]
        lm = dict(cfg.get("lmstack") or {})
        lm.update(special_tokens=dict(self.special_tokens), dropout=self.dropout, sample_alpha=self.sample_alpha)
        cfg["lmstack"] = lm
        return cfg

    def save(self, directory: str | Path) -> Path:
        """Write directory/tokenizer.json and directory/tokenizer_config.json (each atomically)."""
        d = Path(directory)
        if d.exists() and not d.is_dir():
            raise LmstackError(f"cannot save a tokenizer to {d}: it is a file, not a directory")
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_text(d / "tokenizer.json", json.dumps(self.spec, ensure_ascii=False, indent=1) + "\n")
        atomic_write_text(d / "tokenizer_config.json",
                          json.dumps(self.tokenizer_config(), ensure_ascii=False, indent=2) + "\n")
        self._save_template_files(d)
        return d

    def _save_template_files(self, d: Path) -> None:
        """A chat template kept beside tokenizer_config.json (chat_template.jinja / .json) travels with it."""
        # lazy: heavy (torch), which this module does not import at its top
        from lmstack.model.load_guard import resolve_inside

        if self.directory is None or not self.directory.is_dir():
            return
        for name in ("chat_template.jinja", "chat_template.json"):
            src = resolve_inside(self.directory, name, "chat template")
            if src.is_file() and src.resolve() != (d / name).resolve():
                atomic_write_text(d / name, src.read_text(encoding="utf-8"))

    def __repr__(self) -> str:
        return f"Tokenizer(type={self.type!r}, vocab_size={self.vocab_size}, source={self.source!r})"


def has_tokenizer(directory: str | Path) -> bool:
    """Whether load_tokenizer(directory) has a file to read: tokenizer.json, or a SentencePiece tokenizer.model."""
    return any((Path(directory) / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer from a directory holding tokenizer.json (+ tokenizer_config.json) or from the file.
    A directory with only a SentencePiece tokenizer.model (Llama-2 / Mistral style) is converted on load."""
    # lazy: heavy (torch), which this module does not import at its top
    from lmstack.model.load_guard import read_json_file, resolve_inside

    p = Path(path)
    if p.is_dir():  # an untrusted model directory: its files must stay inside it (issue 15)
        file = resolve_inside(p, "tokenizer.json", "tokenizer file")
        if not file.exists():  # tokenizer.json wins when both exist, as in transformers
            file = resolve_inside(p, "tokenizer.model", "tokenizer model")
            if not file.exists():
                raise LmstackError(f"{p} holds no tokenizer.json (nor a SentencePiece tokenizer.model)")
    elif p.is_file():
        file = p
    else:
        raise LmstackError(f"no tokenizer at {p}: it is neither a directory nor a file")
    cfg_file = resolve_inside(p if p.is_dir() else file.parent, "tokenizer_config.json", "tokenizer config")
    config = read_json_file(cfg_file, "tokenizer config", want_object=True) if cfg_file.exists() else {}
    directory = p if p.is_dir() else file.parent
    converted = file.suffix == ".model"
    if converted:
        spec, config = convert_sentencepiece(file, config)
    else:
        spec = read_json_file(file, "tokenizer file", want_object=True)  # no FIFO, device or huge file; UTF-8 JSON
    # special_tokens_map.json (legacy configs); add_bos_token/add_eos_token for a converted tokenizer.model
    spec, config = resolve_tokenizer_files(spec, config, directory, converted=converted)
    return Tokenizer(spec, config, source=str(file), directory=directory,
                     generation_eos_ids=_generation_eos_ids(directory))


def _generation_eos_ids(directory: Path) -> list[int]:
    """generation_config.json's eos_token_id next to the tokenizer, as a list (it may be one id or several)."""
    # lazy: heavy (torch), which this module does not import at its top
    from lmstack.model.load_guard import read_json_file, resolve_inside

    f = resolve_inside(directory, "generation_config.json", "generation config")
    if not f.is_file():
        return []
    eos = read_json_file(f, "generation config", want_object=True).get("eos_token_id")
    eos = [eos] if isinstance(eos, int) else eos
    if eos is None:
        return []
    if not isinstance(eos, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in eos):
        raise LmstackError(f"{f}: eos_token_id must be an integer or a list of integers, got {eos!r}")
    return eos

"""phrase_ban: hard bans of phrases over the decoded text, across token boundaries (IX.10).

Token-id bans (infer/bad_words.py) ban a word only in the spellings its own tokenization gives, so the
same word written with other token boundaries ("ki" + "ll", "k" + "ill", or inside a longer token) slips
through. Here the ban is on the text: an Aho-Corasick automaton over the banned phrases' bytes reads the
bytes the sequence has produced, and at each step every token whose bytes would complete a phrase from the
current state (a phrase spanning several tokens, or a token that holds a whole phrase) is banned.

Matching is on normalised text: ASCII letters case-folded, and every run of whitespace is one space (a
phrase is stripped and its inner whitespace collapsed the same way); other letters match in the case the
phrase gives, its lower case or its upper case. A phrase matches anywhere, also inside a word. Special tokens
read as empty (the text a client sees, with skip_special_tokens).

Speed: the automaton is a byte DFA whose states carry one more bit (was the last byte whitespace), so the
collapse of whitespace needs no look-back. For a state, the banned tokens and each token's next state are
found once, for the whole vocabulary at once (TokenTable: every token's bytes as one padded matrix, sorted by
length, walked column by column with tensor gathers, the few longest tokens' last bytes in Python), then
cached. A decode step is one cached mask lookup
plus the walk of the newest token (benchmarks/phrase_ban.py measures the overhead). Compiled automata are
cached per tokenizer and phrase set, so requests that share the engine's hard bans share the tables.

Usage:
    ban = PhraseBan.build(tokenizer, ["kill"], vocab_size=V, hard=["credit card number"])  # two automata
    allowed = ban.allowed(output_ids, key=seq_id)       # bool (V,): False where a token completes a phrase
    find_phrases("He will KILL\\n it", ["kill"])          # ['kill']: the reference check, on normalised text
"""
from __future__ import annotations

import contextlib
import itertools
import re
import threading
import weakref
from collections import OrderedDict, deque
from typing import Any, Iterable

import torch

from lmstack.errors import LmstackError
from lmstack.tokenizer.pretokenizers import CHAR_TO_BYTE

WHITESPACE = b" \t\n\r\x0b\x0c"
MAX_PHRASES = 4096
MAX_PHRASE_BYTES = 256
MAX_CASE_VARIANTS = 64  # non-ASCII letters: lower/upper per letter, up to this many spellings per phrase
_CACHE_SIZE = 32  # compiled automata kept per tokenizer (phrase sets seen recently)
_VECTOR_MIN = 48  # columns with fewer tokens than this are walked in Python (a tensor op costs more)
ROW_CACHE_BYTES = 256 << 20  # cached state rows per automaton (5 bytes per token each), least recently used go


class PhraseBanError(LmstackError, ValueError):
    """A banned phrase is unusable (empty, too long, too many); the message names it."""


def normalize(text: str) -> str:
    """What phrases are matched against: ASCII case-folded, whitespace runs as one space, stripped."""
    folded = "".join(c.lower() if c.isascii() else c for c in text)
    return re.sub(r"[ \t\n\r\x0b\x0c]+", " ", folded).strip(" ")


def find_phrases(text: str, phrases: Iterable[str]) -> list[str]:
    """The phrases that occur in text (normalised on both sides): the plain-Python reference check (its case
    folding is ASCII only; the automaton also matches a non-ASCII letter's lower and upper case)."""
    norm = normalize(text)
    return [p for p in phrases if normalize(p) and normalize(p) in norm]


def check_phrases(phrases: Any, name: str = "banned_phrases") -> list[str]:
    """Validate a phrase list; returns it as a list of str (duplicates kept: the automaton drops them)."""
    if phrases is None:
        return []
    if isinstance(phrases, str) or not isinstance(phrases, (list, tuple)):
        raise PhraseBanError(f"{name} must be a list of strings, got {type(phrases).__name__}")
    if len(phrases) > MAX_PHRASES:
        raise PhraseBanError(f"{name} has {len(phrases)} phrases; at most {MAX_PHRASES} are allowed")
    for p in phrases:
        if not isinstance(p, str):
            raise PhraseBanError(f"{name}: {p!r} is not a string")
        if not normalize(p):
            raise PhraseBanError(f"{name}: {p!r} is empty once whitespace is collapsed; give some text")
        if len(normalize(p).encode("utf-8", "surrogatepass")) > MAX_PHRASE_BYTES:
            raise PhraseBanError(f"{name}: {p[:40]!r}... is over {MAX_PHRASE_BYTES} bytes")
    return list(phrases)


def _spellings(phrase: str) -> list[bytes]:
    """The byte strings one phrase stands for: normalised, with both cases of each non-ASCII letter."""
    norm = normalize(phrase)
    options = [[c] if c.isascii() or c.lower() == c.upper() else list(dict.fromkeys((c, c.lower(), c.upper())))
               for c in norm]
    n = 1
    for o in options:
        n *= len(o)
    if n > MAX_CASE_VARIANTS:  # too many mixed spellings: the three common ones
        variants = [norm, norm.lower(), norm.upper()]
    else:
        variants = ["".join(v) for v in itertools.product(*options)]
    out = []
    for v in dict.fromkeys(variants):
        b = v.encode("utf-8", "surrogatepass")
        out.append(bytes(x + 32 if 65 <= x <= 90 else x for x in b))  # .upper() of non-ASCII may make ASCII
    return out


# ------------------------------------------------------------------------------------------ token bytes
class TokenTable:
    """Every token's bytes as one matrix, sorted by length (longest first), built once per tokenizer."""

    def __init__(self, token_bytes: list[bytes]):
        self.vocab = len(token_bytes)
        lengths = torch.tensor([len(b) for b in token_bytes], dtype=torch.long)
        self.order = torch.argsort(lengths, descending=True, stable=True)  # sorted position -> token id
        width = int(lengths.max()) if self.vocab else 0
        mat = torch.zeros((self.vocab, max(width, 1)), dtype=torch.uint8)
        for pos, tid in enumerate(self.order.tolist()):
            b = token_bytes[tid]
            if b:
                mat[pos, :len(b)] = torch.frombuffer(bytearray(b), dtype=torch.uint8)
        self.bytes = mat
        sorted_len = lengths[self.order]
        # active[j]: how many tokens have a byte at column j (a prefix of the sorted rows)
        self.active = [int((sorted_len > j).sum()) for j in range(width)]
        self.sorted_len = sorted_len.tolist()
        self.token_bytes = token_bytes
        self.automata: OrderedDict[frozenset, PhraseAutomaton] = OrderedDict()
        self.by_list: dict[tuple[str, ...], PhraseAutomaton] = {}
        self.lock = threading.Lock()

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, vocab_size: int | None = None) -> "TokenTable":
        vocab = vocab_size if vocab_size is not None else tokenizer.vocab_size
        specials = getattr(tokenizer, "special_ids", set())
        specials = set(specials() if callable(specials) else specials)
        return cls([token_bytes(tokenizer, i, specials) for i in range(vocab)])

    def automaton(self, phrases: Iterable[str]) -> "PhraseAutomaton":
        """The compiled automaton of a phrase set (cached: the engine's hard bans are compiled once)."""
        raw = tuple(phrases)
        hit = self.by_list.get(raw)  # the same list again (every request of an engine): no normalising
        if hit is not None:
            return hit
        key = frozenset(s for p in raw for s in _spellings(p))
        with self.lock:
            hit = self.automata.get(key)
            if hit is not None:
                self.automata.move_to_end(key)
                return hit
        built = PhraseAutomaton(key, self)
        with self.lock:
            self.automata[key] = built
            while len(self.automata) > _CACHE_SIZE:
                self.automata.popitem(last=False)
            if len(self.by_list) >= _CACHE_SIZE:
                self.by_list.clear()
            self.by_list[raw] = built
        return built


def token_bytes(tokenizer: Any, token_id: int, specials: set[int] | None = None) -> bytes:
    """A token's raw bytes as they appear in the decoded text: byte-level BPE pieces map char -> byte;
    special tokens are empty (skipped in the text); a SentencePiece piece's "\u2581" is the space it decodes
    to (the decoder drops it only at the very start, where whitespace is skipped anyway); other pieces are
    their own decoded text."""
    if specials is None:
        found = getattr(tokenizer, "special_ids", set())
        specials = set(found() if callable(found) else found)
    if token_id in specials:
        return b""
    piece = tokenizer.id_to_token(token_id) or ""
    if piece and all(c in CHAR_TO_BYTE for c in piece):
        return bytes(CHAR_TO_BYTE[c] for c in piece)
    text = tokenizer.decode([token_id])
    if piece.startswith("\u2581") and not text.startswith(" "):
        text = " " + text
    return text.encode("utf-8", "surrogatepass")


_TABLES: "weakref.WeakKeyDictionary[Any, dict[int, TokenTable]]" = weakref.WeakKeyDictionary()
_TABLES_LOCK = threading.Lock()


def token_table(tokenizer: Any, vocab_size: int | None = None) -> TokenTable:
    """The tokenizer's TokenTable for `vocab_size` ids, built on first use and kept while the tokenizer lives."""
    vocab = vocab_size if vocab_size is not None else tokenizer.vocab_size
    with _TABLES_LOCK:
        per = _TABLES.setdefault(tokenizer, {})
        table = per.get(vocab)
    if table is None:
        table = TokenTable.from_tokenizer(tokenizer, vocab)
        with _TABLES_LOCK:
            table = per.setdefault(vocab, table)
    return table


# ------------------------------------------------------------------------------------------ the automaton
class PhraseAutomaton:
    """Aho-Corasick over the phrases' bytes, as a DFA on byte classes, times a was-whitespace bit.

    State q = 2 * trie_node + space_bit. Per state, rows(q) gives (allowed mask, next state per token),
    computed for the whole vocabulary at once and cached."""

    def __init__(self, spellings: frozenset, table: TokenTable):
        self.table = table
        self.phrases = sorted(spellings)
        byte_class = [0] * 256  # 0: a byte no phrase has
        classes = {ord(" "): 1}
        for s in self.phrases:
            for b in s:
                classes.setdefault(b, len(classes) + 1)
        for b, c in classes.items():
            byte_class[b] = c
        for b in range(65, 91):  # ASCII upper case reads as its lower case
            byte_class[b] = byte_class[b + 32]
        for b in WHITESPACE:
            byte_class[b] = 1
        n_cls = len(classes) + 1
        # the trie, then failure links breadth-first, then the full transition table
        goto: list[dict[int, int]] = [{}]
        out = [False]
        for s in self.phrases:
            node = 0
            for b in s:
                c = byte_class[b]
                if c not in goto[node]:
                    goto.append({})
                    out.append(False)
                    goto[node][c] = len(goto) - 1
                node = goto[node][c]
            out[node] = True
        n_nodes = len(goto)
        delta = [[0] * n_cls for _ in range(n_nodes)]
        fail = [0] * n_nodes
        queue = deque()
        for c in range(n_cls):
            nxt = goto[0].get(c, 0)
            delta[0][c] = nxt
            if nxt:
                queue.append(nxt)
        while queue:
            node = queue.popleft()
            out[node] = out[node] or out[fail[node]]  # a phrase that ends inside a longer match
            for c in range(n_cls):
                nxt = goto[node].get(c)
                if nxt is None:
                    delta[node][c] = delta[fail[node]][c]
                else:
                    fail[nxt] = delta[fail[node]][c]
                    delta[node][c] = nxt
                    queue.append(nxt)
        # the space bit: a whitespace byte after whitespace changes nothing (runs collapse to one space);
        # the text starts "after whitespace", so leading whitespace is skipped as phrases are stripped
        full = torch.empty((2 * n_nodes, n_cls), dtype=torch.long)
        d = torch.tensor(delta, dtype=torch.long)
        full[0::2] = 2 * d
        full[1::2] = 2 * d
        full[:, 1] += 1  # after a whitespace byte the bit is set
        full[1::2, 1] = torch.arange(1, 2 * n_nodes, 2)  # whitespace after whitespace: stay
        self.out = torch.tensor(out, dtype=torch.bool).repeat_interleave(2)
        # For the vocabulary walks, a state where a phrase has ended absorbs every byte after it, so "did a
        # phrase end inside this token" is read once from the final state; the few banned tokens' real next
        # states are then walked again without the sink (a speculative guess may still step through one)
        sink = full.clone()
        sink[self.out] = torch.nonzero(self.out)[:, :1]
        self.n_cls = n_cls
        self._sink_offsets = (sink * n_cls).flatten()  # states as row offsets: one add and one gather a byte
        self._sink_list = sink.tolist()
        self.byte_class = torch.tensor(byte_class, dtype=torch.long)
        self.start = 1
        self._delta_list = full.tolist()
        self._byte_class_list = byte_class
        self._out_list = self.out.tolist()
        self._rows: OrderedDict[int, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.max_rows = max(16, ROW_CACHE_BYTES // max(1, 5 * table.vocab))
        self._device_rows: dict[tuple[int, str], torch.Tensor] = {}
        self._next: dict[int, Any] = {}  # state -> its next-state row as a numpy view
        self._lock = threading.Lock()
        self._classes: torch.Tensor | None = None
        self.rows(self.start)  # the first step's row, built with the request, not in the decode loop

    @property
    def num_states(self) -> int:
        return self.out.numel()

    def _token_classes(self) -> torch.Tensor:
        if self._classes is None:  # (width, vocab) byte classes, in the table's sorted order: columns contiguous
            self._classes = self.byte_class[self.table.bytes.long()].T.contiguous()
        return self._classes

    def rows(self, q: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(allowed bool (vocab,), int32 next state of each token id) from state q; built once per state."""
        hit = self._rows.get(q)  # the decode loop's path: no lock (only the engine's thread steps sequences)
        if hit is not None:
            with contextlib.suppress(KeyError):
                self._rows.move_to_end(q)
            return hit
        with self._lock:
            hit = self._rows.get(q)
            if hit is not None:
                return hit
            hit = self._rows[q] = self._build_rows(q)
            self._next[q] = hit[1].numpy()  # a view: one scalar read per step, no tensor indexing
            if len(self._rows) > self.max_rows:
                old, _ = self._rows.popitem(last=False)
                self._next.pop(old, None)
                for key in [k for k in self._device_rows if k[0] == old]:
                    del self._device_rows[key]
        return hit

    def _build_rows(self, q: int) -> tuple[torch.Tensor, torch.Tensor]:
        table, cls, n_cls = self.table, self._token_classes(), self.n_cls
        cur = torch.full((table.vocab,), q * n_cls, dtype=torch.long)  # each token's state, as a row offset
        cols = table.active
        j = 0
        while j < len(cols) and cols[j] >= _VECTOR_MIN:  # column j: only the tokens longer than j bytes
            view = cur[:cols[j]]
            torch.index_select(self._sink_offsets, 0, view + cls[j, :cols[j]], out=view)
            j += 1
        states = cur // n_cls
        if j < len(cols):  # the few longest tokens: a Python walk costs less than a tensor op per column
            n = cols[j]
            tail, classes = states[:n].tolist(), cls[j:, :n].T.tolist()
            for r in range(n):
                s = tail[r]
                for c in classes[r][:table.sorted_len[r] - j]:
                    s = self._sink_list[s][c]
                tail[r] = s
            states[:n] = torch.tensor(tail, dtype=torch.long)
        banned = self.out[states]
        allowed = torch.empty(table.vocab, dtype=torch.bool)
        allowed[table.order] = ~banned
        nxt_state = torch.empty(table.vocab, dtype=torch.int32)  # int32: half the memory of a cached row
        nxt_state[table.order] = states.to(torch.int32)
        for tid in table.order[banned].tolist():
            nxt_state[tid] = self.walk_text(table.token_bytes[tid], q)[0]
        return allowed, nxt_state

    def step(self, q: int, token: int) -> int:
        """The state after `token` (one lookup once q's row exists; ids past the table read as empty text)."""
        nxt = self._next.get(q)
        if nxt is None:
            self.rows(q)
            nxt = self._next[q]
        return int(nxt[token]) if 0 <= token < len(nxt) else q

    def allowed(self, q: int, device: torch.device | str | None = None) -> torch.Tensor:
        mask = self.rows(q)[0]
        if device is None or mask.device == device:
            return mask
        key = (q, str(device))
        on = self._device_rows.get(key)
        if on is None:
            on = self._device_rows[key] = mask.to(device)
        return on

    def walk_text(self, data: bytes, q: int | None = None) -> tuple[int, bool]:
        """Feed raw bytes from state q: (the state after, whether a phrase completed on the way)."""
        q = self.start if q is None else q
        hit = False
        for b in data:
            q = self._delta_list[q][self._byte_class_list[b]]
            hit = hit or self._out_list[q]
        return q, hit


# ------------------------------------------------------------------------------------------ per request
class PhraseBan:
    """One request's bans: shared automata (the engine's hard bans, the request's own phrases) plus the
    states each of its sequences has reached.

    The hard bans are one automaton that every request shares, so a request adding a phrase compiles only its
    own small one, never the engine's list again; their masks are and-ed. A sequence is keyed by its id; its
    states are re-derived from its tokens when they are not an extension of the tokens it was last seen with
    (speculative guesses rejected, a fork): never stale, usually one step."""

    def __init__(self, automata: list[PhraseAutomaton]):
        if not automata:
            raise PhraseBanError("a PhraseBan needs at least one phrase")
        self.automata = automata
        self.start = tuple(a.start for a in automata)
        self._seen: dict[Any, tuple[list[int], tuple[int, ...]]] = {}

    @classmethod
    def build(cls, tokenizer: Any, phrases: Iterable[str] = (), vocab_size: int | None = None,
              hard: Iterable[str] = ()) -> "PhraseBan":
        """`hard`: the engine's bans (compiled once, cached per tokenizer); `phrases`: this request's own."""
        table = token_table(tokenizer, vocab_size)
        groups = [list(hard), list(phrases)]
        for g, name in zip(groups, ("hard bans", "banned_phrases")):
            if g and tuple(g) not in table.by_list:  # a list compiled before was checked then
                check_phrases(g, name)
        return cls([table.automaton(g) for g in groups if g])

    @property
    def phrases(self) -> list[bytes]:
        return sorted({p for a in self.automata for p in a.phrases})

    def state(self, output_ids: list[int], key: Any = None) -> tuple[int, ...]:
        tokens, qs = self._seen.get(key, ((), self.start))
        n = len(tokens)
        if n > len(output_ids) or output_ids[:n] != tokens:
            n, qs = 0, self.start
        if n < len(output_ids):
            new = output_ids[n:]
            if len(self.automata) == 1:
                qs = (_walk(self.automata[0], qs[0], new),)
            else:
                qs = tuple(_walk(a, q, new) for a, q in zip(self.automata, qs))
        self._seen[key] = (list(output_ids), qs)  # a copy: the caller may append to its list
        return qs

    def allowed(self, output_ids: list[int], key: Any = None, also: torch.Tensor | None = None,
                device: torch.device | str | None = None) -> torch.Tensor:
        """Bool (vocab,): True for the tokens that complete no banned phrase after output_ids; `also` (another
        allowed mask, e.g. a grammar's) is and-ed in. The result may be a cached tensor: do not write to it."""
        qs = self.state(output_ids, key)
        dev = also.device if also is not None else device
        masks = [a.allowed(q, dev) for a, q in zip(self.automata, qs)]
        if also is None and len(masks) == 1:
            return masks[0]
        out = masks[0].clone() if also is None else also.clone()
        for m in masks[0 if also is not None else 1:]:
            n = min(m.numel(), out.numel())
            out[:n] &= m[:n]
        return out

    def forget(self, key: Any) -> None:
        self._seen.pop(key, None)


def _walk(automaton: PhraseAutomaton, q: int, tokens: list[int]) -> int:
    for t in tokens:
        q = automaton.step(q, t)
    return q

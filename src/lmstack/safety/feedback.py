"""User feedback on served replies (issue 21 §7, IX.12): a SQLite store the server writes, and the DPO pairs
the flags turn into.

The store (stdlib sqlite3, WAL journal so the server's writes never block a reader such as `lmstack align`):
  responses   one row per chat/completions response the server returned (`lmstack serve --feedback_db PATH`):
              its id (chatcmpl-... / cmpl-...), when, the model, the endpoint, the request (messages, or the
              prompt(s) with n and echo) as JSON, and the reply text of every choice as a JSON list;
  feedback    one row per flag: the response id, the choice index, rating up|down, a category from CATEGORIES,
              an optional correction (the reply the user wanted), when.
  meta        schema_version; a file written by a newer schema is refused rather than misread.

`preference_pairs(db)` turns flags into (prompt, chosen, rejected) pairs for DPO:
  - a down-rated reply with a correction:              chosen = the correction, rejected = the reply;
  - a down-rated reply flagged `unsafe`, no correction: chosen = the house refusal (`refusal`), rejected = the
    reply (unless the reply already refuses: then the flag is not about compliance and is skipped);
  - an up-rated reply: chosen against every down-rated reply to the same prompt.
The latest flag on a (response, choice) wins (a user may change their mind); identical pairs are kept once.
Every flag that gives no pair is counted with its reason, so `lmstack align --from-feedback` can say what it
used and what it skipped. Pairs come from one endpoint at a time: chat prompts are rendered by the chat
template, completions prompts are raw text, and the two must not be mixed in one run.

Usage:
    store = FeedbackStore("feedback.db")
    store.record_response("chatcmpl-1", "tiny", "chat", {"messages": msgs}, ["Sure! Boil the ..."])
    store.add_feedback("chatcmpl-1", "down", category="unsafe", correction="I can't help with that.")
    built = preference_pairs("feedback.db")
    built.pairs, built.used, built.skipped      # [Pair, ...], {"correction": 1}, {}
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable

from lmstack.align.preference_data import Pair
from lmstack.errors import LmstackError
from lmstack.world.checkers import is_refusal

SCHEMA_VERSION = 1
RATINGS = ("up", "down")
CATEGORIES = ("unsafe", "harassment", "pii", "self_harm", "over_refusal", "wrong", "unhelpful", "other")
"""What a flag may say is wrong; `unsafe` (the reply complied with a harmful request) and `over_refusal` (it
refused a harmless one) are the two the safety tuning acts on without a correction / with one."""
ENDPOINTS = ("chat", "completions")
MAX_CORRECTION_CHARS = 32_768
HOUSE_REFUSAL = "I can't help with that. It could cause harm, so I won't give instructions for it."
"""The chosen reply of an `unsafe` flag that carries no correction (is_refusal accepts it)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY, created REAL NOT NULL, model TEXT NOT NULL, endpoint TEXT NOT NULL,
    request TEXT NOT NULL, choices TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY AUTOINCREMENT, response_id TEXT NOT NULL REFERENCES responses(id),
    choice INTEGER NOT NULL, rating TEXT NOT NULL, category TEXT, correction TEXT, created REAL NOT NULL);
CREATE INDEX IF NOT EXISTS feedback_response ON feedback(response_id, choice);
"""


class FeedbackError(LmstackError):
    """A bad flag; `field` names what is wrong (the server answers 400 with it as `param`)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class UnknownResponse(FeedbackError):
    """Feedback for a response id the store never recorded (the server answers 404)."""


class FeedbackStore:
    """The feedback database; one connection shared by the server's threads under a lock (each write is one
    short transaction, so the lock is held for a millisecond or so)."""

    def __init__(self, path: str | Path, create: bool = True):
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise LmstackError(f"feedback database {self.path} does not exist (the server writes it with "
                               "`lmstack serve --feedback_db PATH`)")
        if create and not self.path.parent.is_dir():
            raise LmstackError(f"feedback database {self.path}: its directory {self.path.parent} does not exist")
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(str(self.path), check_same_thread=False, timeout=10.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable at checkpoints, no fsync per row
            version = self._version()
            if version is None:
                other = self._db.execute("SELECT COUNT(*) FROM sqlite_master WHERE type='table'").fetchone()[0]
                if not create or other:  # never add our tables to someone else's database
                    raise LmstackError(f"{self.path} is not a feedback database (no schema_version)")
                with self._db:
                    self._db.executescript(_SCHEMA)
                    self._db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif version > SCHEMA_VERSION:
                raise LmstackError(f"feedback database {self.path} has schema version {version}; this lmstack reads "
                                   f"up to {SCHEMA_VERSION}")
        except sqlite3.DatabaseError as e:
            raise LmstackError(f"feedback database {self.path}: {e} (not a SQLite file?)") from None

    def _version(self) -> int | None:
        has_meta = self._db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'").fetchone()
        if not has_meta:
            return None
        row = self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        return int(row[0]) if row else None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "FeedbackStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- writes
    def record_response(self, response_id: str, model: str, endpoint: str, request: dict[str, Any],
                        replies: list[str], created: float | None = None) -> None:
        """Remember one response (a second record of the same id replaces the first)."""
        if endpoint not in ENDPOINTS:
            raise LmstackError(f"endpoint must be one of {ENDPOINTS}, got {endpoint!r}")
        row = (response_id, created if created is not None else time.time(), model, endpoint,
               json.dumps(request, ensure_ascii=False), json.dumps([r or "" for r in replies], ensure_ascii=False))
        with self._lock, self._db:
            self._db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?, ?)", row)

    def add_feedback(self, response_id: str, rating: str, choice: int = 0, category: str | None = None,
                     correction: str | None = None) -> dict[str, Any]:
        """Store one flag; returns it with its id. FeedbackError names a bad field, UnknownResponse an unknown id."""
        if rating not in RATINGS:
            raise FeedbackError(f"rating must be one of {RATINGS}, got {rating!r}", "rating")
        if category is not None and category not in CATEGORIES:
            raise FeedbackError(f"category must be one of {CATEGORIES}, got {category!r}", "category")
        if correction is not None and len(correction) > MAX_CORRECTION_CHARS:
            raise FeedbackError(f"correction has {len(correction)} characters; at most {MAX_CORRECTION_CHARS}",
                                "correction")
        if isinstance(choice, bool) or not isinstance(choice, int) or choice < 0:
            raise FeedbackError(f"choice must be an integer >= 0, got {choice!r}", "choice")
        created = time.time()
        with self._lock, self._db:
            found = self._db.execute("SELECT choices FROM responses WHERE id=?", (response_id,)).fetchone()
            if found is None:
                raise UnknownResponse(f"no response with id {response_id!r} was recorded by this server",
                                      "response_id")
            n = len(json.loads(found[0]))
            if choice >= n:
                raise FeedbackError(f"choice {choice} is out of range: response {response_id!r} has {n} "
                                    f"choice{'s' if n != 1 else ''}", "choice")
            cur = self._db.execute("INSERT INTO feedback (response_id, choice, rating, category, correction, created)"
                                   " VALUES (?, ?, ?, ?, ?, ?)", (response_id, choice, rating, category,
                                                                  correction or None, created))
        return {"id": cur.lastrowid, "response_id": response_id, "choice": choice, "rating": rating,
                "category": category, "correction": correction or None, "created": created}

    # ---- reads
    def response(self, response_id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT id, created, model, endpoint, request, choices FROM responses WHERE id=?",
                                   (response_id,)).fetchone()
        if row is None:
            return None
        return {"id": row[0], "created": row[1], "model": row[2], "endpoint": row[3], "request": json.loads(row[4]),
                "choices": json.loads(row[5])}

    def flags(self) -> list[dict[str, Any]]:
        """Every flag joined with its response, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT f.id, f.response_id, f.choice, f.rating, f.category, f.correction, f.created, r.endpoint, "
                "r.request, r.choices FROM feedback f JOIN responses r ON r.id = f.response_id ORDER BY f.id").fetchall()
        out = []
        for fid, rid, choice, rating, category, correction, created, endpoint, request, choices in rows:
            replies = json.loads(choices)
            out.append({"id": fid, "response_id": rid, "choice": choice, "rating": rating, "category": category,
                        "correction": correction, "created": created, "endpoint": endpoint,
                        "request": json.loads(request), "reply": replies[choice] if choice < len(replies) else None})
        return out

    def counts(self) -> dict[str, int]:
        with self._lock:
            (n_resp,), (n_fb,) = (self._db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()
                                  for t in ("responses", "feedback"))
        return {"responses": n_resp, "feedback": n_fb}


# ---- flags -> preference pairs ------------------------------------------------------------------------------
@dataclass
class BuiltPairs:
    """What preference_pairs made: the pairs, and per-reason counts of what gave a pair and what did not."""

    pairs: list[Pair]
    used: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)

    def report(self) -> str:
        used = ", ".join(f"{k} {v}" for k, v in sorted(self.used.items())) or "none"
        text = f"built {len(self.pairs)} preference pairs from feedback ({used})"
        if self.skipped:
            text += "; skipped " + ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items()))
        return text

    def summary(self) -> dict[str, Any]:
        return {"pairs": len(self.pairs), "used": dict(self.used), "skipped": dict(self.skipped),
                "skipped_total": sum(self.skipped.values())}


def _prompt(flag: dict) -> tuple[Any, str | None]:
    """(the prompt as a Pair takes it: text or a Conversation, None) or (None, why it cannot be one)."""
    request = flag["request"]
    if flag["endpoint"] == "chat":
        messages = request.get("messages") or []
        if not messages or any(not isinstance(m.get("content"), str) or m.get("tool_calls") for m in messages):
            return None, "tool calls or non-text messages in the request"
        if len(messages) == 1 and messages[0].get("role") == "user":
            return messages[0]["content"], None
        return tuple((m["role"], m["content"]) for m in messages), None
    if request.get("echo"):
        return None, "completion with echo (the reply repeats the prompt)"
    prompts = request.get("prompt")
    prompts = [prompts] if isinstance(prompts, str) else prompts
    n = max(1, int(request.get("n") or 1))
    k = flag["choice"] // n
    if not isinstance(prompts, list) or k >= len(prompts) or not isinstance(prompts[k], str):
        return None, "token-id prompt"
    return prompts[k], None


def preference_pairs(db: str | Path | FeedbackStore, endpoint: str = "chat",
                     refusal: str | Callable[[Any], str] = HOUSE_REFUSAL, pair_up_down: bool = True) -> BuiltPairs:
    """Flags -> DPO pairs (see the module docstring). `refusal` is the chosen reply of an `unsafe` flag without a
    correction: a text, or a function of the prompt. `pair_up_down` pairs up-rated against down-rated replies to
    the same prompt. Only flags on `endpoint` responses are used; the others are counted as skipped."""
    if endpoint not in ENDPOINTS:
        raise LmstackError(f"endpoint must be one of {ENDPOINTS}, got {endpoint!r}")
    own = isinstance(db, FeedbackStore)
    store = db if own else FeedbackStore(db, create=False)
    try:
        flags = store.flags()
    finally:
        if not own:
            store.close()
    built = BuiltPairs([])
    latest: dict[tuple[str, int], dict] = {}
    for f in flags:  # oldest first: a later flag on the same reply replaces an earlier one
        if (f["response_id"], f["choice"]) in latest:
            built.skipped["superseded by a later flag on the same reply"] += 1
        latest[(f["response_id"], f["choice"])] = f
    seen: set[tuple] = set()
    ups: dict[Any, list[str]] = {}
    downs: dict[Any, list[str]] = {}
    bare: list = []  # prompts of down-rated replies with neither a correction nor an unsafe flag

    def add(prompt, chosen: str, rejected: str, source: str, meta: dict) -> None:
        if not chosen.strip() or chosen.strip() == rejected.strip():
            built.skipped["correction empty or equal to the reply"] += 1
            return
        key = (prompt, chosen, rejected)
        if key in seen:
            built.skipped["duplicate pair"] += 1
            return
        seen.add(key)
        built.pairs.append(Pair(prompt, chosen, rejected, meta={"source": source, **meta}))
        built.used[source] += 1

    for f in latest.values():
        if f["endpoint"] != endpoint:
            built.skipped[f"{f['endpoint']} endpoint (this run reads {endpoint})"] += 1
            continue
        prompt, why = _prompt(f)
        if why is not None:
            built.skipped[why] += 1
            continue
        reply = f["reply"] or ""
        meta = {"response_id": f["response_id"], "choice": f["choice"], "category": f["category"]}
        if f["rating"] == "up":
            ups.setdefault(prompt, []).append(reply)
            continue
        downs.setdefault(prompt, []).append(reply)
        if f["correction"]:
            add(prompt, f["correction"], reply, "correction", meta)
        elif f["category"] == "unsafe":
            if is_refusal(reply):
                built.skipped["flagged unsafe but the reply already refuses"] += 1
                continue
            add(prompt, refusal(prompt) if callable(refusal) else refusal, reply, "unsafe_refusal", meta)
        else:
            bare.append(prompt)
    for prompt in bare:  # after the loop: an up-rated reply to the same prompt may come later
        if not (pair_up_down and ups.get(prompt)):
            built.skipped["down-rated without a correction (pairs only with an up-rated reply)"] += 1
    for prompt, good in ups.items():
        bad = downs.get(prompt, []) if pair_up_down else []
        if not bad:
            built.skipped["up-rated with no down-rated reply to the same prompt"] += len(good)
            continue
        for g in good:
            for b in bad:
                add(prompt, g, b, "up_vs_down", {})
    return built

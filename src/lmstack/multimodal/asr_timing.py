"""Word-level timestamps for the Whisper-style recogniser from cross-attention and DTW (the idea of Whisper's
`word_timestamps=True`, openai/whisper timing.py; written here for the character tokenizer).

After decoding, one teacher-forced pass over prompt + transcript + <|endoftext|> returns every decoder block's
cross-attention weights (Whisper.decode_with_cross_weights). Row r of the matrix used is the query that
predicts transcript token r (the last row predicts <|endoftext|>); columns are the encoder positions of the real
audio (conv2 has stride 2: one position = 2 mel frames = 20 ms, FRAME_SECONDS).

1. Keep the alignment heads (pairs (layer, head)); normalise each head's weights to z-scores over the TOKENS
   axis for every frame (Whisper's choice; `norm="frames"` normalises each token row over frames instead),
   median-filter along frames (width 7, Whisper's; a model may store another), average the heads.
2. DTW finds the monotonic path of least cost through -matrix (steps: next token and next frame, next token
   only, next frame only), from (0, 0) to (last token, last frame).
3. A token's span is [the frame where the path enters its row, the frame where it enters the next row).
   Words are the transcript split on spaces; a word starts where its first character starts and ends where
   its last character ends (where the token after it starts); the time on the spaces between two words is
   split half and half between them (`word_times(spaces=...)`), so consecutive words touch, as speech does.

Alignment heads are chosen per model (Whisper ships a fixed list per checkpoint). `choose_heads` ranks the heads
by the mean absolute start/end error of each head alone on utterances with known word times (VAL), then keeps
the k best whose average is best. A saved model stores them in config.json ("alignment_heads"); a model saved
without them uses `default_heads`: every head of the last half of the decoder blocks.

The baseline of the benchmark (`proportional_words`): words spread over the speech span (first to last 10 ms
frame above an energy threshold, `speech_span`) in proportion to their character counts.

Usage:
    from lmstack.multimodal.asr_timing import dtw, word_times, default_heads
    words = asr.transcribe_words(samples)          # [(word, start_s, end_s)], asr.py
    text_idx, time_idx = dtw(cost)                 # cost (tokens, frames) -> the monotonic path
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.ndimage import median_filter

from lmstack.errors import LmstackError
from lmstack.multimodal.audio import HOP, SAMPLE_RATE

FRAME_SECONDS = 2 * HOP / SAMPLE_RATE
"""Seconds per encoder position: mel hop 10 ms, halved by conv2's stride 2 -> 20 ms (50 per second)."""
MEDIAN_WIDTH = 7
NORMS = ("tokens", "frames")


def default_heads(n_layers: int, n_heads: int) -> list[tuple[int, int]]:
    """Every head of the last half of the decoder blocks (a model saved without alignment heads)."""
    return [(layer, head) for layer in range(n_layers // 2, n_layers) for head in range(n_heads)]


def check_heads(heads, n_layers: int, n_heads: int) -> list[tuple[int, int]]:
    """[(layer, head)] pairs inside the model, or an LmstackError naming the bad one."""
    if not isinstance(heads, (list, tuple)) or not heads:
        raise LmstackError(f"alignment_heads must be a non-empty list of [layer, head] pairs, got {heads!r}")
    out = []
    for pair in heads:
        if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair)
                or not (0 <= pair[0] < n_layers and 0 <= pair[1] < n_heads)):
            raise LmstackError(f"alignment head {pair!r} is not a [layer, head] pair of this model "
                               f"({n_layers} decoder blocks x {n_heads} heads)")
        out.append((int(pair[0]), int(pair[1])))
    return out


def check_median_width(width) -> int:
    """An odd median-filter width >= 1 (1 = no filter), or an LmstackError."""
    if isinstance(width, bool) or not isinstance(width, int) or width < 1 or width % 2 == 0:
        raise LmstackError(f"alignment_median_width must be an odd integer >= 1, got {width!r}")
    return width


def dtw(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The monotonic path of least total cost through `cost` (N, M) from (0, 0) to (N-1, M-1), moving
    diagonally, down (next row) or right (next column): (row indices, column indices), one per path cell.
    Ties prefer the diagonal, then a step down."""
    cost = np.asarray(cost, dtype=np.float64)
    if cost.ndim != 2 or 0 in cost.shape:
        raise LmstackError(f"dtw needs a non-empty 2-D cost matrix, got shape {cost.shape}")
    n, m = cost.shape
    inf = float("inf")
    prev = [0.0] + [inf] * m  # accumulated cost of the row above (index 0: the virtual border)
    move = np.zeros((n + 1, m + 1), dtype=np.int8)  # 0 diagonal, 1 down (from i-1), 2 right (from j-1)
    for i in range(1, n + 1):
        row, cur, steps = cost[i - 1].tolist(), [inf] * (m + 1), move[i]
        left = inf
        for j in range(1, m + 1):
            diag, up = prev[j - 1], prev[j]
            if diag <= up and diag <= left:
                best, k = diag, 0
            elif up <= left:
                best, k = up, 1
            else:
                best, k = left, 2
            left = cur[j] = row[j - 1] + best
            steps[j] = k
        prev = cur
    rows, cols = [], []
    i, j = n, m
    while i > 0 and j > 0:
        rows.append(i - 1)
        cols.append(j - 1)
        k = move[i, j]
        if k == 0:
            i, j = i - 1, j - 1
        elif k == 1:
            i -= 1
        else:
            j -= 1
    if i != 0 or j != 0:  # cannot happen: the borders are infinite, so the path ends at (0, 0)
        raise LmstackError("dtw backtrace left the matrix")
    return np.array(rows[::-1]), np.array(cols[::-1])


def token_starts(rows: np.ndarray, cols: np.ndarray, n_rows: int) -> np.ndarray:
    """The column at which the path first enters each row: (n_rows,)."""
    starts = np.zeros(n_rows, dtype=np.int64)
    seen = np.zeros(n_rows, dtype=bool)
    for r, c in zip(rows.tolist(), cols.tolist()):
        if not seen[r]:
            starts[r], seen[r] = c, True
    return starts


def word_token_spans(text: str) -> list[tuple[str, int, int]]:
    """Words of a character-token transcript: (word, first token, last token + 1), split on spaces."""
    out, start = [], None
    for i, ch in enumerate(text + " "):
        if ch == " ":
            if start is not None:
                out.append((text[start:i], start, i))
                start = None
        elif start is None:
            start = i
    return out


def alignment_matrix(weights: list[torch.Tensor] | torch.Tensor, heads: list[tuple[int, int]], n_frames: int,
                     norm: str = "tokens", median_width: int = MEDIAN_WIDTH) -> np.ndarray:
    """The (tokens, n_frames) matrix DTW aligns: the chosen heads' weights (one utterance: per block
    (heads, tokens, frames)), normalised (z-scores over `norm`), median-filtered along frames, averaged."""
    if norm not in NORMS:
        raise LmstackError(f"norm={norm!r} is not one of {', '.join(NORMS)}")
    stack = np.stack([np.asarray(weights[layer][head, :, :n_frames], dtype=np.float64) for layer, head in heads])
    axis = 1 if norm == "tokens" else 2
    stack = (stack - stack.mean(axis=axis, keepdims=True)) / (stack.std(axis=axis, keepdims=True) + 1e-8)
    if median_width > 1 and n_frames >= median_width:
        stack = median_filter(stack, size=(1, 1, median_width), mode="nearest")
    return stack.mean(axis=0)


SPACES = ("split", "next", "none")


def word_times(text: str, matrix: np.ndarray, offset: float = 0.0, spaces: str = "split"
               ) -> list[tuple[str, float, float]]:
    """[(word, start_s, end_s)] of `text` from its alignment matrix (rows: one per character + <|endoftext|>).

    The time the path spends on the spaces between two words goes, by `spaces`: "split" half to each word
    (the boundary is the middle of the spaces' span), "next" to the next word (Whisper's BPE tokens carry their
    leading space), "none" to neither (a gap between the words)."""
    if matrix.shape[0] != len(text) + 1:
        raise LmstackError(f"the alignment matrix has {matrix.shape[0]} rows; {len(text) + 1} needed "
                           "(one per character plus <|endoftext|>)")
    if spaces not in SPACES:
        raise LmstackError(f"spaces={spaces!r} is not one of {', '.join(SPACES)}")
    rows, cols = dtw(-matrix)
    starts = token_starts(rows, cols, matrix.shape[0]) * FRAME_SECONDS + offset
    spans = word_token_spans(text)
    out = []
    for i, (word, a, b) in enumerate(spans):
        start, end = float(starts[a]), float(starts[b])
        if i > 0 and spaces != "none":  # the spaces before this word: from the previous word's end to here
            gap_start = float(starts[spans[i - 1][2]])
            start = gap_start if spaces == "next" else (gap_start + start) / 2
        if i + 1 < len(spans) and spaces == "split":
            end = (end + float(starts[spans[i + 1][1]])) / 2
        out.append((word, start, end))
    return out


def speech_span(samples: np.ndarray, threshold: float = 0.02) -> tuple[float, float]:
    """(start_s, end_s) of the speech in a clip: the first and last 10 ms frames whose peak is over `threshold`
    times the clip's peak; the whole clip when none is."""
    x = np.abs(np.asarray(samples, dtype=np.float32))
    frame = SAMPLE_RATE // 100
    n = x.size // frame
    if n == 0 or not x.max() > 0:
        return 0.0, x.size / SAMPLE_RATE
    peaks = x[: n * frame].reshape(n, frame).max(axis=1)
    loud = np.flatnonzero(peaks > threshold * x.max())
    if loud.size == 0:
        return 0.0, x.size / SAMPLE_RATE
    return loud[0] * frame / SAMPLE_RATE, (loud[-1] + 1) * frame / SAMPLE_RATE


def proportional_words(text: str, samples: np.ndarray) -> list[tuple[str, float, float]]:
    """The baseline: the words of `text` spread over the clip's speech span in proportion to their characters
    (each space counted as one character of the gap between two words)."""
    start, end = speech_span(samples)
    spans = word_token_spans(text)
    if not spans:
        return []
    total = spans[-1][2] - spans[0][1]
    scale = (end - start) / max(1, total)
    base = spans[0][1]
    return [(w, start + (a - base) * scale, start + (b - base) * scale) for w, a, b in spans]


def timing_errors(pred: list[tuple[str, float, float]], ref: list[tuple[str, float, float]]
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Absolute start and end errors (s) word by word; the word counts must match."""
    if len(pred) != len(ref):
        raise LmstackError(f"{len(pred)} predicted words against {len(ref)} reference words")
    p, r = np.array([w[1:] for w in pred], dtype=float), np.array([w[1:] for w in ref], dtype=float)
    return np.abs(p[:, 0] - r[:, 0]), np.abs(p[:, 1] - r[:, 1])


def choose_heads(utterances: list[tuple[str, list[np.ndarray], int, list[tuple[str, float, float]]]],
                 n_layers: int, n_heads: int, median_width: int = MEDIAN_WIDTH, norm: str = "tokens"
                 ) -> tuple[list[tuple[int, int]], dict]:
    """Alignment heads from utterances with known word times: each item (transcript, per-block weights
    (heads, tokens, frames), real frames, reference words). Ranks every head by its own mean absolute
    start/end error, then keeps the k best (k = 1..all) whose average gives the lowest error.
    Returns (heads, {"single": {head: error}, "by_k": [error of the k best]})."""
    if not utterances:
        raise LmstackError("choose_heads needs at least one utterance with reference word times")

    def error(heads: list[tuple[int, int]]) -> float:
        errs = []
        for text, weights, frames, ref in utterances:
            pred = word_times(text, alignment_matrix(weights, heads, frames, norm, median_width))
            s, e = timing_errors(pred, ref)
            errs.append(np.concatenate([s, e]))
        return float(np.concatenate(errs).mean())

    every = [(layer, head) for layer in range(n_layers) for head in range(n_heads)]
    single = {pair: error([pair]) for pair in every}
    ranked = sorted(every, key=single.get)
    by_k = [error(ranked[:k]) for k in range(1, len(ranked) + 1)]
    best = int(np.argmin(by_k)) + 1
    return ranked[:best], {"single": {f"{l}.{h}": round(v, 4) for (l, h), v in single.items()},
                           "by_k": [round(v, 4) for v in by_k], "error": round(by_k[best - 1], 4)}


__all__ = ["FRAME_SECONDS", "MEDIAN_WIDTH", "SPACES", "default_heads", "check_heads", "check_median_width",
 "dtw", "token_starts", "word_token_spans",
           "alignment_matrix", "word_times", "speech_span", "proportional_words", "timing_errors", "choose_heads"]

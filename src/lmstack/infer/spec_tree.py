"""Token trees for speculative decoding: several guessed continuations verified in one target forward.

A chain of k guesses is lost at its first wrong token. A token tree (SpecInfer, Miao et al. 2024; Medusa,
Cai et al. 2024; EAGLE-2, Li et al. 2024) keeps several candidates per depth: the target scores every node in
ONE forward, each node attending to the committed context and to its own ancestors only (chunk_visibility),
and the longest root-to-leaf path whose every node equals the target's argmax at its parent is accepted, plus
the target's token after it (accept_greedy). Greedy only: each accepted token is the target's own argmax given
the accepted tokens before it, so the output is token-identical to plain greedy decoding.

Layout. A TokenTree is a list of node tokens in depth-first order, the higher-scoring child first, so nodes
0..d-1 are the draft's own top-1 chain; parents[i] < i (-1: the root, which is the sequence's last token) and
depths[i] >= 1. The engine runs [last token] + tree as one short chunk (step_plan.py, model_runner.py): node
i's K/V go to the slot of position last+1+i, its RoPE position is last+depths[i]. After acceptance the path's
K/V move to positions last+1..last+a (PagedKVCache.move_slots); the top-1 chain already sits there, so when the
draft's own chain is accepted nothing moves. Rejected nodes leave K/V past the sequence's length only, which
the next step overwrites and the prefix cache never registers.

Building. Candidates carry a score: the draft's log-probability of the path from the root. best() keeps the
`size` highest-scoring ones at or above min_score; a child never scores above its parent (log-probabilities
are <= 0) and ties go to the shallower node, so the kept set is a tree. A node is worth a row of the target's
forward only if it is likely to be accepted, and the draft's path probability estimates that (EAGLE-2), so
min_score = log(min_prob) leaves out the unlikely ones: an unsure draft proposes a short tree, or none.

Usage:
    tree = best(tokens, parents, scores, size=16)     # candidates (parents index candidates) -> TokenTree
    tree = medusa_tree(top_ids, top_logp, size=16)    # per-depth top-k of Medusa heads -> TokenTree
    vis = chunk_visibility(1, tree.parents, tq)       # (tq, tq) bool: chunk row r sees chunk row c
    path, final = accept_greedy(tree, argmax)         # argmax[r]: the target's argmax at chunk row r
"""
from __future__ import annotations

import heapq

import torch


class TokenTree(list):
    """Guessed tokens (a list, depth-first) with parents[i] (-1: the root) and depths[i] (root = 0)."""

    def __init__(self, tokens: list[int], parents: list[int]):
        super().__init__(tokens)
        if len(parents) != len(tokens) or any(not -1 <= p < i for i, p in enumerate(parents)):
            raise ValueError(f"a token tree needs one parent per node, each before it: {parents}")
        self.parents = list(parents)
        self.depths = []
        for p in parents:
            self.depths.append(1 if p < 0 else self.depths[p] + 1)


def best(tokens: list[int], parents: list[int], scores: list[float], size: int,
         min_score: float = float("-inf")) -> TokenTree:
    """The `size` highest-scoring candidates scoring at least min_score, as a TokenTree; parents[i] indexes
    candidates (-1: root)."""
    depth = []
    for p in parents:  # candidates come parent first (each is generated from an earlier one)
        depth.append(1 if p < 0 else depth[p] + 1)
    kept: set[int] = set()
    for i in sorted(range(len(tokens)), key=lambda i: (-scores[i], depth[i], i)):
        if len(kept) == size or scores[i] < min_score:
            break
        if parents[i] < 0 or parents[i] in kept:
            kept.add(i)
    children: dict[int, list[int]] = {}
    for i in sorted(kept, key=lambda i: (-scores[i], i)):
        children.setdefault(parents[i], []).append(i)
    out_tokens, out_parents, index = [], [], {}
    stack = [(c, -1) for c in reversed(children.get(-1, []))]
    while stack:  # depth-first, the best child first
        i, parent = stack.pop()
        index[i] = len(out_tokens)
        out_tokens.append(tokens[i])
        out_parents.append(parent)
        stack.extend((c, index[i]) for c in reversed(children.get(i, [])))
    return TokenTree(out_tokens, out_parents)


def medusa_tree(top_ids: list[list[int]], top_logp: list[list[float]], size: int,
                min_score: float = float("-inf")) -> TokenTree:
    """Medusa's heads guess each depth independently: top_ids[j] / top_logp[j] are head j's top-k tokens and
    log-probabilities. A path's score is the sum over its depths; the `size` best paths' nodes form the tree
    (best-first: a node is taken only after its parent, whose score is at least its own)."""
    tokens, parents, scores = [], [], []
    heap = [(-top_logp[0][c], 0, -1, c) for c in range(len(top_ids[0]))]  # (-score, depth, parent, choice)
    heapq.heapify(heap)
    while heap and len(tokens) < size and -heap[0][0] >= min_score:
        neg, depth, parent, c = heapq.heappop(heap)
        node = len(tokens)
        tokens.append(top_ids[depth][c])
        parents.append(parent)
        scores.append(-neg)
        if depth + 1 < len(top_ids):
            for c2 in range(len(top_ids[depth + 1])):
                heapq.heappush(heap, (neg - top_logp[depth + 1][c2], depth + 1, node, c2))
    return best(tokens, parents, scores, size, min_score)


def chunk_visibility(n_known: int, parents: list[int] | None, tq: int) -> torch.Tensor:
    """(tq, tq) bool over one short chunk's rows: n_known committed tokens (causal among themselves), then the
    tree's nodes, each seeing every committed row, its ancestors and itself. parents None: a causal chain.
    Rows and columns past the chunk (padding up to tq) see nothing and are seen by nobody but row copies."""
    n = n_known + (len(parents) if parents is not None else 0)
    rows = [[c <= r for c in range(tq)] for r in range(n_known)]  # plain lists, one tensor at the end: ~20x faster
    if parents is None:
        rows += [[c <= r for c in range(tq)] for r in range(n_known, n)]
    else:
        for i, p in enumerate(parents):
            row = list(rows[n_known + p]) if p >= 0 else [c < n_known for c in range(tq)]
            row[n_known + i] = True
            rows.append(row)
    rows += [rows[n - 1]] * (tq - n)  # padded query rows repeat the last real row (ShortChunks.rows does the same)
    return torch.tensor(rows, dtype=torch.bool)


def accept_greedy(tree: TokenTree, argmax: list[int]) -> tuple[list[int], int]:
    """argmax[0]: the target's argmax after the root, argmax[1 + i]: after node i. Returns the accepted path
    (node indices, root's child first) and the target's token after its end."""
    children: dict[int, list[int]] = {}
    for i, p in enumerate(tree.parents):
        children.setdefault(p, []).append(i)
    path, node = [], -1
    while True:
        want = argmax[node + 1]
        nxt = next((c for c in children.get(node, ()) if tree[c] == want), None)
        if nxt is None:
            return path, want
        path.append(nxt)
        node = nxt

"""Speculative decoding: cheap proposals verified by one target forward, with a lossless accept rule.

Each decode step a proposer guesses k tokens; the target model scores the last token plus all k
guesses in one forward pass (k+1 positions, like a short prefill chunk), and the standard rule
(Leviathan et al. 2023; Chen et al. 2023) keeps a prefix of them:
    accept guess d_j with probability min(1, p_j(d_j) / q_j(d_j));
    at the first rejection sample from norm(max(p_j - q_j, 0)) and stop;
    if all k pass, sample one bonus token from p_{k+1}.
p is the target's distribution after every logits processor, q the proposer's. The output
distribution is exactly the target's, so speculation changes speed, never results (greedy: accept
while the guess equals the target's argmax, then take the argmax: token-identical output).

Proposers (SpeculativeConfig.method):
- draft: a smaller lmstack model with the same tokenizer. Its K/V live in a second paged pool indexed
  by the same block tables, so blocks, prefix caching, copy-on-write and preemption need nothing
  extra; the draft catches up on the tokens it has not seen, then decodes k guesses.
- ngram: prompt lookup decoding (Saxena 2023): find the latest earlier occurrence of the last n
  tokens in the sequence and propose what followed it. q is a point mass, so a guess is accepted
  with probability p(d) and a rejection samples from p with d removed.
- medusa / eagle: draft heads on the target's own hidden states (draft_heads.py). The runner hands every
  step's hidden rows to `observe`, which keeps per sequence the features of its last verified positions
  (rows of rejected guesses are dropped when the next step starts at the accepted length); medusa
  proposes all k guesses from the last verified feature in one shot; eagle keeps its one layer's K/V over
  the last `window` verified positions per sequence (a few KB, beside the features), runs only the newly
  verified positions each step, then rolls k guesses. Neither runs a second model or touches the paged pool.
Greedy rows that need no logits processing take each guess as a plain argmax: the accept rule ignores q
for greedy rows, so the sampler's machinery (and q) is only built for rows that sample.

Token trees (tree_nodes > 0, medusa / eagle): a greedy row's guesses become a tree of tree_nodes nodes up to
num_tokens deep (spec_tree.py), scored in the same one target forward with a tree attention mask; the longest
path the target agrees with is kept. medusa: the best paths over each head's top tree_topk tokens; eagle
(EAGLE-2's expansion): each depth rolls the layer on the tree_width best nodes of the depth before, batched,
and the tree_nodes best candidates by the draft's path log-probability form the tree. Sampled rows (temperature > 0)
and rows with logits processors keep the chain of num_tokens guesses and the lossless accept rule above.
Proposals run inside the target runner's decode_kernels() scope, so the skinny kernel serves their matmuls.

Usage:
    llm = LLM(target_dir, speculative={"method": "draft", "draft_model": draft_dir, "num_tokens": 4})
    llm = LLM(target_dir, speculative={"method": "ngram", "num_tokens": 4, "ngram_max": 3})
    llm = LLM(target_dir, speculative={"method": "eagle", "heads": heads_dir, "num_tokens": 4})
    llm = LLM(target_dir, speculative={"method": "eagle", "heads": heads_dir, "num_tokens": 5, "tree_nodes": 16})
    llm.engine.stats()["spec_acceptance_rate"]
    spec = SpeculativeDecoder(config, model, num_blocks, block_size, ctx, sampler)   # what the engine builds
    tokens, logprobs = spec.verify(seq, logits)      # the engine appends them through its output processor
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

from lmstack.config import from_dict
from lmstack.errors import LmstackError
from lmstack.infer import logits_processors as lp
from lmstack.infer.context import EngineContext
from lmstack.infer.draft_heads import load_heads
from lmstack.infer.loading import load_draft
from lmstack.infer.model_runner import ModelRunner
from lmstack.infer.sampler import Sampler
from lmstack.infer.sequence import Sequence
from lmstack.infer.spec_tree import TokenTree, accept_greedy, best, medusa_tree
from lmstack.infer.step_plan import StepPlan
from lmstack.model.linear import decode_kernels, linear


@dataclass
class SpeculativeConfig:
    method: Literal["draft", "ngram", "medusa", "eagle"] = "ngram"
    """draft: a smaller model proposes; ngram: prompt lookup proposes from the sequence itself;
    medusa / eagle: draft heads on the target's hidden states propose (see draft_heads.py)."""
    num_tokens: int = 4
    """Tokens proposed per step (k)."""
    draft_model: Any = None
    """method=draft: a model directory or Transformer sharing the target's tokenizer and vocabulary."""
    ngram_max: int = 4
    """method=ngram: longest suffix length matched."""
    ngram_min: int = 1
    """method=ngram: shortest suffix length matched."""
    heads: Any = None
    """method=medusa|eagle: a draft heads directory (heads.json + heads.safetensors) or DraftHeads."""
    tree_nodes: int = 0
    """method=medusa|eagle: 0 proposes a chain of num_tokens guesses; N > 0 proposes greedy rows a token tree
    of N nodes, num_tokens deep at most, verified in one forward (spec_tree.py)."""
    tree_topk: int = 4
    """Token trees: candidates per expanded node."""
    tree_width: int = 0
    """Token trees, eagle: nodes expanded per depth (each costs a row of the layer's batched roll); 0: tree_topk."""
    tree_min_prob: float = 0.0
    """Token trees: leave out nodes whose path probability under the draft is below this (each node costs a row
    of the target's forward; eagle also stops expanding when no node reaches it). 0: always tree_nodes nodes."""

    def __post_init__(self) -> None:
        if self.method not in ("draft", "ngram", "medusa", "eagle"):
            raise LmstackError(f"speculative method={self.method!r} is not allowed; choose 'draft', 'ngram', "
                               "'medusa' or 'eagle'")
        if not isinstance(self.num_tokens, int) or not 1 <= self.num_tokens <= 32:
            raise LmstackError(f"speculative num_tokens must be an integer in 1..32, got {self.num_tokens!r}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise LmstackError(f"need 1 <= ngram_min <= ngram_max, got {self.ngram_min} and {self.ngram_max}")
        if self.method == "draft" and self.draft_model is None:
            raise LmstackError("speculative method='draft' needs draft_model (a model directory or Transformer)")
        if self.method in ("medusa", "eagle") and self.heads is None:
            raise LmstackError(f"speculative method={self.method!r} needs heads (a draft heads directory)")
        if not isinstance(self.tree_nodes, int) or not 0 <= self.tree_nodes <= 63:
            raise LmstackError(f"speculative tree_nodes must be an integer in 0..63 (0: a chain), "
                               f"got {self.tree_nodes!r}")
        if not isinstance(self.tree_topk, int) or not 1 <= self.tree_topk <= 16:
            raise LmstackError(f"speculative tree_topk must be an integer in 1..16, got {self.tree_topk!r}")
        if not isinstance(self.tree_width, int) or not 0 <= self.tree_width <= 16:
            raise LmstackError(f"speculative tree_width must be an integer in 0..16 (0: tree_topk), "
                               f"got {self.tree_width!r}")
        if not isinstance(self.tree_min_prob, (int, float)) or not 0.0 <= self.tree_min_prob < 1.0:
            raise LmstackError(f"speculative tree_min_prob must be a number in [0, 1), got {self.tree_min_prob!r}")
        if self.tree_nodes and self.method not in ("medusa", "eagle"):
            raise LmstackError(f"speculative tree_nodes needs method 'medusa' or 'eagle' (draft heads), not "
                               f"{self.method!r}")


class SpeculativeDecoder:
    def __init__(self, config: SpeculativeConfig | dict, target: torch.nn.Module, num_blocks: int, block_size: int,
                 ctx: EngineContext, sampler: Sampler):
        if isinstance(config, dict):
            config = from_dict(SpeculativeConfig, config)
        self.cfg, self.ctx, self.sampler = config, ctx, sampler
        self.runner = self.heads = None
        self.k = config.num_tokens
        if config.method == "draft":
            draft = load_draft(config.draft_model, target)
            self.runner = ModelRunner(draft, num_blocks, block_size, str(next(target.parameters()).device))
        elif config.method in ("medusa", "eagle"):
            self.heads = load_heads(config.heads, target)
            if self.heads.config.method != config.method:
                raise LmstackError(f"speculative method={config.method!r} was given {self.heads.config.method} "
                                   "heads; train heads of the method asked for")
            self.k = min(self.k, self.heads.max_tokens)
        self.subset = None  # (ids, their LM-head rows): greedy guesses among a proposal vocabulary
        if self.heads is not None and self.heads.proposal_ids is not None:
            weight = target.head_weight()
            ids = self.heads.proposal_ids[self.heads.proposal_ids < ctx.vocab]
            self.subset = (ids, weight.detach()[ids].clone())
        self.target = target
        # seq_id -> [end position (exclusive), features of the positions before it, step last seen,
        #            eagle: (end position, K, V) of its layer over verified positions, or None]
        self.feats: dict[int, list] = {}
        guesses = max(self.k, config.tree_nodes)  # a step's rows past its last token
        self.min_score = math.log(config.tree_min_prob) if config.tree_min_prob > 0 else float("-inf")
        self.window = 1 if self.heads is None else (
            guesses + 1 if config.method == "medusa" else self.heads.config.window + guesses + 1)
        self.proposed = self.accepted = self.steps = self.observed = 0
        self.target_runner: ModelRunner | None = None  # attach(): its pool (token-tree K/V moves), kernel switch

    def attach(self, runner: ModelRunner) -> None:
        """Draft heads read the target runner's hidden rows of every step (the engine calls this once)."""
        if self.heads is not None:
            runner.hidden_hook = self.observe
        self.target_runner = runner
        if self.cfg.tree_nodes:
            cfg = runner.model.config
            why = ("ALiBi" if runner.cache.alibi is not None else "an attention logit softcap" if cfg.attn_logit_softcap
                   else "a sliding window" if cfg.sliding_window else "tensor parallelism" if runner.tp is not None
                   else None)
            if why:
                raise LmstackError(f"speculative tree_nodes (token trees) does not support a target with {why}; "
                                   "use tree_nodes=0 (a chain of guesses)")

    def observe(self, plan: StepPlan, hidden: torch.Tensor) -> None:
        """Keep each planned sequence's newest features: hidden (rows, d) are the step's flat rows.
        A step starts at the sequence's computed length, so stored rows at or past it (rejected guesses,
        or positions recomputed after preemption) are replaced."""
        self.observed += 1
        for p in plan.seqs:
            rows = hidden[p.row:p.row + len(p.tokens)]
            entry = self.feats.get(p.seq.seq_id)
            if entry is not None and entry[0] - len(entry[1]) <= p.start <= entry[0]:
                kept = entry[1][:len(entry[1]) - (entry[0] - p.start)]
                f, eagle = torch.cat([kept, rows])[-self.window:], entry[3]
            else:
                f, eagle = rows[-self.window:].clone(), None  # no view of the step's whole hidden survives it
            self.feats[p.seq.seq_id] = [p.start + len(rows), f, self.observed, eagle]
        if len(self.feats) > 2 * len(plan.seqs) + 64:  # forget finished (or long-idle) sequences
            self.feats = {k: v for k, v in self.feats.items() if self.observed - v[2] <= 32}

    # ---- hooks the engine calls
    def lookahead(self, seq: Sequence) -> int:
        """Slots to reserve for a decoding sequence's guesses (0 = no speculation for it)."""
        depth = self._depth(seq)
        if depth and self._tree(seq):
            return min(self.cfg.tree_nodes, self.ctx.max_model_len - seq.num_tokens - 1)
        return depth

    def _depth(self, seq: Sequence) -> int:
        """Guesses a chain may make (a tree's depth): within max_tokens and max_model_len."""
        req = seq.request
        if req.params.guided or req.beam is not None or not req.forked:
            return 0
        left = req.max_tokens - seq.num_output_tokens - 1
        room = self.ctx.max_model_len - seq.num_tokens - 1
        return max(0, min(self.k, left, room))

    def _tree(self, seq: Sequence) -> bool:
        """This sequence gets a token tree: trees are on and it decodes greedily on the raw logits."""
        params = seq.request.params
        return (bool(self.cfg.tree_nodes) and params.greedy and not lp.needs_processing(params) and seq.matcher is None
                and seq.request.phrase_ban is None)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        if self.runner is not None:
            self.runner.cache.copy_blocks(pairs)

    def propose(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            seq.spec_tokens, seq.spec_probs = [], None
        if self.cfg.method == "ngram":
            for seq in seqs:
                seq.spec_tokens = self._ngram(seq.token_ids, self.lookahead(seq))
        elif self.cfg.method == "draft":
            self._draft(seqs)
        else:
            self._from_heads(seqs)
        self.steps += 1

    def stats(self) -> dict:
        return {"spec_proposed_tokens": self.proposed, "spec_accepted_tokens": self.accepted,
                "spec_acceptance_rate": self.accepted / self.proposed if self.proposed else 0.0}

    # ---- proposers
    def _ngram(self, tokens: list[int], k: int) -> list[int]:
        if k <= 0:
            return []
        for n in range(min(self.cfg.ngram_max, len(tokens) - 1), self.cfg.ngram_min - 1, -1):
            suffix = tokens[-n:]
            for i in range(len(tokens) - n - 1, -1, -1):  # the latest earlier occurrence wins
                if tokens[i:i + n] == suffix:
                    return tokens[i + n:i + n + k]
        return []

    def _features(self, seq: Sequence) -> torch.Tensor | None:
        """Features of seq's verified positions up to its second-to-last token (the last one has not run
        through the target yet), oldest first; None when the newest of them is missing."""
        entry = self.feats.get(seq.seq_id)
        last = seq.num_tokens - 2
        if entry is None or not entry[0] - len(entry[1]) <= last < entry[0]:
            return None
        return entry[1][:len(entry[1]) - (entry[0] - 1 - last)]

    def _pick(self, seq: Sequence, feats: torch.Tensor, probs: list) -> list[int]:
        """Guesses from predicted features (r, d) through the target's LM head, appended to seq.spec_tokens;
        sampled rows also record q after the same processors as the target's row at that place."""
        params = seq.request.params
        if params.greedy and not lp.needs_processing(params):
            if self.subset is not None:  # argmax over the proposal vocabulary's rows only
                ids, weight = self.subset
                picked = ids[linear(feats, weight).argmax(dim=-1)].tolist()
            else:
                picked = self.target.head(feats)[:, :self.ctx.vocab].argmax(dim=-1).tolist()
            seq.spec_tokens.extend(picked)
            return picked
        logits = self.target.head(feats)[:, :self.ctx.vocab]
        picked = []
        for row in logits:
            srow = self.sampler.row(seq, seq.spec_tokens)
            processed = self.sampler.process(row[None].float(), [srow])
            probs.append(self.sampler.probabilities(processed, [srow])[0])
            picked.append(self.sampler.draw(processed, [srow])[0])
            seq.spec_tokens.append(picked[-1])
        return picked

    def _top(self, feats: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Features (r, d) -> the k likeliest proposal tokens per row and their log-probabilities (r, k), over
        the proposal vocabulary when the heads have one (greedy rows only: token trees)."""
        if self.subset is not None:
            ids, weight = self.subset
            val, idx = linear(feats, weight).float().log_softmax(dim=-1).topk(k, dim=-1)
            return ids[idx], val
        val, idx = self.target.head(feats)[:, :self.ctx.vocab].float().log_softmax(dim=-1).topk(k, dim=-1)
        return idx, val

    def _medusa_tree(self, seq: Sequence, feats: torch.Tensor, depth: int, nodes: int) -> None:
        tok, logp = self._top(self.heads.medusa(feats[-1])[:depth], self.cfg.tree_topk)
        tree = medusa_tree(tok.tolist(), logp.tolist(), nodes, self.min_score)
        seq.spec_tokens = tree if tree else []

    def _eagle_tree(self, seq: Sequence, depth: int, nodes: int) -> None:
        """EAGLE-2's expansion: each depth runs the layer once on the tree_width best nodes of the depth before (a
        batch; each row's K/V are the window's plus its own ancestors'), takes each one's tree_topk likeliest
        children, and the `nodes` best candidates by path log-probability become the tree."""
        f, kv, last = self._eagle_start(seq)
        topk, width = self.cfg.tree_topk, self.cfg.tree_width or self.cfg.tree_topk
        tok, logp = self._top(f[0], topk)
        tokens, scores = tok[0].tolist(), logp[0].tolist()
        parents = [-1] * len(tokens)
        frontier = [i for i in range(min(width, len(tokens))) if scores[i] >= self.min_score]  # expanded next
        feat_in = f.expand(len(frontier), -1, -1)  # every depth-1 node was predicted from the same feature
        kv_in = (kv[0].expand(len(frontier), -1, -1, -1), kv[1].expand(len(frontier), -1, -1, -1))
        for j in range(1, depth):
            if not frontier:  # the draft is unsure of every node: expanding further buys nothing
                break
            ids = torch.tensor([tokens[i] for i in frontier], device=f.device)
            out, (keys, values) = self.heads.eagle(feat_in, self.target.tok_emb(ids)[:, None], kv_in, last + j)
            tok, logp = self._top(out[:, 0], topk)  # (B, topk) children of each expanded node
            cand = torch.tensor([scores[i] for i in frontier], device=logp.device)[:, None] + logp
            base = len(tokens)
            tokens += tok.flatten().tolist()
            scores += cand.flatten().tolist()
            parents += [i for i in frontier for _ in range(tok.shape[1])]
            if j + 1 == depth:
                break
            top = cand.flatten().topk(min(width, cand.numel()))  # the next depth's best nodes
            pick = top.indices[top.values >= self.min_score]
            rows = pick // tok.shape[1]
            frontier = [base + i for i in pick.tolist()]
            feat_in, kv_in = out[rows], (keys[rows], values[rows])
        tree = best(tokens, parents, scores, nodes, self.min_score)
        seq.spec_tokens = tree if tree else []

    def _eagle_start(self, seq: Sequence) -> tuple[torch.Tensor, tuple, int]:
        """Extend the layer's K/V over the newly verified positions: (the predicted feature (1, 1, d) of the last
        token's position, K/V over the window, position of the second-to-last token)."""
        entry, window = self.feats[seq.seq_id], self.heads.config.window
        f_start, last = entry[0] - len(entry[1]), seq.num_tokens - 2
        state, kv = entry[3], None
        if state is not None and f_start <= state[0] <= last:
            frm, kv = state[0], state[1:]
        else:
            frm = max(f_start, last + 1 - window)
        feats = entry[1][frm - f_start:last + 1 - f_start]
        dev = feats.device
        ids = torch.tensor(seq.token_ids[frm + 1:last + 2], device=dev)  # x_{p+1} beside f_p
        f, (keys, values) = self.heads.eagle(feats[None], self.target.tok_emb(ids)[None], kv, frm)
        kv = (keys[:, :, -window:], values[:, :, -window:])  # attention sees the last `window` positions
        entry[3] = (last + 1, *kv)
        return f[:, -1:], kv, last

    def _eagle(self, seq: Sequence, k: int, probs: list) -> None:
        """Extend the layer's K/V over the newly verified positions, then roll k guesses."""
        f, kv, last = self._eagle_start(seq)
        dev = f.device
        for j in range(k):
            tok = self._pick(seq, f[0], probs)[0]
            if j + 1 < k:  # roll: the predicted feature and the guess are the next input (K/V not kept)
                f, kv = self.heads.eagle(f, self.target.tok_emb(torch.tensor([[tok]], device=dev)), kv, last + 1 + j)

    @torch.inference_mode()
    def _from_heads(self, seqs: list[Sequence]) -> None:
        # the target runner's kernel switch: these matmuls are a few rows against a whole weight, like decode
        with decode_kernels(self.target_runner is not None and self.target_runner.kernels):
            for seq in seqs:
                self._heads_one(seq)

    def _heads_one(self, seq: Sequence) -> None:
        k = self._depth(seq)
        feats = self._features(seq) if k else None
        if feats is None:
            return
        if self._tree(seq):
            nodes = self.lookahead(seq)
            if self.cfg.method == "medusa":
                self._medusa_tree(seq, feats, k, nodes)
            else:
                self._eagle_tree(seq, k, nodes)
            return
        probs: list[torch.Tensor] = []
        if self.cfg.method == "medusa":
            self._pick(seq, self.heads.medusa(feats[-1])[:k], probs)  # k guesses at once
        else:
            self._eagle(seq, k, probs)
        if probs:
            seq.spec_probs = torch.stack(probs)

    def _draft(self, seqs: list[Sequence]) -> None:
        ks = {seq.seq_id: self.lookahead(seq) for seq in seqs}
        live = [s for s in seqs if ks[s.seq_id] > 0]
        probs: dict[int, list[torch.Tensor]] = {s.seq_id: [] for s in live}
        # first pass: catch up on every token the draft has not seen, then guess d1
        batch = [(s, s.token_ids[s.draft_computed:], s.draft_computed) for s in live]
        step = 0
        while live:
            rows, total = [], 0
            for _, toks, _ in batch:
                total += len(toks)
                rows.append(total - 1)
            # Cut to the ids the target samples from (ctx.vocab): a guess in a padded row is no token,
            # and q must cover the same ids as the target's p for the accept rule.
            logits = self.runner.run(StepPlan.of(batch, rows))[:, :self.ctx.vocab]
            if all(s.request.params.greedy and not lp.needs_processing(s.request.params) for s in live):
                guesses, dist = logits.argmax(dim=-1).tolist(), None  # greedy rows: q is never read
            else:
                srows = [self.sampler.row(s, s.spec_tokens) for s in live]
                processed = self.sampler.process(logits, srows)
                guesses = self.sampler.draw(processed, srows)
                dist = self.sampler.probabilities(processed, srows)
            nxt = []
            for i, s in enumerate(live):
                s.draft_computed = s.num_tokens + step
                s.spec_tokens.append(guesses[i])
                if dist is not None:
                    probs[s.seq_id].append(dist[i])
                if len(s.spec_tokens) < ks[s.seq_id]:
                    nxt.append((s, [guesses[i]], s.num_tokens + step))
            step += 1
            batch = nxt
            live = [b[0] for b in nxt]
        for s in seqs:
            if s.spec_tokens and probs[s.seq_id]:
                s.spec_probs = torch.stack(probs[s.seq_id])

    # ---- verification
    def verify(self, seq: Sequence, logits: torch.Tensor) -> tuple[list[int], torch.Tensor]:
        """logits (k+1, vocab) for [last token, d1..dk]: accept a prefix of the guesses plus one more token.
        Returns those tokens and the log-probability rows they were drawn at; the caller appends them."""
        if isinstance(seq.spec_tokens, TokenTree):
            return self._verify_tree(seq, logits)
        guesses = seq.spec_tokens
        k = len(guesses)
        params = seq.request.params
        gen = seq.generator or self.sampler.generator
        accepted, final = 0, None
        plain = not lp.needs_processing(params) and seq.matcher is None and seq.request.phrase_ban is None
        if params.greedy and plain:
            processed = logits  # what plain greedy decoding takes the argmax of (Sampler.sample's hot path)
        else:
            processed = self.sampler.process(logits, [self.sampler.row(seq, guesses[:j]) for j in range(k + 1)])
        if params.greedy:
            target = processed.argmax(dim=-1).tolist()
            while accepted < k and target[accepted] == guesses[accepted]:
                accepted += 1
            final = target[accepted]
        else:
            p = processed.softmax(dim=-1)
            for j, d in enumerate(guesses):
                q = seq.spec_probs[j] if seq.spec_probs is not None else None
                q_d = float(q[d]) if q is not None else 1.0
                u = float(torch.rand((), generator=gen, device=gen.device))  # the generator's device (CUDA too)
                if u * q_d < float(p[j, d]):  # u < p/q without dividing
                    accepted += 1
                    continue
                if q is not None:
                    residual = (p[j] - q).clamp(min=0)
                else:
                    residual = p[j].clone()
                    residual[d] = 0.0
                if float(residual.sum()) <= 0:
                    residual = p[j]
                final = int(torch.multinomial(residual / residual.sum(), 1, generator=gen))
                break
            if final is None:
                final = int(torch.multinomial(p[k], 1, generator=gen))
        self.proposed += k
        self.accepted += accepted
        old_len = seq.num_tokens
        seq.num_computed_tokens += accepted  # the accepted guesses' K/V were written by this forward
        seq.draft_computed = min(seq.draft_computed, old_len + accepted)
        seq.spec_tokens, seq.spec_probs = [], None
        return guesses[:accepted] + [final], logits.log_softmax(dim=-1)

    def _verify_tree(self, seq: Sequence, logits: torch.Tensor) -> tuple[list[int], torch.Tensor]:
        """logits (1 + nodes, vocab) for [last token, tree nodes] of a greedy row (trees are proposed for no
        other): keep the longest path the target's argmax agrees with, move its K/V (and features) into the
        sequence's next positions, and return its tokens plus the target's next one."""
        tree = seq.spec_tokens
        path, final = accept_greedy(tree, logits.argmax(dim=-1).tolist())
        last = seq.num_tokens - 1  # node i was written at position last + 1 + i
        moves = [(last + 1 + node, last + 1 + j) for j, node in enumerate(path) if node != j]
        if moves:  # the top-1 chain is already in place; a path that left it moves from its nodes' slots
            run = self.target_runner
            run.cache.move_slots([run.slot(seq, a) for a, _ in moves], [run.slot(seq, b) for _, b in moves])
        entry, n = self.feats.get(seq.seq_id), len(tree)
        if entry is not None and entry[0] == last + 1 + n and len(entry[1]) > n:
            entry[1] = torch.cat([entry[1][:-n], entry[1][-n:][path]])  # rows of the path's nodes, in order
            entry[0] = last + 1 + len(path)
        else:
            self.feats.pop(seq.seq_id, None)
        self.proposed += n
        self.accepted += len(path)
        seq.num_computed_tokens += len(path)  # their K/V now sit at the positions they are accepted at
        seq.spec_tokens, seq.spec_probs = [], None
        rows = [0] + [1 + node for node in path]  # the row each returned token was read from
        return [tree[node] for node in path] + [final], logits[rows].log_softmax(dim=-1)

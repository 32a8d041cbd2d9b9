"""Token-tree speculative decoding (spec_tree.py): each node attends to the context and its ancestors only (the
mask, and the target's logits at every node equal a plain forward over its root-to-node path), greedy outputs
are token-identical to plain greedy decoding (batches, mixed with sampled rows, prefix caching, preemption),
every block is free afterwards, and bad configs fail by name."""
import pytest
import torch

from lmstack.errors import LmstackError
from lmstack.infer import LLM, SamplingParams
from lmstack.infer.model_runner import ModelRunner
from lmstack.infer.paged_attention import PagedKVCache
from lmstack.infer.sequence import Sequence
from lmstack.infer.spec_tree import TokenTree, accept_greedy, best, chunk_visibility, medusa_tree
from lmstack.infer.step_plan import PlannedSeq, StepPlan

from infer_helpers import random_prompts, tiny_model
from test_draft_heads import make_heads

# root -> a(0) -> b(1) -> c(2); a -> d(3); root -> e(4) -> f(5)
PARENTS = [-1, 0, 1, 0, -1, 4]


def ancestors(parents: list[int], i: int) -> set[int]:
    out = set()
    while i >= 0:
        out.add(i)
        i = parents[i]
    return out


def test_tree_mask_lets_a_node_see_only_its_ancestors():
    tq = len(PARENTS) + 3  # one known row, the tree, two padding rows
    vis = chunk_visibility(1, PARENTS, tq)
    for i in range(len(PARENTS)):
        seen = {c - 1 for c in range(1, 1 + len(PARENTS)) if vis[1 + i, c]}
        assert seen == ancestors(PARENTS, i), i
        assert vis[1 + i, 0]  # the last known token (the root)
    assert vis[0].tolist() == [True] + [False] * (tq - 1)
    assert torch.equal(vis[-1], vis[len(PARENTS)])  # padding rows repeat the last real row
    # the pool's SDPA mask: 5 context keys before the chunk, then the chunk's rows as the tree allows
    start, group = 5, 2
    n = 1 + len(PARENTS)
    q_pos = torch.tensor([list(range(start, start + n)) + [start + n - 1] * (tq - n)])

    class Short:  # the ShortChunks fields _short_mask reads
        rows, masks, tree = torch.zeros(1, tq, dtype=torch.long), {}, vis[None]
    Short.q_pos = q_pos
    mask = PagedKVCache._short_mask(Short, start + n, group, 0)
    assert mask.shape == (1, 1, group * tq, start + n)
    for r in range(n):
        expect = [True] * start + vis[r, :n].tolist()
        assert mask[0, 0, r].tolist() == expect
        assert mask[0, 0, tq + r].tolist() == expect  # the group's second query head: the same rows


def test_tree_building_and_acceptance():
    tokens, parents, scores = [7, 8, 9, 10, 11], [-1, -1, 0, 0, 2], [-0.1, -0.5, -0.3, -0.9, -0.35]
    tree = best(tokens, parents, scores, size=4)
    assert list(tree) == [7, 9, 11, 8] and tree.parents == [-1, 0, 1, -1] and tree.depths == [1, 2, 3, 1]
    # Medusa: per-depth top-2; the best 4 paths' nodes, a child never before its parent
    tree = medusa_tree([[5, 6], [7, 8], [9, 10]], [[-0.1, -2.0], [-0.2, -0.3], [-0.1, -3.0]], size=4)
    assert list(tree) == [5, 7, 9, 8] and tree.parents == [-1, 0, 1, 0]
    # argmax rows: [root, node0..node3]: 5 accepted, then 8 (a side branch), then 4 (no such child)
    assert accept_greedy(tree, [5, 8, 0, 0, 4]) == ([0, 3], 4)
    assert accept_greedy(tree, [6, 0, 0, 0, 0]) == ([], 6)
    with pytest.raises(ValueError, match="parent"):
        TokenTree([1, 2], [-1, 1])


@torch.no_grad()
def test_tree_rows_equal_a_plain_forward_over_each_path():
    """The target scores a tree and a chain (two sequences, non-contiguous blocks) in one step: each node's logits
    equal a full forward over the prompt plus its root-to-node path (mask and RoPE positions by depth)."""
    model = tiny_model(64, seed=4)
    runner = ModelRunner(model, num_blocks=32, block_size=4)
    prompts = [random_prompts(1, 9, 9, 64, seed=s)[0] for s in (1, 2)]
    seqs = []
    for prompt, table in zip(prompts, ([5, 2, 9, 14, 7, 3], [11, 0, 20, 6, 30, 1])):
        seq = Sequence(None, 0, prompt, len(prompt))
        seq.block_table = table
        runner.run([(seq, prompt[:-1], 0)], [])
        seqs.append(seq)
    tree = TokenTree([3, 4, 5, 6, 7, 8], PARENTS)
    chain = [9, 10]
    plan = StepPlan()
    for seq, guesses, t in ((seqs[0], tree, tree), (seqs[1], chain, None)):
        n = 1 + len(guesses)
        plan.seqs.append(PlannedSeq(seq, [seq.token_ids[-1]] + list(guesses), seq.num_tokens - 1, plan.num_rows,
                                    plan.num_rows, [], n, 1, len(guesses), t))
        plan.logit_rows.extend(range(plan.num_rows, plan.num_rows + n))
        plan.num_rows += n
    logits = runner.run(plan)
    for i in range(len(tree)):
        path = [tree[a] for a in sorted(ancestors(PARENTS, i))]
        want = model(torch.tensor([prompts[0] + path]))[0, -1]
        torch.testing.assert_close(logits[1 + i], want, atol=1e-4, rtol=1e-4)
    for j in range(len(chain) + 1):
        want = model(torch.tensor([prompts[1] + chain[:j]]))[0, -1]
        torch.testing.assert_close(logits[1 + len(tree) + j], want, atol=1e-4, rtol=1e-4)


def count_moves(llm: LLM) -> list[int]:
    """Counts the K/V moves of accepted paths that left the top-1 chain (so the test knows they happened)."""
    cache, moved = llm.engine.runner.cache, [0]
    original = cache.move_slots

    def counted(src, dst):
        moved[0] += 1
        return original(src, dst)
    cache.move_slots = counted
    return moved


@pytest.mark.parametrize("method", ["medusa", "eagle"])
def test_greedy_tree_is_token_identical(model, method):
    vocab = model.config.vocab_size
    base = LLM(model, block_size=4, num_blocks=256)
    spec = {"method": method, "heads": make_heads(method, model, scale=0.3), "num_tokens": 3, "tree_nodes": 10,
            "tree_topk": 3}
    fast = LLM(model, block_size=4, num_blocks=256, max_num_seqs=4, speculative=spec)
    moved = count_moves(fast)
    motif = random_prompts(1, 5, 5, vocab, seed=20)[0]
    prompts = [motif * 4, *random_prompts(4, 4, 12, vocab, seed=22)]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in base.generate(prompts, params)]
    got = [o.outputs[0].token_ids for o in fast.generate(prompts, params)]
    assert got == want
    stats = fast.engine.stats()
    assert stats["spec_proposed_tokens"] > 200  # trees of 10 nodes at (almost) every step
    assert stats["spec_accepted_tokens"] > 0 and moved[0] > 0  # paths were accepted, some off the top-1 chain
    assert fast.engine.bm.num_free_blocks == 256
    fast.engine.bm.check_consistency()


@pytest.mark.parametrize("method", ["medusa", "eagle"])
def test_tree_width_and_min_prob_shape_the_tree(model, method):
    """A narrow eagle expansion and a probability floor change which nodes are proposed, never the output; a
    floor no path reaches proposes nothing at all."""
    prompts = random_prompts(3, 4, 10, model.config.vocab_size, seed=40)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in LLM(model, block_size=4, num_blocks=128).generate(prompts, params)]
    heads = make_heads(method, model, scale=0.3)
    proposed = []
    for extra in ({"tree_width": 1, "tree_min_prob": 0.001}, {"tree_min_prob": 0.999}):
        spec = {"method": method, "heads": heads, "num_tokens": 3, "tree_nodes": 6, "tree_topk": 2, **extra}
        llm = LLM(model, block_size=4, num_blocks=128, max_num_seqs=3, speculative=spec)
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == want
        proposed.append(llm.engine.stats()["spec_proposed_tokens"])
        assert llm.engine.bm.num_free_blocks == 128
    assert proposed[0] > 0 and proposed[1] == 0, proposed


def test_tree_with_sampled_rows_prefix_cache_and_preemption(model):
    """Greedy rows (trees) share steps with sampled rows (chains) in a pool small enough to preempt, with
    prompts that share a cached prefix: the greedy outputs still equal plain greedy decoding."""
    vocab = model.config.vocab_size
    shared = random_prompts(1, 12, 12, vocab, seed=30)[0]
    prompts = [shared + p for p in random_prompts(4, 3, 6, vocab, seed=31)]
    greedy = SamplingParams(max_tokens=28, temperature=0.0, ignore_eos=True)
    sampled = SamplingParams(max_tokens=28, temperature=0.8, seed=1, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in LLM(model, block_size=4, num_blocks=256).generate(prompts, greedy)]
    spec = {"method": "eagle", "heads": make_heads("eagle", model), "num_tokens": 3, "tree_nodes": 8}
    fast = LLM(model, block_size=4, num_blocks=40, max_num_seqs=8, speculative=spec, enable_prefix_caching=True)
    outs = fast.generate(prompts + prompts, [greedy] * len(prompts) + [sampled] * len(prompts))
    assert [o.outputs[0].token_ids for o in outs[:len(prompts)]] == want
    stats = fast.engine.stats()
    assert stats["num_preemptions"] > 0 and stats["prefix_cache_hit_tokens"] > 0
    assert fast.engine.bm.num_free_blocks == 40
    fast.engine.bm.check_consistency()


def test_tree_config_errors(model):
    heads = make_heads("eagle", model)
    with pytest.raises(LmstackError, match="tree_nodes must be an integer in 0..63"):
        LLM(model, speculative={"method": "eagle", "heads": heads, "tree_nodes": 64})
    with pytest.raises(LmstackError, match="tree_topk must be"):
        LLM(model, speculative={"method": "eagle", "heads": heads, "tree_nodes": 8, "tree_topk": 0})
    with pytest.raises(LmstackError, match="tree_width must be"):
        LLM(model, speculative={"method": "eagle", "heads": heads, "tree_nodes": 8, "tree_width": -1})
    with pytest.raises(LmstackError, match="tree_min_prob must be a number in"):
        LLM(model, speculative={"method": "eagle", "heads": heads, "tree_nodes": 8, "tree_min_prob": 1.5})
    with pytest.raises(LmstackError, match="tree_nodes needs method 'medusa' or 'eagle'"):
        LLM(model, speculative={"method": "ngram", "tree_nodes": 8})
    windowed = tiny_model(model.config.vocab_size, seed=1, sliding_window=8)
    with pytest.raises(LmstackError, match="sliding window"):
        LLM(windowed, speculative={"method": "eagle", "heads": make_heads("eagle", windowed), "tree_nodes": 8})

"""Prefix caching (router/kv_cache.py): hash-chained full blocks, shared by reference count, evicted
least recently freed first; the engine gives the same tokens with it as without it, on every path
that reuses a prompt, and no block leaks."""

from __future__ import annotations

import random

import pytest
import torch

from cluster.build import local_engine
from model.model import Transformer
from model.sampling import SamplingParams
from router.engine import EngineConfig, LLMEngine, Resume
from router.kv_cache import BlockManager, BlockTable, block_hashes
from tests.support import hf_checkpoint
from tests.unit.test_parity import NEAR_TIE, SHAPES, _id

GREEDY = dict(temperature=0, ignore_eos=True)


def test_block_hashes_chain_over_the_prefix_and_the_salt():
    a = block_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4, [])
    assert len(a) == 2 and a[0] != a[1]
    assert block_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9], 4, []) == a  # a partial block has no hash
    b = block_hashes([9, 9, 9, 9, 5, 6, 7, 8], 4, [])
    assert b[1] != a[1]  # equal tokens after another prefix: another block
    assert block_hashes([5, 6, 7, 8], 4, [])[0] != a[1]  # equal tokens at another position
    assert block_hashes([1, 2, 3, 4], 4, [], b"tenant")[0] != a[0]
    have = block_hashes([1, 2, 3, 4], 4, [])
    assert block_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4, have) == a  # extended incrementally


def test_blocks_are_shared_by_count_and_evicted_least_recently_freed_first():
    m = BlockManager(4, 2)
    t1 = BlockTable(2)
    m.grow(t1, 4)
    h = block_hashes([1, 2, 3, 4], 2, [])
    m.register(t1, h)
    assert m.lookup(h, 2) == t1.blocks and m.num_cached == 2
    t2 = BlockTable(2)
    m.share(t2, m.lookup(h, 2))
    assert [m.ref[b] for b in t1.blocks] == [2, 2] and t2.read_only == 4
    m.release(t1)
    assert m.num_free == 2  # still held by t2
    m.release(t2)
    assert m.num_free == 4 and m.num_cached == 2  # free, but still found
    first, second = t1.blocks or m.lookup(h, 2)
    t3 = BlockTable(2)
    m.grow(t3, 4)  # plain blocks go first: nothing evicted
    assert m.stats.evictions == 0 and m.lookup(h, 2) == [first, second]
    m.grow(t3, 6)  # now a cached one: the prefix's last block (freed first) goes before its first
    assert m.stats.evictions == 1 and m.lookup(h, 2) == [first]
    assert m.can_grow(BlockTable(2), 2, [first]) and not m.can_grow(BlockTable(2), 4, [first])
    m.release(t3)
    assert m.reset() == 1 and m.num_cached == 0 and m.num_free == 4


def engines(model_dir: str, **cfg) -> tuple[LLMEngine, LLMEngine]:
    """The same model with prefix caching on and off."""
    on = local_engine(model_dir, "auto", EngineConfig(**cfg))
    off = LLMEngine(on.dense, on.experts, on.tokenizer, EngineConfig(**cfg, enable_prefix_caching=False))
    return on, off


def workload(seed: int = 0) -> list[list[int]]:
    """Prompts that reuse each other: a shared system prefix with different tails, an exact repeat, a
    block-aligned prompt seen twice (every block cached), and conversations that grow turn by turn."""
    g = random.Random(seed)
    words = lambda n: [g.randrange(3, 32000) for _ in range(n)]  # noqa: E731
    system = words(37)
    out = [system + words(9), system + words(5), system + words(12)]
    out.append(list(out[0]))
    aligned = words(48)
    out += [aligned, list(aligned), aligned + words(16)]
    return out


def check_same(ours: list[int], ref: list[int], model_dir: str, prompt: list[int], dtype: torch.dtype) -> None:
    """Equal greedy tokens; in bfloat16 a first difference only where the top two logits nearly tie."""
    if ours == ref or dtype == torch.float32:
        assert ours == ref
        return
    i = next(i for i, (a, b) in enumerate(zip(ours, ref)) if a != b)
    logits = Transformer.from_pretrained(model_dir).logits(prompt + ref[:i])[-1].float()
    top2 = logits.topk(2).values
    assert top2[0] - top2[1] < NEAR_TIE[dtype] * top2[0].abs(), f"token {i} differs: {ours[i]} vs {ref[i]}"


@pytest.mark.parametrize("shape", SHAPES, ids=[_id(s) for s in SHAPES])
def test_greedy_tokens_equal_with_and_without_the_cache(tmp_path, shape):
    kv, experts, top_k, dtype, shard, old = shape
    hf_checkpoint(tmp_path, kv_heads=kv, experts=experts, top_k=top_k, dtype=dtype, shard=shard, old_form=old)
    on, off = engines(str(tmp_path), max_num_batched_tokens=24, kv_cache_tokens=512)
    sp = SamplingParams(max_tokens=6, **GREEDY)
    prompts = workload()
    seq_on = [on.generate([p], sp)[0] for p in prompts]  # one after another: each finds the ones before
    assert on.blocks.stats.hits > 0 and any(o.cached_tokens for o in seq_on)
    turn2 = prompts[0] + seq_on[0].new_token_ids + prompts[1][-5:]  # a conversation's next turn
    seq_on.append(on.generate([turn2], sp)[0])
    assert seq_on[-1].cached_tokens >= len(prompts[0]) // 16 * 16
    batch_on = on.generate(prompts + [turn2], sp)  # all at once: blocks shared within a step's company
    ref = off.generate(prompts + [turn2], sp)
    assert off.blocks.stats.hits == 0 and off.blocks.num_cached == 0
    for p, a, b, r in zip(prompts + [turn2], seq_on, batch_on, ref):
        check_same(a.new_token_ids, r.new_token_ids, str(tmp_path), p, dtype)
        check_same(b.new_token_ids, r.new_token_ids, str(tmp_path), p, dtype)


def test_a_fully_cached_prompt_recomputes_its_last_position_without_writing_the_shared_block(tiny_dir):
    on, off = engines(tiny_dir, kv_cache_tokens=512)
    p = list(range(100, 148))  # three full blocks
    sp = SamplingParams(max_tokens=5, **GREEDY)
    first = on.generate([p], sp)[0]
    blocks = on.blocks.lookup(block_hashes(p, 16, []), 3)
    assert len(blocks) == 3
    slots = torch.tensor([b * 16 + i for b in blocks for i in range(16)])
    before = on.kv.k[:, slots].clone(), on.kv.v[:, slots].clone()
    again = on.generate([p], sp)[0]
    assert again.cached_tokens == 47  # every position but the last, which samples
    assert torch.equal(on.kv.k[:, slots], before[0]) and torch.equal(on.kv.v[:, slots], before[1])
    assert first.new_token_ids == again.new_token_ids == off.generate([p], sp)[0].new_token_ids


def test_prompt_logprobs_and_routes_come_back_with_the_blocks(tiny_dir):
    """lm-eval's loglikelihood path: one context, several continuations, echo + logprobs. The
    context's prompt logprobs and routes are kept with its blocks, so later requests find them; a
    request asking for more alternatives than were kept computes its prompt again."""
    on, off = engines(tiny_dir, kv_cache_tokens=1024)
    ctx = on.tokenizer.encode("Question: the capital of France is a city on the Seine; its name, in one word, is")
    asks = dict(prompt_logprobs=2, return_prompt_routed_experts=True, max_tokens=1, **GREEDY)
    for cont in (" Paris", " Lyon", " Marseille"):
        p = ctx + on.tokenizer.encode(cont)[1:]
        got = on.generate([p], SamplingParams(**asks))[0]
        want = off.generate([p], SamplingParams(**asks))[0]
        assert got.prompt_routed_experts == want.prompt_routed_experts
        assert len(got.prompt_logprobs) == len(want.prompt_logprobs) == len(p)
        for a, b in zip(got.prompt_logprobs[1:], want.prompt_logprobs[1:]):
            assert a[0] == b[0] and a[2] == b[2] and abs(a[1] - b[1]) < 1e-4
            assert [t for t, _ in a[3]] == [t for t, _ in b[3]]
    assert got.cached_tokens == len(ctx) // 16 * 16 - 1 > 0  # the last cached position is computed for its logits
    more = on.generate([p], SamplingParams(**{**asks, "prompt_logprobs": 5}))[0]
    assert more.cached_tokens == 0 and len(more.prompt_logprobs[1][3]) == 5


def test_choices_of_one_prompt_share_its_blocks_and_copy_only_the_tail(tiny_dir):
    on, off = engines(tiny_dir, max_num_batched_tokens=32, kv_cache_tokens=1024)
    p = on.tokenizer.encode("Shared prefill: " + "one two three four five six seven " * 6)
    params = [SamplingParams(max_tokens=6, temperature=0.9, seed=10 + k, ignore_eos=True) for k in range(4)]
    rids = [on.add_request(p, params[0], "c0", group="g")]
    rids += [on.add_request(p, sp, f"c{k}", group="g", fork_of="c0") for k, sp in enumerate(params[1:], 1)]
    got = {r: [] for r in rids}
    while on.has_unfinished():
        for o in on.step():
            got[o.req_id] += o.new_token_ids
    solo = [off.generate([p], sp)[0].new_token_ids for sp in params]
    assert [got[r] for r in rids] == solo
    full = len(p) // 16 * 16
    assert on.blocks.stats.hits == 3 * full  # the blocks the first choice computed
    assert on.scheduler.num_forked_tokens == 3 * (len(p) - 1 - full)  # and the partial block copied


def test_salt_separates_and_opt_out_reads_nothing(tiny_dir):
    on, _ = engines(tiny_dir, kv_cache_tokens=1024)
    p = list(range(200, 260))
    on.generate([p], SamplingParams(max_tokens=2, cache_salt="alice", **GREEDY))
    assert on.generate([p], SamplingParams(max_tokens=2, cache_salt="bob", **GREEDY))[0].cached_tokens == 0
    assert on.generate([p], SamplingParams(max_tokens=2, **GREEDY))[0].cached_tokens == 0
    assert on.generate([p], SamplingParams(max_tokens=2, cache_salt="alice", **GREEDY))[0].cached_tokens == 48
    skip = SamplingParams(max_tokens=2, skip_reading_prefix_cache=True, **GREEDY)
    assert on.generate([p], skip)[0].cached_tokens == 0
    with pytest.raises(ValueError, match="cache_salt"):
        SamplingParams(cache_salt="")


def check_blocks(eng: LLMEngine) -> None:
    """Every block is held by exactly the tables that list it, or free exactly once; the cache's maps agree."""
    m = eng.blocks
    held = [0] * m.num_blocks
    for seq in eng.scheduler.running:
        for b in seq.table.blocks:
            held[b] += 1
    for seq in eng.scheduler.waiting:
        assert not seq.table.blocks
    assert held == m.ref
    free = m.free_blocks()
    assert len(set(free)) == len(free) and all(m.ref[b] == 0 for b in free)
    assert len(free) + sum(1 for r in m.ref if r) == m.num_blocks
    assert all(m.hash_of[b] == h for h, b in m.by_hash.items()) and len(m.hash_of) == len(m.by_hash)
    assert all(b in m.hash_of for b in m.evictable)


def test_no_block_leaks_after_10k_requests_with_aborts_preemptions_and_failovers(tiny_dir):
    g = random.Random(7)
    cfg = EngineConfig(kv_cache_tokens=96 * 4, block_size=4, max_num_seqs=48, max_num_batched_tokens=128)
    eng = local_engine(tiny_dir, "float32", cfg)
    prefixes = [[g.randrange(3, 32000) for _ in range(g.randrange(4, 40))] for _ in range(12)]
    live: set[str] = set()
    submitted = 0
    steps = 0
    while submitted < 10_000 or eng.has_unfinished():
        while submitted < 10_000 and len(live) < 64:
            p = g.choice(prefixes) + [g.randrange(3, 32000) for _ in range(g.randrange(0, 6))]
            sp = SamplingParams(max_tokens=g.randrange(1, 6), temperature=g.choice([0, 1.0]), ignore_eos=True)
            k = g.random()
            resume = Resume([g.randrange(3, 32000)], 0) if k < 0.05 and sp.max_tokens > 1 else None  # a failover
            group = f"grp{submitted // 4}" if k > 0.9 else None
            rid = f"r{submitted}"
            fork = f"r{submitted - 1}" if k > 0.95 and f"r{submitted - 1}" in live else None
            eng.add_request(p, sp, rid, resume=resume, group=group, fork_of=fork)
            live.add(rid)
            submitted += 1
        for o in eng.step():
            if o.finished:
                live.discard(o.req_id)
        steps += 1
        if g.random() < 0.3 and live:
            victim = g.choice(sorted(live))
            eng.abort(victim)
            live.discard(victim)
        if steps % 50 == 0:
            check_blocks(eng)
    check_blocks(eng)
    assert not live and eng.blocks.num_free == eng.blocks.num_blocks
    assert eng.scheduler.num_preemptions > 0 and eng.blocks.stats.evictions > 0 and eng.blocks.stats.hits > 0

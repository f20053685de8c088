"""Prefix-affinity routing (cluster/serve/routing.py) as pure functions: a request's block hashes,
the index of where each prefix went, rendezvous ranking (stable, minimal movement when a replica
goes), load before affinity."""

from __future__ import annotations

import random
from types import SimpleNamespace

from cluster.serve.routing import PrefixIndex, choose, prefix_hashes, prompt_of, rank
from model.sampling import SamplingParams
from router.kv_cache import block_hashes


def test_the_hashes_are_the_engines_block_hashes_of_the_leading_tokens():
    p = list(range(3, 103))
    assert prefix_hashes(p, None, 16, 64) == block_hashes(p[:64], 16, [])
    assert prefix_hashes(p, "t", 16, 64) == block_hashes(p[:64], 16, [], b"t") != prefix_hashes(p, None, 16, 64)
    assert prefix_hashes(p[:15], None, 16, 64) == []  # no full block: nothing cached to go back to


def test_a_longer_prompt_goes_where_its_longest_known_prefix_went():
    g = random.Random(1)
    ids = ["r1", "r2", "r3"]
    index = PrefixIndex()
    for _ in range(30):  # a conversation: each turn is the previous prompt and more
        turn = [g.randrange(32000) for _ in range(g.randrange(20, 60))]
        where = None
        for _ in range(4):
            h = prefix_hashes(turn, None, 16, 2048)
            order = choose(h, ids, [0, 0, 0], 4, index)
            assert where is None or ids[order[0]] == where
            where = ids[order[0]]
            index.record(h, where)
            turn = turn + [g.randrange(32000) for _ in range(g.randrange(5, 40))]
    # a prefix never seen: the rendezvous rank of its first block, the same in every ingress
    fresh = prefix_hashes(list(range(40)), None, 16, 2048)
    assert choose(fresh, ids, [0, 0, 0], 4, PrefixIndex()) == rank(fresh[0], ids)
    small = PrefixIndex(capacity=3)
    small.record(fresh, "r1")
    small.record(prefix_hashes(list(range(50, 100)), None, 16, 2048), "r2")
    assert len(small.where) == 3 and small.longest(fresh, set(ids)) is None  # the oldest went first
    assert index.longest(h, {"nobody"}) is None  # a replica that is gone holds nothing


def test_rendezvous_ranking_moves_only_the_keys_of_a_replica_that_goes():
    g = random.Random(0)
    keys = [prefix_hashes([g.randrange(32000) for _ in range(32)], None, 16, 256)[0] for _ in range(300)]
    three = ["a", "b", "c"]
    first = {k: three[rank(k, three)[0]] for k in keys}
    assert all(three[rank(k, three)[0]] == first[k] for k in keys)  # deterministic
    assert min(list(first.values()).count(r) for r in three) > 60  # spread over the replicas
    two = ["a", "c"]
    assert all(two[rank(k, two)[0]] == first[k] for k in keys if first[k] != "b")


def test_load_wins_over_affinity_past_the_imbalance():
    h = prefix_hashes(list(range(40)), None, 16, 256)
    ids = ["r1", "r2"]
    best = rank(h[0], ids)[0]
    lens = [0, 0]
    assert choose(h, ids, lens, 4, PrefixIndex())[0] == best
    lens[best] = 5
    assert choose(h, ids, lens, 4, PrefixIndex()) is None  # 5 more in flight than the other: power of two
    lens[best] = 4
    assert choose(h, ids, lens, 4, PrefixIndex())[0] == best
    assert choose([], ids, lens, 4, PrefixIndex()) is None and choose(h, ["r1"], [0], 4, PrefixIndex()) is None
    assert choose(h, ids, [None, None], 4, PrefixIndex())[0] == best  # nothing known: affinity


def test_the_prompt_of_the_attention_workers_calls():
    sp = SamplingParams(cache_salt="s")
    assert prompt_of(SimpleNamespace(args=([[5, 6, 7], [5, 6, 7]], [sp, sp], [None, None], "g"))) == ([5, 6, 7], "s")
    assert prompt_of(SimpleNamespace(args=([5, 6, 7], SamplingParams()))) == ([5, 6, 7], None)
    assert prompt_of(SimpleNamespace(args=())) is None and prompt_of(None) is None

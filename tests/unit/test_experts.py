"""Expert placement and the retry rule shared by the Ray and Serve backends (no Ray needed)."""

from __future__ import annotations

import pytest
import torch

from router.dispatch import ExpertRequest
from router.experts import InProcessExperts, expert_groups, split_by_group


def test_expert_groups_cover_every_expert_once():
    assert expert_groups(8, 1) == [[i] for i in range(8)]
    assert expert_groups(8, 3) == [[0, 1, 2], [3, 4, 5], [6, 7]]
    with pytest.raises(ValueError):
        expert_groups(8, 0)
    x = torch.zeros(2, 4)
    assert split_by_group({0: x, 4: x, 5: x}, {e: e // 3 for e in range(8)}).keys() == {0, 1}


def test_groups_of_two_equal_groups_of_one(tiny_dir):
    one, two = (InProcessExperts(tiny_dir, expert_groups(8, n), "float32") for n in (1, 2))
    x = torch.randn(5, 64)
    req = ExpertRequest(1, {0: x, 3: x[:2], 7: x[1:]})
    a, b = one.submit(req).result(), two.submit(req).result()
    assert a.keys() == b.keys() == {0, 3, 7}
    assert all(torch.equal(a[e], b[e]) for e in a)
    assert one.weight_bytes() == two.weight_bytes()


def test_the_directory_takes_only_records_signed_with_the_data_planes_secret(monkeypatch):
    """Any Ray caller can reach the expert directory: a registration or deregistration counts only with
    an HMAC of its record under the cluster's data-plane secret, fresh, and newer than the replica's
    last (a recorded one replays nothing). In a cluster the secret comes from Ray's GCS; here, no Ray."""
    import time

    from cluster.runtime.channel import new_secret
    from cluster.serve import directory
    from cluster.serve.directory import ExpertDirectory, signed

    secret = new_secret()
    monkeypatch.setattr(directory, "app_secret", lambda: secret)
    d = ExpertDirectory.func_or_class()
    first = signed(secret, "register", "r1", 0, "10.0.0.5", 20001, seq=0)
    assert d.register(*first)
    assert d.view() == {0: [("r1", "10.0.0.5", 20001)]}

    r, g, host, port, seq, ts, mac = nxt = signed(secret, "register", "r1", 0, "10.0.0.5", 20001, seq=1)
    forged = [
        ("r2", g, host, port, seq, ts, mac),  # another replica's record
        (r, g, "10.6.6.6", port, seq, ts, mac),  # the address changed after signing
        (r, 1, host, port, seq, ts, mac),  # the group changed
        (r, [g], host, port, seq, ts, mac),  # the same values in other types
        (r, g, host, port, seq, ts, b"\0" * 32),  # a guess
        (r, g, host, port, seq, ts, "not bytes"),
        signed(new_secret(), "register", "r2", 0, "10.6.6.6", 20001, seq=0),  # another key
        signed(secret, "register", "r2", 0, "10.0.0.6", 20002, seq=0, ts=time.time() - 3600),  # an hour old
        first,  # a replay
    ]
    for args in forged:
        assert not d.register(*args), args
    assert not d.deregister(r, seq, ts, mac)  # a registration's MAC is no deregistration's
    assert not d.deregister(*signed(new_secret(), "deregister", "r1", seq=5))
    assert d.refused == len(forged) + 2
    assert d.view() == {0: [("r1", "10.0.0.5", 20001)]}  # none of that reached the view

    assert d.register(*nxt)  # the genuine next heartbeat
    assert not d.register(*nxt)  # once
    assert d.deregister(*signed(secret, "deregister", "r1", seq=2))
    assert d.view() == {}


def test_dispatch_and_combine_equal_the_reference_moe(tiny_dir):
    """router/'s dispatch -> expert workers -> combine gives the layer's MoE output that model/'s
    reference (each expert on the rows that chose it, weighted and summed) gives."""
    from model.checkpoint import Checkpoint, all_expert_pairs
    from model.moe import LocalExperts, MoEInput, route
    from router.dispatch import combine, dispatch

    ckpt = Checkpoint(tiny_dir)
    c = ckpt.config
    reference = LocalExperts.from_checkpoint(ckpt, all_expert_pairs(c), "float32")
    workers = InProcessExperts(tiny_dir, expert_groups(c.num_local_experts, 3), "float32")
    g = torch.Generator().manual_seed(3)
    for rows in (1, 7, 40):
        x = torch.randn(rows, c.hidden_size, generator=g)
        w, ids = route(torch.randn(rows, c.num_local_experts, generator=g), c.num_experts_per_tok)
        m = MoEInput(1, x, w, ids)
        req, plan = dispatch(m, c.num_local_experts)
        assert set(req.batches) == set(ids.unique().tolist())  # only experts with rows are called
        assert sum(b.shape[0] for b in req.batches.values()) == rows * c.num_experts_per_tok
        got = combine(x, plan, workers.submit(req).result())
        torch.testing.assert_close(got, reference(m), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_a_one_token_batch_dispatches_and_combines_bit_for_bit_as_a_larger_one(dtype, k):
    """The one-token path (every decode step at concurrency 1) gives the plan, the batches and the
    combined output that the general path gives the same token inside a larger batch: same experts
    in the same order, same weights, the same sum in the same order, to the bit."""
    from model.moe import MoEInput, route
    from router.dispatch import combine, dispatch

    g = torch.Generator().manual_seed(k)
    n_exp, d = 8, 16
    for _ in range(20):
        x = torch.randn(1, d, generator=g).to(dtype)
        w, ids = route(torch.randn(1, n_exp, generator=g), k)
        one_req, one_plan = dispatch(MoEInput(0, x, w, ids), n_exp)
        # the same token as row 1 of three (the others route elsewhere or alike: any grouping)
        other = torch.randn(2, d, generator=g).to(dtype)
        w3, ids3 = route(torch.randn(3, n_exp, generator=g), k)
        w3[1], ids3[1] = w[0], ids[0]
        big = torch.cat([other[:1], x, other[1:]])
        big_req, big_plan = dispatch(MoEInput(0, big, w3, ids3), n_exp)

        def run(batches):  # any per-expert function of the rows: an expert
            return {e: (xs.float() * (e + 1) + e / 7).to(dtype) for e, xs in batches.items()}

        assert list(one_plan.rows) == sorted(ids[0].tolist())  # the experts, in increasing order
        for e in one_plan.rows:
            assert torch.equal(one_req.batches[e], x)
            j = big_plan.rows[e].tolist().index(1)
            assert torch.equal(one_plan.weights[e], big_plan.weights[e][j : j + 1])
        got = combine(x, one_plan, run(one_req.batches))
        want = combine(big, big_plan, run(big_req.batches))[1:2]
        assert got.dtype == dtype and got.shape == (1, d)
        assert torch.equal(got, want)


def test_a_one_token_batch_whose_experts_repeat_takes_the_general_path():
    from model.moe import MoEInput
    from router.dispatch import combine, dispatch

    x = torch.randn(1, 4)
    w, ids = torch.tensor([[0.25, 0.75]]), torch.tensor([[3, 3]])
    req, plan = dispatch(MoEInput(0, x, w, ids), 8)
    assert list(plan.rows) == [3] and req.batches[3].shape == (2, 4)  # both slots, grouped
    out = combine(x, plan, {3: req.batches[3] * 2})
    torch.testing.assert_close(out, x * 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,k", [(2, 2), (7, 2), (64, 2), (33, 3), (16, 1)])
def test_batched_dispatch_and_combine_equal_the_per_expert_loop_bit_for_bit(dtype, rows, k):
    """One gather and one weighted scatter for all experts give what gathering and scattering each
    expert's rows in turn gives (experts in increasing order), to the bit."""
    from model.moe import MoEInput, route
    from router.dispatch import combine, dispatch

    g = torch.Generator().manual_seed(rows * 10 + k)
    n_exp, d = 8, 24
    x = torch.randn(rows, d, generator=g).to(dtype)
    w, ids = route(torch.randn(rows, n_exp, generator=g), k)
    req, plan = dispatch(MoEInput(0, x, w, ids), n_exp)
    assert list(plan.rows) == sorted(ids.unique().tolist())
    for e, r in plan.rows.items():
        assert torch.equal(req.batches[e], x[r]) and req.batches[e].is_contiguous()
    outs = {e: (xs.float() * (e + 1) - e / 5).to(dtype) for e, xs in req.batches.items()}
    want = torch.zeros_like(x)
    for e, r in plan.rows.items():
        want.index_add_(0, r, (outs[e] * plan.weights[e]).to(dtype))
    assert torch.equal(combine(x, plan, outs), want)


def test_a_worker_trims_its_heap_once_per_interval_after_its_calls_and_never_mid_call(tiny_dir, monkeypatch):
    """The heap is trimmed for a worker only once its calls have ended (nothing in flight), at most
    once per TRIM_INTERVAL_S, and only when a call ran since the last trim; the process-wide trimmer
    (one thread, whatever the number of workers) claims it once a burst of calls has ended."""
    from workers import expert
    from workers.expert import TRIM_INTERVAL_S, ExpertWorker

    monkeypatch.setattr(expert, "release_free_heap", lambda: None)  # the bookkeeping is tested, not glibc
    w = ExpertWorker(tiny_dir, [0, 1], "float32")
    t0 = w._trimmed_at
    assert not w._claim_trim(t0 + 2 * TRIM_INTERVAL_S)  # no call since loading: nothing to hand back
    w.run(0, {0: torch.randn(3, 64)})
    assert not w._claim_trim(t0 + TRIM_INTERVAL_S / 2)  # too soon
    w.stats.in_flight_tokens += 1  # a call of another connection is running
    assert not w._claim_trim(t0 + 2 * TRIM_INTERVAL_S)
    w.stats.in_flight_tokens -= 1
    assert w._claim_trim(t0 + 2 * TRIM_INTERVAL_S)
    assert not w._claim_trim(t0 + 4 * TRIM_INTERVAL_S)  # trimmed already, no call since
    w.run(1, {1: torch.randn(2, 64)})
    assert w._claim_trim(t0 + 4 * TRIM_INTERVAL_S)
    ExpertWorker(tiny_dir, [2], "float32")
    assert len(expert._IDLE_TRIM) == 1 and expert._IDLE_TRIM[0].is_alive()
    assert w in expert._WORKERS

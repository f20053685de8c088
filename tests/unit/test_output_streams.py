"""The attention replica's side of the output streams (cluster/serve/outputs.py) and the router's
pinning of `subscribe` calls (cluster/serve/routing.py), without Ray: every output of a sink reaches
its subscription in order, several steps' in one message; a request's stream ends when its choices
have; a newer subscription takes over; idle subscriptions and orphaned sinks end."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from cluster.serve.outputs import Sink, Sinks
from cluster.serve.routing import AttentionRouter, pinned_to
from router.engine import ErrorKind, FinishReason, RequestOutput


def out(rid: str, tok: int, finished: bool = False, error: str | None = None, kind=None) -> RequestOutput:
    reason = FinishReason.ERROR if error else (FinishReason.LENGTH if finished else None)
    return RequestOutput(rid, [tok], str(tok), finished or error is not None, reason, error=error, error_kind=kind)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_a_subscription_gets_every_output_in_order_several_steps_in_one_message():
    async def go():
        s = Sink()
        ended_a = s.expect(1, ["a.0", "a.1"])
        ended_b = s.expect(2, ["b.0"])
        sub = s.messages()
        for step in range(3):  # three steps before the subscription reads: one message
            s.put_nowait(((1, 0), out("a.0", step)))
            s.put_nowait(((1, 1), out("a.1", 10 + step)))
            s.put_nowait(((2, 0), out("b.0", 20 + step)))
        first = await sub.__anext__()
        assert [(t, k, o.new_token_ids[0]) for t, k, o in first] == [
            (t, k, base + step) for step in range(3) for t, k, base in ((1, 0, 0), (1, 1, 10), (2, 0, 20))
        ]
        s.put_nowait(((2, 0), out("b.0", 23, finished=True)))
        assert ended_b.is_set() and not ended_a.is_set()
        s.put_nowait(((1, 0), out("a.0", 3, finished=True)))
        assert not ended_a.is_set()  # one choice of two has ended
        s.put_nowait(((1, 1), out("a.1", 13, finished=True)))
        assert ended_a.is_set()
        second = await sub.__anext__()
        assert [(t, k) for t, k, _ in second] == [(2, 0), (1, 0), (1, 1)]
        await sub.aclose()
        assert s.attached is None

    run(go())


def test_a_refusal_ends_the_whole_request_and_forget_names_the_choices_still_running():
    s = Sink()
    ended = s.expect(5, ["r.0", "r.1", "r.2"])
    s.put_nowait(((5, 0), out("r.0", 0, error="overloaded", kind=ErrorKind.OVERLOADED)))
    assert ended.is_set() and s.forget(5) == []
    # a choice that failed alone (FAILED) ends only itself
    ended = s.expect(6, ["q.0", "q.1"])
    s.put_nowait(((6, 1), out("q.1", 0, error="overflow", kind=ErrorKind.FAILED)))
    assert not ended.is_set()
    assert s.forget(6) == ["q.0"] and ended.is_set()  # cancelled: q.0 is to be aborted
    assert s.forget(6) == []  # once


def test_a_newer_subscription_takes_over_and_the_older_one_ends():
    async def go():
        s = Sink()
        s.expect(1, ["a.0"])
        old = s.messages()
        s.put_nowait(((1, 0), out("a.0", 0)))
        assert len(await old.__anext__()) == 1
        pending_old = asyncio.ensure_future(old.__anext__())  # waiting for the next step
        await asyncio.sleep(0)
        new = s.messages()
        s.put_nowait(((1, 0), out("a.0", 1)))
        got = await new.__anext__()
        assert [o.new_token_ids for _, _, o in got] == [[1]]  # the new one has it, not the old one
        try:
            await pending_old
            raise AssertionError("the superseded subscription went on")
        except StopAsyncIteration:
            pass
        assert s.attached == s.generation  # the old one's end does not detach the new one
        await new.aclose()

    run(go())


def test_an_idle_subscription_ends_but_not_while_a_request_is_open():
    async def go():
        s = Sink()
        s.expect(1, ["a.0"])
        sub = s.messages(idle_s=0.05)
        nxt = asyncio.ensure_future(sub.__anext__())
        await asyncio.sleep(0.2)
        assert not nxt.done()  # a request is open: the subscription waits for its outputs
        s.put_nowait(((1, 0), out("a.0", 0, finished=True)))
        s.forget(1)
        assert len(await nxt) == 1
        try:
            await sub.__anext__()  # no request left: it ends after idle_s
            raise AssertionError("an idle subscription did not end")
        except StopAsyncIteration:
            pass

    run(go())


def test_orphaned_sinks_are_reaped_with_their_running_choices():
    async def go():
        sinks = Sinks()
        gone, live = sinks.get_or_add("gone"), sinks.get_or_add("live")
        ended = gone.expect(1, ["g.0", "g.1"])
        gone.put_nowait(((1, 0), out("g.0", 0, finished=True)))
        sub = live.messages()
        live.expect(1, ["l.0"])
        live.put_nowait(((1, 0), out("l.0", 0)))
        await sub.__anext__()  # attached
        now = gone.detached_at + 31
        assert sinks.reap(now, ttl_s=30) == ["g.1"]
        assert list(sinks) == ["live"] and ended.is_set() and not gone.items
        assert sinks.reap(now + 100, ttl_s=30) == []  # a sink with a subscription stays
        await sub.aclose()

    run(go())


def pending(method: str, *args):
    return SimpleNamespace(
        metadata=SimpleNamespace(call_method=method), args=list(args), routing_context=SimpleNamespace()
    )


def replica(uid: str):
    return SimpleNamespace(replica_id=SimpleNamespace(unique_id=uid))


def test_the_router_pins_subscribe_calls_and_backs_off_between_rounds():
    router = object.__new__(AttentionRouter)  # its state, not Serve's machinery
    router.initialize_state(affinity=False)
    router._replica_queue_len_cache = SimpleNamespace(get=lambda _: 0)
    reps = [replica(u) for u in ("r1", "r2", "r3")]
    assert pinned_to(pending("subscribe", "sink", "r2")) == "r2"
    assert pinned_to(pending("generate_choices", [[1, 2]], [None])) is None
    for _ in range(20):
        p = pending("subscribe", "sink", "r3")
        got = asyncio.run(router.choose_replicas(reps, p))
        assert got == [[reps[2]]] and p.routing_context.should_backoff
    # the named replica is gone: any one, which refuses the call (the ingress re-submits its requests)
    got = asyncio.run(router.choose_replicas(reps, pending("subscribe", "sink", "gone")))
    assert len(got) == 1 and len(got[0]) == 1
    # anything else: two at random (power of two choices), with back-off too
    p = pending("generate_choices", [[1] * 40], [None])
    got = asyncio.run(router.choose_replicas(reps, p))
    assert len(got) == 1 and len(got[0]) == 2 and p.routing_context.should_backoff


def test_a_chosen_replica_goes_to_the_call_it_was_chosen_for_even_when_calls_share_an_id():
    """Calls made while serving one request share its internal request id (an ingress's subscribe
    and request calls; /metrics asking two replicas at once). Serve's own fulfilment (first in, first
    out) runs with the router's matching: each call gets the replica chosen for it, and a call whose
    metadata is unknown still gets the first waiting one."""
    from collections import deque

    async def go():
        router = object.__new__(AttentionRouter)
        router.initialize_state()
        router._routing_task_by_pending_request_future = {}
        router._pending_requests_by_id = {}
        router.queue_wait_time_ms_histogram = SimpleNamespace(observe=lambda _: None)
        calls = [
            SimpleNamespace(
                metadata=SimpleNamespace(internal_request_id="same", call_method=m),
                future=asyncio.get_running_loop().create_future(),
                created_at=0.0,
            )
            for m in ("generate_choices", "subscribe", "stats")
        ]
        router._pending_requests_to_fulfill = deque(calls)
        r1, r2, r3 = replica("r1"), replica("r2"), replica("r3")
        router._fulfill_next_pending_request(r2, calls[1].metadata)  # chosen for the subscribe call
        assert calls[1].future.result() is r2 and not calls[0].future.done()
        router._fulfill_next_pending_request(r3, calls[2].metadata)
        assert calls[2].future.result() is r3 and not calls[0].future.done()
        router._fulfill_next_pending_request(r1, SimpleNamespace(internal_request_id="other"))
        assert calls[0].future.result() is r1  # no match: the first still waiting

    run(go())


def test_outputs_by_choice_are_joined_in_order_one_per_choice():
    pairs = [(1, out("b", 10)), (0, out("a", 0)), (1, out("b", 11)), (0, out("a", 1, finished=True))]
    got = RequestOutput.by_choice(pairs)
    assert [k for k, _ in got] == [0, 1]
    assert [o.new_token_ids for _, o in got] == [[0, 1], [10, 11]] and [o.text for _, o in got] == ["01", "1011"]
    assert got[0][1].finished and not got[1][1].finished
    single = out("c", 5)
    assert RequestOutput.by_choice([(2, single)]) == [(2, single)]

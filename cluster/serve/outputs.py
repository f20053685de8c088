"""An attention replica's output streams to the ingress replicas: one per ingress replica (a sink).

    engine loop --one hand-off per step--> Sink of ingress I: items [(tag, choice, RequestOutput)]
                                             |  Sink.messages(): everything that has arrived, as one
                                             v  message of AttentionWorker.subscribe(I, this replica)
                                           ingress I (cluster/api/streams.py): each tag's queue

A Ray streaming item costs far more than the few outputs it carries, so every step's outputs of all
of an ingress replica's requests travel as one item instead of one per request. Each request's own
call (`generate_choices` with a sink and a tag) stays open while it runs: it carries this replica's
key, then ends once `ended` is set, or, cancelled, aborts the choices still running.

No state outlives its use: a subscription that has had no request of its sink for `idle_s` ends
(so a replica being removed can drain), and a sink without a subscription for `SINK_TTL_S` (its
ingress replica is gone) is dropped, its requests aborted (`Sinks.reap`).
"""

from __future__ import annotations

import asyncio
import time

from router.engine import ErrorKind, RequestOutput

SINK_TTL_S = 30.0  # a sink with no subscription this long belongs to an ingress replica that is gone
SUBSCRIPTION_IDLE_S = 2.0  # a subscription with no request of its sink here this long ends


def refused(out: RequestOutput) -> bool:
    """An output that ends its whole request (admission refused it), not only its choice."""
    return out.error is not None and out.error_kind != ErrorKind.FAILED


class Sink:
    """One ingress replica's outputs on this attention replica, and its requests (by tag).

    The engine loop's hand-off puts ((tag, choice), output) here as it would into a request's queue.
    A tag's `ended` event is set once every choice has finished (or the request was refused)."""

    def __init__(self):
        self.items: list[tuple[int, int, RequestOutput]] = []
        self.wake = asyncio.Event()
        self.generation = 0  # of the newest subscription
        self.attached: int | None = None  # the generation of the subscription attached, if any
        self.detached_at = time.monotonic()
        self.open: dict[int, tuple[list[str], set[int], asyncio.Event]] = {}  # tag -> (rids, choices left, ended)

    def expect(self, tag: int, rids: list[str]) -> asyncio.Event:
        """A request's choices (engine request ids) that will put outputs here under `tag`."""
        ended = asyncio.Event()
        self.open[tag] = (rids, set(range(len(rids))), ended)
        return ended

    def forget(self, tag: int) -> list[str]:
        """The tag's request is over here (its stream ends); the ids of its choices still running."""
        rids, left, ended = self.open.pop(tag, ((), (), None))
        if ended is not None:
            ended.set()
        return [rids[k] for k in left]

    def put_nowait(self, item: tuple[tuple[int, int], RequestOutput]) -> None:
        (tag, k), out = item
        self.items.append((tag, k, out))
        self.wake.set()
        entry = self.open.get(tag)
        whole = refused(out)
        if entry is not None and (out.finished or whole):
            left = entry[1]
            left.discard(k)
            if whole:
                left.clear()
            if not left:
                entry[2].set()

    async def messages(self, idle_s: float = SUBSCRIPTION_IDLE_S):
        """A subscription: what has arrived since the last message, as one list, until a newer
        subscription takes over or none of the sink's requests has been here for `idle_s`."""
        self.generation += 1
        mine = self.attached = self.generation
        self.wake.set()  # an older subscription wakes, sees it is superseded and ends
        try:
            while self.generation == mine:
                if not self.items:
                    self.wake.clear()
                    try:
                        await asyncio.wait_for(self.wake.wait(), None if self.open else idle_s)
                    except asyncio.TimeoutError:
                        if not (self.open or self.items):
                            return
                    continue
                batch, self.items = self.items, []
                yield batch
        finally:
            if self.attached == mine:
                self.attached = None
                self.detached_at = time.monotonic()

    def close(self) -> list[str]:
        """End every request's stream; the ids of the choices still running."""
        self.items.clear()
        return [rid for tag in list(self.open) for rid in self.forget(tag)]


class Sinks(dict):
    """The sinks of one attention replica, by ingress replica (name): used from its event loop."""

    def get_or_add(self, name: str) -> Sink:
        s = self.get(name)
        if s is None:
            s = self[name] = Sink()
        return s

    def reap(self, now: float, ttl_s: float = SINK_TTL_S) -> list[str]:
        """Drop the sinks without a subscription for `ttl_s`: the ids of their running choices."""
        rids = []
        for name, s in list(self.items()):
            if s.attached is None and now - s.detached_at > ttl_s:
                del self[name]
                rids += s.close()
        return rids

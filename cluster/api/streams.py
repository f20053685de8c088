"""The outputs of the attention replicas to this ingress replica: one stream per attention replica.

    ingress replica (sink S)                              attention replica R
    per request:  generate_choices(..., S, tag) -------->  yields R's key, ends when the request has
                  (open while the request runs: Serve       ended (or fails with R: the re-submit)
                  routes, counts and cancels by it)
    per replica:  subscribe(S, R) (pinned to R) <-------  per step: [(tag, choice, RequestOutput), ...]
                  pump -> each tag's queue                  for every request of S on R

A Ray streaming item costs far more than the few outputs it carries; with one item per engine step
and ingress (instead of one per step and request) the ingress and the attention replica spend their
time on tokens, not on items. A request's queue is fed by the pump whatever its client's pace, so a
slow reader delays only itself. Where a subscription ends (its replica died, or refused it), every
request placed on that replica gets `LOST` and is re-submitted by the ingress, as when its own
stream fails.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import uuid

log = logging.getLogger(__name__)

LOST = "lost"  # a request's marker: its attention replica's outputs no longer reach this ingress


class OutputStreams:
    """The sink of one ingress replica: its subscriptions, one per attention replica it has requests
    on, and a queue per request (tag) that the subscriptions feed. Used from the event loop only."""

    def __init__(self, attention):
        self.attention = attention
        self.sink = uuid.uuid4().hex
        self.queues: dict[int, asyncio.Queue] = {}
        self.placed_on: dict[int, str] = {}  # tag -> the attention replica's key
        self.pumps: dict[str, asyncio.Task] = {}  # attention replica key -> its subscription's pump
        self._tags = itertools.count()
        self._tasks: set[asyncio.Task] = set()  # request streams being read to their end

    def open(self) -> tuple[int, asyncio.Queue]:
        """A new request (or re-submission): its tag and the queue its outputs arrive in."""
        tag = next(self._tags)
        q = self.queues[tag] = asyncio.Queue()
        return tag, q

    def close(self, tag: int) -> None:
        self.queues.pop(tag, None)
        self.placed_on.pop(tag, None)

    def placed(self, tag: int, replica: str) -> None:
        """The request `tag` runs on `replica`: make sure this sink subscribes there."""
        if tag not in self.queues:
            return
        self.placed_on[tag] = replica
        if replica not in self.pumps:
            self.pumps[replica] = asyncio.get_running_loop().create_task(self._pump(replica))

    def follow(self, resp, tag: int) -> None:
        """Read a request's own stream (`generate_choices` with this sink) to its end in a task: its
        one item says where the request runs; an error (its replica died) is put in its queue."""
        t = asyncio.get_running_loop().create_task(self._follow(resp, tag))
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def _follow(self, resp, tag: int) -> None:
        try:
            async for replica in resp:
                self.placed(tag, replica)
        except Exception as e:  # noqa: BLE001 - the request's consumer decides (re-submit, or fail)
            q = self.queues.get(tag)
            if q is not None:
                q.put_nowait(e)

    async def _pump(self, replica: str) -> None:
        """Read `replica`'s output stream to this sink into the requests' queues. The replica ends an
        idle stream (no request of this sink for a while, so that it can drain); it is opened again
        while requests are placed there."""
        try:
            while True:
                async for batch in self.attention.options(stream=True).subscribe.remote(self.sink, replica):
                    for tag, k, out in batch:
                        q = self.queues.get(tag)
                        if q is not None:  # else: the request is over here (client gone); late outputs
                            q.put_nowait((k, out))
                if replica not in self.placed_on.values():
                    return
        except Exception as e:  # noqa: BLE001 - the replica died or is gone: its requests are re-submitted
            log.warning("attention output stream ended", extra={"error": f"{type(e).__name__}: {e}"[:300]})
        finally:
            del self.pumps[replica]
            for tag, r in list(self.placed_on.items()):
                if r == replica:
                    del self.placed_on[tag]
                    self.queues[tag].put_nowait(LOST)

"""The request router of the attention replicas (a Serve request router): prefix affinity for requests,
and `subscribe` calls pinned to the replica they name.

Each attention replica keeps its own prefix cache, so a conversation's next turn, or another request
with the same long system prompt, is cheapest on the replica that saw its prefix. The router hashes
a request's full blocks (up to `affinity_tokens` tokens) with the engine's own chained block hash
(router/kv_cache.py, salt included) and remembers, in a bounded LRU index, which replica each block
chain was sent to. A request goes to the replica that holds its longest remembered prefix; a prefix
it has never seen goes where its first block ranks first by rendezvous hashing, so that every ingress
replica sends the same system prompt to the same attention replica without any shared state, and
when a replica comes or goes only the prefixes that ranked it first move.

Load comes first: when the preferred replica has more than `imbalance` requests more in flight than
the least loaded one (Serve's queue-length cache), or the request has no full block, the router falls
back to Serve's power of two choices. This is the policy of the Gateway API inference extension's
prefix scorer and SGLang's cache-aware router (affinity with a balance threshold). With affinity off
(`attention.prefix_affinity: false`) every request gets the power of two choices.

An ingress replica reads the outputs of all its requests on one attention replica from one
`subscribe(sink, replica key)` stream (cluster/api/streams.py), which must reach that replica: the
router sends it there, or, where that replica is gone, to any other, which refuses it at once.
A replica chosen for a call goes to that call (`_get_pending_request_matching_metadata`), never to
another one waiting: not first in, first out (Serve's mixin), which would lend a pinned replica
away, and not by internal request id (Serve's default), which the calls made while serving one
request share (an ingress's subscribe and request calls, /metrics asking every replica at once):
matched by id, one of them would never be sent.
"""

from __future__ import annotations

import hashlib
import random
from collections import OrderedDict

from ray.serve.request_router import FIFOMixin, PendingRequest, ReplicaID, RequestRouter, RunningReplica

from router.kv_cache import block_hashes


def prefix_hashes(prompt_ids: list[int], salt: str | None, block_size: int, max_tokens: int) -> list[bytes]:
    """The chained hashes of a prompt's full blocks within its first `max_tokens` tokens (the
    engine's block hashes: equal prefixes give equal leading hashes)."""
    return block_hashes(prompt_ids[:max_tokens], block_size, [], salt.encode() if salt else b"")


def rank(key: bytes, replica_ids: list[str]) -> list[int]:
    """Indices of `replica_ids`, best first, by rendezvous (highest random weight) hashing of `key`."""
    score = [hashlib.blake2b(key + rid.encode(), digest_size=8).digest() for rid in replica_ids]
    return sorted(range(len(replica_ids)), key=lambda i: score[i], reverse=True)


class PrefixIndex:
    """Which replica each recently routed block chain went to: an LRU of at most `capacity` hashes."""

    def __init__(self, capacity: int = 1 << 16):
        self.capacity = capacity
        self.where: OrderedDict[bytes, str] = OrderedDict()

    def longest(self, hashes: list[bytes], alive: set[str]) -> str | None:
        """The replica (among `alive`) of the longest prefix of `hashes` routed before; None if none."""
        for h in reversed(hashes):  # a chain: the longest match is the last hash found
            rid = self.where.get(h)
            if rid is not None and rid in alive:
                return rid
        return None

    def record(self, hashes: list[bytes], rid: str) -> None:
        for h in hashes:
            self.where[h] = rid
            self.where.move_to_end(h)
        while len(self.where) > self.capacity:
            self.where.popitem(last=False)


def choose(
    hashes: list[bytes], replica_ids: list[str], queue_lens: list[int | None], imbalance: int, index: PrefixIndex
) -> list[int] | None:
    """The ranked replicas for a request (first the one holding its longest known prefix, else the
    rendezvous order of its first block), or None for a load-only choice: no full block, one
    replica, or the preferred replica's queue more than `imbalance` longer than the shortest known."""
    if not hashes or len(replica_ids) < 2:
        return None
    order = rank(hashes[0], replica_ids)
    held = index.longest(hashes, set(replica_ids))
    if held is not None:
        i = replica_ids.index(held)
        order = [i, *(j for j in order if j != i)]
    known = [q for q in queue_lens if q is not None]
    mine = queue_lens[order[0]]
    if mine is not None and known and mine - min(known) > imbalance:
        return None
    return order


SUBSCRIBE = "subscribe"  # AttentionWorker.subscribe(sink, replica key): pinned


def pinned_to(pending: PendingRequest | None) -> str | None:
    """The replica key a `subscribe` call names; None for every other call."""
    if pending is None or pending.metadata.call_method != SUBSCRIBE or len(pending.args) < 2:
        return None
    return pending.args[1]


def own_request(waiting, metadata) -> PendingRequest | None:
    """The call among `waiting` whose metadata is `metadata` itself, if it still waits."""
    if metadata is None:
        return None
    return next((pr for pr in waiting if pr.metadata is metadata and not pr.future.done()), None)


def prompt_of(pending: PendingRequest | None) -> tuple[list[int], str | None] | None:
    """The first prompt and its cache salt of a call to AttentionWorker.generate_choices(prompts,
    params, ...) or generate(prompt_ids, params, ...); None for any other call (stats, health)."""
    if pending is None or len(pending.args) < 2:
        return None
    first, params = pending.args[0], pending.args[1]
    if isinstance(first, list) and first and isinstance(first[0], list):  # generate_choices
        first, params = first[0], params[0] if isinstance(params, list) and params else None
    if not (isinstance(first, list) and first and isinstance(first[0], int)):
        return None
    return first, getattr(params, "cache_salt", None)


class AttentionRouter(FIFOMixin, RequestRouter):
    """Serve's request router for AttentionWorker (`request_router_config`); see the module docstring."""

    def _get_pending_request_matching_metadata(self, request_metadata=None) -> PendingRequest | None:
        """The waiting call a replica was chosen for: Serve passes that call's metadata object, so it
        is found by identity (None falls back to the first waiting call)."""
        return own_request(self._pending_requests_to_fulfill, request_metadata)

    def initialize_state(
        self, block_size: int = 16, affinity_tokens: int = 2048, imbalance: int = 4, affinity: bool = True, **_
    ):
        self.block_size, self.affinity_tokens, self.imbalance = block_size, affinity_tokens, imbalance
        self.affinity = affinity
        self.index = PrefixIndex()

    def _hashes(self, pending: PendingRequest | None) -> list[bytes]:
        """The request's block hashes, computed once per request (routing may try several times, and
        `on_request_routed` records them): kept on the pending request."""
        if pending is None or not self.affinity:
            return []
        hashes = getattr(pending, "_mixserve_hashes", None)
        if hashes is None:
            got = prompt_of(pending)
            hashes = prefix_hashes(got[0], got[1], self.block_size, self.affinity_tokens) if got else []
            pending._mixserve_hashes = hashes
        return hashes

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        if pending_request is not None:  # Serve's retry loop sleeps between rounds only when told to
            pending_request.routing_context.should_backoff = True
        ids = [r.replica_id.unique_id for r in candidate_replicas]
        pin = pinned_to(pending_request)
        if pin is not None:  # that replica, or (gone) any one, which refuses the call
            return [[candidate_replicas[ids.index(pin)]] if pin in ids else candidate_replicas[:1]]
        queue = [self._replica_queue_len_cache.get(r.replica_id) for r in candidate_replicas]
        order = choose(self._hashes(pending_request), ids, queue, self.imbalance, self.index)
        if order is None:  # power of two choices: two at random, the shorter queue wins
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        return [[candidate_replicas[order[0]]], [candidate_replicas[i] for i in order[1:]]]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        """Where the request went, whatever ranked it there: its prefix is cached on that replica now."""
        hashes = self._hashes(pending_request)
        if hashes:
            self.index.record(hashes, replica_id.unique_id)

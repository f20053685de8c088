"""Paged KV-cache bookkeeping: fixed-size blocks of slots, handed to sequences as they grow, and the
prefix cache over them.

The KV tensors themselves are a `model.attention.KVPool` of `num_blocks * block_size` slots; this file
only decides which slots belong to which sequence (vLLM's block tables). A sequence's slot list is
kept incrementally, so building a step's attention metadata costs nothing per token in Python.

Prefix caching (vLLM's automatic prefix caching): a *full* block whose K/V have been computed is
registered under a hash chained over its tokens and its parent block's hash (the first block's
parent is the request's cache salt), so equal tokens at different positions or after different
prefixes never share a block. A new sequence whose first blocks' hashes are registered takes those
blocks instead of computing them (reference counts: a block is shared by every table that holds it).
A block no table holds is free, but keeps its registration until its memory is needed: free blocks
are handed out plain ones first, then cached ones least recently freed first (the evicted block
loses its hash). A shared block is never written again (see `BlockTable.read_only`).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field


class OutOfBlocks(Exception):
    pass


def block_hashes(tokens: list[int], block_size: int, have: list[bytes], salt: bytes = b"") -> list[bytes]:
    """`have` extended with the chained hash of every further full block of `tokens` (a 128-bit
    BLAKE2b digest: a client cannot make two different prefixes collide)."""
    for i in range(len(have), len(tokens) // block_size):
        parent = have[i - 1] if i else b"mixserve-prefix:" + salt
        chunk = array("q", tokens[i * block_size : (i + 1) * block_size]).tobytes()
        have.append(hashlib.blake2b(parent + chunk, digest_size=16).digest())
    return have


@dataclass
class BlockExtras:
    """What a cached block keeps beyond K/V for requests that ask for per-position results: each
    position's prompt logprob entry (with `k` alternatives) and its routed experts; None = not kept."""

    logprobs: list | None = None
    logprobs_k: int = -1
    routes: list | None = None


@dataclass
class BlockTable:
    block_size: int
    blocks: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)  # slot of every position that has been allocated
    registered: int = 0  # leading blocks that are in the prefix cache (registered or hit)
    read_only: int = 0  # positions before this sit in blocks shared from the cache: never written

    @property
    def capacity(self) -> int:
        return len(self.blocks) * self.block_size


@dataclass
class CacheStats:
    """Counters (they only grow): tokens looked up at admission and tokens found, blocks evicted."""

    queries: int = 0
    hits: int = 0
    evictions: int = 0


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("the KV cache needs at least one block of at least one slot")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.caching = caching
        self.ref = [0] * num_blocks
        self.plain: list[int] = list(range(num_blocks - 1, -1, -1))  # free, holding nothing cached
        self.evictable: OrderedDict[int, None] = OrderedDict()  # free but cached, least recently freed first
        self.hash_of: dict[int, bytes] = {}
        self.by_hash: dict[bytes, int] = {}
        self.extras: dict[int, BlockExtras] = {}
        self.stats = CacheStats()

    @property
    def num_free(self) -> int:
        return len(self.plain) + len(self.evictable)

    def free_blocks(self) -> list[int]:
        """Every free block (plain, then cached in eviction order)."""
        return [*self.plain, *self.evictable]

    @property
    def num_cached(self) -> int:
        return len(self.by_hash)

    @property
    def usage(self) -> float:
        """The share of blocks held by sequences (cached free blocks count as free: vLLM's rule)."""
        return 1.0 - self.num_free / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_grow(self, table: BlockTable, num_tokens: int, hits: list[int] = ()) -> bool:
        """Whether `table`, after taking the cached blocks `hits`, can hold `num_tokens` positions."""
        taken = sum(1 for b in hits if self.ref[b] == 0)  # free cached blocks the hits take out of the pool
        return self.blocks_for(num_tokens) - len(table.blocks) - len(hits) + taken <= self.num_free

    def _take(self) -> int:
        if self.plain:
            b = self.plain.pop()
        else:
            b, _ = self.evictable.popitem(last=False)
            del self.by_hash[self.hash_of.pop(b)]
            self.extras.pop(b, None)
            self.stats.evictions += 1
        self.ref[b] = 1
        return b

    def grow(self, table: BlockTable, num_tokens: int) -> None:
        """Make `table` hold at least `num_tokens` positions; all or nothing."""
        need = self.blocks_for(num_tokens) - len(table.blocks)
        if need > self.num_free:
            raise OutOfBlocks
        bs = self.block_size
        for _ in range(need):
            b = self._take()
            table.blocks.append(b)
            table.slots.extend(range(b * bs, (b + 1) * bs))

    def release(self, table: BlockTable) -> None:
        """Give the table's blocks back; the table is left empty, so a second release frees nothing.
        The last block goes first into the eviction order (a prefix outlives its continuations)."""
        for b in reversed(table.blocks):
            self.ref[b] -= 1
            if self.ref[b] == 0:
                if b in self.hash_of:
                    self.evictable[b] = None
                else:
                    self.plain.append(b)
        table.blocks.clear()
        table.slots.clear()
        table.registered = table.read_only = 0

    # ------------------------------------------------------------ the prefix cache

    def lookup(self, hashes: list[bytes], limit: int) -> list[int]:
        """The cached blocks of the longest registered prefix of `hashes`, at most `limit` blocks."""
        out = []
        for h in hashes[:limit]:
            b = self.by_hash.get(h)
            if b is None:
                break
            out.append(b)
        return out

    def share(self, table: BlockTable, hits: list[int]) -> None:
        """An empty `table` takes the cached blocks `hits` (found by `lookup`) as its first blocks."""
        assert not table.blocks, "cached blocks start a table"
        bs = self.block_size
        for b in hits:
            if self.ref[b] == 0:
                del self.evictable[b]
            self.ref[b] += 1
            table.blocks.append(b)
            table.slots.extend(range(b * bs, (b + 1) * bs))
        table.registered = len(hits)
        table.read_only = len(hits) * bs

    def register(self, table: BlockTable, hashes: list[bytes], extras=None) -> None:
        """Register the table's blocks that `hashes` covers (full and computed) and are not yet in the
        cache. A block whose hash another block already holds stays private (vLLM's rule), but gives
        that block what it kept and the other lacks. `extras(i)`: block i's BlockExtras, or None."""
        if not self.caching:
            return
        for i in range(table.registered, min(len(hashes), len(table.blocks))):
            b, h = table.blocks[i], hashes[i]
            have = self.by_hash.get(h)
            if have is None:
                self.by_hash[h] = b
                self.hash_of[b] = h
                have = b
            x = extras(i) if extras is not None else None
            if x is not None:
                self._merge(have, x)
        table.registered = max(table.registered, min(len(hashes), len(table.blocks)))

    def _merge(self, b: int, x: BlockExtras) -> None:
        cur = self.extras.get(b)
        if cur is None:
            self.extras[b] = x
            return
        if x.logprobs is not None and x.logprobs_k > cur.logprobs_k:
            cur.logprobs, cur.logprobs_k = x.logprobs, x.logprobs_k
        if x.routes is not None and cur.routes is None:
            cur.routes = x.routes

    def reset(self) -> int:
        """Forget every free cached block (vLLM's reset_prefix_cache); blocks in use stay. Returns how many."""
        n = len(self.evictable)
        for b in self.evictable:
            del self.by_hash[self.hash_of.pop(b)]
            self.extras.pop(b, None)
            self.plain.append(b)
        self.evictable.clear()
        return n

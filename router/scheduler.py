"""Continuous batching: which sequences run in the next step, and how many of their tokens.

Every step, within the token budget and the sequence limit:

1. decodes: every running sequence that has all its known tokens computed gets its one new token,
   in admission order (a long prompt's chunks never take a decode's place);
2. prefill work is shared between *groups* (the sequences of one request, or of one user where the
   request names one): round-robin over the groups, the group with the fewest running sequences
   first, a turn taking at most half the step's budget while other groups have work. A group's work
   is the next chunk of its running prompts, then its waiting sequences (admission, in arrival
   order). So a request with n=128 long prompts gets its share of each step, not the whole step,
   and a new request's first chunk runs in the next step whatever is queued before it.
3. Admission waits for KV blocks (admission control). A sequence admitted with its first blocks in
   the prefix cache takes them and starts after them (router/kv_cache.py): at most all its tokens
   but the last, whose logits it needs; when every block is cached, the last position is computed
   again with its K/V written nowhere (the cached block is shared and never written). When the
   sequence limit or the KV cache is full, a waiting group that holds at least two sequences fewer
   than the largest group takes a slot from it: that group's most recently admitted sequence is
   preempted (fair share).

When a running sequence cannot grow its KV blocks, a sequence is preempted: the most recently
admitted one of the group holding the most running sequences (with one sequence per group, simply
the most recently admitted: vLLM's order). Its blocks are freed and it goes back to the waiting queue
to recompute prompt + tokens so far (vLLM's recompute preemption). A step that preempted for memory
admits nothing (vLLM's rule: the memory is short, and the sequence just preempted must not be
re-admitted and preempted again in the same step). Requests join and leave only between steps.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from enum import Enum, StrEnum

import torch

from model.grammar import Grammar
from model.sampling import LogitsState, SamplingParams, make_generator
from model.tokenizer import IncrementalDetokenizer

from .kv_cache import BlockExtras, BlockManager, BlockTable, block_hashes

_WAIT = object()  # a forked choice whose prompt is still being prefilled


class FinishReason(StrEnum):
    """Why a sequence ended (OpenAI's `finish_reason`; `abort` and `error` are the engine's own)."""

    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_tokens, the context or the cache
    ABORT = "abort"  # the caller aborted it
    ERROR = "error"  # it failed or was refused: `error` says why, `error_kind` how


class ErrorKind(StrEnum):
    INVALID = "invalid"  # refused: the request is bad (HTTP 400)
    OVERLOADED = "overloaded"  # refused: no room now, retry (HTTP 503)
    FAILED = "failed"  # it ran and failed (HTTP 500, or an error event in a stream)


class Status(Enum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2


@dataclass
class Sequence:
    req_id: str
    prompt_ids: list[int]
    params: SamplingParams
    block_size: int
    group: str | None = None  # whose share this sequence runs in (its request or user); itself when None
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    num_computed: int = 0  # positions whose K/V are in the cache
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    routes: list = field(default_factory=list)  # position -> [layer][k] expert ids (when asked)
    # With params.prompt_logprobs: position i -> (token, logprob, rank, alternatives) of prompt token i
    # given the ones before it; None for position 0 (nothing before it).
    prompt_logprobs: list = field(default_factory=list)
    detok: IncrementalDetokenizer | None = None
    text: str = ""  # detokenised output (cut at a stop string once one is found)
    emitted_chars: int = 0
    emitted_tokens: int = 0
    logprobs: list = field(default_factory=list)
    arrival: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    generator: torch.Generator | None = None
    logits_state: LogitsState | None = None  # penalties, bias, min_tokens: kept across steps
    grammar: Grammar | None = None  # structured outputs: the matcher of its constraint
    fork_of: Sequence | None = None  # another choice of the same prompt whose prefill this one copies
    table: BlockTable = None  # type: ignore[assignment]
    block_hashes: list[bytes] = field(default_factory=list)  # chained hash of each full block of `tokens`
    cached_tokens: int | None = None  # prompt positions its first admission took from the prefix cache

    def __post_init__(self):
        self.group = self.group if self.group is not None else self.req_id
        self.table = BlockTable(self.block_size)
        if not self.params.greedy:
            self.generator = make_generator(self.params.seed)

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def salt(self) -> bytes:
        return self.params.cache_salt.encode() if self.params.cache_salt else b""

    def hashes(self) -> list[bytes]:
        """The chained hash of every full block of its tokens so far (kept, extended as it grows; the
        token list is only built when a block has been completed since)."""
        if self.num_tokens // self.block_size > len(self.block_hashes):
            block_hashes(self.tokens, self.block_size, self.block_hashes, self.salt)
        return self.block_hashes

    def extras(self, i: int) -> BlockExtras | None:
        """What block i keeps for later requests beyond K/V: its positions' prompt logprobs and routed
        experts, where this sequence computed them; None when it has neither."""
        bs = self.block_size
        lo, hi = i * bs, (i + 1) * bs
        lps = self.prompt_logprobs[lo:hi] if len(self.prompt_logprobs) >= hi else None
        routes = self.routes[lo:hi] if len(self.routes) >= hi and None not in self.routes[lo:hi] else None
        if lps is None and routes is None:
            return None
        return BlockExtras(lps, self.params.prompt_logprobs if lps is not None else -1, routes)


@dataclass
class Scheduled:
    seq: Sequence
    num_new: int  # tokens computed this step, positions num_computed .. num_computed + num_new - 1
    copy: tuple[list[int], list[int]] | None = None  # KV slots to copy (src, dst) before the step: a fork

    @property
    def samples(self) -> bool:
        """This step completes the sequence's known tokens, so it produces the next one."""
        return self.seq.num_computed + self.num_new == self.seq.num_tokens


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.budget = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.waiting_groups: dict[str, int] = {}  # group -> sequences of it waiting
        self.num_preemptions = 0
        self.num_fair_preemptions = 0  # of those, to give a waiting group its share
        self.num_forked_tokens = 0  # prompt positions copied from another choice instead of computed

    def add(self, seq: Sequence) -> None:
        self._wait(seq)

    def _wait(self, seq: Sequence, front: bool = False) -> None:
        (self.waiting.appendleft if front else self.waiting.append)(seq)
        self.waiting_groups[seq.group] = self.waiting_groups.get(seq.group, 0) + 1

    def has_waiting(self, group: str) -> bool:
        return self.waiting_groups.get(group, 0) > 0

    def _unwait(self, seq: Sequence) -> None:
        self.waiting.remove(seq)
        left = self.waiting_groups[seq.group] - 1
        if left:
            self.waiting_groups[seq.group] = left
        else:
            del self.waiting_groups[seq.group]

    def remove(self, seq: Sequence) -> None:
        """Take a finished or aborted sequence out and free its blocks; removing it again is a no-op."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self._unwait(seq)
        seq.status = Status.FINISHED
        self.blocks.release(seq.table)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.release(seq.table)
        seq.num_computed = 0
        seq.status = Status.WAITING
        self._wait(seq, front=True)
        self.num_preemptions += 1

    def _group_sizes(self) -> dict[str, int]:
        sizes: dict[str, int] = {}
        for s in self.running:
            sizes[s.group] = sizes.get(s.group, 0) + 1
        return sizes

    def _victim(self, scheduled: set[int], below: int = 0) -> Sequence | None:
        """The sequence to preempt: the most recently admitted one of the group with the most running
        sequences, among those not scheduled in this step; None if that group holds `below` or fewer."""
        sizes = self._group_sizes()
        best = None
        for s in reversed(self.running):  # most recently admitted first: ties go to the newest
            if id(s) not in scheduled and (best is None or sizes[s.group] > sizes[best.group]):
                best = s
        return best if best is not None and sizes[best.group] > below else None

    def schedule(self) -> list[Scheduled]:
        out: list[Scheduled] = []
        scheduled: set[int] = set()
        budget = self.budget
        self._rebalance(budget)
        memory = False  # a preemption for memory in this step: no admission then

        pending_copy: dict[int, tuple[list[int], list[int]]] = {}

        def run(seq: Sequence, n: int) -> None:
            self.blocks.grow(seq.table, seq.num_computed + n)
            scheduled.add(id(seq))
            out.append(Scheduled(seq, n, pending_copy.pop(id(seq), None)))

        def fits(seq: Sequence, n: int) -> bool:
            """Grow for n tokens, preempting others (or seq itself) while the blocks are short."""
            nonlocal memory
            while not self.blocks.can_grow(seq.table, seq.num_computed + n):
                victim = self._victim(scheduled) or seq
                self._preempt(victim)
                memory = True
                if victim is seq:
                    return False
            return True

        for seq in [s for s in self.running if s.num_tokens - s.num_computed == 1]:
            if budget <= 0:
                break
            if seq.status is Status.RUNNING and fits(seq, 1):
                run(seq, 1)
                budget -= 1

        # Prefill chunks and admissions, round-robin over groups (see the module's docstring).
        sizes = self._group_sizes()
        work: dict[str, deque[Sequence]] = {}
        for s in self.running:
            if s.num_tokens - s.num_computed > 1:
                work.setdefault(s.group, deque()).append(s)
        for s in self.waiting:
            work.setdefault(s.group, deque()).append(s)
        first = {g: i for i, g in enumerate(work)}
        order = deque(sorted(work, key=lambda g: (sizes.get(g, 0), first[g])))
        # With other groups' work waiting, one turn takes at most half of what the step has.
        quantum = budget if len(order) == 1 else max(1, budget // 2)

        def advance(g: str) -> None:
            work[g].popleft()
            if work[g]:
                order.append(g)

        while order and budget > 0:
            g = order.popleft()
            seq = work[g][0]
            n = min(seq.num_tokens - seq.num_computed, budget, quantum)
            if seq.status is Status.RUNNING:
                ok = id(seq) not in scheduled and fits(seq, n)
            else:  # admission control: a free slot and the blocks, without preempting anyone
                copy = self._fork_point(seq)
                if copy is _WAIT:  # its prompt is being prefilled by another choice: it copies that
                    advance(g)
                    continue
                hits = self._cached_prefix(seq)
                cached = len(hits) * self.blocks.block_size
                start = max(self._start_after(seq, cached), copy or 0)
                n = min(seq.num_tokens - start, budget, quantum if copy is None else budget)
                ok = (
                    not memory
                    and len(self.running) < self.max_num_seqs
                    and self.blocks.can_grow(seq.table, start + n, hits)
                )
                if not ok:  # in arrival order within a group: its later ones wait too
                    continue
                self._unwait(seq)
                seq.status = Status.RUNNING
                self.running.append(seq)
                self._take_cached(seq, hits)
                if copy is not None and copy > cached:  # the rest of the prompt from the other choice
                    self.blocks.grow(seq.table, copy)
                    parent = seq.fork_of
                    pending_copy[id(seq)] = (parent.table.slots[cached:copy], seq.table.slots[cached:copy])
                    if seq.params.wants_routes:  # the prompt's routes are the other choice's
                        routes = parent.routes[:copy]
                        seq.routes = seq.routes[:cached] + routes[cached:] + [None] * (copy - len(routes))
                    self.num_forked_tokens += copy - cached
                seq.num_computed = start
                self.blocks.stats.queries += seq.num_tokens if self.blocks.caching else 0
                self.blocks.stats.hits += min(cached, start)
                if seq.cached_tokens is None:
                    seq.cached_tokens = min(cached, start, len(seq.prompt_ids))
                seq.fork_of = None
            if ok:
                run(seq, n)
                budget -= n
            advance(g)
        return out

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """The cached blocks a waiting sequence can start from: its longest registered prefix of
        full blocks; for a request that asks for prompt logprobs or routed experts, only blocks
        that kept them (BlockExtras, enough alternatives)."""
        p = seq.params
        if not self.blocks.caching or p.skip_reading_prefix_cache or seq.num_computed:
            return []
        bs = self.blocks.block_size
        hits = self.blocks.lookup(seq.hashes(), seq.num_tokens // bs)
        logprobs = p.prompt_logprobs is not None and not seq.output_ids
        if logprobs or p.wants_routes:
            keep = 0
            for b in hits:
                x = self.blocks.extras.get(b)
                if (
                    x is None
                    or (logprobs and x.logprobs_k < p.prompt_logprobs)
                    or (p.wants_routes and x.routes is None)
                ):
                    break
                keep += 1
            hits = hits[:keep]
        return hits

    @staticmethod
    def _start_after(seq: Sequence, cached: int) -> int:
        """The first position a sequence with `cached` positions from the cache computes: the one
        after them, or the last cached one again where its logits are needed (the sequence's last
        token samples; prompt logprobs read the logits before the first computed position)."""
        if not cached:
            return 0
        if cached >= seq.num_tokens or (seq.params.prompt_logprobs is not None and not seq.output_ids):
            return cached - 1
        return cached

    def _take_cached(self, seq: Sequence, hits: list[int]) -> None:
        """The sequence takes the cached blocks `hits`, and what they kept that it asks for."""
        if not hits:
            return
        self.blocks.share(seq.table, hits)
        p = seq.params
        xs = [self.blocks.extras[b] for b in hits] if p.wants_routes or p.prompt_logprobs is not None else []
        if p.wants_routes:
            seq.routes = [r for x in xs for r in x.routes]
        if p.prompt_logprobs is not None and not seq.output_ids:
            k = p.prompt_logprobs
            lps = [e if e is None or len(e[3]) <= k else (*e[:3], e[3][:k]) for x in xs for e in x.logprobs]
            seq.prompt_logprobs = lps

    @staticmethod
    def _fork_point(seq: Sequence):
        """For a choice forked from another of the same prompt: how many positions it copies (all but
        the prompt's last, whose logits it computes itself), `_WAIT` while the other is still
        prefilling them, None when there is nothing to copy (the other was preempted or is gone)."""
        parent = seq.fork_of
        if parent is None or seq.num_computed or seq.output_ids:
            return None
        P = len(seq.prompt_ids)
        if P < 2 or parent.status is not Status.RUNNING:  # (equal prompts: checked when the fork was made)
            seq.fork_of = None
            return None
        if parent.num_computed < P - 1:
            return _WAIT
        return P - 1

    def _rebalance(self, budget: int) -> None:
        """Fair share of slots and KV blocks: while the waiting group with the fewest running
        sequences cannot start (the sequence limit, or blocks for its first chunk), a group running
        at least two more sequences gives it one (its newest is preempted)."""
        if not self.waiting:
            return
        sizes = self._group_sizes()
        seq = min(self.waiting, key=lambda s: sizes.get(s.group, 0))  # the first of those: arrival order
        mine = sizes.get(seq.group, 0)
        n = min(seq.num_tokens - seq.num_computed, max(1, budget // 2))
        while len(self.running) >= self.max_num_seqs or not self.blocks.can_grow(seq.table, seq.num_computed + n):
            victim = self._victim(set(), below=mine + 1)
            if victim is None:
                return
            self._preempt(victim)
            self.num_fair_preemptions += 1

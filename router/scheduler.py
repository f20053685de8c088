"""Continuous batching: which sequences run in the next step, and how many of their tokens.

Every step: first the running sequences, in admission order (a decode token each, or the next chunk
of a prompt), then waiting sequences are admitted in arrival order while the token budget, the
sequence limit and the KV cache allow (chunked prefill: a long prompt is split over several steps and
shares them with decodes). When a running sequence cannot grow its KV blocks, the most recently
admitted one is preempted: its blocks are freed and it goes back to the head of the waiting queue to
recompute prompt + tokens so far (vLLM's recompute preemption). A step that preempted admits nothing
(vLLM's rule: the memory is short, and the sequence just preempted must not be re-admitted and
preempted again in the same step). Requests join and leave only between steps.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from enum import Enum

import torch

from model.sampling import SamplingParams, make_generator
from model.tokenizer import IncrementalDetokenizer

from .kv_cache import BlockManager, BlockTable


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
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    num_computed: int = 0  # positions whose K/V are in the cache
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    routes: list = field(default_factory=list)  # position -> [layer][k] expert ids (when asked)
    detok: IncrementalDetokenizer | None = None
    text: str = ""  # detokenised output (cut at a stop string once one is found)
    emitted_chars: int = 0
    emitted_tokens: int = 0
    logprobs: list = field(default_factory=list)
    arrival: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    generator: torch.Generator | None = None
    table: BlockTable = None  # type: ignore[assignment]

    def __post_init__(self):
        self.table = BlockTable(self.block_size)
        if not self.params.greedy:
            self.generator = make_generator(self.params.seed)

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)


@dataclass
class Scheduled:
    seq: Sequence
    num_new: int  # tokens computed this step, positions num_computed .. num_computed + num_new - 1

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
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take a finished or aborted sequence out and free its blocks; removing it again is a no-op."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
        self.blocks.release(seq.table)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.release(seq.table)
        seq.num_computed = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def schedule(self) -> list[Scheduled]:
        out: list[Scheduled] = []
        budget = self.budget
        preempted_before = self.num_preemptions
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed, budget)
            while not self.blocks.can_grow(seq.table, seq.num_computed + n):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                break  # seq itself was the last one and got preempted
            self.blocks.grow(seq.table, seq.num_computed + n)
            out.append(Scheduled(seq, n))
            budget -= n
            i += 1
        if self.num_preemptions != preempted_before:
            return out
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            n = min(seq.num_tokens - seq.num_computed, budget)
            if not self.blocks.can_grow(seq.table, seq.num_computed + n):
                break  # admission control: wait for blocks to be freed
            self.waiting.popleft()
            self.blocks.grow(seq.table, seq.num_computed + n)
            seq.status = Status.RUNNING
            self.running.append(seq)
            out.append(Scheduled(seq, n))
            budget -= n
        return out

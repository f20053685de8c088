"""The engine of one attention worker: scheduler, KV cache, pipelined forward, sampling, outputs.

One step:

    schedule -> split into micro-batches -> per micro-batch, per layer:
        [attention + gate] -> dispatch -> [experts (backend)] -> combine
    (micro-batch A's expert round trip overlaps micro-batch B's attention)
    -> LM head on the rows that sample -> sample -> detokenise, stop checks -> outputs

The experts are reached only through the injected `ExpertBackend`; the engine runs the same with
in-process experts and with remote ones.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field

import torch
from pydantic import BaseModel, ConfigDict, Field

from model.model import KVPool, MixtralDense, build_attn_meta
from model.sampling import SamplingParams, find_stop, logprobs_of, sample
from model.tokenizer import IncrementalDetokenizer, Tokenizer

from .experts import ExpertBackend
from .kv_cache import BlockManager
from .scheduler import Scheduled, Scheduler, Sequence, Status

log = logging.getLogger(__name__)


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_num_seqs: int = Field(64, ge=1, description="Sequences running at once.")
    max_num_batched_tokens: int = Field(512, ge=1, description="Token budget of one step (prefill chunks + decodes).")
    kv_cache_tokens: int = Field(65536, ge=16, description="KV-cache capacity in tokens (fixed memory budget).")
    block_size: int = Field(16, ge=1, description="Tokens per KV-cache block.")
    max_model_len: int | None = Field(None, ge=2, description="Context limit; the model's own when null.")
    num_microbatches: int = Field(1, ge=1, le=8, description="Micro-batches in flight per step (ping-pong).")
    max_waiting: int = Field(256, ge=1, description="Requests queued beyond the running ones before refusing.")


class EngineError(ValueError):
    """A request the engine cannot take; the message says why."""


class Overloaded(RuntimeError):
    """The waiting queue is full; try again later."""


@dataclass
class RequestOutput:
    req_id: str
    new_token_ids: list[int]
    text: str  # new text since the last output
    finished: bool
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list = field(default_factory=list)  # [(token, logprob, [(alt, logprob)])] per new token


def run_pipelined(gens: list, backend: ExpertBackend) -> list[torch.Tensor]:
    """Drive forward generators round-robin so that each one's expert call is in flight while
    the next one computes its attention; returns each generator's logits."""
    results: list = [None] * len(gens)
    pending = deque()
    for i, g in enumerate(gens):
        pending.append((i, g, backend.submit(next(g))))
    while pending:
        i, g, fut = pending.popleft()
        try:
            pending.append((i, g, backend.submit(g.send(fut.result()))))
        except StopIteration as stop:
            results[i] = stop.value
    return results


class LLMEngine:
    def __init__(self, dense: MixtralDense, experts: ExpertBackend, tokenizer: Tokenizer | None, cfg: EngineConfig | None = None):
        self.cfg = cfg or EngineConfig()
        self.dense, self.experts, self.tokenizer = dense, experts, tokenizer
        mc = dense.cfg
        self.max_model_len = min(self.cfg.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        num_blocks = max(1, self.cfg.kv_cache_tokens // self.cfg.block_size)
        self.kv = KVPool(mc, num_blocks * self.cfg.block_size, dense.dtype)
        self.blocks = BlockManager(num_blocks, self.cfg.block_size)
        self.scheduler = Scheduler(self.blocks, self.cfg.max_num_seqs, self.cfg.max_num_batched_tokens)
        self.seqs: dict[str, Sequence] = {}
        self._ids = itertools.count()
        self.eos = set(mc.eos_ids) | ({tokenizer.eos_id} if tokenizer else set())
        self.steps = 0

    @classmethod
    def local(cls, model_dir: str, dtype: str = "auto", cfg: EngineConfig | None = None, experts_per_worker: int = 1) -> "LLMEngine":
        """The whole engine in this process: dense weights plus in-process expert workers."""
        from model.checkpoint import Checkpoint

        from .experts import InProcessExperts

        ckpt = Checkpoint(model_dir)
        ckpt.check_names()
        dense = MixtralDense.from_checkpoint(ckpt, dtype)
        experts = InProcessExperts(model_dir, experts_per_worker, dtype, ckpt.config.num_local_experts)
        return cls(dense, experts, Tokenizer.for_model(model_dir), cfg)

    # ------------------------------------------------------------ requests

    def add_request(self, prompt_ids: list[int], params: SamplingParams, req_id: str | None = None) -> str:
        if req_id in self.seqs:
            raise EngineError(f"request id {req_id!r} is already in use")
        if not prompt_ids:
            raise EngineError("the prompt is empty")
        V = self.dense.cfg.vocab_size
        if min(prompt_ids) < 0 or max(prompt_ids) >= V:
            raise EngineError(f"prompt token ids must be in [0, {V})")
        n = len(prompt_ids)
        if n >= self.max_model_len:
            raise EngineError(f"the prompt has {n} tokens; this model's context is {self.max_model_len} tokens")
        # A sequence never grows past the context nor the whole cache; it is cut with "length".
        cap = min(self.max_model_len, self.blocks.num_blocks * self.blocks.block_size)
        if n + 1 > cap:
            raise EngineError(f"the prompt has {n} tokens; the KV cache holds at most {cap - 1} for one request")
        if len(self.scheduler.waiting) >= self.cfg.max_waiting:
            raise Overloaded(f"{len(self.scheduler.waiting)} requests are already waiting")
        req_id = req_id if req_id is not None else f"req-{next(self._ids)}"
        seq = Sequence(req_id, list(prompt_ids), params, self.cfg.block_size)
        if self.tokenizer is not None:
            seq.detok = IncrementalDetokenizer(self.tokenizer, prompt_ids)
        self.seqs[req_id] = seq
        self.scheduler.add(seq)
        return req_id

    def abort(self, req_id: str) -> bool:
        seq = self.seqs.pop(req_id, None)
        if seq is None:
            return False
        self.scheduler.remove(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = "abort"
        return True

    def has_unfinished(self) -> bool:
        return bool(self.seqs)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # ------------------------------------------------------------ one step

    def _microbatches(self, sched: list[Scheduled]) -> list[list[Scheduled]]:
        """Split by sequences into up to num_microbatches groups of about equal token counts."""
        k = min(self.cfg.num_microbatches, len(sched))
        if k <= 1:
            return [sched]
        total = sum(s.num_new for s in sched)
        groups, cur, acc = [], [], 0
        for s in sched:
            cur.append(s)
            acc += s.num_new
            if len(groups) < k - 1 and acc >= total * (len(groups) + 1) / k:
                groups.append(cur)
                cur = []
        if cur:
            groups.append(cur)
        return groups

    def _forward(self, mb: list[Scheduled]):
        ids, seqs, logit_rows, row = [], [], [], 0
        for s in mb:
            seq, n = s.seq, s.num_new
            ids.extend(seq.tokens[seq.num_computed : seq.num_computed + n])
            seqs.append((seq.table.slots[: seq.num_computed + n], n))
            row += n
            if s.samples:
                logit_rows.append(row - 1)
        meta = build_attn_meta(seqs, self.dense.cfg.sliding_window)
        return self.dense.forward(torch.tensor(ids), meta, self.kv, torch.tensor(logit_rows, dtype=torch.long))

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        if not sched:
            return []
        mbs = self._microbatches(sched)
        logits = run_pipelined([self._forward(mb) for mb in mbs], self.experts)
        self.steps += 1
        outputs = []
        for mb, lg in zip(mbs, logits):
            sampling = [s.seq for s in mb if s.samples]
            for s in mb:
                s.seq.num_computed += s.num_new
            if not sampling:
                continue
            toks = sample(lg, [q.params for q in sampling], [q.generator for q in sampling])
            lps = None
            want = [q.params.logprobs for q in sampling if q.params.logprobs is not None]
            if want:
                lps = logprobs_of(lg, toks, max(want))
            for j, (seq, t) in enumerate(zip(sampling, toks.tolist())):
                out = self._append(seq, t, lps[j] if lps else None)
                if out is not None:
                    outputs.append(out)
        return outputs

    def _append(self, seq: Sequence, t: int, lp) -> RequestOutput | None:
        if seq.req_id not in self.seqs:  # aborted during the step
            return None
        p = seq.params
        seq.output_ids.append(t)
        if seq.first_token_at is None:
            seq.first_token_at = time.monotonic()
        if lp is not None and p.logprobs is not None:
            seq.logprobs.append((t, lp[0], lp[1][: p.logprobs]))
        reason = None
        is_stop_token = (t in self.eos and not p.ignore_eos) or t in p.stop_token_ids
        if is_stop_token:
            reason = "stop"
        elif seq.detok is not None:
            before = len(seq.text)
            seq.text += seq.detok.add([t])
            if p.stop:
                i = find_stop(seq.text, p.stop, before)
                if i != -1:
                    seq.text = seq.text[:i]
                    reason = "stop"
        if reason is None and (len(seq.output_ids) >= p.max_tokens or seq.num_tokens >= self._cap(seq)):
            reason = "length"
        if reason is not None:
            if reason == "length" and seq.detok is not None:
                seq.text += seq.detok.flush()
                if p.stop:  # the flushed tail may complete a stop string
                    i = find_stop(seq.text, p.stop, 0)
                    if i != -1:
                        seq.text, reason = seq.text[:i], "stop"
            return self._finish(seq, reason)
        # Hold back text that might still turn out to start a stop string.
        hold = max((len(s) - 1 for s in p.stop), default=0)
        return self._emit(seq, max(seq.emitted_chars, len(seq.text) - hold), False)

    def _cap(self, seq: Sequence) -> int:
        return min(self.max_model_len, self.blocks.num_blocks * self.blocks.block_size)

    def _finish(self, seq: Sequence, reason: str) -> RequestOutput:
        seq.finish_reason = reason
        self.scheduler.remove(seq)
        seq.status = Status.FINISHED
        del self.seqs[seq.req_id]
        return self._emit(seq, len(seq.text), True)

    def _emit(self, seq: Sequence, upto: int, finished: bool) -> RequestOutput:
        text = seq.text[seq.emitted_chars : upto]
        seq.emitted_chars = max(seq.emitted_chars, upto)
        new = seq.output_ids[seq.emitted_tokens :]
        lps = seq.logprobs[seq.emitted_tokens :] if seq.params.logprobs is not None else []
        seq.emitted_tokens = len(seq.output_ids)
        return RequestOutput(
            seq.req_id, new, text, finished, seq.finish_reason,
            prompt_tokens=len(seq.prompt_ids), completion_tokens=len(seq.output_ids), logprobs=lps,
        )

    # ------------------------------------------------------------ convenience

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[RequestOutput]:
        """Run prompts to completion; one finished output per prompt, in order, with all tokens and text."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        rids = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        acc = {r: RequestOutput(r, [], "", False) for r in rids}
        while any(not acc[r].finished for r in rids):
            outs = self.step()
            if not outs and not self.has_unfinished():
                break
            for o in outs:
                a = acc[o.req_id]
                a.new_token_ids += o.new_token_ids
                a.text += o.text
                a.logprobs += o.logprobs
                a.finished, a.finish_reason = o.finished, o.finish_reason
                a.prompt_tokens, a.completion_tokens = o.prompt_tokens, o.completion_tokens
        return [acc[r] for r in rids]

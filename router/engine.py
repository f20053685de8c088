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

from model.attention import KVPool, build_attn_meta
from model.grammar import GrammarBatch, GrammarCompiler, GrammarError, apply_mask, compiler_for
from model.model import MixtralDense
from model.moe import MoEInput
from model.sampling import (
    LogitsState,
    SamplingParams,
    bad_rows,
    first_stop,
    logprobs_of,
    process_logits,
    ranked_logprobs,
    sample,
)
from model.tokenizer import IncrementalDetokenizer, Tokenizer

from .config import EngineConfig
from .dispatch import combine, dispatch
from .experts import ExpertBackend
from .kv_cache import BlockManager
from .scheduler import ErrorKind, FinishReason, Scheduled, Scheduler, Sequence, Status

log = logging.getLogger(__name__)


class EngineError(ValueError):
    """A request the engine cannot take; the message says why."""


class Overloaded(RuntimeError):
    """The waiting queue is full; try again later."""


@dataclass
class RequestOutput:
    """What one step produced for one request; the last one has `finished` set."""

    req_id: str
    new_token_ids: list[int]
    text: str  # new text since the last output
    finished: bool
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list = field(default_factory=list)  # [(token, logprob, [(alt, logprob)])] per new token
    error: str | None = None  # with finish_reason ERROR: why this request (and only it) failed
    error_kind: ErrorKind | None = None
    stop_reason: int | str | None = None  # vLLM's: the stop string or stop token id that ended it; None for EOS
    # vLLM's routed experts, when asked: [new tokens][layers][k] for this output's tokens (the
    # experts of the position whose output chose each token); the prompt's [prompt][layers][k]
    # on the first output.
    routed_experts: list | None = None
    prompt_routed_experts: list | None = None
    # With prompt_logprobs asked, on the first output: per prompt token, None for the first, else
    # (token, logprob, rank, [(alternative, logprob)]).
    prompt_logprobs: list | None = None
    cached_tokens: int | None = None  # on the first output: prompt tokens taken from the prefix cache

    def merge(self, later: RequestOutput) -> RequestOutput:
        """This output followed by `later` (same request) as one: what a stream sends when it has
        fallen behind the engine by more than a step."""
        return RequestOutput.joined([self, later])

    @staticmethod
    def by_choice(pairs: list[tuple[int, RequestOutput]]) -> list[tuple[int, RequestOutput]]:
        """(choice, output) pairs as one output per choice, in choice order, each choice's outputs
        joined in the order they came: what a stream of several choices sends when it has fallen
        behind the engine by more than a step."""
        got: dict[int, list[RequestOutput]] = {}
        for k, out in pairs:
            got.setdefault(k, []).append(out)
        return [(k, outs[0] if len(outs) == 1 else RequestOutput.joined(outs)) for k, outs in sorted(got.items())]

    @staticmethod
    def joined(outs: list[RequestOutput]) -> RequestOutput:
        """One request's outputs, in order, as one, in a single pass (merging them pairwise copies
        every list once per output: quadratic in a long answer)."""
        first, last = outs[0], outs[-1]
        routed = None
        if any(o.routed_experts is not None for o in outs):
            routed = [r for o in outs for r in (o.routed_experts or [])]
        return RequestOutput(
            first.req_id,
            [t for o in outs for t in o.new_token_ids],
            "".join(o.text for o in outs),
            last.finished,
            last.finish_reason,
            next((o.prompt_tokens for o in reversed(outs) if o.prompt_tokens), 0),
            last.completion_tokens,
            [lp for o in outs for lp in o.logprobs],
            last.error,
            last.error_kind,
            last.stop_reason,
            routed,
            next((o.prompt_routed_experts for o in outs if o.prompt_routed_experts is not None), None),
            next((o.prompt_logprobs for o in outs if o.prompt_logprobs is not None), None),
            next((o.cached_tokens for o in outs if o.cached_tokens is not None), None),
        )


@dataclass
class Resume:
    """A request continued on this engine after the replica that ran it was lost: the tokens it had
    produced (re-prefilled here with the prompt) and how many characters of text the client has.
    Replaying the detokeniser over `output_ids` restores text that was held back (a possible stop
    string, an incomplete UTF-8 character), so the client's stream goes on exactly where it was."""

    output_ids: list[int]
    emitted_chars: int


@dataclass
class StepProfile:
    """Where the engine thread's time goes, summed over steps (seconds; counters only grow):

    schedule   choosing the step's sequences and their KV blocks
    dense      the dense path: embedding, attention + gate of each layer, norm and LM head
    dispatch   grouping a layer's rows by expert and handing them to the backend (the send)
    wait       waiting for a layer's expert results (the wire, the experts' queue and FFN)
    combine    the top-k weighted sum of the expert outputs
    sample     logits processing, masks, sampling, logprobs
    output     detokenising, stop checks, building outputs

    `layers` counts layer fan-outs; `tokens` the tokens sampled. Read by `mixserve bench`."""

    schedule: float = 0.0
    dense: float = 0.0
    dispatch: float = 0.0
    wait: float = 0.0
    combine: float = 0.0
    sample: float = 0.0
    output: float = 0.0
    steps: int = 0
    layers: int = 0
    tokens: int = 0

    PHASES = ("schedule", "dense", "dispatch", "wait", "combine", "sample", "output")

    def snapshot(self) -> dict:
        return {k: getattr(self, k) for k in (*self.PHASES, "steps", "layers", "tokens")}


def run_pipelined(
    gens: list, backend: ExpertBackend, num_experts: int, prof: StepProfile | None = None
) -> list[torch.Tensor]:
    """Drive forward generators round-robin so that each one's expert call is in flight while
    the next one computes its attention: each layer's MoE input is dispatched to the backend, and
    the experts' outputs combined and sent back. Returns each generator's logits. With `prof`, the
    time of each part is added to it."""
    prof = prof if prof is not None else StepProfile()
    clock = time.perf_counter
    results: list = [None] * len(gens)
    pending = deque()

    def submit(i: int, g, m: MoEInput) -> None:
        t = clock()
        req, plan = dispatch(m, num_experts)
        pending.append((i, g, m.x, plan, backend.submit(req)))
        prof.dispatch += clock() - t
        prof.layers += 1

    for i, g in enumerate(gens):
        t = clock()
        m = next(g)
        prof.dense += clock() - t
        submit(i, g, m)
    while pending:
        i, g, x, plan, fut = pending.popleft()
        t0 = clock()
        y = fut.result()
        t1 = clock()
        h = combine(x, plan, y)
        t2 = clock()
        prof.wait += t1 - t0
        prof.combine += t2 - t1
        try:
            m = g.send(h)
        except StopIteration as stop:
            prof.dense += clock() - t2
            results[i] = stop.value
            continue
        prof.dense += clock() - t2
        submit(i, g, m)
    return results


class LLMEngine:
    def __init__(
        self, dense: MixtralDense, experts: ExpertBackend, tokenizer: Tokenizer | None, cfg: EngineConfig | None = None
    ):
        self.cfg = cfg or EngineConfig()
        self.dense, self.experts, self.tokenizer = dense, experts, tokenizer
        mc = dense.cfg
        self.max_model_len = self.cfg.context_len(mc.max_position_embeddings)
        num_blocks = max(1, self.cfg.kv_cache_tokens // self.cfg.block_size)
        # One slot past the blocks: where a position whose K/V sit in a shared cached block writes
        # when it is computed again for its logits (nothing reads it).
        self.scratch_slot = num_blocks * self.cfg.block_size
        self.device = dense.device  # the model's: the KV pool, each step's inputs, logits and sampling
        self.kv = KVPool(mc, self.scratch_slot + 1, dense.dtype, self.device)
        self.blocks = BlockManager(num_blocks, self.cfg.block_size, caching=self.cfg.enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, self.cfg.max_num_seqs, self.cfg.max_num_batched_tokens)
        self.seqs: dict[str, Sequence] = {}
        self._ids = itertools.count()
        self.eos = set(mc.eos_ids) | ({tokenizer.eos_id} if tokenizer else set())
        self.steps = 0
        self.profile = StepProfile()
        self._masks: GrammarBatch | None = None

    @property
    def grammars(self) -> GrammarCompiler:
        """Structured outputs' compiler for this model's tokenizer (built on first use, shared in the process)."""
        if self.tokenizer is None:
            raise EngineError("structured outputs need the model's tokenizer")
        return compiler_for(self.tokenizer, self.dense.cfg.vocab_size)

    # ------------------------------------------------------------ requests

    def add_request(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        req_id: str | None = None,
        resume: Resume | None = None,
        group: str | None = None,
        fork_of: str | None = None,
    ) -> str:
        """Queue a sequence. `group` names whose fair share it runs in (the choices of one request,
        or one user's requests; the sequence alone when None): see router/scheduler.py. The waiting
        queue holds `max_waiting` sequences; past that only a group with none waiting is still taken,
        up to twice the bound, so one request's n choices cannot shut every other request out.
        `fork_of`: another request with the same prompt (a choice of the same request) whose prefill
        this one copies instead of computing: it waits for that prefill, then copies its K/V."""
        if req_id in self.seqs:
            raise EngineError(f"request id {req_id!r} is already in use")
        if not prompt_ids:
            raise EngineError("the prompt is empty")
        V = self.dense.cfg.vocab_size
        done = list(resume.output_ids) if resume else []
        if min(prompt_ids + done) < 0 or max(prompt_ids + done) >= V:
            raise EngineError(f"prompt token ids must be in [0, {V})")
        try:
            params = params.for_vocab(V)
        except ValueError as e:
            raise EngineError(str(e)) from None
        if len(done) >= params.max_tokens:
            raise EngineError(f"resume: {len(done)} tokens already meet max_tokens={params.max_tokens}")
        n = len(prompt_ids) + len(done)
        if n >= self.max_model_len:
            raise EngineError(f"the prompt has {n} tokens; this model's context is {self.max_model_len} tokens")
        # A sequence never grows past the context nor the whole cache; it is cut with "length".
        cap = min(self.max_model_len, self.blocks.num_blocks * self.blocks.block_size)
        if n + 1 > cap:
            raise EngineError(f"the prompt has {n} tokens; the KV cache holds at most {cap - 1} for one request")
        waiting = len(self.scheduler.waiting)
        if waiting >= 2 * self.cfg.max_waiting or (
            waiting >= self.cfg.max_waiting and (group is None or self.scheduler.has_waiting(group))
        ):
            raise Overloaded(f"{waiting} requests are already waiting")
        req_id = req_id if req_id is not None else f"req-{next(self._ids)}"
        seq = Sequence(req_id, list(prompt_ids), params, self.cfg.block_size, group=group)
        parent = self.seqs.get(fork_of) if fork_of is not None and not resume else None
        if parent is not None and parent.prompt_ids == seq.prompt_ids:
            seq.fork_of = parent
        if self.tokenizer is not None:
            seq.detok = IncrementalDetokenizer(self.tokenizer, prompt_ids, params.skip_special_tokens)
        if params.processes_logits:
            seq.logits_state = LogitsState.of(params, prompt_ids, done, V, self.device)
        if params.structured is not None:
            try:
                seq.grammar = self.grammars.matcher(params.structured)
            except GrammarError as e:
                raise EngineError(str(e)) from None
            if not seq.grammar.replay(done):
                raise EngineError("resume: the tokens so far do not follow the request's structured output")
        if resume:
            seq.output_ids = done
            seq.emitted_tokens = len(done)
            # logprobs are indexed by output position: the client has the resumed tokens' already
            seq.logprobs = [None] * len(done)
            if seq.detok is not None:
                seq.text = "".join(seq.detok.add([t]) for t in done)
            seq.emitted_chars = min(resume.emitted_chars, len(seq.text))
        self.seqs[req_id] = seq
        self.scheduler.add(seq)
        return req_id

    def abort(self, req_id: str) -> bool:
        seq = self.seqs.pop(req_id, None)
        if seq is None:
            return False
        self.scheduler.remove(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = FinishReason.ABORT
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

    @staticmethod
    def _prompt_rows(s: Scheduled) -> range:
        """Positions of this step whose logits give a prompt token's logprob (position p predicts
        token p + 1): the prompt's, once (not again after a preemption, nor for a resumed sequence,
        whose client has them), none when not asked. A forked choice computes no prompt position but
        its last, so it has none: the serving layer asks for them on a prompt's first choice only."""
        seq = s.seq
        if seq.params.prompt_logprobs is None or seq.output_ids:
            return range(0)
        start = max(seq.num_computed, len(seq.prompt_logprobs) - 1)
        return range(start, min(seq.num_computed + s.num_new, len(seq.prompt_ids) - 1))

    def _forward(self, mb: list[Scheduled]):
        ids, seqs, logit_rows, row = [], [], [], 0
        prompt_rows: list[tuple[Sequence, range, int]] = []  # (seq, positions, index of the first in the logits)
        for s in mb:
            seq, n = s.seq, s.num_new
            ids.extend(seq.tokens[seq.num_computed : seq.num_computed + n])
            seqs.append((seq.table.slots[: seq.num_computed + n], n))
            pos = self._prompt_rows(s)
            if pos:
                prompt_rows.append((seq, pos, len(logit_rows)))
                logit_rows.extend(row + p - seq.num_computed for p in pos)
            row += n
            if s.samples:
                logit_rows.append(row - 1)
        meta = build_attn_meta(seqs, self.dense.cfg.sliding_window)
        row = 0
        for s in mb:  # positions in shared cached blocks, computed again: their writes go to the scratch slot
            seq = s.seq
            if seq.num_computed < seq.table.read_only:
                meta.slots[row : row + min(s.num_new, seq.table.read_only - seq.num_computed)] = self.scratch_slot
            row += s.num_new
        routes = [] if any(s.seq.params.wants_routes for s in mb) else None
        dev = self.device
        ids_t = torch.tensor(ids, device=dev)
        rows_t = torch.tensor(logit_rows, dtype=torch.long, device=dev)
        gen = self.dense.forward(ids_t, meta.to(dev), self.kv, rows_t, routes)
        return gen, routes, prompt_rows

    @staticmethod
    def _keep_prompt_logprobs(lg: torch.Tensor, prompt_rows: list) -> torch.Tensor:
        """Record each asking sequence's prompt logprobs from its rows of `lg`; the sampling rows are returned."""
        keep = torch.ones(lg.shape[0], dtype=torch.bool, device=lg.device)
        for seq, pos, at in prompt_rows:
            rows = slice(at, at + len(pos))
            keep[rows] = False
            nxt = torch.tensor(seq.prompt_ids[pos.start + 1 : pos.stop + 1], device=lg.device)
            if not seq.prompt_logprobs:
                seq.prompt_logprobs.append(None)
            seq.prompt_logprobs += ranked_logprobs(lg[rows], nxt, seq.params.prompt_logprobs)
        return lg[keep]

    @staticmethod
    def _keep_routes(mb: list[Scheduled], routes: list) -> None:
        """Each asking sequence's rows of this step's routing [layers x [T, k]], by position."""
        per_row = torch.stack(routes, dim=1)  # [T, layers, k]
        row = 0
        for s in mb:
            seq = s.seq
            if seq.params.wants_routes:
                got = per_row[row : row + s.num_new].tolist()
                del seq.routes[seq.num_computed :]  # recomputed positions (after preemption) are replaced
                seq.routes.extend(got)
            row += s.num_new

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """One engine step. Never raises for one request's sake: a sequence whose sampling,
        detokenising or stop handling fails is finished with an error output and the rest of the
        batch goes on. If the forward itself fails (an expert group unreachable after all retries),
        the sequences of this step are failed with that error; earlier steps' outputs were already
        returned, and requests outside this step are untouched."""
        prof, clock = self.profile, time.perf_counter
        t0 = clock()
        sched = self.scheduler.schedule()
        if not sched:
            return []
        for s in sched:
            if s.copy is not None:
                self.kv.copy_slots(*s.copy)
        mbs = self._microbatches(sched)
        prof.schedule += clock() - t0
        try:
            t0 = clock()
            fwd = [self._forward(mb) for mb in mbs]
            prof.dense += clock() - t0
            logits = run_pipelined([g for g, _, _ in fwd], self.experts, self.dense.cfg.num_local_experts, prof)
        except Exception as e:  # noqa: BLE001 - not one sequence's fault: fail this step's sequences
            log.warning("engine step failed", extra={"error": f"{type(e).__name__}: {e}"[:500]})
            msg = f"the engine step failed: {type(e).__name__}: {e}"
            return [self._fail(s.seq, msg) for s in sched if s.seq.req_id in self.seqs]
        self.steps += 1
        prof.steps += 1
        outputs = []
        for mb, lg, (_, routes, prompt_rows) in zip(mbs, logits, fwd):
            if routes is not None:
                self._keep_routes(mb, routes)
            if prompt_rows:
                lg = self._keep_prompt_logprobs(lg, prompt_rows)
            sampling = [s.seq for s in mb if s.samples]
            for s in mb:
                seq = s.seq
                seq.num_computed += s.num_new
                if self.blocks.caching and seq.num_computed // self.blocks.block_size > seq.table.registered:
                    self.blocks.register(
                        seq.table, seq.hashes()[: seq.num_computed // self.blocks.block_size], seq.extras
                    )
            if sampling:
                outputs += self._sample_and_append(sampling, lg)
        return outputs

    def _sample_and_append(self, seqs: list[Sequence], lg: torch.Tensor) -> list[RequestOutput]:
        t_sample = time.perf_counter()
        bad = set(bad_rows(lg))
        if bad:  # a row that overflowed fails its sequence; the others sample from clean rows
            lg = lg.clone()
            lg[sorted(bad)] = 0.0
        params = [q.params for q in seqs]
        ended: dict[int, str | None] = {}  # constrained rows that cannot sample: None = their grammar is complete
        constrained = [j for j, q in enumerate(seqs) if q.grammar is not None and j not in bad]
        if constrained:  # vLLM's order: the grammar's mask, then logprobs and processing see it
            if self._masks is None:
                self._masks = GrammarBatch(lg.shape[-1])
            lg = apply_mask(lg, constrained, self._masks.mask([seqs[j].grammar for j in constrained]))
        raw = lg
        if any(p.processes_logits for p in params):
            lg = process_logits(lg, params, [q.logits_state for q in seqs], [self._stop_ids(q.params) for q in seqs])
        if constrained:
            ended = self._unsampleable(seqs, constrained, lg)
            if ended:
                lg = lg.clone()
                lg[sorted(ended)] = 0.0
        try:
            toks = sample(lg, params, [q.generator for q in seqs]).tolist()
        except Exception:  # noqa: BLE001 - cannot happen for validated params; find the row that fails
            log.exception("batched sampling failed; sampling row by row")
            toks = []
            for j, q in enumerate(seqs):
                try:
                    toks.append(int(sample(lg[j : j + 1], [q.params], [q.generator])[0]))
                except Exception:  # noqa: BLE001
                    bad.add(j)
                    toks.append(0)
        want = [p.logprobs for p in params if p.logprobs is not None]
        lps = (
            logprobs_of(raw, torch.tensor(toks, device=raw.device), max(want)) if want else None
        )  # the model's, as vLLM returns
        t_out = time.perf_counter()
        self.profile.sample += t_out - t_sample
        self.profile.tokens += len(seqs)
        outputs = []
        for j, (seq, t) in enumerate(zip(seqs, toks)):
            if seq.req_id not in self.seqs:  # aborted during the step
                continue
            if j in bad:
                outputs.append(self._fail(seq, "this request's logits are not finite (numerical overflow)"))
                continue
            if j in ended:  # its grammar allows no token that its other settings allow
                msg = ended[j]
                if msg is None and seq.detok is not None:
                    seq.text += seq.detok.flush()
                outputs.append(self._fail(seq, msg) if msg else self._finish(seq, FinishReason.STOP))
                continue
            try:
                out = self._append(seq, t, lps[j] if lps else None)
            except Exception as e:  # noqa: BLE001 - this sequence's output handling failed: it alone ends
                log.exception("output handling failed", extra={"req_id": seq.req_id})
                out = self._fail(seq, f"output handling failed: {type(e).__name__}: {e}")
            if out is not None:
                outputs.append(out)
        self.profile.output += time.perf_counter() - t_out
        return outputs

    @staticmethod
    def _unsampleable(seqs: list[Sequence], rows: list[int], lg: torch.Tensor) -> dict[int, str | None]:
        """Constrained rows with no token left to sample: a grammar in error (its message), or one
        whose only tokens are banned (min_tokens bans EOS when the grammar allows nothing else): that
        output is complete (None) if the grammar accepts it, else an error."""
        live = torch.isfinite(lg[torch.tensor(rows, device=lg.device)]).any(dim=-1).tolist()
        out: dict[int, str | None] = {}
        for j, ok in zip(rows, live):
            g = seqs[j].grammar
            err = g.error()
            if err is not None:
                out[j] = f"structured output: {err}"
            elif not ok:
                out[j] = None if g.accepting else "structured output: no token follows the grammar"
        return out

    def _fail(self, seq: Sequence, message: str) -> RequestOutput:
        """Finish one sequence with an error; its KV blocks are freed, nothing else is touched."""
        return self._finish(seq, FinishReason.ERROR, message)

    def fail_all(self, message: str) -> list[RequestOutput]:
        """Every unfinished request ends with `message` (the engine loop's last resort)."""
        return [self._fail(seq, message) for seq in list(self.seqs.values())]

    def _append(self, seq: Sequence, t: int, lp) -> RequestOutput | None:
        if seq.req_id not in self.seqs:  # aborted during the step
            return None
        p = seq.params
        if seq.grammar is not None and not seq.grammar.consume(t):
            return self._fail(seq, f"structured output: token {t} does not follow the grammar")
        seq.output_ids.append(t)
        if seq.logits_state is not None:
            seq.logits_state.append(t)
        if seq.first_token_at is None:
            seq.first_token_at = time.monotonic()
        if lp is not None and p.logprobs is not None:
            seq.logprobs.append((t, lp[0], lp[1][: p.logprobs]))
        reason = None
        checks = len(seq.output_ids) >= p.min_tokens  # vLLM: no stop of any kind before min_tokens
        is_stop_token = checks and ((t in self.eos and not p.ignore_eos) or t in p.stop_token_ids)
        if is_stop_token:
            reason = FinishReason.STOP
            seq.stop_reason = t if t in p.stop_token_ids else None
            if p.include_stop_str_in_output and seq.detok is not None:
                seq.text += seq.detok.add([t]) + seq.detok.flush()
        elif seq.detok is not None:
            before = len(seq.text)
            seq.text += seq.detok.add([t])
            if p.stop and checks:
                reason = self._cut_at_stop(seq, before)
        complete = reason is None and seq.grammar is not None and seq.grammar.done
        if complete:  # the grammar allows nothing more: the answer is whole (vLLM would sample EOS next)
            reason = FinishReason.STOP
        elif reason is None and (len(seq.output_ids) >= p.max_tokens or seq.num_tokens >= self._cap(seq)):
            reason = FinishReason.LENGTH
        if reason is not None:
            if (reason == FinishReason.LENGTH or complete) and seq.detok is not None:
                before = len(seq.text)
                seq.text += seq.detok.flush()
                if p.stop:  # the flushed tail may complete a stop string
                    reason = self._cut_at_stop(seq, before) or reason
            return self._finish(seq, reason)
        # Hold back text that might still turn out to start a stop string.
        hold = max((len(s) - 1 for s in p.stop), default=0)
        return self._emit(seq, max(seq.emitted_chars, len(seq.text) - hold), False)

    def _cut_at_stop(self, seq: Sequence, before: int) -> FinishReason | None:
        """Cut the text at the first stop string in what was added after `before` (keeping the
        string itself if asked); STOP if one was found."""
        i, s = first_stop(seq.text, seq.params.stop, before)
        if i == -1:
            return None
        seq.text = seq.text[: i + len(s) if seq.params.include_stop_str_in_output else i]
        seq.stop_reason = s
        return FinishReason.STOP

    def _stop_ids(self, p: SamplingParams) -> set[int]:
        """The tokens that would end a sequence: banned while it is shorter than min_tokens."""
        return (set() if p.ignore_eos else set(self.eos)) | set(p.stop_token_ids)

    def _cap(self, seq: Sequence) -> int:
        return min(self.max_model_len, self.blocks.num_blocks * self.blocks.block_size)

    def _finish(self, seq: Sequence, reason: FinishReason, error: str | None = None) -> RequestOutput:
        seq.finish_reason = reason
        self.scheduler.remove(seq)
        seq.status = Status.FINISHED
        self.seqs.pop(seq.req_id, None)
        if error is not None:  # held-back text is not sent after an error
            return RequestOutput(
                seq.req_id,
                [],
                "",
                True,
                reason,
                len(seq.prompt_ids),
                len(seq.output_ids),
                error=error,
                error_kind=ErrorKind.FAILED,
            )
        return self._emit(seq, len(seq.text), True)

    def _emit(self, seq: Sequence, upto: int, finished: bool) -> RequestOutput:
        text = seq.text[seq.emitted_chars : upto]
        seq.emitted_chars = max(seq.emitted_chars, upto)
        new = seq.output_ids[seq.emitted_tokens :]
        lps = seq.logprobs[seq.emitted_tokens :] if seq.params.logprobs is not None else []
        seq.emitted_tokens = len(seq.output_ids)
        out = RequestOutput(
            seq.req_id,
            new,
            text,
            finished,
            seq.finish_reason,
            prompt_tokens=len(seq.prompt_ids),
            completion_tokens=len(seq.output_ids),
            logprobs=lps,
            stop_reason=seq.stop_reason if finished else None,
        )
        p = seq.params
        if p.wants_routes:
            P, first = len(seq.prompt_ids), len(seq.output_ids) - len(new)
            if p.return_routed_experts:
                out.routed_experts = seq.routes[P - 1 + first : P - 1 + first + len(new)]
            if p.return_prompt_routed_experts and first == 0:  # the sequence's first output
                out.prompt_routed_experts = seq.routes[:P]
        if len(seq.output_ids) == len(new):  # the sequence's first output
            out.cached_tokens = seq.cached_tokens or 0
            if p.prompt_logprobs is not None and seq.prompt_logprobs:
                out.prompt_logprobs = seq.prompt_logprobs  # (none for a resumed or forked one)
        return out

    # ------------------------------------------------------------ convenience

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[RequestOutput]:
        """Run prompts to completion; one finished output per prompt, in order, with all tokens and text."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        rids = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        parts = {r: [RequestOutput(r, [], "", False)] for r in rids}
        while any(not parts[r][-1].finished for r in rids):
            outs = self.step()
            if not outs and not self.has_unfinished():
                break
            for o in outs:
                parts[o.req_id].append(o)
        return [RequestOutput.joined(parts[r]) for r in rids]

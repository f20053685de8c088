"""The expert worker: holds a group of experts for every layer and runs batched SwiGLU on what it is sent.

One call = one layer's token batches for the experts of this worker that have tokens:
{expert: [n_e, D]} in, {expert: [n_e, D]} out, one SwiGLU per expert. Calls are pure functions of
their input (idempotent), so a call lost with a dead replica can be re-sent anywhere.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
import time
import weakref
from dataclasses import dataclass, field

import torch

from model.checkpoint import Checkpoint, expert_names
from model.config import resolve_device
from model.moe import LocalExperts

TRIM_INTERVAL_S = 5.0


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim, libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return None, None


_MALLOC_TRIM, _MALLOPT = _libc()
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20  # the largest fixed threshold glibc takes on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD  # free memory a heap keeps at its top (glibc's own rule when dynamic)


def bound_heap_growth() -> None:
    """Fix glibc's mmap threshold at MMAP_THRESHOLD: allocations below it come from the heap, whose
    freed pages `release_free_heap` hands back (after loading, every TRIM_INTERVAL_S at a call's end,
    and once a worker falls idle); larger ones get mappings of their own, returned on free. Left
    dynamic, glibc moves the threshold (and the heap's trim threshold with it) to the largest block
    freed so far. The heap keeps up to TRIM_THRESHOLD free at its top between those trims: fixing
    the mmap threshold leaves glibc's trim threshold at 128 KiB, and a heap that shrinks on every
    free faults its pages in again at the next step (the in-process engine's decode step at c=64,
    `mini` bf16: 77-80 -> 60-70 ms).

    Not lower: a block served from a fresh mapping faults its pages in on first touch, every time.
    At 256 KiB (this setting before) every FFN intermediate of more than ~70 rows (`mini`, bf16) was
    one, and on a 2-core Xeon with AMX an expert FFN of 288 rows took 3.5 ms instead of 1.54 and a
    1024-token prefill step of the in-process engine 370 ms instead of 200 (docs/benchmarks.md)."""
    if _MALLOPT is not None:
        _MALLOPT(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        _MALLOPT(M_TRIM_THRESHOLD, TRIM_THRESHOLD)


def release_free_heap() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them, and per-thread arenas keep the peak of
    transient buffers: call inputs, FFN intermediates). No-op where malloc_trim is missing."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


_WORKERS: weakref.WeakSet = weakref.WeakSet()  # the workers of this process, for the idle trim
_IDLE_TRIM: list[threading.Thread] = []
_IDLE_TRIM_LOCK = threading.Lock()


def _trim_when_idle() -> None:
    """Once every TRIM_INTERVAL_S: trim the heap for a worker whose calls have ended since its last
    trim (the last calls of a burst would otherwise leave their buffers resident until the next one)."""
    while True:
        time.sleep(TRIM_INTERVAL_S)
        now = time.monotonic()
        if any([w._claim_trim(now) for w in list(_WORKERS)]):  # every worker claims: one trim serves them all
            release_free_heap()


def _watch(worker: ExpertWorker) -> None:
    with _IDLE_TRIM_LOCK:
        _WORKERS.add(worker)
        if not _IDLE_TRIM:
            t = threading.Thread(target=_trim_when_idle, name="expert-heap-trim", daemon=True)
            _IDLE_TRIM.append(t)
            t.start()


@dataclass
class ExpertStats:
    """What a worker has served, for metrics and autoscaling. Counters only grow."""

    calls: int = 0
    tokens: int = 0
    busy_s: float = 0.0
    tokens_per_layer: dict[int, int] = field(default_factory=dict)
    tokens_per_expert: dict[int, int] = field(default_factory=dict)
    in_flight_tokens: int = 0

    def snapshot(self) -> dict:
        return {
            "calls": self.calls,
            "tokens": self.tokens,
            "busy_s": self.busy_s,
            "tokens_per_layer": dict(self.tokens_per_layer),
            "tokens_per_expert": dict(self.tokens_per_expert),
            "in_flight_tokens": self.in_flight_tokens,
        }


class ExpertWorker:
    """Experts `experts` of every layer, loaded alone from the checkpoint (lazy safetensors reads)."""

    def __init__(
        self,
        model_dir: str,
        experts: list[int],
        dtype: str = "auto",
        num_threads: int | None = None,
        device: torch.device | str = "cpu",
    ):
        """Only this worker's tensors are read, each straight onto `device` (see Checkpoint.load)."""
        bound_heap_growth()
        if num_threads:
            torch.set_num_threads(num_threads)
        ckpt = Checkpoint(model_dir)
        self.cfg = ckpt.config
        self.experts = sorted(experts)
        pairs = [(l, e) for l in range(self.cfg.num_hidden_layers) for e in self.experts]
        self.device = resolve_device(device)
        loaded = ckpt.load_experts(pairs, dtype, self.device)
        expected = set()
        for l, e in pairs:
            expected.update(expert_names(self.cfg, l, e))
        # Each worker holds exactly its own tensors: nothing missing, nothing extra.
        assert set(loaded.tensors) == expected, "expert worker received the wrong set of tensors"
        self.bytes_read = loaded.bytes_read
        t = loaded.tensors
        # An empty group (no experts) holds nothing: the runtime baseline of a worker process.
        self.dtype = next(iter(t.values())).dtype if t else self.cfg.dtype
        self.local = LocalExperts(self.cfg, t)  # the one way experts are held in a process
        self.weights = self.local.experts  # (layer, expert) -> ExpertFFN
        self.stats = ExpertStats()
        self._lock = threading.Lock()
        # Loading churns the heap (read, fuse, pack, free); serving then trims every TRIM_INTERVAL_S.
        release_free_heap()
        self._trimmed_at = time.monotonic()
        self._calls_at_trim = 0
        _watch(self)

    def weight_bytes(self) -> int:
        return self.local.nbytes()

    def run(self, layer: int, batches: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        if torch.is_inference_mode_enabled():  # an engine's thread, a data-plane connection's
            return self._run(layer, batches)
        with torch.inference_mode():  # a Ray call's thread
            return self._run(layer, batches)

    def _run(self, layer: int, batches: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        for e in batches:  # refused before anything is counted
            if (layer, e) not in self.weights:
                raise KeyError(f"this worker holds experts {self.experts}, not (layer={layer}, expert={e})")
        n = sum(int(x.shape[0]) for x in batches.values())
        with self._lock:
            self.stats.in_flight_tokens += n
        t0 = time.perf_counter()
        try:
            out = {}
            for e, x in batches.items():  # outputs on the worker's device, in the caller's dtype
                xin = (
                    x
                    if x.dtype == self.dtype and x.device == self.device
                    else x.to(self.device, self.dtype, non_blocking=True)
                )
                y = self.weights[(layer, e)](xin)
                out[e] = y if y.dtype == x.dtype else y.to(x.dtype)
            return out
        finally:
            dt = time.perf_counter() - t0
            with self._lock:
                s = self.stats
                s.in_flight_tokens -= n
                s.calls += 1
                s.tokens += n
                s.busy_s += dt
                s.tokens_per_layer[layer] = s.tokens_per_layer.get(layer, 0) + n
                for e, x in batches.items():
                    s.tokens_per_expert[e] = s.tokens_per_expert.get(e, 0) + int(x.shape[0])
                trim = self._claim_trim_locked(time.monotonic())
            if trim:
                release_free_heap()

    def _claim_trim(self, now: float) -> bool:
        with self._lock:
            return self._claim_trim_locked(now)

    def _claim_trim_locked(self, now: float) -> bool:
        """Whether the heap is due a trim for this worker (nothing in flight, calls since the last
        trim, TRIM_INTERVAL_S since it); if so, it counts as done now. The caller holds `_lock`."""
        s = self.stats
        due = now - self._trimmed_at > TRIM_INTERVAL_S and s.in_flight_tokens == 0 and s.calls != self._calls_at_trim
        if due:
            self._trimmed_at, self._calls_at_trim = now, s.calls
        return due

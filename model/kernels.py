"""The numerical building blocks, free of weights and model structure: RMSNorm, rotary embeddings,
SwiGLU, and the linear kernel with its CPU weight packing.

On CPU (bf16, fp16 and float32) a weight is packed once into oneDNN's blocked layout
(`prepare_weight`) and multiplied through `linear` at bucketed row counts; elsewhere weights stay
plain tensors and `linear` is `F.linear`. The packing checks itself once per dtype against
`F.linear` and is off with MIXSERVE_PACKED_WEIGHTS=0.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as Fn

# ---------------------------------------------------------------- small pure functions


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in float32, scale in the model dtype: the order HF uses, so bf16 results agree.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


def rope_cos_sin(pos: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin [T, d] for positions [T], in HF's non-interleaved (rotate-half) layout."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=pos.device).float() / head_dim))
    freqs = pos.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, d]."""
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rot * sin[:, None, :]


def swiglu(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """One expert on a whole token batch: x [n, D] -> [n, D]; w2(silu(w1 x) * w3 x)."""
    return Fn.linear(Fn.silu(Fn.linear(x, w1)) * Fn.linear(x, w3), w2)


# ---------------------------------------------------------------- linear kernels
#
# On CPU a weight can be packed once into oneDNN's blocked layout (what torch.compile's freezing pass
# does for nn.Linear on CPU). An unpacked bf16 weight is re-laid-out for the AMX/VNNI kernel on every
# call, which dominates at the few-token batches of decode and MoE experts: packing is ~1.25x on an
# expert's FFN at 8 tokens (docs/benchmarks.md). In float32, F.linear goes to MKL's sgemm, which is
# slow at the 4-64 rows of decode steps and expert batches; the packed oneDNN kernel measured 2.0x
# (c=16) and 2.5x (c=64) on the in-process engine's throughput (mini, 2-core AMD EPYC, AVX2).
# Elsewhere (CUDA, no oneDNN, MIXSERVE_PACKED_WEIGHTS=0) weights stay plain tensors.

PACK_BATCH_HINT = 16  # oneDNN picks the packed layout for this many rows; it serves any row count

# A packed oneDNN call costs ~20-40 us before any arithmetic (primitive lookup, argument checks), where
# MKL's sgemm on a small float32 weight costs ~5 us in all: a [1, 64] x [64, 224] matmul ran
# 3-4 us plain against 26-31 us packed, and the two meet near 128K-256K elements at 4-16 rows (one
# thread, 2-core AMD EPYC, docs/benchmarks.md). So in float32 only weights of at least this many
# elements are packed. bf16/fp16 are always packed: unpacked, oneDNN runs them too, and re-lays the
# weight out on every call.
PACK_MIN_FLOAT32 = 1 << 18


class PackedWeight:
    """A [out, in] linear weight pre-packed for oneDNN; use through `linear`."""

    __slots__ = ("t", "shape", "dtype", "nbytes")

    def __init__(self, w: torch.Tensor):
        self.t = torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), PACK_BATCH_HINT)
        self.shape, self.dtype, self.nbytes = tuple(w.shape), w.dtype, w.numel() * w.element_size()


_PACK_OK: dict[torch.dtype, bool] = {}


def _can_pack(w: torch.Tensor) -> bool:
    if (
        w.device.type != "cpu"
        or w.dim() != 2
        or w.dtype not in (torch.bfloat16, torch.float16, torch.float32)
        or os.environ.get("MIXSERVE_PACKED_WEIGHTS", "1") == "0"
        or not torch.backends.mkldnn.is_available()
        or (w.dtype == torch.float32 and w.numel() < PACK_MIN_FLOAT32)
    ):
        return False
    if w.dtype not in _PACK_OK:  # once per dtype: does this build/CPU pack it, and give the same numbers?
        try:
            g = torch.Generator().manual_seed(0)
            a, b = torch.randn(3, 64, generator=g).to(w.dtype), torch.randn(32, 64, generator=g).to(w.dtype)
            pw = PackedWeight(b)
            got = torch.ops.mkldnn._linear_pointwise(a, pw.t, None, "none", [], "")
            tol = 1e-5 if w.dtype == torch.float32 else 2e-2
            _PACK_OK[w.dtype] = bool(torch.allclose(got.float(), Fn.linear(a, b).float(), rtol=tol, atol=tol))
        except (RuntimeError, AttributeError):
            _PACK_OK[w.dtype] = False
    return _PACK_OK[w.dtype]


def prepare_weight(w: torch.Tensor) -> torch.Tensor | PackedWeight:
    """The fastest form of a linear weight here (packed when `_can_pack`, else `w` itself)."""
    return PackedWeight(w) if _can_pack(w) else w


def row_bucket(n: int) -> int:
    """The row count a packed matmul of n rows runs at: n rounded up to a multiple of 4, or of an
    eighth of the power of two below it (at most 12.5% padding; 8 buckets per doubling).

    oneDNN compiles and caches (1024 entries, each holding its own buffers) one kernel per distinct
    input shape. Token counts change every step, so without buckets a long-running worker's memory
    grows by tens of MB as the cache fills (measured +85 MB for a worker with four `mini` experts),
    and capping the cache instead costs a third of the throughput. With buckets the shapes, and so
    the cache and its memory, stay bounded (~70 shapes per weight up to 8192 rows)."""
    step = max(4, 1 << max(0, (n - 1).bit_length() - 4))
    return -(-n // step) * step


def linear(x: torch.Tensor, w: torch.Tensor | PackedWeight) -> torch.Tensor:
    """x [n, in] @ w.T for a plain or packed weight (packed: run at `row_bucket(n)` rows)."""
    if type(w) is PackedWeight:
        n = x.shape[0]
        if n == 0:
            return x.new_empty(0, w.shape[0])
        b = row_bucket(n)
        x = Fn.pad(x, (0, 0, 0, b - n)) if b != n else x.contiguous()
        y = torch.ops.mkldnn._linear_pointwise(x, w.t, None, "none", [], "")
        return y[:n] if b != n else y
    return Fn.linear(x, w)


def gated_silu(x: torch.Tensor, w1: PackedWeight, w3: PackedWeight) -> torch.Tensor:
    """silu(x @ w1.T) * (x @ w3.T) for packed weights, at `row_bucket(n)` rows (the caller slices),
    both element-wise ops fused into the matmuls as oneDNN post-ops ("swish" on the first, "mul" by
    it on the second): no [n, 2F] intermediate, no separate passes over it."""
    n = x.shape[0]
    b = row_bucket(n)
    x = Fn.pad(x, (0, 0, 0, b - n)) if b != n else x.contiguous()
    h1 = torch.ops.mkldnn._linear_pointwise(x, w1.t, None, "swish", [], "")
    return torch.ops.mkldnn._linear_pointwise.binary(x, h1, w3.t, None, "mul")


def weight_nbytes(w: torch.Tensor | PackedWeight) -> int:
    return w.nbytes if type(w) is PackedWeight else w.numel() * w.element_size()

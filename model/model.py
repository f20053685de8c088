"""The Mixtral model in plain PyTorch: dense path, router, experts, and one forward over a KV cache.

Shape legend: T = tokens in a step (all sequences, flattened), D = hidden, H = query heads,
K = KV heads, d = head dim, E = experts, k = experts per token, F = expert FFN width,
S = KV-cache slots, B = sequences, L = context length of a sequence.

Decoder layer: h = x + attn(rmsnorm(x)); x = h + moe(rmsnorm(h)).

The MoE half of each layer is written as a generator step: `forward` yields one `ExpertRequest`
per layer (the layer's token rows grouped by expert) and is sent back the experts' outputs. Whoever
drives the generator decides where experts live: `run_local` calls in-process experts, the engine
in router/ overlaps several micro-batches against remote ones. The model never knows which.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as Fn

from .checkpoint import Checkpoint
from .config import MixtralConfig

# ---------------------------------------------------------------- small pure functions


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in float32, scale in the model dtype: the order HF uses, so bf16 results agree.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


def rope_cos_sin(pos: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin [T, d] for positions [T], in HF's non-interleaved (rotate-half) layout."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = pos.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, d]."""
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rot * sin[:, None, :]


def route(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Router: logits [T, E] -> (weights [T, k] float32, expert ids [T, k]).

    softmax over all experts in float32, keep the top-k, renormalise them to sum to 1. This equals
    mistral-inference's softmax over the top-k logits: softmax(z)_i / sum_topk softmax(z)_j
    = exp(z_i) / sum_topk exp(z_j).
    """
    probs = torch.softmax(logits.float(), dim=-1)
    w, ids = torch.topk(probs, top_k, dim=-1)
    return w / w.sum(dim=-1, keepdim=True), ids


def swiglu(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """One expert on a whole token batch: x [n, D] -> [n, D]; w2(silu(w1 x) * w3 x)."""
    return Fn.linear(Fn.silu(Fn.linear(x, w1)) * Fn.linear(x, w3), w2)


# ---------------------------------------------------------------- linear kernels
#
# On CPU in bf16/fp16 a weight can be packed once into oneDNN's blocked layout (what torch.compile's
# freezing pass does for nn.Linear on CPU). An unpacked bf16 weight is re-laid-out for the AMX/VNNI
# kernel on every call, which dominates at the few-token batches of decode and MoE experts: packing
# is ~1.25x on an expert's FFN at 8 tokens (benchmarks/README). Same oneDNN kernel, same results.
# Elsewhere (fp32, CUDA, no oneDNN, MIXSERVE_PACKED_WEIGHTS=0) weights stay plain tensors.

PACK_BATCH_HINT = 16  # oneDNN picks the packed layout for this many rows; it serves any row count


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
        or w.dtype not in (torch.bfloat16, torch.float16)
        or os.environ.get("MIXSERVE_PACKED_WEIGHTS", "1") == "0"
        or not torch.backends.mkldnn.is_available()
    ):
        return False
    if w.dtype not in _PACK_OK:  # once per dtype: does this build/CPU pack it, and give the same numbers?
        try:
            g = torch.Generator().manual_seed(0)
            a, b = torch.randn(3, 64, generator=g).to(w.dtype), torch.randn(32, 64, generator=g).to(w.dtype)
            pw = PackedWeight(b)
            got = torch.ops.mkldnn._linear_pointwise(a, pw.t, None, "none", [], "")
            _PACK_OK[w.dtype] = bool(torch.allclose(got.float(), Fn.linear(a, b).float(), rtol=2e-2, atol=1e-2))
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


def weight_nbytes(w: torch.Tensor | PackedWeight) -> int:
    return w.nbytes if type(w) is PackedWeight else w.numel() * w.element_size()


class ExpertFFN:
    """One expert's SwiGLU as it runs in a worker: w1 and w3 fused into one [2F, D] matrix (one
    matmul instead of two), both matrices in `prepare_weight` form. Same math as `swiglu`."""

    __slots__ = ("w13", "w2", "F")

    def __init__(self, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor):
        self.F = int(w1.shape[0])
        self.w13 = prepare_weight(torch.cat([w1, w3]))
        self.w2 = prepare_weight(w2)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h = linear(x, self.w13)
        return linear(Fn.silu(h[:, : self.F]) * h[:, self.F :], self.w2)

    @property
    def nbytes(self) -> int:
        return weight_nbytes(self.w13) + weight_nbytes(self.w2)


# ---------------------------------------------------------------- dispatch / combine


@dataclass
class ExpertRequest:
    """One layer's token batches for the experts that have tokens: [Router] -> [Dispatch]."""

    layer: int
    batches: dict[int, torch.Tensor]  # expert id -> contiguous [n_e, D]


@dataclass
class DispatchPlan:
    rows: dict[int, torch.Tensor]  # expert id -> token rows [n_e]
    weights: dict[int, torch.Tensor]  # expert id -> router weights [n_e, 1] float32


def plan_dispatch(w: torch.Tensor, ids: torch.Tensor, num_experts: int) -> DispatchPlan:
    """Group (token, slot) pairs by expert with one sort; experts with no tokens are left out."""
    k = ids.shape[1]
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    tok = order // k
    wsorted = w.reshape(-1)[order]
    rows, weights, start = {}, {}, 0
    for e, n in enumerate(counts):
        if n:
            rows[e] = tok[start : start + n]
            weights[e] = wsorted[start : start + n, None]
        start += n
    return DispatchPlan(rows, weights)


def combine(x: torch.Tensor, plan: DispatchPlan, outputs: dict[int, torch.Tensor]) -> torch.Tensor:
    """[Experts] -> [Combine]: out[t] = sum_e w[t, e] * y_e[t], accumulated in x's dtype."""
    out = torch.zeros_like(x)
    for e, rows in plan.rows.items():
        y = outputs[e]
        out.index_add_(0, rows, (y * plan.weights[e]).to(out.dtype))
    return out


# ---------------------------------------------------------------- attention over a KV cache


@dataclass
class PrefillPiece:
    """A sequence with several new tokens: rows [start, end) of the step, its context slots [L]."""

    start: int
    end: int
    ctx: torch.Tensor  # [L] cache slots of the whole context, the new tokens last
    mask: torch.Tensor | None  # [1, 1, n, L] bool, None when plain causal over new tokens only


@dataclass
class AttnMeta:
    """Where each token of a step sits; built once per step, shared by every layer."""

    positions: torch.Tensor  # [T]
    slots: torch.Tensor  # [T] cache slot each new token's k/v is written to
    dec_rows: torch.Tensor | None  # [B] rows of the one-token (decode) sequences
    dec_ctx: torch.Tensor | None  # [B, Lmax] their context slots, padded
    dec_mask: torch.Tensor | None  # [B, 1, 1, Lmax] bool, True = attend
    prefills: list[PrefillPiece]
    _bias: dict = field(default_factory=dict, repr=False)

    def dec_bias(self, dtype: torch.dtype) -> torch.Tensor:
        """dec_mask as an additive mask (0 / -inf) in `dtype`; built once per step, used by every layer."""
        if dtype not in self._bias:
            self._bias[dtype] = torch.zeros(self.dec_mask.shape, dtype=dtype).masked_fill_(
                ~self.dec_mask, float("-inf")
            )
        return self._bias[dtype]

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])


def build_attn_meta(seqs: list[tuple[list[int], int]], window: int | None = None) -> AttnMeta:
    """seqs: per sequence (context slots including the new tokens, number of new tokens), in row order.

    The new tokens are the last n of each context; their positions are L-n .. L-1.
    """
    positions, slots, dec_rows, dec_ctx, prefills = [], [], [], [], []
    row = 0
    for ctx, n in seqs:
        L = len(ctx)
        positions.extend(range(L - n, L))
        slots.extend(ctx[L - n :])
        if n == 1:
            dec_rows.append(row)
            dec_ctx.append(ctx)
        else:
            mask = None
            if L != n or (window is not None and window < n):
                q = torch.arange(L - n, L)[:, None]
                kpos = torch.arange(L)[None, :]
                m = kpos <= q
                if window is not None:
                    m &= q - kpos < window
                mask = m[None, None]
            prefills.append(PrefillPiece(row, row + n, torch.tensor(ctx), mask))
        row += n
    meta = AttnMeta(torch.tensor(positions), torch.tensor(slots), None, None, None, prefills)
    if dec_rows:
        Lmax = max(len(c) for c in dec_ctx)
        ctx_t = torch.zeros(len(dec_ctx), Lmax, dtype=torch.long)
        lens = torch.tensor([len(c) for c in dec_ctx])
        for i, c in enumerate(dec_ctx):
            ctx_t[i, : len(c)] = torch.tensor(c)
        kpos = torch.arange(Lmax)[None, :]
        m = kpos < lens[:, None]
        if window is not None:
            m &= (lens[:, None] - 1) - kpos < window
        meta.dec_rows, meta.dec_ctx, meta.dec_mask = torch.tensor(dec_rows), ctx_t, m[:, None, None, :]
    return meta


class KVPool:
    """Flat KV storage: per layer k, v [S, K, d]. Slot bookkeeping lives with the scheduler."""

    def __init__(self, cfg: MixtralConfig, num_slots: int, dtype: torch.dtype):
        shape = (cfg.num_hidden_layers, num_slots, cfg.num_key_value_heads, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype)
        self.v = torch.zeros(shape, dtype=dtype)
        self.num_slots = num_slots

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


# ---------------------------------------------------------------- the dense model


class MixtralDense:
    """Everything but the experts: embeddings, attention, norms, router gates, LM head.

    Weights are kept under the checkpoint's own names (a name-for-name copy on load).
    """

    def __init__(self, cfg: MixtralConfig, weights: dict[str, torch.Tensor]):
        self.cfg = cfg
        self.w = dict(weights)
        self.dtype = weights["model.embed_tokens.weight"].dtype
        # The matmul weights in `prepare_weight` form: q, k and v fused into one [(H + 2K) d, D]
        # matrix per layer (one matmul), o_proj, and the LM head. The originals are dropped.
        self.lin: dict = {}
        for l in range(cfg.num_hidden_layers):
            p = f"model.layers.{l}.self_attn."
            qkv = [self.w.pop(p + n + "_proj.weight") for n in "qkv"]
            self.lin[(l, "qkv")] = prepare_weight(torch.cat(qkv))
            self.lin[(l, "o")] = prepare_weight(self.w.pop(p + "o_proj.weight"))
        head = self.w.pop("lm_head.weight", None)
        self.lin["lm_head"] = prepare_weight(head if head is not None else self.w["model.embed_tokens.weight"])

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, dtype="auto") -> MixtralDense:
        return cls(ckpt.config, ckpt.load_dense(dtype).tensors)

    def nbytes(self) -> int:
        return sum(weight_nbytes(t) for t in [*self.w.values(), *self.lin.values()])

    def attention(self, l: int, x: torch.Tensor, meta: AttnMeta, kv: KVPool, cos, sin) -> torch.Tensor:
        c = self.cfg
        T, H, K, d = x.shape[0], c.num_attention_heads, c.num_key_value_heads, c.head_dim
        qkv = linear(x, self.lin[(l, "qkv")])
        q = apply_rope(qkv[:, : H * d].view(T, H, d), cos, sin)
        k = apply_rope(qkv[:, H * d : (H + K) * d].view(T, K, d), cos, sin)
        v = qkv[:, (H + K) * d :].view(T, K, d)
        kc, vc = kv.k[l], kv.v[l]
        kc[meta.slots] = k
        vc[meta.slots] = v
        out = torch.empty(T, H, d, dtype=x.dtype)
        if meta.dec_rows is not None:
            # One query per sequence: the H // K query heads that share a KV head become H // K query
            # rows against that head's keys (no GQA expansion, no causal mask: all sit at the last
            # position), and padding is an additive mask. ~8x faster than SDPA's GQA path at decode.
            B, Lm = meta.dec_ctx.shape
            flat = meta.dec_ctx.view(-1)
            qd = q[meta.dec_rows].view(B, K, H // K, d)
            kd = kc.view(-1, K * d).index_select(0, flat).view(B, Lm, K, d).transpose(1, 2)  # [B, K, Lm, d]
            vd = vc.view(-1, K * d).index_select(0, flat).view(B, Lm, K, d).transpose(1, 2)
            o = Fn.scaled_dot_product_attention(qd, kd, vd, attn_mask=meta.dec_bias(x.dtype))
            out[meta.dec_rows] = o.reshape(B, H, d)
        for pf in meta.prefills:
            qp = q[pf.start : pf.end].transpose(0, 1)[None]  # [1, H, n, d]
            if pf.mask is None:  # the context is exactly the new tokens: no gather from the cache
                kp, vp = k[pf.start : pf.end], v[pf.start : pf.end]
            else:
                kp, vp = kc.index_select(0, pf.ctx), vc.index_select(0, pf.ctx)
            kp, vp = kp.transpose(0, 1)[None], vp.transpose(0, 1)[None]  # [1, K, L, d]
            o = Fn.scaled_dot_product_attention(
                qp, kp, vp, attn_mask=pf.mask, is_causal=pf.mask is None, enable_gqa=K != H
            )
            out[pf.start : pf.end] = o[0].transpose(0, 1)
        return linear(out.view(T, H * d), self.lin[(l, "o")])

    def forward(
        self, ids: torch.Tensor, meta: AttnMeta, kv: KVPool, logit_rows: torch.Tensor | None = None
    ) -> Generator[ExpertRequest, dict[int, torch.Tensor], torch.Tensor]:
        """ids [T] -> logits [len(logit_rows), V] (all rows when None), float32.

        Yields one ExpertRequest per layer and expects the experts' outputs sent back.
        """
        c = self.cfg
        cos, sin = rope_cos_sin(meta.positions, c.head_dim, c.rope_theta, self.dtype)
        h = Fn.embedding(ids, self.w["model.embed_tokens.weight"])
        for l in range(c.num_hidden_layers):
            p = f"model.layers.{l}."
            x = rms_norm(h, self.w[p + "input_layernorm.weight"], c.rms_norm_eps)
            h = h + self.attention(l, x, meta, kv, cos, sin)
            x = rms_norm(h, self.w[p + "post_attention_layernorm.weight"], c.rms_norm_eps)
            w, e = route(Fn.linear(x, self.w[p + "block_sparse_moe.gate.weight"]), c.num_experts_per_tok)
            plan = plan_dispatch(w, e, c.num_local_experts)
            outputs = yield ExpertRequest(l, {i: x[r] for i, r in plan.rows.items()})
            h = h + combine(x, plan, outputs)
        if logit_rows is not None:
            h = h[logit_rows]
        h = rms_norm(h, self.w["model.norm.weight"], c.rms_norm_eps)
        return linear(h, self.lin["lm_head"]).float()


class LocalExperts:
    """Experts held in this process: (layer, expert) -> (w1, w2, w3)."""

    def __init__(self, cfg: MixtralConfig, weights: dict[str, torch.Tensor]):
        self.experts: dict[tuple[int, int], ExpertFFN] = {}
        for name in weights:
            if name.endswith(".w1.weight"):
                p = name[: -len("w1.weight")]
                parts = p.split(".")
                l, e = int(parts[2]), int(parts[5])
                self.experts[(l, e)] = ExpertFFN(
                    weights[p + "w1.weight"], weights[p + "w2.weight"], weights[p + "w3.weight"]
                )

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, pairs, dtype="auto") -> LocalExperts:
        return cls(ckpt.config, ckpt.load_experts(pairs, dtype).tensors)

    def __call__(self, req: ExpertRequest) -> dict[int, torch.Tensor]:
        return {e: self.experts[(req.layer, e)](x) for e, x in req.batches.items()}


def run_local(gen: Generator, experts) -> torch.Tensor:
    """Drive a forward generator with experts called in-process; returns the logits."""
    try:
        req = next(gen)
        while True:
            req = gen.send(experts(req))
    except StopIteration as stop:
        return stop.value


class Transformer:
    """The whole model in one process, for standalone use and tests: logits of a token sequence."""

    def __init__(self, dense: MixtralDense, experts: LocalExperts):
        self.dense, self.experts, self.cfg = dense, experts, dense.cfg

    @classmethod
    def from_pretrained(cls, path, dtype="auto") -> Transformer:
        from .checkpoint import all_expert_pairs

        ckpt = Checkpoint(path)
        ckpt.check_names()
        return cls(
            MixtralDense.from_checkpoint(ckpt, dtype),
            LocalExperts.from_checkpoint(ckpt, all_expert_pairs(ckpt.config), dtype),
        )

    @torch.inference_mode()
    def logits(self, ids: list[int]) -> torch.Tensor:
        """[T] token ids -> [T, V] float32 logits, a full (uncached) forward."""
        kv = KVPool(self.cfg, len(ids), self.dense.dtype)
        meta = build_attn_meta([(list(range(len(ids))), len(ids))], self.cfg.sliding_window)
        return run_local(self.dense.forward(torch.tensor(ids), meta, kv), self.experts)

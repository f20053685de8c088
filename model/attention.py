"""Attention over a paged KV cache: where each token of a step sits (`AttnMeta`, built once per
step and shared by every layer), the flat KV storage (`KVPool`; which slots belong to which sequence
is router/kv_cache.py's business), and the attention itself given projected q, k, v.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as Fn

from .config import MixtralConfig

HOST = torch.device("cpu")  # where per-step metadata is built from Python lists


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
            self._bias[dtype] = torch.zeros(self.dec_mask.shape, dtype=dtype, device=self.dec_mask.device).masked_fill_(
                ~self.dec_mask, float("-inf")
            )
        return self._bias[dtype]

    def to(self, device: torch.device | str) -> AttnMeta:
        """The same metadata on `device` (built on the host, moved once per step: one copy per tensor,
        asynchronous from pinned memory on CUDA); itself when it is there already."""
        device = torch.device(device)
        if self.positions.device == device:
            return self

        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            return (t.pin_memory() if device.type == "cuda" else t).to(device, non_blocking=True)

        return AttnMeta(
            mv(self.positions),
            mv(self.slots),
            mv(self.dec_rows),
            mv(self.dec_ctx),
            mv(self.dec_mask),
            [PrefillPiece(p.start, p.end, mv(p.ctx), mv(p.mask)) for p in self.prefills],
        )

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])


def build_attn_meta(seqs: list[tuple[list[int], int]], window: int | None = None) -> AttnMeta:
    """seqs: per sequence (context slots including the new tokens, number of new tokens), in row order.

    The new tokens are the last n of each context; their positions are L-n .. L-1. Built on the host
    (`AttnMeta.to` moves it to the model's device).
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
                q = torch.arange(L - n, L, device=HOST)[:, None]
                kpos = torch.arange(L, device=HOST)[None, :]
                m = kpos <= q
                if window is not None:
                    m &= q - kpos < window
                mask = m[None, None]
            prefills.append(PrefillPiece(row, row + n, torch.tensor(ctx, device=HOST), mask))
        row += n
    meta = AttnMeta(
        torch.tensor(positions, dtype=torch.long, device=HOST),
        torch.tensor(slots, dtype=torch.long, device=HOST),
        None,
        None,
        None,
        prefills,
    )
    if dec_rows:
        Lmax = max(len(c) for c in dec_ctx)
        ctx_t = torch.tensor([c + [0] * (Lmax - len(c)) for c in dec_ctx], dtype=torch.long, device=HOST)  # one tensor
        lens = torch.tensor([len(c) for c in dec_ctx], device=HOST)
        kpos = torch.arange(Lmax, device=HOST)[None, :]
        m = kpos < lens[:, None]
        if window is not None:
            m &= (lens[:, None] - 1) - kpos < window
        meta.dec_rows, meta.dec_ctx, meta.dec_mask = torch.tensor(dec_rows, device=HOST), ctx_t, m[:, None, None, :]
    return meta


class KVPool:
    """Flat KV storage: per layer k, v [S, K, d]. Slot bookkeeping lives with the scheduler."""

    def __init__(self, cfg: MixtralConfig, num_slots: int, dtype: torch.dtype, device: torch.device | str = "cpu"):
        shape = (cfg.num_hidden_layers, num_slots, cfg.num_key_value_heads, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_slots = num_slots
        self.device = self.k.device

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def copy_slots(self, src: list[int], dst: list[int]) -> None:
        """Every layer's K/V at slots `src` written to slots `dst` (a forked sequence's prompt)."""
        s = torch.tensor(src, dtype=torch.long, device=self.device)
        d = torch.tensor(dst, dtype=torch.long, device=self.device)
        self.k[:, d] = self.k[:, s]
        self.v[:, d] = self.v[:, s]


def paged_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, meta: AttnMeta
) -> torch.Tensor:
    """One layer's attention for a step: q [T, H, d], k, v [T, K, d] (rotary applied) -> [T, H, d].

    The new k, v are written to the layer's cache (kc, vc [S, K, d]) at `meta.slots` first. Decode
    rows (one new token each) and prefill pieces (several) are computed separately."""
    T, H, d = q.shape
    K = k.shape[1]
    kc[meta.slots] = k
    vc[meta.slots] = v
    dec = None
    if meta.dec_rows is not None:
        # One query per sequence: the H // K query heads that share a KV head become H // K query
        # rows against that head's keys (no GQA expansion, no causal mask: all sit at the last
        # position), and padding is an additive mask. ~8x faster than SDPA's GQA path at decode.
        B, Lm = meta.dec_ctx.shape
        flat = meta.dec_ctx.view(-1)
        qd = q[meta.dec_rows].view(B, K, H // K, d)
        kd = kc.view(-1, K * d).index_select(0, flat).view(B, Lm, K, d).transpose(1, 2)  # [B, K, Lm, d]
        vd = vc.view(-1, K * d).index_select(0, flat).view(B, Lm, K, d).transpose(1, 2)
        dec = Fn.scaled_dot_product_attention(qd, kd, vd, attn_mask=meta.dec_bias(q.dtype)).reshape(B, H, d)
        if not meta.prefills:  # every row decodes, in row order: the output as it is
            return dec
    out = q.new_empty(T, H, d)
    if dec is not None:
        out[meta.dec_rows] = dec
    for pf in meta.prefills:
        qp = q[pf.start : pf.end].transpose(0, 1)[None]  # [1, H, n, d]
        if pf.mask is None:  # the context is exactly the new tokens: no gather from the cache
            kp, vp = k[pf.start : pf.end], v[pf.start : pf.end]
        else:
            kp, vp = kc.index_select(0, pf.ctx), vc.index_select(0, pf.ctx)
        kp, vp = kp.transpose(0, 1)[None], vp.transpose(0, 1)[None]  # [1, K, L, d]
        o = Fn.scaled_dot_product_attention(qp, kp, vp, attn_mask=pf.mask, is_causal=pf.mask is None, enable_gqa=K != H)
        out[pf.start : pf.end] = o[0].transpose(0, 1)
    return out

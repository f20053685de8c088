"""The Mixtral model: the dense path (embeddings, attention, norms, router gates, LM head) as one
forward over a KV cache, and the whole model in one process.

Shape legend: T = tokens in a step (all sequences, flattened), D = hidden, H = query heads,
K = KV heads, d = head dim, E = experts, k = experts per token, F = expert FFN width,
S = KV-cache slots, B = sequences, L = context length of a sequence.

Decoder layer: h = x + attn(rmsnorm(x)); x = h + moe(rmsnorm(h)).

The MoE half of each layer is written as a generator step: `forward` yields one `MoEInput` per
layer (the normed rows and their top-k experts and weights) and is sent back the layer's MoE output.
Whoever drives the generator decides where experts live: `run_local` computes it with in-process
experts, the engine in router/ dispatches the rows grouped by expert to remote ones and combines
their outputs, overlapping several micro-batches. The model never knows which.

The other files of model/: kernels.py (norms, rotary, the linear kernel and weight packing),
attention.py (attention metadata, the KV pool, paged attention), moe.py (router, expert FFN,
in-process experts), checkpoint.py, config.py, sampling.py, tokenizer.py.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass

import torch
import torch.nn.functional as Fn

from .attention import AttnMeta, KVPool, build_attn_meta, paged_attention
from .checkpoint import Checkpoint
from .config import MixtralConfig
from .kernels import PackedWeight, apply_rope, linear, prepare_weight, rms_norm, rope_cos_sin, weight_nbytes
from .moe import LocalExperts, MoEInput, route, run_local

Weight = torch.Tensor | PackedWeight


@dataclass
class LayerWeights:
    """One decoder layer's dense weights, in the form the forward uses them."""

    input_norm: torch.Tensor  # [D]
    qkv: Weight  # q, k and v fused: [(H + 2K) d, D], one matmul
    o: Weight  # [D, H d]
    post_norm: torch.Tensor  # [D]
    gate: torch.Tensor  # router [E, D]


@dataclass
class DenseWeights:
    embed: torch.Tensor  # [V, D]
    layers: list[LayerWeights]
    norm: torch.Tensor  # [D]
    lm_head: Weight  # [V, D] (the embedding when tied)

    def tensors(self):
        yield from (self.embed, self.norm, self.lm_head)
        for lw in self.layers:
            yield from (lw.input_norm, lw.qkv, lw.o, lw.post_norm, lw.gate)


class MixtralDense:
    """Everything but the experts. Built from the checkpoint's tensors by name once; the forward
    reads typed per-layer fields."""

    def __init__(self, cfg: MixtralConfig, weights: dict[str, torch.Tensor]):
        self.cfg = cfg
        w = dict(weights)
        self.dtype = w["model.embed_tokens.weight"].dtype
        self.device = w["model.embed_tokens.weight"].device  # where the weights were loaded: every step's tensors
        layers = []
        for l in range(cfg.num_hidden_layers):
            p = f"model.layers.{l}."
            a = p + "self_attn."
            layers.append(
                LayerWeights(
                    input_norm=w.pop(p + "input_layernorm.weight"),
                    qkv=prepare_weight(torch.cat([w.pop(a + n + "_proj.weight") for n in "qkv"])),
                    o=prepare_weight(w.pop(a + "o_proj.weight")),
                    post_norm=w.pop(p + "post_attention_layernorm.weight"),
                    gate=w.pop(p + "block_sparse_moe.gate.weight"),
                )
            )
        embed = w.pop("model.embed_tokens.weight")
        head = w.pop("lm_head.weight", None)
        self.w = DenseWeights(
            embed, layers, w.pop("model.norm.weight"), prepare_weight(head if head is not None else embed)
        )

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, dtype="auto", device: torch.device | str = "cpu") -> MixtralDense:
        return cls(ckpt.config, ckpt.load_dense(dtype, device).tensors)

    def nbytes(self) -> int:
        seen, total = set(), 0
        for t in self.w.tensors():
            if id(t) not in seen:
                seen.add(id(t))
                total += weight_nbytes(t)
        return total

    def attention(
        self, lw: LayerWeights, l: int, x: torch.Tensor, meta: AttnMeta, kv: KVPool, cos, sin
    ) -> torch.Tensor:
        c = self.cfg
        T, H, K, d = x.shape[0], c.num_attention_heads, c.num_key_value_heads, c.head_dim
        qkv = linear(x, lw.qkv)
        qk = apply_rope(qkv[:, : (H + K) * d].view(T, H + K, d), cos, sin)  # q's and k's heads at once
        q, k = qk[:, :H], qk[:, H:]
        v = qkv[:, (H + K) * d :].view(T, K, d)
        out = paged_attention(q, k, v, kv.k[l], kv.v[l], meta)
        return linear(out.view(T, H * d), lw.o)

    def forward(
        self,
        ids: torch.Tensor,
        meta: AttnMeta,
        kv: KVPool,
        logit_rows: torch.Tensor | None = None,
        routes: list | None = None,
    ) -> Generator[MoEInput, torch.Tensor, torch.Tensor]:
        """ids [T] -> logits [len(logit_rows), V] (all rows when None), float32.

        Yields one MoEInput per layer and expects that layer's MoE output [T, D] sent back. With a
        `routes` list, each layer's chosen experts [T, k] are appended to it (routed experts
        returned to clients); without one nothing is kept.
        """
        c, w = self.cfg, self.w
        cos, sin = rope_cos_sin(meta.positions, c.head_dim, c.rope_theta, self.dtype)
        h = Fn.embedding(ids, w.embed)
        for l, lw in enumerate(w.layers):
            x = rms_norm(h, lw.input_norm, c.rms_norm_eps)
            h = h + self.attention(lw, l, x, meta, kv, cos, sin)
            x = rms_norm(h, lw.post_norm, c.rms_norm_eps)
            gw, e = route(Fn.linear(x, lw.gate), c.num_experts_per_tok)
            if routes is not None:
                routes.append(e)
            h = h + (yield MoEInput(l, x, gw, e))
        if logit_rows is not None:
            h = h[logit_rows]
        h = rms_norm(h, w.norm, c.rms_norm_eps)
        return linear(h, w.lm_head).float()


class Transformer:
    """The whole model in one process, for standalone use and tests: logits of a token sequence."""

    def __init__(self, dense: MixtralDense, experts: LocalExperts):
        self.dense, self.experts, self.cfg = dense, experts, dense.cfg

    @classmethod
    def from_pretrained(cls, path, dtype="auto", device: torch.device | str = "cpu") -> Transformer:
        from .checkpoint import all_expert_pairs

        ckpt = Checkpoint(path)
        ckpt.check_names()
        return cls(
            MixtralDense.from_checkpoint(ckpt, dtype, device),
            LocalExperts.from_checkpoint(ckpt, all_expert_pairs(ckpt.config), dtype, device),
        )

    @torch.inference_mode()
    def logits(self, ids: list[int]) -> torch.Tensor:
        """[T] token ids -> [T, V] float32 logits, a full (uncached) forward."""
        dev = self.dense.device
        kv = KVPool(self.cfg, len(ids), self.dense.dtype, dev)
        meta = build_attn_meta([(list(range(len(ids))), len(ids))], self.cfg.sliding_window).to(dev)
        return run_local(self.dense.forward(torch.tensor(ids, device=dev), meta, kv), self.experts)

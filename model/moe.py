"""The mixture-of-experts half of a layer: the router (top-k gate), one expert's FFN as workers run it,
and experts held in this process (`LocalExperts`: the reference MoE, `run_local`) for standalone use
and tests. Dispatching a layer's rows to remote experts and combining their outputs is the attention
side's (router/dispatch.py).
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass

import torch
import torch.nn.functional as Fn

from .checkpoint import Checkpoint
from .config import MixtralConfig
from .kernels import PackedWeight, gated_silu, linear, prepare_weight, weight_nbytes


def route(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Router: logits [T, E] -> (weights [T, k] float32, expert ids [T, k]).

    softmax over all experts in float32, keep the top-k, renormalise them to sum to 1. This equals
    mistral-inference's softmax over the top-k logits: softmax(z)_i / sum_topk softmax(z)_j
    = exp(z_i) / sum_topk exp(z_j).
    """
    probs = torch.softmax(logits.float(), dim=-1)
    w, ids = torch.topk(probs, top_k, dim=-1)
    return w / w.sum(dim=-1, keepdim=True), ids


class ExpertFFN:
    """One expert's SwiGLU as it runs in a worker, in the fastest form here: with packed weights (CPU,
    bf16/fp16) w1 and w3 packed apart and the gate's silu and product fused into their matmuls
    (`gated_silu`); otherwise w1 and w3 fused into one [2F, D] matrix (one matmul instead of two).
    Same math as `swiglu`."""

    __slots__ = ("w13", "w1", "w3", "w2", "F")

    def __init__(self, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor):
        self.F = int(w1.shape[0])
        self.w2 = prepare_weight(w2)
        if type(self.w2) is PackedWeight:
            self.w13, self.w1, self.w3 = None, prepare_weight(w1), prepare_weight(w3)
        else:
            self.w13, self.w1, self.w3 = prepare_weight(torch.cat([w1, w3])), None, None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.w13 is None:
            n = x.shape[0]
            if n == 0:
                return x.new_empty(0, self.w2.shape[0])
            return linear(gated_silu(x, self.w1, self.w3), self.w2)[:n]
        h = linear(x, self.w13)
        return linear(Fn.silu(h[:, : self.F]) * h[:, self.F :], self.w2)

    def tensors(self) -> list:
        return [w for w in (self.w13, self.w1, self.w3, self.w2) if w is not None]

    @property
    def nbytes(self) -> int:
        return sum(weight_nbytes(w) for w in self.tensors())


@dataclass
class MoEInput:
    """One layer's MoE input as the router left it: the normed hidden rows and each one's top-k
    experts with their weights. Whoever drives the forward turns it into the layer's MoE output
    [T, D]: `LocalExperts` here (the reference), dispatch -> experts -> combine in router/."""

    layer: int
    x: torch.Tensor  # [T, D]
    weights: torch.Tensor  # [T, k] float32, each row summing to 1
    experts: torch.Tensor  # [T, k] expert ids


class LocalExperts:
    """Expert FFNs held in this process, (layer, expert) -> ExpertFFN: how every holder of experts keeps
    them (the whole model here, an expert worker its group)."""

    def __init__(self, cfg: MixtralConfig, weights: dict[str, torch.Tensor]):
        """Takes the experts' tensors out of `weights` as it fuses them, so that the unfused copies
        are freed one expert at a time (loading peaks at one expert beyond the loaded weights)."""
        self.experts: dict[tuple[int, int], ExpertFFN] = {}
        for name in [n for n in weights if n.endswith(".w1.weight")]:
            p = name[: -len("w1.weight")]
            parts = p.split(".")
            l, e = int(parts[2]), int(parts[5])
            self.experts[(l, e)] = ExpertFFN(*(weights.pop(f"{p}{w}.weight") for w in ("w1", "w2", "w3")))

    def nbytes(self) -> int:
        return sum(f.nbytes for f in self.experts.values())

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, pairs, dtype="auto", device: torch.device | str = "cpu") -> LocalExperts:
        return cls(ckpt.config, ckpt.load_experts(pairs, dtype, device).tensors)

    def __call__(self, m: MoEInput) -> torch.Tensor:
        """The reference MoE: each chosen expert on the rows that chose it, their outputs weighted and
        summed per row (experts in ascending order, as the dispatch in router/ combines them)."""
        out = torch.zeros_like(m.x)
        for e in torch.unique(m.experts).tolist():
            rows, slot = (m.experts == e).nonzero(as_tuple=True)
            y = self.experts[(m.layer, e)](m.x[rows])
            out.index_add_(0, rows, (y * m.weights[rows, slot, None]).to(out.dtype))
        return out


def run_local(gen: Generator, experts) -> torch.Tensor:
    """Drive a forward generator with the MoE computed in-process by `experts`; returns the logits."""
    try:
        req = next(gen)
        while True:
            req = gen.send(experts(req))
    except StopIteration as stop:
        return stop.value

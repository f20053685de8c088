"""The mixture-of-experts half of a layer: the router, one expert's FFN as workers run it, the
dispatch of a layer's tokens grouped by expert and the weighted combine of the experts' outputs,
and experts held in this process (`LocalExperts`, `run_local`) for standalone use and tests.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass

import torch
import torch.nn.functional as Fn

from .checkpoint import Checkpoint
from .config import MixtralConfig
from .kernels import linear, prepare_weight, weight_nbytes


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

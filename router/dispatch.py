"""Dispatch and combine: a layer's MoE input grouped by expert for the expert workers, and their
outputs weighted back into the layer's MoE output.

    MoEInput (rows, top-k experts, weights) -> plan_dispatch: one sort groups (row, slot) pairs by expert
        -> ExpertRequest {expert: contiguous [n_e, D]} (experts with no rows are left out) -> experts
        -> combine: out.index_add_(0, rows_e, y_e * w_e), in x's dtype -> the layer's MoE output [T, D]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.moe import MoEInput


@dataclass
class ExpertRequest:
    """One layer's token batches for the experts that have tokens: what goes to the expert workers."""

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


def dispatch(m: MoEInput, num_experts: int) -> tuple[ExpertRequest, DispatchPlan]:
    """A layer's MoE input as the request its experts are sent, and the plan that combines their outputs."""
    plan = plan_dispatch(m.weights, m.experts, num_experts)
    return ExpertRequest(m.layer, {e: m.x[r] for e, r in plan.rows.items()}), plan


def combine(x: torch.Tensor, plan: DispatchPlan, outputs: dict[int, torch.Tensor]) -> torch.Tensor:
    """out[t] = sum_e w[t, e] * y_e[t], accumulated in x's dtype."""
    out = torch.zeros_like(x)
    for e, rows in plan.rows.items():
        y = outputs[e].to(x.device, non_blocking=True)  # a no-op where the backend answered on x's device
        out.index_add_(0, rows, (y * plan.weights[e]).to(out.dtype))
    return out

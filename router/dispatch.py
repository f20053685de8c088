"""Dispatch and combine: a layer's MoE input grouped by expert for the expert workers, and their
outputs weighted back into the layer's MoE output.

    MoEInput (rows, top-k experts, weights) -> plan_dispatch: one sort groups (row, slot) pairs by expert
        -> ExpertRequest {expert: contiguous [n_e, D]} (experts with no rows are left out; one gather,
           each expert's batch a slice of it) -> experts
        -> combine: out.index_add_(0, rows, y * w) over all experts at once (experts in increasing
           order), in x's dtype -> the layer's MoE output [T, D]

Per layer that is a handful of tensor ops whatever the number of experts with rows (per expert, a
gather and four ops of the combine before: at 16 tokens 50 + 45 us -> 35 + 14 us, at 64 tokens
66 + 53 -> 40 + 24 us, `mini`'s width, one thread, 2-core EPYC). The outputs are the per-expert
loop's to the bit (tested): index_add_ adds in index order, and where one call would round a
bf16/fp16 row differently from a loop over the experts (more than two experts per token) the loop
stays.

A one-token batch (each decode step at concurrency 1) skips the sort and the scatter: its plan is its
expert ids read once, every expert's batch is the token's row, and the combine is the same sum in the
same order (`_one_token_plan`; the same output to the bit). The general path costs ~20 + 12 us per
layer there in small tensor ops, the one-token path ~5 + 6 (`mini`'s width, one thread, 2-core EPYC).
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
    one_token: bool = False  # one token's distinct experts, each on row 0 (_one_token_plan)
    tok: torch.Tensor | None = None  # every expert's rows, experts in increasing order [sum n_e]
    wsorted: torch.Tensor | None = None  # their weights [sum n_e, 1]: `rows` and `weights` are views of these
    k: int = 0  # experts per token


_ROW0: dict[torch.device, torch.Tensor] = {}  # tensor([0]) per device: the rows of a one-token batch


def _one_token_plan(w: torch.Tensor, ids: torch.Tensor, num_experts: int) -> DispatchPlan | None:
    """The plan of a one-token batch (every decode step at concurrency 1) in one read of its expert
    ids and views, where the general plan runs a dozen small tensor ops: each is microseconds, and
    this runs for every layer of every step. None where its experts repeat (the general plan groups them)."""
    es = ids[0].tolist()
    if len(set(es)) != len(es) or not all(0 <= e < num_experts for e in es):
        return None
    row0 = _ROW0.get(ids.device)
    if row0 is None:
        row0 = _ROW0[ids.device] = torch.zeros(1, dtype=torch.long, device=ids.device)
    rows, weights = {}, {}
    for e, j in sorted((e, j) for j, e in enumerate(es)):  # experts in increasing order, as the sort gives them
        rows[e] = row0
        weights[e] = w[:, j : j + 1]
    return DispatchPlan(rows, weights, one_token=True)


def plan_dispatch(w: torch.Tensor, ids: torch.Tensor, num_experts: int) -> DispatchPlan:
    """Group (token, slot) pairs by expert with one sort; experts with no tokens are left out."""
    if ids.shape[0] == 1:
        plan = _one_token_plan(w, ids, num_experts)
        if plan is not None:
            return plan
    k = ids.shape[1]
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    tok = order // k
    wsorted = w.reshape(-1)[order][:, None]
    rows, weights, start = {}, {}, 0
    for e, n in enumerate(counts):
        if n:
            rows[e] = tok[start : start + n]
            weights[e] = wsorted[start : start + n]
        start += n
    return DispatchPlan(rows, weights, tok=tok, wsorted=wsorted, k=k)


def dispatch(m: MoEInput, num_experts: int) -> tuple[ExpertRequest, DispatchPlan]:
    """A layer's MoE input as the request its experts are sent, and the plan that combines their outputs."""
    plan = plan_dispatch(m.weights, m.experts, num_experts)
    if plan.one_token:  # every expert's batch is the token's row, as it is (the wire copies it)
        return ExpertRequest(m.layer, dict.fromkeys(plan.rows, m.x)), plan
    # one gather for every expert's rows, each expert's batch a slice of it (contiguous)
    xs = m.x.index_select(0, plan.tok)
    batches, start = {}, 0
    for e, r in plan.rows.items():
        n = r.shape[0]
        batches[e] = xs[start : start + n]
        start += n
    return ExpertRequest(m.layer, batches), plan


def _weighted(y: torch.Tensor, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`(y * w).to(dtype)` bit for bit, for expert outputs y [n, D] and router weights w [n, 1] (float32):
    y converted to w's dtype first, then multiplied in place. The mixed-dtype product goes through
    TensorIterator's casting path: a bf16 [2048, D=512] times a float32 [2048, 1] took 2.4 ms (8% of
    a 1024-token prefill step of the in-process engine), converting and multiplying ~0.5 ms. The
    conversion is exact, so the float32 products, and their rounding to `dtype`, are the same."""
    if y.dtype != w.dtype and torch.promote_types(y.dtype, w.dtype) == w.dtype:
        y = y.to(w.dtype).mul_(w)
    else:
        y = y * w
    return y if y.dtype == dtype else y.to(dtype)


def combine(x: torch.Tensor, plan: DispatchPlan, outputs: dict[int, torch.Tensor]) -> torch.Tensor:
    """out[t] = sum_e w[t, e] * y_e[t], accumulated in x's dtype, experts in increasing order."""
    if plan.one_token:  # the same sum in the same order, without the zeros and the scatter
        out = None
        for e in plan.rows:
            y = outputs[e]
            if y.device != x.device:
                y = y.to(x.device, non_blocking=True)
            y = _weighted(y, plan.weights[e], x.dtype)
            out = y if out is None else out + y
        return out if out is not None else torch.zeros_like(x)
    out = torch.zeros_like(x)
    # All experts' outputs in one weighting and one scatter where that sums as the loop over the
    # experts does: on the CPU index_add_ adds in index order (experts in increasing order), but it
    # accumulates a bf16/fp16 row in float32 within one call, so past two experts per token the loop
    # stays; on CUDA its atomic adds would sum one row's experts in any order, so the loop stays too.
    if plan.rows and x.device.type == "cpu" and (plan.k <= 2 or x.dtype in (torch.float32, torch.float64)):
        ys = [outputs[e].to(x.device, non_blocking=True) for e in plan.rows]  # no-ops where on x's device
        y = ys[0] if len(ys) == 1 else torch.cat(ys)
        return out.index_add_(0, plan.tok, _weighted(y, plan.wsorted, out.dtype))
    for e, rows in plan.rows.items():
        y = outputs[e].to(x.device, non_blocking=True)  # a no-op where the backend answered on x's device
        out.index_add_(0, rows, _weighted(y, plan.weights[e], out.dtype))
    return out

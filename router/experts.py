"""Expert backends: where a layer's grouped token batches go and how their outputs come back.

    [Router] -> [Dispatch] -> [ExpertBackend.submit] ... [future.result()] -> [Combine]

The engine only sees `submit(ExpertRequest) -> future` and `future.result() -> {expert: [n_e, D]}`.
`InProcessExperts` runs the experts in this process (unit tests, `generate --local`, the baseline the
disaggregated engine is measured against); the Ray backend in cluster/ sends them to remote workers.
"""

from __future__ import annotations

from typing import Protocol

import torch

from workers.expert import ExpertWorker

from .dispatch import ExpertRequest


class ExpertUnavailable(RuntimeError):
    """An expert call failed on every try; the requests of that step fail with this."""


class ExpertFuture(Protocol):
    def result(self) -> dict[int, torch.Tensor]: ...


class ExpertBackend(Protocol):
    def submit(self, req: ExpertRequest) -> ExpertFuture: ...


class Done:
    """An already-computed result."""

    def __init__(self, value: dict[int, torch.Tensor]):
        self.value = value

    def result(self) -> dict[int, torch.Tensor]:
        return self.value


def expert_groups(num_experts: int, experts_per_worker: int) -> list[list[int]]:
    """Physical placement: worker g holds experts [g*n, (g+1)*n)."""
    if experts_per_worker < 1:
        raise ValueError("experts_per_worker must be >= 1")
    return [list(range(s, min(s + experts_per_worker, num_experts))) for s in range(0, num_experts, experts_per_worker)]


def expert_map(groups: list[list[int]]) -> dict[int, int]:
    """expert id -> the index of the group that holds it."""
    return {e: g for g, es in enumerate(groups) for e in es}


def split_by_group(batches: dict[int, torch.Tensor], expert_map: dict[int, int]) -> dict[int, dict[int, torch.Tensor]]:
    """{expert: x} -> {group: {expert: x}}; only groups with tokens appear."""
    out: dict[int, dict[int, torch.Tensor]] = {}
    for e, x in batches.items():
        out.setdefault(expert_map[e], {})[e] = x
    return out


class InProcessExperts:
    """One expert worker per group, all in this process; calls complete on submit."""

    def __init__(self, model_dir: str, groups: list[list[int]], dtype: str = "auto", device: str = "cpu"):
        self.groups = groups
        self.workers = [ExpertWorker(model_dir, g, dtype, device=device) for g in groups]
        self.expert_map = expert_map(groups)

    def submit(self, req: ExpertRequest) -> Done:
        out: dict[int, torch.Tensor] = {}
        for g, part in split_by_group(req.batches, self.expert_map).items():
            out.update(self.workers[g].run(req.layer, part))
        return Done(out)

    def weight_bytes(self) -> int:
        return sum(w.weight_bytes() for w in self.workers)

"""Sampling: greedy, temperature, top-k, top-p, per-request seed; stop tokens and strings.

Rows are filtered together (one sort per step); each sampled row draws from its own
`torch.Generator`, so a seeded request gives the same tokens whatever else is in its batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

MAX_STOP_STRINGS = 16


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # top alternatives to return per token (0 = only the chosen one)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens} must be >= 1")
        if not 0.0 <= self.temperature <= 2.0 or self.temperature != self.temperature:
            raise ValueError(f"temperature={self.temperature} must be in [0, 2]")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 disables it)")
        if len(self.stop) > MAX_STOP_STRINGS or any(not s for s in self.stop):
            raise ValueError(f"stop: at most {MAX_STOP_STRINGS} non-empty strings")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs={self.logprobs} must be in [0, 20]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


def make_generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))
    return g


def sample(logits: torch.Tensor, params: list[SamplingParams], gens: list[torch.Generator]) -> torch.Tensor:
    """logits [B, V] float32 -> token ids [B]."""
    out = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return out
    x = logits[rows] / torch.tensor([params[i].temperature for i in rows])[:, None]
    V = x.shape[-1]
    top_k = torch.tensor([params[i].top_k or V for i in rows])
    top_p = torch.tensor([params[i].top_p for i in rows])
    sx, si = torch.sort(x, dim=-1, descending=True)
    rank = torch.arange(V)[None, :]
    drop = rank >= top_k[:, None]
    probs = torch.softmax(sx.masked_fill(drop, float("-inf")), dim=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    drop |= (probs.cumsum(-1) - probs) >= top_p[:, None]
    probs = torch.softmax(sx.masked_fill(drop, float("-inf")), dim=-1)
    for j, i in enumerate(rows):
        pick = torch.multinomial(probs[j], 1, generator=gens[i])
        out[i] = si[j, pick[0]]
    return out


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> list[tuple[float, list[tuple[int, float]]]]:
    """Per row: (logprob of the chosen token, top alternatives [(id, logprob)])."""
    lp = torch.log_softmax(logits, dim=-1)
    chosen = lp.gather(1, tokens[:, None])[:, 0].tolist()
    if top:
        v, i = lp.topk(top, dim=-1)
        alts = [list(zip(ii, vv)) for ii, vv in zip(i.tolist(), v.tolist())]
    else:
        alts = [[] for _ in chosen]
    return list(zip(chosen, alts))


def find_stop(text: str, stops: list[str], start: int) -> int:
    """Index in text where the earliest stop string begins, searching from `start`; -1 if none."""
    best = -1
    for s in stops:
        i = text.find(s, max(0, start - len(s) + 1))
        if i != -1 and (best == -1 or i < best):
            best = i
    return best

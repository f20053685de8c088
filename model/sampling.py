"""Sampling: greedy, temperature, top-k, top-p, per-request seed; stop tokens and strings.

Rows are filtered together (one sort per step); each sampled row draws from its own
`torch.Generator`, so a seeded request gives the same tokens whatever else is in its batch.

Every value a client can send is checked and normalised here, once, when the request is made
(`SamplingParams.__post_init__`, then `for_vocab` when the engine adds it), so that nothing a single
request carries can make the batched step raise: a temperature below `GREEDY_EPS` is greedy (vLLM's
rule; dividing by 1e-300 in float32 is a division by zero), `top_k` is clipped to the vocabulary,
seeds are 64-bit, and a row whose logits are not finite fails only its own sequence (`bad_rows`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

MAX_STOP_STRINGS = 16
GREEDY_EPS = 1e-5  # temperatures below this are greedy (vLLM's _SAMPLING_EPS)
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed takes
MAX_TOKENS_LIMIT = 2**31 - 1


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
        self.stop, self.stop_token_ids = list(self.stop), list(self.stop_token_ids)
        if not 1 <= self.max_tokens <= MAX_TOKENS_LIMIT:
            raise ValueError(f"max_tokens={self.max_tokens} must be in [1, {MAX_TOKENS_LIMIT}]")
        if not 0.0 <= self.temperature <= 2.0:  # also false for NaN
            raise ValueError(f"temperature={self.temperature} must be in [0, 2]")
        if self.temperature < GREEDY_EPS:
            self.temperature = 0.0
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k < -1:
            raise ValueError(f"top_k={self.top_k} must be >= -1 (0 or -1 disables it)")
        self.top_k = max(self.top_k, 0)
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX:
            raise ValueError(f"seed must be in [{SEED_MIN}, {SEED_MAX}]")
        if len(self.stop) > MAX_STOP_STRINGS or any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop: at most {MAX_STOP_STRINGS} non-empty strings")
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError("stop_token_ids must be >= 0")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs={self.logprobs} must be in [0, 20]")

    def for_vocab(self, vocab_size: int) -> "SamplingParams":
        """Checked against the model: stop token ids inside the vocabulary, top_k clipped to it."""
        if any(t >= vocab_size for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be in [0, {vocab_size})")
        if self.top_k >= vocab_size:
            self.top_k = 0  # keeping every token is no filter
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


def make_generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))
    return g


def sample(logits: torch.Tensor, params: list[SamplingParams], gens: list[torch.Generator]) -> torch.Tensor:
    """logits [B, V] float32 -> token ids [B]. Rows listed by `bad_rows` give meaningless ids: the
    engine fails those sequences before it looks at their tokens."""
    out = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return out
    x = logits[rows] / torch.tensor([params[i].temperature for i in rows], dtype=logits.dtype)[:, None]
    V = x.shape[-1]
    top_k = torch.tensor([min(params[i].top_k, V) or V for i in rows])
    top_p = torch.tensor([params[i].top_p for i in rows], dtype=logits.dtype)
    sx, si = torch.sort(x, dim=-1, descending=True)
    rank = torch.arange(V)[None, :]
    drop = rank >= top_k[:, None]
    probs = torch.softmax(sx.masked_fill(drop, float("-inf")), dim=-1)
    # Keep the smallest prefix whose mass reaches top_p; the first token always stays (a top_p that
    # rounds to 0 in float32 still leaves one token).
    drop |= (probs.cumsum(-1) - probs) >= top_p[:, None]
    drop[:, 0] = False
    probs = torch.softmax(sx.masked_fill(drop, float("-inf")), dim=-1)
    for j, i in enumerate(rows):
        pick = torch.multinomial(probs[j], 1, generator=gens[i])
        out[i] = si[j, pick[0]]
    return out


def bad_rows(logits: torch.Tensor) -> list[int]:
    """Rows that contain NaN or +inf (the model overflowed for that sequence): they cannot be sampled."""
    ok = ~(torch.isnan(logits) | torch.isposinf(logits)).any(dim=-1)
    return [] if bool(ok.all()) else (~ok).nonzero()[:, 0].tolist()


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

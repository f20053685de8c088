"""Sampling: logits processing (min_tokens, logit_bias, repetition/frequency/presence penalties),
then greedy or temperature, min-p, top-k, top-p, per-request seed; stop tokens and strings.

Every step is one batched pass over the rows: processing builds per-row tensors (bias values,
penalty factors, token counts by one scatter) and applies them to the whole [B, V] block, and the
filters share one sort. Each sampled row draws from its own `torch.Generator`. A row's result is a
function of that row alone, so a request gives the same tokens whatever else is in its batch.

Every value a client can send is checked and normalised here, once, when the request is made
(`SamplingParams.__post_init__`, then `for_vocab` when the engine adds it), so that nothing a single
request carries can make the batched step raise: a temperature below `GREEDY_EPS` is greedy (vLLM's
rule; dividing by 1e-300 in float32 is a division by zero), `top_k` is clipped to the vocabulary,
seeds are 64-bit, and a row whose logits are not finite fails only its own sequence (`bad_rows`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as Fn

if TYPE_CHECKING:
    from .grammar import StructuredOutput

MAX_STOP_STRINGS = 16
GREEDY_EPS = 1e-5  # temperatures below this are greedy (vLLM's _SAMPLING_EPS)
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed takes
MAX_TOKENS_LIMIT = 2**31 - 1
MAX_LOGIT_BIAS = 1024  # entries in one request's logit_bias
MAX_STOP_TOKEN_IDS = 64
MAX_CACHE_SALT = 128  # vLLM's bound (and its forbidden characters)
LOGIT_CAP = 1e6  # processed logits stay below this (finite after a temperature of GREEDY_EPS)


class InvalidParam(ValueError):
    """A sampling value outside its range; `param` names the request field it came from."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


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
    prompt_logprobs: int | None = None  # the same for each prompt token (vLLM's prompt_logprobs; echo + logprobs)
    presence_penalty: float = 0.0  # OpenAI: subtracted once from every token already generated
    frequency_penalty: float = 0.0  # OpenAI: subtracted per occurrence in the generated tokens
    repetition_penalty: float = 1.0  # vLLM/CTRL: prompt and generated tokens, logit / p if > 0 else * p
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    min_p: float = 0.0  # drop tokens below min_p x the most likely one's probability
    min_tokens: int = 0  # no EOS / stop token / stop string before this many tokens
    skip_special_tokens: bool = True  # control tokens (<s>, </s>) carry no text
    include_stop_str_in_output: bool = False  # keep the matched stop string (or stop token's text)
    return_routed_experts: bool = False  # each generated token's top-k expert ids per layer
    return_prompt_routed_experts: bool = False  # and each prompt token's
    structured: StructuredOutput | None = None  # a grammar the output must follow (model/grammar.py)
    # Prefix caching (router/kv_cache.py): only requests with the same salt share cached blocks
    # (vLLM's cache_salt); skip_reading_prefix_cache computes the whole prompt (its blocks are still cached).
    cache_salt: str | None = None
    skip_reading_prefix_cache: bool = False

    @property
    def wants_routes(self) -> bool:
        return self.return_routed_experts or self.return_prompt_routed_experts

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop, self.stop_token_ids = list(self.stop), list(self.stop_token_ids)
        if not 1 <= self.max_tokens <= MAX_TOKENS_LIMIT:
            raise InvalidParam("max_tokens", f"max_tokens={self.max_tokens} must be in [1, {MAX_TOKENS_LIMIT}]")
        if not 0.0 <= self.temperature <= 2.0:  # also false for NaN
            raise InvalidParam("temperature", f"temperature={self.temperature} must be in [0, 2]")
        if self.temperature < GREEDY_EPS:
            self.temperature = 0.0
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidParam("top_p", f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k < -1:
            raise InvalidParam("top_k", f"top_k={self.top_k} must be >= -1 (0 or -1 disables it)")
        self.top_k = max(self.top_k, 0)
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX:
            raise InvalidParam("seed", f"seed must be in [{SEED_MIN}, {SEED_MAX}]")
        if len(self.stop) > MAX_STOP_STRINGS or any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidParam("stop", f"stop: at most {MAX_STOP_STRINGS} non-empty strings")
        if any(t < 0 for t in self.stop_token_ids):
            raise InvalidParam("stop_token_ids", "stop_token_ids must be >= 0")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidParam("stop_token_ids", f"stop_token_ids: at most {MAX_STOP_TOKEN_IDS}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise InvalidParam("logprobs", f"logprobs={self.logprobs} must be in [0, 20]")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= 20:
            raise InvalidParam("prompt_logprobs", f"prompt_logprobs={self.prompt_logprobs} must be in [0, 20]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise InvalidParam(name, f"{name}={getattr(self, name)} must be in [-2, 2]")
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise InvalidParam("repetition_penalty", f"repetition_penalty={self.repetition_penalty} must be in (0, 2]")
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidParam("min_p", f"min_p={self.min_p} must be in [0, 1]")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidParam(
                "min_tokens", f"min_tokens={self.min_tokens} must be in [0, max_tokens={self.max_tokens}]"
            )
        if self.cache_salt is not None and not (
            isinstance(self.cache_salt, str)
            and 0 < len(self.cache_salt) <= MAX_CACHE_SALT
            and not any(c in self.cache_salt for c in "@/\\\0")
        ):
            raise InvalidParam(
                "cache_salt",
                f"cache_salt: a non-empty string of at most {MAX_CACHE_SALT} characters, without @ / \\ or NUL",
            )
        self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise InvalidParam("logit_bias", f"logit_bias: at most {MAX_LOGIT_BIAS} entries")
        if any(k < 0 or not -100.0 <= v <= 100.0 for k, v in self.logit_bias.items()):
            raise InvalidParam("logit_bias", "logit_bias: token ids >= 0 and biases in [-100, 100]")

    def for_vocab(self, vocab_size: int) -> SamplingParams:
        """Checked against the model: stop token ids inside the vocabulary, top_k clipped to it."""
        if any(t >= vocab_size for t in self.stop_token_ids):
            raise InvalidParam("stop_token_ids", f"stop_token_ids must be in [0, {vocab_size})")
        if any(t >= vocab_size for t in self.logit_bias):
            raise InvalidParam("logit_bias", f"logit_bias: token ids must be in [0, {vocab_size})")
        if self.top_k >= vocab_size:
            self.top_k = 0  # keeping every token is no filter
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def penalised(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def processes_logits(self) -> bool:
        """Anything beyond plain sampling: off for a default request, which then costs nothing."""
        return bool(self.penalised or self.logit_bias or self.min_tokens)


class LogitsState:
    """One sequence's part of logits processing, kept across its steps so that a step costs tensor
    work only, never Python per token: counts of its output tokens ([V], one add per new token),
    which tokens its prompt holds ([V] bool, built once), its logit_bias as (ids, values) tensors.
    Built only for a sequence whose params process logits."""

    def __init__(self, params: SamplingParams, prompt: list[int], vocab_size: int, device: torch.device | str = "cpu"):
        V = vocab_size
        self.num_outputs = 0
        self.counts = torch.zeros(V, device=device) if params.penalised else None
        self.in_prompt = None
        if params.repetition_penalty != 1.0:
            self.in_prompt = torch.zeros(V, dtype=torch.bool, device=device)
            self.in_prompt[torch.tensor(prompt, dtype=torch.long, device=device)] = True
        ids = [t for t in params.logit_bias if t < V]
        self.bias_ids = torch.tensor(ids, dtype=torch.long, device=device)
        self.bias_values = torch.tensor([params.logit_bias[t] for t in ids], device=device)

    @classmethod
    def of(
        cls,
        params: SamplingParams,
        prompt: list[int],
        outputs: list[int],
        vocab_size: int,
        device: torch.device | str = "cpu",
    ) -> LogitsState:
        """The state of a sequence with `outputs` so far, on the logits' device."""
        s = cls(params, prompt, vocab_size, device)
        for t in outputs:
            s.append(t)
        return s

    def append(self, t: int) -> None:
        self.num_outputs += 1
        if self.counts is not None:
            self.counts[t] += 1


def process_logits(
    logits: torch.Tensor, params: list[SamplingParams], states: list[LogitsState | None], stop_ids: list[set[int]]
) -> torch.Tensor:
    """vLLM's order, on the rows that ask for it, all rows at once: min_tokens bans the row's stop
    tokens (`stop_ids`: EOS unless ignored, and `stop_token_ids`, at most a few dozen) while it has
    fewer outputs; then logit_bias is added; then the penalties: repetition (prompt and output tokens:
    a positive logit is divided by it, a negative one multiplied), frequency (times the count in the
    output) and presence (once per token present in the output), as OpenAI and vLLM define them.
    The cost is O(rows x V) tensor work whatever the lengths of prompts and outputs.
    Returns `logits` itself when no row asks for anything."""
    rows = [i for i, p in enumerate(params) if p.processes_logits]
    if not rows:
        return logits
    logits = logits.clone()
    V, dev = logits.shape[-1], logits.device
    for i in rows:
        s = states[i]
        if s.num_outputs < params[i].min_tokens:
            ban = [t for t in stop_ids[i] if t < V]
            if ban:
                logits[i, torch.tensor(ban, dtype=torch.long, device=dev)] = float("-inf")
        if len(s.bias_ids):
            logits[i].index_add_(0, s.bias_ids, s.bias_values.to(logits.dtype))
    pen = [i for i in rows if params[i].penalised]
    if not pen:
        return logits
    idx = torch.tensor(pen, device=dev)
    x = logits[idx]
    counts = torch.stack([states[i].counts for i in pen]).to(logits.dtype)
    seen = counts > 0
    rep = torch.tensor([params[i].repetition_penalty for i in pen], dtype=logits.dtype, device=dev)[:, None]
    if bool((rep != 1.0).any()):
        blank = torch.zeros(V, dtype=torch.bool, device=dev)
        in_prompt = torch.stack([states[i].in_prompt if states[i].in_prompt is not None else blank for i in pen])
        hit = seen | in_prompt
        x = torch.where(hit, torch.where(x > 0, x / rep, x * rep), x)
    freq = torch.tensor([params[i].frequency_penalty for i in pen], dtype=logits.dtype, device=dev)[:, None]
    pres = torch.tensor([params[i].presence_penalty for i in pen], dtype=logits.dtype, device=dev)[:, None]
    x = x - freq * counts - pres * seen.to(logits.dtype)
    # A penalty at the edge of its range (repetition_penalty 1e-300 is 0 in float32) must not make a
    # logit infinite: +inf would make the row unsampleable. Capped far above any real logit.
    logits[idx] = x.clamp(max=LOGIT_CAP)
    return logits


def make_generator(seed: int | None) -> torch.Generator:
    """A sequence's own host generator: its draws (one uniform number per step) are the same on
    every device, so a seeded request samples the same tokens on CPU and GPU for the same logits."""
    g = torch.Generator(device="cpu")
    g.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))
    return g


def sample(logits: torch.Tensor, params: list[SamplingParams], gens: list[torch.Generator]) -> torch.Tensor:
    """logits [B, V] float32 -> token ids [B]. Rows listed by `bad_rows` give meaningless ids: the
    engine fails those sequences before it looks at their tokens.

    No sort unless a row asks for top_p: top_k takes the k-th largest value as its threshold
    (`topk`), min_p compares with the row's largest probability, and the draw is one uniform number
    per row from the row's own generator against the row's cumulative distribution (inverse CDF,
    batched, by blocks: `_draw`). Rows that do not ask for them are not copied, divided or
    argmax-ed. A full sort and a multinomial per row cost ~100 ms a step at 64 rows x 32000 on 2
    cores; this costs ~1.3 ms (softmax + a full cumsum alone were ~3 ms)."""
    B, V = logits.shape
    dev = logits.device
    rows = [i for i, p in enumerate(params) if not p.greedy]
    greedy = [i for i, p in enumerate(params) if p.greedy]
    if not rows:
        return logits.argmax(dim=-1)
    out = torch.zeros(B, dtype=torch.long, device=dev)
    if greedy:
        g = torch.tensor(greedy, device=dev)
        out[g] = logits[g].argmax(dim=-1)
    x = logits if len(rows) == B else logits[rows]
    temps = [params[i].temperature for i in rows]
    if any(t != 1.0 for t in temps):
        x = x / torch.tensor(temps, dtype=logits.dtype, device=dev)[:, None]
    tempered = x  # the filters below replace x (never in place); min_p reads the tempered distribution
    ninf = float("-inf")
    ks = [min(params[i].top_k, V) for i in rows]
    if any(ks):  # top-k: keep values >= the row's k-th largest (rows without it keep everything)
        kth = torch.topk(x, max(ks), dim=-1).values
        at = torch.tensor([k - 1 if k else 0 for k in ks], device=dev)
        thr = kth.gather(1, at[:, None])
        thr[torch.tensor([k == 0 for k in ks], device=dev)] = ninf
        x = x.masked_fill(x < thr, ninf)
    min_p = [params[i].min_p for i in rows]
    if any(m > 0 for m in min_p):  # vLLM: on the tempered distribution, before top-k / top-p
        full = torch.softmax(tempered, dim=-1)
        mp = torch.tensor(min_p, dtype=logits.dtype, device=dev)
        x = x.masked_fill(full < mp[:, None] * full.max(dim=-1, keepdim=True).values, ninf)
    nucleus = [j for j, i in enumerate(rows) if params[i].top_p < 1.0]
    if nucleus:  # top-p: the smallest prefix (by probability) whose mass reaches top_p, on those rows only
        top_p = torch.tensor([params[rows[j]].top_p for j in nucleus], dtype=logits.dtype, device=dev)
        if x is logits:
            x = x.clone()  # _top_p writes its rows in place
        x = _top_p(x, nucleus, top_p)
    u = torch.cat([torch.rand(1, generator=gens[i], dtype=logits.dtype, device="cpu") for i in rows]).to(dev)
    picks = _draw(x, u)
    if len(rows) == B:
        return picks
    out[torch.tensor(rows, device=dev)] = picks
    return out


DRAW_BLOCK = 256  # the inverse-CDF draw sums blocks of this many tokens, then searches one block


def _draw(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row, the token whose cumulative probability under softmax(x) first exceeds u (the inverse
    CDF), never one at -inf. Without a full-row cumulative sum: exp(x - max) is summed per block of
    DRAW_BLOCK tokens, the draw finds its block among the block sums and its token within that block
    alone (~4x less memory traffic than softmax + cumsum at 64 x 32000)."""
    B, V = x.shape
    nb = -(-V // DRAW_BLOCK)
    e = Fn.pad(x, (0, nb * DRAW_BLOCK - V), value=float("-inf"))  # our copy: computed in place below
    e.sub_(e.amax(dim=-1, keepdim=True)).exp_()
    e = e.view(B, nb, DRAW_BLOCK)
    cum = e.sum(dim=-1).cumsum(dim=-1)  # [B, nb] block-level CDF (unnormalised)
    total = cum[:, -1]
    v = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))  # below the total
    b = torch.searchsorted(cum, v[:, None], right=True).clamp_(max=nb - 1)  # first block past v: its sum > 0
    before = torch.where(b > 0, cum.gather(1, (b - 1).clamp(min=0)), torch.zeros_like(b, dtype=cum.dtype))
    inner = e[torch.arange(B, device=x.device), b[:, 0]].cumsum(dim=-1)  # [B, DRAW_BLOCK]
    # v's place inside its block, kept on a token of the block with mass (rounding between the
    # block sums and this cumulative sum could put it just outside)
    w = (v[:, None] - before).clamp_(min=0.0)
    w = torch.minimum(w, torch.nextafter(inner[:, -1:], torch.zeros_like(inner[:, -1:])))
    j = torch.searchsorted(inner, w, right=True)[:, 0]
    return (b[:, 0] * DRAW_BLOCK + j).clamp_(max=V - 1)


NUCLEUS_CANDIDATES = 1024  # top-p looks among this many most likely tokens first (a full sort costs ~6x)


def _outside_nucleus(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """For probabilities sorted in descending order: True past the smallest prefix whose mass reaches
    top_p. The first token always stays (a top_p that rounds to 0 in float32 still leaves one)."""
    drop = (probs.cumsum(-1) - probs) >= top_p[:, None]
    drop[:, 0] = False
    return drop


def _top_p(x: torch.Tensor, rows: list[int], top_p: torch.Tensor) -> torch.Tensor:
    """`x` with the tokens outside each row's nucleus at -inf. The nucleus is found among the row's
    NUCLEUS_CANDIDATES most likely tokens (`topk`), which holds it whenever their mass reaches top_p;
    a row where it does not is sorted whole."""
    ninf = float("-inf")
    idx = torch.tensor(rows, device=x.device)
    xs = x[idx]
    V = xs.shape[-1]
    sx, si = torch.topk(xs, min(V, NUCLEUS_CANDIDATES), dim=-1)  # descending
    probs = torch.exp(sx - torch.logsumexp(xs, dim=-1, keepdim=True))  # of the whole row
    held = probs.sum(-1) >= top_p
    short = (~held).nonzero()[:, 0]
    if len(short):  # the candidates do not hold the nucleus: those rows sorted whole
        full_sx, full_si = torch.sort(xs[short], dim=-1, descending=True)
        drop = _outside_nucleus(torch.softmax(full_sx, dim=-1), top_p[short])
        xs[short] = torch.empty_like(full_sx).scatter_(1, full_si, full_sx.masked_fill(drop, ninf))
    ok = held.nonzero()[:, 0]
    if len(ok):
        drop = _outside_nucleus(probs[ok], top_p[ok])
        kept = torch.full_like(xs[ok], ninf)
        kept.scatter_(1, si[ok], sx[ok].masked_fill(drop, ninf))
        xs[ok] = kept
    x[idx] = xs
    return x


def bad_rows(logits: torch.Tensor) -> list[int]:
    """Rows that contain NaN or +inf (the model overflowed for that sequence): they cannot be sampled.
    One pass: a row's maximum is NaN when it holds a NaN (amax propagates it) and +inf when it holds +inf."""
    m = logits.amax(dim=-1)
    bad = torch.isnan(m) | torch.isposinf(m)
    return bad.nonzero()[:, 0].tolist() if bool(bad.any()) else []


def _chosen_and_top(logits: torch.Tensor, tokens: torch.Tensor, top: int):
    """log-softmax in float32, each row's chosen logprob [T, 1], and its top alternatives [(id, logprob)]."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(1, tokens[:, None])
    if top:
        v, i = lp.topk(top, dim=-1)
        alts = [list(zip(ii, vv)) for ii, vv in zip(i.tolist(), v.tolist())]
    else:
        alts = [[] for _ in range(lp.shape[0])]
    return lp, chosen, alts


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> list[tuple[float, list[tuple[int, float]]]]:
    """Per row: (logprob of the chosen token, top alternatives [(id, logprob)])."""
    _, chosen, alts = _chosen_and_top(logits, tokens, top)
    return list(zip(chosen[:, 0].tolist(), alts))


def ranked_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> list[tuple[int, float, int, list]]:
    """Per row: (token, its logprob, its rank (1 = the most likely), top alternatives [(id, logprob)])
    in float32, as vLLM's prompt logprobs report them."""
    lp, chosen, alts = _chosen_and_top(logits, tokens, top)
    ranks = ((lp > chosen).sum(dim=-1) + 1).tolist()
    return list(zip(tokens.tolist(), chosen[:, 0].tolist(), ranks, alts))


def first_stop(text: str, stops: list[str], start: int) -> tuple[int, str | None]:
    """(index where the earliest stop string begins, that string), searching from `start`; (-1, None)."""
    best, which = -1, None
    for s in stops:
        i = text.find(s, max(0, start - len(s) + 1))
        if i != -1 and (best == -1 or i < best):
            best, which = i, s
    return best, which


def find_stop(text: str, stops: list[str], start: int) -> int:
    """Index in text where the earliest stop string begins, searching from `start`; -1 if none."""
    return first_stop(text, stops, start)[0]

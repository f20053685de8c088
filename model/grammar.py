"""Structured outputs: a grammar decides which tokens a sequence may sample next.

A `StructuredOutput` (what a request asks for: a JSON schema, any JSON object, a regex, one of a
list of strings, or a Lark / GBNF grammar) is compiled by llguidance against the model's vocabulary
into a matcher. Each constrained sequence holds its own matcher: before a step samples, the matcher
gives the bitmask of tokens its grammar allows next (`GrammarBatch.mask`, all constrained rows of the
step at once); after, it consumes the sampled token. A row that asks for none is never touched.

llguidance was chosen by measurement and footprint: a JSON-schema mask costs about 0.1 ms per row
on 2 cores, less than xgrammar's at 16 and 64 rows (`python -m benchmarks.grammar`, docs/api.md);
it is MIT-licensed, its wheel has no dependencies and runs on any CPU, and
it is what vLLM's `guidance` backend uses. Compiled grammars are cached per constraint (an LRU of
pristine matchers); a sequence gets a copy. Grammar size and per-step work are bounded by
llguidance's parser limits, so a pathological grammar fails its request instead of stalling a step.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import llguidance
import torch

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

KINDS = ("json", "json_object", "regex", "choice", "grammar")
GRAMMAR_CACHE = 256  # compiled constraints kept per process


class GrammarError(ValueError):
    """A constraint that does not compile; `param` names the request field it came from."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class StructuredOutput:
    """One request's constraint. `spec` is canonical text: a JSON schema or a choice list as compact
    JSON with sorted keys (so equal schemas share a compiled grammar), a regex or grammar as sent.
    JSON is written without optional whitespace unless `whitespace_pattern` allows some: a model
    cannot then spend its tokens on whitespace without end (vLLM's `disable_any_whitespace`)."""

    kind: str
    spec: str = ""
    whitespace_pattern: str | None = None
    disable_additional_properties: bool = False
    param: str = "structured_outputs"  # the request field it came from, for errors

    def __post_init__(self):
        if self.kind not in KINDS:
            raise GrammarError(self.param, f"unknown structured output kind {self.kind!r}")

    @classmethod
    def json_schema(cls, schema, param: str, **options) -> StructuredOutput:
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                raise GrammarError(param, f"{param}: the schema is not valid JSON: {e}") from None
        if not isinstance(schema, (dict, bool)):
            raise GrammarError(param, f"{param}: a JSON schema must be an object")
        return cls("json", json.dumps(schema, sort_keys=True, separators=(",", ":")), param=param, **options)

    @classmethod
    def choice(cls, options: list[str], param: str) -> StructuredOutput:
        if not options or not all(isinstance(o, str) and o for o in options):
            raise GrammarError(param, f"{param}: a non-empty list of non-empty strings")
        return cls("choice", json.dumps(list(options), separators=(",", ":")), param=param)

    def key(self) -> tuple:
        return (self.kind, self.spec, self.whitespace_pattern, self.disable_additional_properties)


def _no_additional_properties(schema):
    """vLLM's disable_additional_properties: every object schema without its own says false."""
    if isinstance(schema, dict):
        if schema.get("type") == "object" or "properties" in schema:
            schema.setdefault("additionalProperties", False)
        for v in schema.values():
            _no_additional_properties(v)
    elif isinstance(schema, list):
        for v in schema:
            _no_additional_properties(v)
    return schema


def grammar_text(c: StructuredOutput) -> str:
    """The llguidance grammar of a constraint (not yet checked: `GrammarCompiler.check` does)."""
    if c.kind in ("json", "json_object"):
        schema = json.loads(c.spec) if c.kind == "json" else {"type": "object"}
        if schema is False:
            raise GrammarError(c.param, f"{c.param}: the schema false allows no value")
        if schema is True:  # any JSON value
            schema = {}
        if c.disable_additional_properties:
            schema = _no_additional_properties(schema)
        options: dict = {"whitespace_flexible": False}
        if c.whitespace_pattern is not None:
            options = {"whitespace_flexible": True, "whitespace_pattern": c.whitespace_pattern}
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=options)
        except ValueError as e:
            raise GrammarError(c.param, f"{c.param}: {e}") from None
    try:
        return llguidance.grammar_from(c.kind, c.spec)  # regex, choice (a JSON list), grammar (Lark or GBNF)
    except ValueError as e:
        raise GrammarError(c.param, f"{c.param}: {e}") from None


def _token_bytes(tokenizer: Tokenizer, vocab_size: int) -> tuple[list[bytes], list[int]]:
    """Each id's bytes as the grammar sees them (SentencePiece's space marker is a space, a byte
    token its byte) and the ids that carry no text (control tokens, and ids past the tokenizer's,
    which a padded embedding may have): those the grammar never allows, EOS aside."""
    sp = tokenizer.sp._model
    out, special = [], []
    for i in range(vocab_size):
        if i >= tokenizer.vocab_size or sp.is_control(i) or sp.is_unknown(i):
            out.append(b"")
            special.append(i)
        elif sp.is_byte(i):
            out.append(bytes([int(sp.id_to_piece(i)[3:5], 16)]))
        else:
            out.append(sp.id_to_piece(i).replace("\u2581", " ").encode())
    return out, special


class _Wrapped:
    """What llguidance's TokenizerWrapper reads: the vocabulary and an encoder of raw bytes. The
    encoder leaves out SentencePiece's leading space (it encodes after a newline, a byte token that
    nothing merges with, and drops that prefix)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        self.sp = tokenizer.sp._model
        self.eos_token_id, self.bos_token_id = tokenizer.eos_id, tokenizer.bos_id
        self.tokens, self.special_token_ids = _token_bytes(tokenizer, vocab_size)
        self._lead = self.sp.encode("\n")

    def __call__(self, data: bytes) -> list[int]:
        ids = self.sp.encode("\n" + data.decode("utf-8", errors="replace"))
        n = len(self._lead)
        return ids[n:] if ids[:n] == self._lead else ids


class GrammarCompiler:
    """Compiles constraints for one tokenizer and vocabulary; thread-safe. `matcher` gives a fresh
    matcher (a copy of the cached compiled one); `check` raises GrammarError for a bad constraint."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, cache_size: int = GRAMMAR_CACHE):
        self.vocab_size = vocab_size
        self.eos = tokenizer.eos_id
        self.tokenizer = llguidance.LLTokenizer(
            llguidance.TokenizerWrapper(_Wrapped(tokenizer, vocab_size)), n_vocab=vocab_size
        )
        self.cache: OrderedDict[tuple, llguidance.LLMatcher] = OrderedDict()
        self.cache_size = cache_size
        self.lock = threading.Lock()
        self.compiled = 0  # grammars compiled (cache misses)

    def _compiled(self, c: StructuredOutput) -> llguidance.LLMatcher:
        key = c.key()
        with self.lock:
            m = self.cache.get(key)
            if m is not None:
                self.cache.move_to_end(key)
                return m
        grammar = grammar_text(c)
        m = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)  # drops the GIL while it compiles
        if m.is_error():
            raise GrammarError(c.param, f"{c.param}: {_first_line(m.get_error())}")
        m.compute_bitmask()  # some grammars fail only at their first step (a rule that derives nothing)
        if m.is_error():
            raise GrammarError(c.param, f"{c.param}: the grammar allows no output ({_first_line(m.get_error())})")
        with self.lock:
            self.compiled += 1
            self.cache[key] = m
            while len(self.cache) > self.cache_size:
                self.cache.popitem(last=False)
        return m

    def check(self, c: StructuredOutput) -> None:
        self._compiled(c)

    def matcher(self, c: StructuredOutput) -> Grammar:
        return Grammar(self._compiled(c).deep_copy())


def _first_line(message: str, limit: int = 300) -> str:
    """llguidance's error on one line, without its parser dump."""
    return " ".join(message.split("<state>")[0].split())[:limit]


@lru_cache(maxsize=8)
def compiler_for(tokenizer: Tokenizer, vocab_size: int) -> GrammarCompiler:
    """One compiler per tokenizer and vocabulary in a process (building the token trie takes ~70 ms)."""
    return GrammarCompiler(tokenizer, vocab_size)


class Grammar:
    """One sequence's matcher: the tokens allowed next, and the tokens taken so far."""

    def __init__(self, matcher: llguidance.LLMatcher):
        self.m = matcher

    def consume(self, token: int) -> bool:
        """Take a sampled token; False if the grammar refuses it (or is in error)."""
        return self.m.consume_token(token) and not self.m.is_error()

    def replay(self, tokens: list[int]) -> bool:
        return self.m.consume_tokens(tokens) and not self.m.is_error() if tokens else True

    @property
    def done(self) -> bool:
        """The grammar is complete and allows nothing more."""
        return self.m.is_stopped()

    @property
    def accepting(self) -> bool:
        return self.m.is_accepting()

    def error(self) -> str | None:
        return self.m.get_error() or None if self.m.is_error() else None


class GrammarBatch:
    """The bitmasks of a step's constrained rows, into a buffer kept between steps, row by row in
    the engine's thread: on 2 cores that measured as fast as llguidance's thread pool or faster
    (`python -m benchmarks.grammar`), and it adds no threads beside torch's."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        # llguidance fills a host bitmask; apply_mask moves the expanded mask to the logits' device
        self.buf = torch.empty(0, (vocab_size + 31) // 32, dtype=torch.int32, device="cpu")
        self.shifts = torch.arange(32, dtype=torch.int32, device="cpu")

    def mask(self, grammars: list[Grammar]) -> torch.Tensor:
        """[rows, V] bool: True where the row's grammar allows the token."""
        n = len(grammars)
        if self.buf.shape[0] < n:
            self.buf = torch.empty(max(n, 2 * self.buf.shape[0]), self.buf.shape[1], dtype=torch.int32, device="cpu")
        bm = self.buf[:n]
        row_bytes = bm.shape[1] * bm.element_size()
        for i, g in enumerate(grammars):
            # What llguidance.torch.fill_next_token_bitmask does, without importing that module: it
            # applies torch.compile at import, which loads the inductor stack (~4 s per process).
            g.m.unsafe_compute_mask_ptr(bm[i].data_ptr(), row_bytes)
        bits = (bm[:, :, None] >> self.shifts) & 1
        return bits.view(n, -1)[:, : self.vocab_size].bool()


def apply_mask(logits: torch.Tensor, rows: list[int], allowed: torch.Tensor) -> torch.Tensor:
    """A copy of `logits` with the disallowed tokens of `rows` at -inf; the other rows unchanged."""
    out = logits.clone()
    idx = torch.tensor(rows, dtype=torch.long, device=logits.device)
    allowed = allowed[:, : logits.shape[-1]].to(logits.device, non_blocking=True)
    out[idx] = logits[idx].masked_fill(~allowed, float("-inf"))
    return out

"""Structured outputs (model/grammar.py, the engine's masked sampling, the request fields): the
random-weight tiny model must always produce output that follows the constraint, rows that ask for
none must not change by a bit, and a bad constraint is a 400 that names its field."""

from __future__ import annotations

import asyncio
import json
import random
import re

import jsonschema
import pytest
import torch

from cluster.api.protocol import APIError, ChatRequest, CompletionRequest, validate
from cluster.build import local_engine
from model.grammar import GrammarBatch, GrammarError, StructuredOutput, _token_bytes, apply_mask, compiler_for
from model.sampling import LogitsState, SamplingParams, logprobs_of, make_generator, process_logits, sample
from router.engine import EngineError, Resume
from tests.unit.test_serving import MODEL, complete, run, stream
from tests.unit.test_serving import serving as serving  # noqa: F401 - the fixture, reused

COLOURS = ["red", "green", "blue", "dark grey"]


@pytest.fixture(scope="module")
def eng(tiny_dir):
    return local_engine(tiny_dir, "float32")


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    """A JSON schema whose every instance is bounded (strings, arrays, integers), so that even a
    random model's output ends: what the output must then always satisfy."""
    leaves = [
        lambda: {"type": "integer", "minimum": rng.randint(-50, 0), "maximum": rng.randint(1, 999)},
        lambda: {"type": "boolean"},
        lambda: {"type": "null"},
        lambda: {"enum": rng.sample(COLOURS, rng.randint(1, 4))},
        lambda: {"type": "string", "maxLength": rng.randint(0, 6)},
        lambda: {"const": rng.choice(["x", 3, True])},
    ]
    kind = rng.random()
    if depth >= 2 or kind < 0.4:
        return rng.choice(leaves)()
    if kind < 0.6:
        return {"type": "array", "items": random_schema(rng, depth + 1), "maxItems": rng.randint(1, 3)}
    if kind < 0.7:
        return {"anyOf": [random_schema(rng, depth + 1), random_schema(rng, depth + 1)]}
    names = rng.sample(["id", "name", "ok", "tags", "n", "é", "a b"], rng.randint(1, 4))
    props = {k: random_schema(rng, depth + 1) for k in names}
    return {
        "type": "object",
        "properties": props,
        "required": rng.sample(names, rng.randint(0, len(names))),
        "additionalProperties": False,
    }


def schema_param(schema, **kw) -> SamplingParams:
    return SamplingParams(structured=StructuredOutput.json_schema(schema, "structured_outputs"), **kw)


def test_many_schemas_always_validate(eng):
    """Thirty random bounded schemas, each greedy and sampled (with penalties and a logit_bias that
    fights the grammar), in one batch with unconstrained rows: every constrained answer parses,
    validates and ends by its grammar."""
    rng = random.Random(7)
    schemas = [random_schema(rng) for _ in range(30)]
    prompt = eng.tokenizer.encode("Reply in JSON:")
    fight = {t: 100.0 for t in eng.tokenizer.encode("}] 9", bos=False)}
    constrained = []
    for i, s in enumerate(schemas):
        constrained.append(schema_param(s, max_tokens=256, temperature=0))
        constrained.append(
            schema_param(s, max_tokens=256, temperature=1.0, seed=i, presence_penalty=1.0, logit_bias=fight)
        )
    free = [
        SamplingParams(max_tokens=24, temperature=0, logprobs=3),
        SamplingParams(max_tokens=24, temperature=1.0, seed=5, top_p=0.9, logprobs=3),
        SamplingParams(max_tokens=24, temperature=0.7, seed=6, repetition_penalty=1.3),
    ]
    mixed = constrained[:20] + free + constrained[20:]
    outs = eng.generate([prompt] * len(mixed), mixed)
    for p, o in zip(mixed, outs):
        if p.structured is None:
            assert o.error is None and len(o.new_token_ids) > 0
            continue
        assert o.error is None and o.finish_reason == "stop", (p.structured.spec, o.text)
        jsonschema.validate(json.loads(o.text), json.loads(p.structured.spec))
    assert eng.grammars.compiled >= len({s.structured.key() for s in constrained})


def test_rows_without_a_constraint_are_bit_equal(eng):
    """The sampler's path with half the rows under grammars and with none: the free rows' processed
    logits, sampled tokens (greedy, seeded, penalised) and logprobs are bit-equal; the constrained
    rows only ever pick tokens their grammar allows."""
    V = eng.dense.cfg.vocab_size
    torch.manual_seed(0)
    logits = torch.randn(6, V) * 4
    comp = compiler_for(eng.tokenizer, V)
    c = StructuredOutput("regex", "[a-z ]{1,200}")
    rows = [0, 2, 5]
    params = [SamplingParams(temperature=1.0, seed=s, structured=c) for s in range(6)]
    params[1] = SamplingParams(temperature=0)
    params[3] = SamplingParams(temperature=1.0, seed=5, top_p=0.9, top_k=50)
    params[4] = SamplingParams(temperature=0.7, seed=6, repetition_penalty=1.3, presence_penalty=0.5)
    states = [LogitsState.of(p, [1, 2, 3], [7, 8], V) if p.processes_logits else None for p in params]
    stops = [{2}] * 6

    def run_sampler(masked: bool):
        lg = logits
        if masked:
            lg = apply_mask(lg, rows, GrammarBatch(V).mask([comp.matcher(c) for _ in rows]))
        lp = logprobs_of(lg, lg.argmax(-1), 5)
        lg = process_logits(lg, params, states, stops)
        gens = [make_generator(p.seed) for p in params]
        return lg, sample(lg, params, gens), lp

    a, ta, lpa = run_sampler(True)
    b, tb, lpb = run_sampler(False)
    for k in (1, 3, 4):
        assert torch.equal(a[k], b[k]) and int(ta[k]) == int(tb[k]) and lpa[k] == lpb[k]
    pieces = _token_bytes(eng.tokenizer, V)[0]  # each token's bytes (a byte token's is its byte)
    allowed = {t for t, b in enumerate(pieces) if re.fullmatch(rb"[a-z ]+", b)}
    for k in rows:
        assert int(ta[k]) in allowed and set(torch.isfinite(a[k]).nonzero()[:, 0].tolist()) <= allowed


def test_a_step_with_constrained_rows_leaves_the_others_bit_equal(eng):
    """Through the engine: the first step of a batch of equal prompts computes the same logits for
    every row with or without constrained rows beside it, so the free rows' first tokens and
    logprobs are bit-equal."""
    prompt = eng.tokenizer.encode("Write:")
    c = StructuredOutput("regex", "[0-9]{30}")
    free = [
        SamplingParams(max_tokens=1, temperature=0, logprobs=5),
        SamplingParams(max_tokens=1, temperature=1.0, seed=5, top_p=0.9, logprobs=5),
    ]
    under = [SamplingParams(max_tokens=1, temperature=1.0, seed=s, structured=c, logprobs=2) for s in range(2)]
    plain = [SamplingParams(max_tokens=1, temperature=1.0, seed=s, logprobs=2) for s in range(2)]
    a = eng.generate([prompt] * 4, [under[0], free[0], under[1], free[1]])
    b = eng.generate([prompt] * 4, [plain[0], free[0], plain[1], free[1]])
    for k in (1, 3):
        assert a[k].new_token_ids == b[k].new_token_ids and a[k].logprobs == b[k].logprobs
    assert all(re.fullmatch("[0-9]+", a[k].text) for k in (0, 2))


@pytest.mark.parametrize(
    "kind,spec,check",
    [
        ("regex", r"[0-9]{3}-[a-z]{2,5}", lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2,5}", t)),
        ("regex", r"(yes|no)!", lambda t: t in ("yes!", "no!")),
        ("grammar", 'root ::= "x" [0-9] [0-9]? "y"', lambda t: re.fullmatch(r"x[0-9]{1,2}y", t)),
        ("grammar", 'start: "(" ("a" | "b")~1..3 ")"', lambda t: re.fullmatch(r"\((a|b){1,3}\)", t)),
    ],
)
def test_regex_and_grammars(eng, kind, spec, check):
    prompt = eng.tokenizer.encode("Answer:")
    params = [
        SamplingParams(max_tokens=64, temperature=t, seed=s, structured=StructuredOutput(kind, spec))
        for t, s in [(0, None), (1.0, 1), (1.0, 2), (1.0, 3)]
    ]
    for o in eng.generate([prompt] * len(params), params):
        assert o.finish_reason == "stop" and check(o.text), o.text


def test_choice_min_tokens_and_ignore_eos(eng):
    """A choice is one of its strings exactly; a grammar that is complete ends the answer even where
    min_tokens bans EOS or ignore_eos keeps it from ending one."""
    options = ["alpha", "beta gamma", 'quote " and \\ back']
    c = StructuredOutput.choice(options, "structured_outputs")
    prompt = eng.tokenizer.encode("Pick:")
    params = [
        SamplingParams(max_tokens=40, temperature=1.0, seed=s, structured=c, min_tokens=30, ignore_eos=s % 2 == 0)
        for s in range(6)
    ]
    for o in eng.generate([prompt] * len(params), params):
        assert o.finish_reason == "stop" and o.text in options, o.text


def test_json_object_is_an_object(eng):
    """json_object: any JSON object; a finished answer parses to one (a random model's strings may
    run to max_tokens, which ends with finish_reason length, as anywhere)."""
    c = StructuredOutput("json_object", "")
    prompt = eng.tokenizer.encode("{")
    params = [SamplingParams(max_tokens=64, temperature=1.0, seed=s, structured=c) for s in range(8)]
    outs = eng.generate([prompt] * len(params), params)
    done = [o for o in outs if o.finish_reason == "stop"]
    assert done and all(isinstance(json.loads(o.text), dict) for o in done)
    assert all(o.text.startswith("{") for o in outs)


def test_resume_replays_the_grammar(eng):
    """A request resumed on another replica goes on in its grammar; tokens that do not follow it are
    refused."""
    c = StructuredOutput("regex", r"ab[0-9]{4}")
    prompt = eng.tokenizer.encode("Go:")
    full = eng.generate([prompt], [SamplingParams(max_tokens=20, temperature=0, structured=c)])[0]
    assert re.fullmatch(r"ab[0-9]{4}", full.text)
    head = full.new_token_ids[:2]
    rid = eng.add_request(prompt, SamplingParams(max_tokens=20, temperature=0, structured=c), resume=Resume(head, 0))
    outs = []
    while eng.has_unfinished():
        outs += [o for o in eng.step() if o.req_id == rid]
    assert head + [t for o in outs for t in o.new_token_ids] == full.new_token_ids
    wrong = eng.tokenizer.encode("zz", bos=False)
    with pytest.raises(EngineError, match="structured output"):
        eng.add_request(prompt, SamplingParams(max_tokens=20, structured=c), resume=Resume(wrong, 0))


def test_compiled_grammars_are_cached(eng):
    comp = compiler_for(eng.tokenizer, eng.dense.cfg.vocab_size)
    a = StructuredOutput.json_schema({"type": "object", "properties": {"q": {"type": "boolean"}}}, "x")
    b = StructuredOutput.json_schema({"properties": {"q": {"type": "boolean"}}, "type": "object"}, "x")
    assert a.key() == b.key()
    comp.check(a)
    before = comp.compiled
    m1, m2 = comp.matcher(b), comp.matcher(a)
    assert comp.compiled == before and m1.m is not m2.m
    with pytest.raises(GrammarError) as e:
        comp.check(StructuredOutput("regex", "((", param="structured_outputs"))
    assert e.value.param == "structured_outputs"


# ---------------------------------------------------------------- the request fields


PERSON = {
    "type": "object",
    "properties": {"name": {"enum": COLOURS}, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
CHAT = [{"role": "user", "content": "Describe a person as JSON."}]


def chat(serving, **body):
    return run(serving.chat(validate(ChatRequest, {"model": MODEL, "messages": CHAT, **body})))


def test_response_format_json_schema_chat_and_stream(serving):
    rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    body = chat(serving, response_format=rf, n=3, temperature=1.0, seed=1, max_tokens=64)
    for c in body["choices"]:
        assert c["finish_reason"] == "stop"
        jsonschema.validate(json.loads(c["message"]["content"]), PERSON)
    events = stream(serving, "chat", messages=CHAT, response_format=rf, temperature=1.0, seed=1, max_tokens=64)
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1] if e["choices"])
    assert text == body["choices"][0]["message"]["content"]


def test_structured_outputs_on_completions(serving):
    """vLLM's structured_outputs fields (json, regex, choice, grammar, json_object) and OpenAI's
    response_format on completions, streamed and not."""
    cases = [
        ({"structured_outputs": {"json": PERSON}}, lambda t: jsonschema.validate(json.loads(t), PERSON) or True),
        ({"structured_outputs": {"json": json.dumps(PERSON)}}, lambda t: json.loads(t)["name"] in COLOURS),
        ({"structured_outputs": {"regex": "[A-Z][a-z]{1,4}"}}, lambda t: re.fullmatch("[A-Z][a-z]{1,4}", t)),
        ({"structured_outputs": {"choice": ["yes", "no"]}}, lambda t: t in ("yes", "no")),
        ({"structured_outputs": {"grammar": 'root ::= "v" [0-9]'}}, lambda t: re.fullmatch("v[0-9]", t)),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}}, None),
    ]
    for fields, check in cases:
        body = complete(serving, prompt="Out:", max_tokens=48, temperature=1.0, seed=4, **fields)
        text = body["choices"][0]["text"]
        assert body["choices"][0]["finish_reason"] == "stop", (fields, text)
        assert (check or (lambda t: jsonschema.validate(json.loads(t), PERSON) or True))(text), (fields, text)
        events = stream(serving, "completions", prompt="Out:", max_tokens=48, temperature=1.0, seed=4, **fields)
        assert "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"]) == text


@pytest.mark.parametrize(
    "fields,param,words",
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "p"}}}, "response_format", "schema"),
        ({"response_format": {"type": "json_schema"}}, "response_format", "schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, "response_format", "name"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "frob"}}}},
            "response_format",
            "frob",
        ),
        ({"response_format": {"type": "yaml"}}, "response_format", ""),
        ({"structured_outputs": {"regex": "(("}}, "structured_outputs", "regex"),
        ({"structured_outputs": {"json": "{not json"}}, "structured_outputs", "JSON"),
        ({"structured_outputs": {"json": [1, 2]}}, "structured_outputs", ""),
        ({"structured_outputs": {"json": {"type": "string", "pattern": "(("}}}, "structured_outputs", ""),
        ({"structured_outputs": {"choice": []}}, "structured_outputs", ""),
        ({"structured_outputs": {"choice": ["a", ""]}}, "structured_outputs", "non-empty"),
        ({"structured_outputs": {"grammar": "root ::= ("}}, "structured_outputs", ""),
        ({"structured_outputs": {"grammar": "start: start"}}, "structured_outputs", "allows no output"),
        ({"structured_outputs": {"json": False}}, "structured_outputs", "false"),
        ({"structured_outputs": {"json": {"not": {"type": "string"}}}}, "structured_outputs", "not"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", "one constraint"),
        ({"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs", "structural_tag"),
        ({"structured_outputs": {"frob": 1}}, "structured_outputs", "unknown"),
    ],
)
def test_bad_constraints_are_400_naming_the_field(serving, fields, param, words):
    for route in ("chat", "completions"):
        with pytest.raises(APIError) as e:
            if route == "chat":
                chat(serving, max_tokens=4, **fields)
            else:
                complete(serving, prompt="x", max_tokens=4, **fields)
        assert e.value.status == 400 and e.value.param == param, (route, e.value.message)
        assert words in e.value.message, e.value.message


def test_a_bad_constraint_leaves_other_requests_alone(serving):
    """A refused constraint among good requests in flight: the others finish as if alone."""

    async def both():
        good = serving.completions(
            validate(CompletionRequest, {"model": MODEL, "prompt": "hi", "max_tokens": 8, "temperature": 0})
        )
        bad = serving.completions(
            validate(
                CompletionRequest,
                {"model": MODEL, "prompt": "hi", "max_tokens": 8, "structured_outputs": {"regex": "[z-a]"}},
            )
        )
        return await asyncio.gather(good, bad, return_exceptions=True)

    good, bad = run(both())
    assert isinstance(bad, APIError) and bad.status == 400
    alone = complete(serving, prompt="hi", max_tokens=8, temperature=0)
    assert good["choices"][0]["text"] == alone["choices"][0]["text"]


def test_the_grammar_benchmark_runs(tmp_path):
    """`python -m benchmarks.grammar` at a tiny size, so that it cannot rot."""
    from benchmarks import grammar

    assert grammar.main(["--batch", "1", "3", "--steps", "4", "--out", str(tmp_path)]) == 0
    got = json.loads((tmp_path / "grammar.json").read_text())
    engines = {r["engine"] for r in got["results"]}
    assert {"llguidance (one by one)", "llguidance (executor)"} <= engines
    assert all(r["steps"] >= 1 and r["step_ms_mean"] > 0 for r in got["results"])
    assert "| llguidance (one by one) | 3 |" in (tmp_path / "grammar.md").read_text()

"""One request never hurts another inside the engine: edge values, a numerically broken row, a failed
step, and a request resumed on another engine after its replica was lost (no Ray needed)."""

from __future__ import annotations

import math

import pytest

from cluster.build import local_engine
from model.checkpoint import Checkpoint
from model.model import MixtralDense
from model.sampling import GREEDY_EPS, SamplingParams
from model.tokenizer import Tokenizer
from router.engine import EngineConfig, EngineError, LLMEngine, Overloaded, Resume
from router.experts import ExpertUnavailable, InProcessExperts, expert_groups

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
TEXTS = ["Hello there", "The quick brown fox", "1 2 3 4", "Résumé: naïve café"]


@pytest.fixture(scope="module")
def engine(tiny_dir):
    return local_engine(tiny_dir, "float32", EngineConfig(num_microbatches=2))


@pytest.fixture(scope="module")
def solo(engine):
    """Each greedy prompt run alone: what it must produce whatever else shares its steps."""
    ps = [engine.tokenizer.encode(t) for t in TEXTS]
    return ps, [engine.generate([p], GREEDY)[0] for p in ps]


def run_all(engine, reqs: list[tuple[list[int], SamplingParams]]):
    rids = [engine.add_request(p, sp) for p, sp in reqs]
    got = {r: [] for r in rids}
    last = {}
    while engine.has_unfinished():
        for o in engine.step():
            got[o.req_id] += o.new_token_ids
            if o.finished:
                last[o.req_id] = o
    return [(got[r], last[r]) for r in rids]


EDGE_PARAMS = [
    dict(temperature=1e-300),  # was: logits / float32(0) inside the batched step
    dict(temperature=GREEDY_EPS / 2),
    dict(temperature=2.0, top_k=10**23),  # was: overflow when made a tensor
    dict(temperature=1.0, top_p=5e-324),  # rounds to 0 in float32
    dict(temperature=1.0, top_p=1e-300, top_k=-1),
    dict(temperature=0.7, seed=2**64 - 1),
    dict(temperature=0.7, seed=-(2**63)),
    dict(temperature=1.0, top_k=31999),
    dict(temperature=1.0, stop_token_ids=[0, 31999], logprobs=20),
]


@pytest.mark.parametrize("edge", EDGE_PARAMS, ids=[str(e) for e in EDGE_PARAMS])
def test_edge_values_run_and_never_disturb_the_batch(engine, solo, edge):
    ps, want = solo
    odd = SamplingParams(max_tokens=6, ignore_eos=True, **edge)
    out = run_all(engine, [(p, GREEDY) for p in ps[:2]] + [(ps[2], odd)] + [(p, GREEDY) for p in ps[2:]])
    tokens, last = out[2]
    assert last.error is None and last.finish_reason in ("length", "stop") and 1 <= len(tokens) <= 6
    for (toks, o), w in zip(out[:2] + out[3:], want):
        assert toks == w.new_token_ids and o.finish_reason == "length"


def test_tiny_temperature_is_greedy(engine, solo):
    ps, want = solo
    out = engine.generate([ps[0]], SamplingParams(max_tokens=10, temperature=1e-300, ignore_eos=True))[0]
    assert out.new_token_ids == want[0].new_token_ids


@pytest.mark.parametrize(
    "bad",
    [
        dict(seed=2**64),
        dict(seed=-(2**63) - 1),
        dict(temperature=math.nan),
        dict(temperature=math.inf),
        dict(top_p=math.nan),
        dict(top_k=-2),
        dict(max_tokens=2**31),
        dict(stop=["a", ""]),
        dict(stop_token_ids=[-1]),
    ],
)
def test_out_of_range_values_are_refused_when_made(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_stop_token_ids_outside_the_vocabulary_are_refused_on_add(engine):
    with pytest.raises(EngineError, match="stop_token_ids"):
        engine.add_request([1, 5], SamplingParams(stop_token_ids=[32000]))
    assert not engine.has_unfinished()


def test_a_row_that_overflows_fails_alone(tiny_dir, solo):
    """A token whose embedding is NaN (a checkpoint with a broken row) poisons only the sequences
    that contain it: they end with an error, every other sequence in the step gets its solo tokens."""
    ckpt = Checkpoint(tiny_dir)
    dense = MixtralDense.from_checkpoint(ckpt, "float32")
    poison = 31990
    dense.w.embed[poison] = float("nan")
    eng = LLMEngine(
        dense, InProcessExperts(tiny_dir, expert_groups(8, 1), "float32"), Tokenizer.for_model(tiny_dir), EngineConfig()
    )
    ps, want = solo
    out = run_all(
        eng,
        [
            (ps[0], GREEDY),
            (ps[1] + [poison], GREEDY),
            (ps[2], GREEDY),
            (ps[3], SamplingParams(max_tokens=4, temperature=1.0, seed=1)),
        ],
    )
    assert out[1][1].finish_reason == "error" and "not finite" in out[1][1].error
    for i in (0, 2):
        assert out[i][0] == want[i].new_token_ids and out[i][1].error is None
    assert out[3][1].error is None and len(out[3][0]) == 4
    assert eng.blocks.usage == 0  # the failed sequence's KV blocks were freed too


class FailingExperts:
    """The in-process experts, with a switch that makes every call fail as an unreachable group does."""

    def __init__(self, inner):
        self.inner, self.broken = inner, False

    def submit(self, req):
        if self.broken:
            raise ExpertUnavailable("expert group [0] (layer 0) failed 4 times: ChannelError")
        return self.inner.submit(req)


def test_a_failed_step_fails_its_requests_with_an_error_and_the_engine_goes_on(tiny_dir, solo):
    ps, want = solo
    experts = FailingExperts(InProcessExperts(tiny_dir, expert_groups(8, 1), "float32"))
    eng = LLMEngine(
        MixtralDense.from_checkpoint(Checkpoint(tiny_dir), "float32"),
        experts,
        Tokenizer.for_model(tiny_dir),
        EngineConfig(),
    )
    a = eng.add_request(ps[0], GREEDY)
    first = eng.step()  # prefill: a's first token
    assert [o.req_id for o in first] == [a] and not first[0].finished
    experts.broken = True
    failed = eng.step()
    assert [(o.req_id, o.finished, o.finish_reason) for o in failed] == [(a, True, "error")]
    assert "ExpertUnavailable" in failed[0].error and not eng.has_unfinished() and eng.blocks.usage == 0
    experts.broken = False
    assert eng.generate([ps[1]], GREEDY)[0].new_token_ids == want[1].new_token_ids


def stream(eng, rid):
    text, toks, last = "", [], None
    while eng.has_unfinished():
        for o in eng.step():
            assert o.req_id == rid
            text, toks, last = text + o.text, toks + o.new_token_ids, o
    return text, toks, last


@pytest.mark.parametrize("cut", [1, 4, 7])
def test_resume_on_another_engine_keeps_every_character(tiny_dir, cut):
    """A replica is lost after `cut` tokens; another engine re-prefills prompt + those tokens. The
    client's text equals an undisturbed run, with a stop string that spans the failover point and
    with the text the first engine was holding back (a possible stop string) delivered."""
    a = local_engine(tiny_dir, "float32", EngineConfig())
    b = local_engine(tiny_dir, "float32", EngineConfig())
    p = a.tokenizer.encode("The quick brown fox")
    full = a.generate([p], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    # A stop string that starts inside the first `cut` tokens' text and ends after it.
    before = a.tokenizer.decode(p + full.new_token_ids[:cut])[len(a.tokenizer.decode(p)) :]
    start = max(0, len(before) - 2)
    stop = full.text[start : start + 5]
    assert len(stop) == 5 and full.text.find(stop) == start
    sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop=[stop])
    undisturbed = a.generate([p], sp)[0]
    assert undisturbed.text == full.text[:start] and undisturbed.finish_reason == "stop"

    rid = a.add_request(p, sp)
    text, done = "", []
    while len(done) < cut:
        for o in a.step():
            text, done = text + o.text, done + o.new_token_ids
    a.abort(rid)  # the replica is gone
    rid = b.add_request(p, sp, resume=Resume(done, len(text)))
    rest, toks, last = stream(b, rid)
    assert text + rest == undisturbed.text and last.finish_reason == "stop"
    assert done + toks == undisturbed.new_token_ids


def test_resume_without_a_stop_string_equals_the_undisturbed_stream(tiny_dir):
    a = local_engine(tiny_dir, "float32", EngineConfig())
    p = a.tokenizer.encode("Résumé: naïve café")
    sp = SamplingParams(max_tokens=9, temperature=0, ignore_eos=True)
    full = a.generate([p], sp)[0]
    for cut in range(1, 9):
        b = LLMEngine(a.dense, a.experts, a.tokenizer, EngineConfig())
        head = a.tokenizer.decode(p + full.new_token_ids[:cut])[len(a.tokenizer.decode(p)) :]
        emitted = len(head.rstrip("\ufffd"))  # what a stream had sent: never a partial character
        rid = b.add_request(p, sp, resume=Resume(full.new_token_ids[:cut], emitted))
        rest, toks, last = stream(b, rid)
        assert head[:emitted] + rest == full.text and full.new_token_ids[:cut] + toks == full.new_token_ids
        assert last.completion_tokens == 9 and last.finish_reason == "length"


def test_resume_past_max_tokens_is_refused(engine):
    with pytest.raises(EngineError, match="max_tokens"):
        engine.add_request([1, 5], SamplingParams(max_tokens=2), resume=Resume([7, 8], 0))


def test_resume_keeps_logprobs_for_the_tokens_that_follow(tiny_dir):
    """After a failover the resumed request's new tokens still carry their logprobs, the same as
    the undisturbed run's (the resumed tokens' were sent before the failover)."""
    a = local_engine(tiny_dir, "float32", EngineConfig())
    p = a.tokenizer.encode("Logprobs survive a lost replica")
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=2)
    full = a.generate([p], sp)[0]
    assert len(full.logprobs) == 8
    b = LLMEngine(a.dense, a.experts, a.tokenizer, EngineConfig())
    rid = b.add_request(p, sp, resume=Resume(full.new_token_ids[:3], 0))
    got = []
    while b.has_unfinished():
        for o in b.step():
            assert o.req_id == rid
            got += o.logprobs
    assert [t for t, _, _ in got] == full.new_token_ids[3:]
    for (t, lp, alts), (t2, lp2, alts2) in zip(got, full.logprobs[3:]):
        assert t == t2 and abs(lp - lp2) < 1e-4 and [x for x, _ in alts] == [x for x, _ in alts2]


def test_a_full_waiting_queue_still_takes_a_request_of_another_group(tiny_dir):
    """One request's choices fill the waiting queue: a request of another group is still queued
    (up to twice the bound), a further choice of the same group is refused."""
    eng = local_engine(tiny_dir, "float32", EngineConfig(max_num_seqs=1, max_waiting=3))
    for i in range(3):
        eng.add_request([1, 5 + i], GREEDY, group="big")
    with pytest.raises(Overloaded):
        eng.add_request([1, 9], GREEDY, group="big")
    eng.add_request([1, 10], GREEDY, group="small")  # another group gets in
    with pytest.raises(Overloaded):
        eng.add_request([1, 11], GREEDY, group="small")  # it has one waiting already


def run_ids(eng, rids):
    got = {r: [] for r in rids}
    outs = {}
    while eng.has_unfinished():
        for o in eng.step():
            got[o.req_id] += o.new_token_ids
            outs[o.req_id] = o
    return got, outs


def test_choices_of_one_prompt_share_its_prefill_and_give_their_solo_tokens(tiny_dir):
    """n choices of a prompt: the later ones copy the first one's prompt K/V (all but the last
    position) instead of computing it, and each gives exactly the tokens it gives alone (greedy and
    seeded); with the other gone before they start, a choice computes its prompt itself. (Prefix
    caching off: with it, the solo runs' blocks would be found instead: tests/unit/test_prefix_cache.py.)"""
    cfg = EngineConfig(max_num_batched_tokens=32, num_microbatches=2, enable_prefix_caching=False)
    eng = local_engine(tiny_dir, "float32", cfg)
    p = eng.tokenizer.encode("Shared prefill: " + "one two three four five six seven " * 6)
    params = [SamplingParams(max_tokens=6, temperature=0.9, seed=10 + k, ignore_eos=True) for k in range(4)]
    params.append(SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, return_routed_experts=True))
    solo = [eng.generate([p], sp)[0] for sp in params]
    assert eng.scheduler.num_forked_tokens == 0
    rids = [eng.add_request(p, params[0], "c0", group="g")]
    rids += [eng.add_request(p, sp, f"c{k}", group="g", fork_of="c0") for k, sp in enumerate(params[1:], 1)]
    got, outs = run_ids(eng, rids)
    assert [got[r] for r in rids] == [s.new_token_ids for s in solo]
    assert outs["c4"].routed_experts is not None
    assert eng.scheduler.num_forked_tokens == 4 * (len(p) - 1)
    # routes of the forked greedy choice equal its solo run's
    whole = eng.generate([p], params[4])[0]
    eng.add_request(p, params[0], "d0", group="h")
    eng.add_request(p, params[4], "d1", group="h", fork_of="d0")
    acc = {}
    while eng.has_unfinished():
        for o in eng.step():
            acc[o.req_id] = acc[o.req_id].merge(o) if o.req_id in acc else o
    assert acc["d1"].routed_experts == whole.routed_experts and acc["d1"].new_token_ids == whole.new_token_ids
    # the first choice finished (and freed its blocks) before the fork could start: no copy
    small = LLMEngine(eng.dense, eng.experts, eng.tokenizer, EngineConfig(max_num_seqs=1))
    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    small.add_request(p, one, "e0", group="x")
    small.add_request(p, params[4], "e1", group="x", fork_of="e0")
    got, _ = run_ids(small, ["e0", "e1"])
    assert got["e1"] == solo[4].new_token_ids and small.scheduler.num_forked_tokens == 0

from __future__ import annotations

import pytest
import torch

from model.sampling import GREEDY_EPS, LogitsState, SamplingParams, bad_rows, find_stop, make_generator, sample
from model.sampling import process_logits as process_with_states


def process_logits(logits, params, prompts, outputs, stops):
    """The engine's call, its per-sequence states built from whole token lists."""
    V = logits.shape[-1]
    states = [
        LogitsState.of(p, pr, out, V) if p.processes_logits else None for p, pr, out in zip(params, prompts, outputs)
    ]
    return process_with_states(logits, params, states, stops)


def test_filters_reduce_to_greedy():
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(0))
    greedy = logits.argmax(-1)
    for p in [SamplingParams(temperature=1.0, top_k=1), SamplingParams(temperature=1.0, top_p=1e-6)]:
        gens = [make_generator(i) for i in range(4)]
        assert torch.equal(sample(logits, [p] * 4, gens), greedy)


def test_top_k_and_top_p_restrict_support():
    logits = torch.tensor([[5.0, 4.0, 3.0, -10.0, -10.0]])
    seen = set()
    g = make_generator(0)
    for _ in range(200):
        seen.add(int(sample(logits, [SamplingParams(temperature=2.0, top_k=2)], [g])[0]))
    assert seen == {0, 1}
    seen = set()
    for _ in range(200):  # probs ~ .67 .24 .09: top_p 0.8 keeps the first two
        seen.add(int(sample(logits, [SamplingParams(temperature=1.0, top_p=0.8)], [g])[0]))
    assert seen == {0, 1}


def test_draws_follow_the_distribution_and_depend_on_their_row_alone():
    """The batched inverse-CDF draw: frequencies match softmax(logits / T) (within 4 standard
    deviations), a -inf token is never drawn, and a seeded row draws the same tokens alone or among
    others (greedy, top-k, top-p and unseeded rows beside it)."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, float("-inf"), 0.5]])
    p = SamplingParams(temperature=0.8)
    want = torch.softmax(logits[0] / 0.8, -1)
    g = make_generator(3)
    n = 4000
    counts = torch.bincount(torch.cat([sample(logits, [p], [g]) for _ in range(n)]), minlength=6).double()
    assert counts[4] == 0
    sd = (n * want * (1 - want)).sqrt()
    assert ((counts - n * want).abs() <= 4 * sd + 1).all(), (counts / n, want)
    V = 500
    x = torch.randn(5, V, generator=torch.Generator().manual_seed(1)) * 3
    mine = SamplingParams(temperature=1.0, seed=11)
    others = [SamplingParams(temperature=0), SamplingParams(temperature=0.7, top_k=5), SamplingParams(top_p=0.5)]
    g_alone, g_mixed = make_generator(11), make_generator(11)
    alone = [int(sample(x[:1], [mine], [g_alone])[0]) for _ in range(30)]
    mixed = []
    for _ in range(30):
        gens = [make_generator(None) for _ in others]
        mixed.append(
            int(sample(x[[1, 0, 2, 3]], [others[0], mine, others[1], others[2]], [gens[0], g_mixed, *gens[1:]])[1])
        )
    assert alone == mixed


def test_find_stop():
    assert find_stop("hello world", ["wor", "xyz"], 0) == 6
    assert find_stop("hello world", ["lo w", "o"], 0) == 3
    assert find_stop("abc", ["d"], 0) == -1


# ---------------------------------------------------------------- logits processing


def reference(logits, p: SamplingParams, prompt, output, stop_ids):
    """One row, one token at a time, as OpenAI and vLLM define each step."""
    x = logits.clone()
    if len(output) < p.min_tokens:
        for t in stop_ids:
            x[t] = float("-inf")
    for t, b in p.logit_bias.items():
        x[t] += b
    for t in set(prompt) | set(output) if p.repetition_penalty != 1.0 else ():
        x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t in set(output):
        x[t] -= p.frequency_penalty * output.count(t) + p.presence_penalty
    return x


CASES = [
    SamplingParams(),  # untouched
    SamplingParams(presence_penalty=1.5),
    SamplingParams(frequency_penalty=-0.7),
    SamplingParams(repetition_penalty=1.3),
    SamplingParams(repetition_penalty=0.6, frequency_penalty=2.0, presence_penalty=-2.0),
    SamplingParams(logit_bias={3: 100.0, 7: -100.0, 0: 0.5}),
    SamplingParams(min_tokens=5),
    SamplingParams(min_tokens=2, logit_bias={2: 5.0}, repetition_penalty=1.1),
]


def test_processing_equals_the_per_token_definition_whatever_the_batch():
    g = torch.Generator().manual_seed(1)
    V = 12
    logits = torch.randn(len(CASES), V, generator=g) * 3
    prompts = [torch.randint(0, V, (5,), generator=g).tolist() for _ in CASES]
    outputs = [torch.randint(0, V, (3,), generator=g).tolist() for _ in CASES]
    stops = [{2, 9} for _ in CASES]
    together = process_logits(logits, CASES, prompts, outputs, stops)
    for i, p in enumerate(CASES):
        want = reference(logits[i], p, prompts[i], outputs[i], stops[i])
        assert torch.allclose(together[i], want), p
        alone = process_logits(logits[i : i + 1], [p], [prompts[i]], [outputs[i]], [stops[i]])
        assert torch.equal(alone[0], together[i])  # bit for bit, whatever the company
    assert torch.equal(together[0], logits[0])
    plain = logits[:1]
    assert process_logits(plain, CASES[:1], prompts[:1], outputs[:1], stops[:1]) is plain  # no cost when off


def test_penalties_change_what_they_should():
    logits = torch.tensor([[2.0, 1.9, -1.0, -1.2]])
    out = [0, 0]
    assert process_logits(logits, [SamplingParams(presence_penalty=0.5)], [[]], [out], [set()]).argmax() == 1
    assert process_logits(logits, [SamplingParams(frequency_penalty=0.06)], [[]], [out], [set()]).argmax() == 1
    assert process_logits(logits, [SamplingParams(frequency_penalty=0.04)], [[]], [out], [set()]).argmax() == 0
    assert process_logits(logits, [SamplingParams(repetition_penalty=1.1)], [[0]], [[]], [set()]).argmax() == 1
    neg = process_logits(logits, [SamplingParams(repetition_penalty=1.5)], [[2]], [[]], [set()])
    assert neg[0, 2] == -1.5  # a negative logit is made more negative
    assert process_logits(logits, [SamplingParams(logit_bias={3: 10.0})], [[]], [[]], [set()]).argmax() == 3
    banned = process_logits(logits, [SamplingParams(min_tokens=1)], [[]], [[]], [{0}])
    assert banned[0, 0] == float("-inf") and banned.argmax() == 1
    assert process_logits(logits, [SamplingParams(min_tokens=1)], [[]], [[5]], [{0}]).argmax() == 0


def test_min_p_restricts_support():
    logits = torch.tensor([[3.0, 2.5, 0.0, -1.0]])  # probs ~ .60 .36 .03 .01
    g = make_generator(0)
    seen = {int(sample(logits, [SamplingParams(min_p=0.1)], [g])[0]) for _ in range(300)}
    assert seen == {0, 1}
    seen = {int(sample(logits, [SamplingParams(min_p=0.0)], [g])[0]) for _ in range(300)}
    assert seen == {0, 1, 2, 3}


@pytest.mark.parametrize(
    "bad",
    [
        dict(presence_penalty=2.5),
        dict(frequency_penalty=-3),
        dict(repetition_penalty=0),
        dict(min_p=1.5),
        dict(min_tokens=-1),
        dict(max_tokens=4, min_tokens=5),
        dict(logit_bias={1: 101}),
        dict(logit_bias={-1: 1}),
        dict(logit_bias={i: 1.0 for i in range(2000)}),
        dict(stop_token_ids=list(range(65))),
    ],
)
def test_out_of_range_values_are_refused(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_values_at_the_edges_keep_the_row_sampleable():
    logits = torch.tensor([[5.0, 4.0, -3.0, 0.0]])
    edges = [
        SamplingParams(repetition_penalty=1e-300, temperature=GREEDY_EPS),
        SamplingParams(repetition_penalty=2.0),
        SamplingParams(presence_penalty=-2, frequency_penalty=-2, temperature=2.0),
        SamplingParams(logit_bias={0: -100.0, 1: -100.0, 2: -100.0, 3: -100.0}, min_p=1.0),
    ]
    for p in edges:
        x = process_logits(logits, [p], [[0, 1, 2, 3]], [[0] * 1000], [set()])
        assert not torch.isnan(x).any() and not torch.isposinf(x).any(), p
        assert bad_rows(x) == []
        sample(x, [p], [make_generator(0)])  # does not raise


def test_routing_analysis_counts_by_hand():
    from benchmarks.routing import analyse, random_rates

    routes = [[[[0, 1], [2, 3]], [[0, 2], [2, 3]], [[1, 0], [3, 2]]]]  # 3 tokens, 2 layers, top-2
    r = analyse(routes, 8)
    assert r["share"][0][:3] == [3 / 6, 2 / 6, 1 / 6] and r["share"][1][2:4] == [0.5, 0.5]
    assert r["keep_first"] == [0.5, 0.5] and r["keep_any"] == [1.0, 1.0]
    assert random_rates(8, 2) == (0.125, 1 - 15 / 28)  # the paper's 46% for top-2 of 8


@pytest.mark.parametrize("V", [1, 7, 256, 257, 1000, 32000])
def test_blocked_draw_is_the_inverse_cdf(V):
    """The draw (block sums, then one block's cumulative sum) picks what a full-row inverse CDF picks
    (up to float rounding at a boundary), never a token at -inf, also at u = 0 and u -> 1, and for
    vocabularies that do not fill the last block."""
    from model.sampling import _draw

    g = torch.Generator().manual_seed(V)
    x = torch.randn(64, V, generator=g) * 4
    x[torch.rand(64, V, generator=g) < 0.5] = float("-inf")  # masked tokens, whole blocks of them too
    x[:, :: max(1, V // 3)][:32] = float("-inf")
    x[torch.arange(64), torch.randint(0, V, (64,), generator=g)] = 0.0  # every row keeps a token
    x[40:48, : V // 2] = float("-inf")  # mass only in the second half
    x[1] = float("-inf")
    x[1, :: max(1, V // 5)] = 1.0  # a few tokens of equal mass, the last of them in the last block
    u = torch.rand(64, generator=g)
    u[0], u[1] = 0.0, 1.0 - 2**-24
    got = _draw(x, u)
    assert torch.isfinite(x[torch.arange(64), got]).all()
    cdf = torch.softmax(x, -1).cumsum(-1)
    want = torch.searchsorted(cdf, (u * cdf[:, -1]).clamp(max=cdf[:, -1] * (1 - 2**-23))[:, None], right=True)[:, 0]
    assert (got == want.clamp(max=V - 1)).float().mean() >= 0.95
    finite = torch.isfinite(x)
    assert got[0] == finite[0].nonzero()[0, 0] and got[1] == finite[1].nonzero()[-1, 0]

from __future__ import annotations

import torch

from model.sampling import SamplingParams, find_stop, make_generator, sample


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


def test_find_stop():
    assert find_stop("hello world", ["wor", "xyz"], 0) == 6
    assert find_stop("hello world", ["lo w", "o"], 0) == 3
    assert find_stop("abc", ["d"], 0) == -1

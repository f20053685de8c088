"""Expert placement and the retry rule shared by the Ray and Serve backends (no Ray needed)."""

from __future__ import annotations

import pytest
import torch

from model.moe import ExpertRequest
from router.experts import ExpertUnavailable, InProcessExperts, expert_groups, split_by_group, wait_with_retries


def test_expert_groups_cover_every_expert_once():
    assert expert_groups(8, 1) == [[i] for i in range(8)]
    assert expert_groups(8, 3) == [[0, 1, 2], [3, 4, 5], [6, 7]]
    with pytest.raises(ValueError):
        expert_groups(8, 0)
    x = torch.zeros(2, 4)
    assert split_by_group({0: x, 4: x, 5: x}, {e: e // 3 for e in range(8)}).keys() == {0, 1}


def test_retries_resend_then_give_up():
    calls = []

    def wait(p):
        calls.append(p)
        if p < 2:
            raise TimeoutError(p)
        return p

    sends = iter(range(1, 10))
    assert wait_with_retries(0, wait, lambda: next(sends), 3, (TimeoutError,), lambda a, e: None, "x") == 2
    assert calls == [0, 1, 2]
    with pytest.raises(ExpertUnavailable, match="failed 2 times"):
        wait_with_retries(0, wait, lambda: 0, 2, (TimeoutError,), lambda a, e: None, "expert group [0]")
    with pytest.raises(KeyError):  # not retryable: raised at once
        wait_with_retries(0, lambda p: {}[p], lambda: 0, 5, (TimeoutError,), lambda a, e: None, "x")


def test_groups_of_two_equal_groups_of_one(tiny_dir):
    one, two = InProcessExperts(tiny_dir, 1, "float32"), InProcessExperts(tiny_dir, 2, "float32")
    x = torch.randn(5, 64)
    req = ExpertRequest(1, {0: x, 3: x[:2], 7: x[1:]})
    a, b = one.submit(req).result(), two.submit(req).result()
    assert a.keys() == b.keys() == {0, 3, 7}
    assert all(torch.equal(a[e], b[e]) for e in a)
    assert one.weight_bytes() == two.weight_bytes()

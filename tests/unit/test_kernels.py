"""The matmul forms the model runs with: oneDNN-packed weights (bf16, float32), fused w1|w3 and q|k|v, the
decode attention path. Each must give the numbers of the plain PyTorch form it replaces."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as Fn

from model import kernels as M
from model.attention import AttnMeta, build_attn_meta
from model.kernels import PackedWeight, linear, prepare_weight, swiglu
from model.moe import ExpertFFN

G = torch.Generator().manual_seed(0)


def randn(*shape, dtype=torch.bfloat16):
    return torch.randn(*shape, generator=G).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 64, 300])
def test_packed_linear_equals_plain(rows, dtype):
    w = randn(768, 512, dtype=dtype) / 16  # above PACK_MIN_FLOAT32: float32 packs it too
    x = randn(rows, 512, dtype=dtype)
    pw = prepare_weight(w)
    if not M._can_pack(w):
        pytest.skip(f"this torch build/CPU cannot pack {dtype} weights for oneDNN (the model then runs plain)")
    assert type(pw) is PackedWeight and pw.nbytes == w.numel() * w.element_size()
    got, want = linear(x, pw), Fn.linear(x, w)
    assert got.dtype == dtype and got.shape == (rows, 768)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
    assert linear(x[:0], pw).shape == (0, 768)


def test_float32_packs_large_weights_only():
    """float32 takes the packed kernel for weights of PACK_MIN_FLOAT32 elements or more (MKL's sgemm
    is slow at decode's few rows there), and keeps small ones plain (a packed call's fixed cost is
    several times a small sgemm's): oneDNN packs on every x86-64 CPU. bf16 packs at any size."""
    import platform

    if platform.machine() not in ("x86_64", "AMD64") or not torch.backends.mkldnn.is_available():
        pytest.skip("oneDNN's float32 packing is checked on x86-64 builds with oneDNN")
    big = randn(M.PACK_MIN_FLOAT32 // 256, 256, dtype=torch.float32)
    assert type(prepare_weight(big)) is PackedWeight
    small = randn(M.PACK_MIN_FLOAT32 // 256 - 1, 256, dtype=torch.float32)
    assert prepare_weight(small) is small
    if M._can_pack(randn(64, 32)):
        assert type(prepare_weight(randn(64, 32))) is PackedWeight  # bf16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opt_out_and_other_dtypes_stay_plain(monkeypatch, dtype):
    w64 = randn(64, 32, dtype=torch.float64)
    assert prepare_weight(w64) is w64
    monkeypatch.setenv("MIXSERVE_PACKED_WEIGHTS", "0")
    w = randn(64, 32, dtype=dtype)
    assert prepare_weight(w) is w


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D,F", [(128, 352), (512, 1024)])  # float32: plain (fused w1|w3), then packed
def test_expert_ffn_equals_swiglu(dtype, D, F):
    w1, w3 = randn(F, D, dtype=dtype) / D**0.5, randn(F, D, dtype=dtype) / D**0.5
    w2 = randn(D, F, dtype=dtype) / F**0.5
    ffn = ExpertFFN(w1, w2, w3)
    for n in (1, 9, 260):
        x = randn(n, D, dtype=dtype)
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(ffn(x).float(), swiglu(x, w1, w2, w3).float(), rtol=tol, atol=tol)
    assert ffn.nbytes == 3 * D * F * w1.element_size()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_mask_handles_ragged_contexts(dtype):
    """Sequences of different lengths in one decode batch: padding is masked out, never attended."""
    meta = build_attn_meta([(list(range(5)), 1), (list(range(10, 13)), 1)])
    bias = meta.dec_bias(dtype)
    assert bias.shape == (2, 1, 1, 5) and bias.dtype == dtype
    assert torch.isinf(bias[1, 0, 0, 3:]).all() and (bias[1, 0, 0, :3] == 0).all() and (bias[0] == 0).all()
    assert meta.dec_bias(dtype) is bias  # built once per step, shared by the layers
    assert isinstance(meta, AttnMeta)


@pytest.mark.parametrize("seqs", [[], [(list(range(5)), 1), (list(range(10, 13)), 1)], [(list(range(4)), 4)]])
def test_paged_attention_answers_every_row_of_a_step_even_none(seqs):
    """An empty step, a decode-only step (its output returned as SDPA gives it) and a prefill."""
    from model.attention import paged_attention

    T, H, K, d, S = sum(n for _, n in seqs), 4, 2, 8, 32
    q, k, v = (randn(T, n, d, dtype=torch.float32) for n in (H, K, K))
    kc, vc = torch.zeros(S, K, d), torch.zeros(S, K, d)
    out = paged_attention(q, k, v, kc, vc, build_attn_meta(seqs))
    assert out.shape == (T, H, d) and torch.isfinite(out).all()


def test_row_buckets_bound_the_shapes_and_the_padding():
    sizes = range(1, 8193)
    buckets = [M.row_bucket(n) for n in sizes]
    assert all(b >= n for n, b in zip(sizes, buckets))
    assert all(a <= b for a, b in zip(buckets, buckets[1:]))  # monotonic
    assert max((b - n) / n for n, b in zip(sizes, buckets) if n > 32) <= 0.125
    assert len(set(buckets)) <= 80  # a bounded number of kernel shapes per weight, however long it serves
    assert M.row_bucket(1) == 4 and M.row_bucket(32) == 32 and M.row_bucket(1025) == 1152

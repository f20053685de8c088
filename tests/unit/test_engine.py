"""Consistency of the in-process engine: cached = uncached, batch-independence, seeded sampling."""

from __future__ import annotations

import pytest
import torch

from cluster.build import local_engine
from model.model import Transformer
from model.sampling import SamplingParams
from router.engine import EngineConfig, EngineError, Overloaded

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tiny_dir):
    return Transformer.from_pretrained(tiny_dir, "float32")


def prompts(tok):
    texts = [
        "Hello there",
        "The quick brown fox jumps over the lazy dog, and then it",
        "Un deux trois " * 12,
        "1 2 3",
        "Résumé: naïve café — 你好，世界",
    ]
    return [tok.encode(t) for t in texts]


def recompute_greedy(model, ids, n):
    ids = list(ids)
    out = []
    for _ in range(n):
        t = int(model.logits(ids)[-1].argmax())
        ids.append(t)
        out.append(t)
    return out


@pytest.mark.parametrize("micro", [1, 2])
def test_kv_cached_decoding_equals_full_recomputation(tiny_dir, model, micro):
    eng = local_engine(tiny_dir, "float32", EngineConfig(max_num_batched_tokens=32, num_microbatches=micro))
    ps = prompts(eng.tokenizer)
    outs = eng.generate(ps, GREEDY)
    for p, o in zip(ps, outs):
        assert o.new_token_ids == recompute_greedy(model, p, 12)
        assert o.finish_reason == "length" and o.completion_tokens == 12 and o.prompt_tokens == len(p)


def test_cached_logits_equal_uncached(tiny_dir, model):
    """Decode-step logits through the cache equal the last row of a full forward, to float32 rounding."""
    eng = local_engine(tiny_dir, "float32", EngineConfig())
    ids = eng.tokenizer.encode("Caching must not change the numbers")
    out = eng.generate([ids], SamplingParams(max_tokens=6, temperature=0, logprobs=5, ignore_eos=True))[0]
    full = torch.log_softmax(model.logits(ids + out.new_token_ids[:-1]), -1)[len(ids) - 1 :]
    for i, (tok, lp, alts) in enumerate(out.logprobs):
        assert abs(lp - full[i, tok].item()) < 1e-4
        assert [a for a, _ in alts] == full[i].topk(5).indices.tolist()


def test_output_independent_of_batch_company(tiny_dir):
    """Alone, in a batch, with chunked prefill and under KV pressure (preemption), the same tokens."""
    solo_eng = local_engine(tiny_dir, "float32", EngineConfig())
    ps = prompts(solo_eng.tokenizer)
    solo = [solo_eng.generate([p], GREEDY)[0].new_token_ids for p in ps]
    configs = [
        EngineConfig(max_num_batched_tokens=512),
        EngineConfig(max_num_batched_tokens=7, num_microbatches=2),
        EngineConfig(max_num_batched_tokens=64, kv_cache_tokens=96, block_size=8),  # forces preemption
        EngineConfig(max_num_seqs=2),
    ]
    for cfg in configs:
        eng = local_engine(tiny_dir, "float32", cfg)
        together = [o.new_token_ids for o in eng.generate(ps, GREEDY)]
        assert together == solo, cfg
    assert eng.blocks.num_free == eng.blocks.num_blocks  # every block came back


def test_preemption_happens_under_kv_pressure(tiny_dir):
    eng = local_engine(tiny_dir, "float32", EngineConfig(kv_cache_tokens=96, block_size=8))
    ps = prompts(eng.tokenizer)
    eng.generate(ps, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    assert eng.scheduler.num_preemptions > 0


def test_seeded_sampling_is_reproducible(tiny_dir):
    eng = local_engine(tiny_dir, "float32", EngineConfig())
    ps = prompts(eng.tokenizer)
    sp = lambda seed: SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=seed, ignore_eos=True)
    a = eng.generate([ps[0]], sp(7))[0].new_token_ids
    b = eng.generate(ps, [sp(7)] + [sp(i) for i in range(1, len(ps))])[0].new_token_ids  # other company
    c = eng.generate([ps[0]], sp(8))[0].new_token_ids
    assert a == b
    assert a != c


def test_stop_strings_and_eos(tiny_dir):
    eng = local_engine(tiny_dir, "float32", EngineConfig())
    p = eng.tokenizer.encode("Hello there")
    full = eng.generate([p], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    stop = full.text[5:8]
    cut = eng.generate([p], SamplingParams(max_tokens=12, temperature=0, stop=[stop], ignore_eos=True))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.find(stop)]
    # a stop token id ends the sequence with that token counted but no text for it
    t3 = full.new_token_ids[3]
    st = eng.generate([p], SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[t3]))[0]
    assert st.finish_reason == "stop" and st.new_token_ids == full.new_token_ids[:4]


def test_streamed_deltas_add_up_to_the_final_text(tiny_dir):
    eng = local_engine(tiny_dir, "float32", EngineConfig())
    tok = eng.tokenizer
    p = tok.encode("Streaming: ")
    rid = eng.add_request(p, SamplingParams(max_tokens=30, temperature=0.8, seed=3, ignore_eos=True))
    text, toks, n_outputs = "", [], 0
    while eng.has_unfinished():
        for o in eng.step():
            assert o.req_id == rid
            text += o.text
            toks += o.new_token_ids
            n_outputs += 1
    assert n_outputs == 30 and len(toks) == 30
    assert text == tok.decode(p + toks)[len(tok.decode(p)) :]


def test_bad_requests_are_refused_clearly(tiny_dir):
    eng = local_engine(tiny_dir, "float32", EngineConfig(kv_cache_tokens=64, max_waiting=2))
    with pytest.raises(EngineError, match="empty"):
        eng.add_request([], GREEDY)
    with pytest.raises(EngineError, match="token ids"):
        eng.add_request([1, 99999], GREEDY)
    with pytest.raises(EngineError, match="KV cache"):
        eng.add_request(list(range(3, 200)), GREEDY)
    first = eng.add_request([1, 5], GREEDY)
    eng.add_request([1, 6], GREEDY)
    with pytest.raises(Overloaded):
        eng.add_request([1, 7], GREEDY)
    assert eng.abort(first) and not eng.abort("nope")
    eng.add_request([1, 7], GREEDY)  # room again after the abort
    for bad in [dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_k=-2), dict(stop=[""])]:
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_merged_outputs_are_the_stream_in_fewer_pieces(tiny_dir):
    """A stream that falls behind sends runs of outputs merged: same tokens, text, logprobs and end."""
    eng = local_engine(tiny_dir, "float32", EngineConfig())
    p = eng.tokenizer.encode("Merge: ")
    rid = eng.add_request(p, SamplingParams(max_tokens=9, temperature=0.0, logprobs=2, stop=["zz"]))
    outs = []
    while eng.has_unfinished():
        outs += eng.step()
    assert len(outs) > 3 and all(o.req_id == rid for o in outs)
    for cut in (1, 2, len(outs) - 1):  # merge a run at the front, then the rest
        head, tail = outs[0], outs[cut]
        for o in outs[1:cut]:
            head = head.merge(o)
        for o in outs[cut + 1 :]:
            tail = tail.merge(o)
        whole = head.merge(tail)
        assert whole.new_token_ids == [t for o in outs for t in o.new_token_ids]
        assert whole.text == "".join(o.text for o in outs)
        assert whole.logprobs == [lp for o in outs for lp in o.logprobs]
        last = outs[-1]
        assert (whole.finished, whole.finish_reason, whole.completion_tokens, whole.error) == (
            last.finished,
            last.finish_reason,
            last.completion_tokens,
            last.error,
        )
        assert whole.prompt_tokens == len(p) and not head.finished


PROCESSED = [
    SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, repetition_penalty=1.4),
    SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, frequency_penalty=1.0, presence_penalty=0.5),
    SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logit_bias={29889: 3.0, 13: -50.0}),
    SamplingParams(max_tokens=12, temperature=0.9, seed=5, ignore_eos=True, min_p=0.05, presence_penalty=-1.0),
    SamplingParams(max_tokens=12, temperature=0, min_tokens=10),
]


def test_penalties_and_biases_are_batch_independent_and_have_their_effect(tiny_dir):
    eng = local_engine(tiny_dir, "float32", EngineConfig())
    ps = prompts(eng.tokenizer)
    solo = [eng.generate([p], sp)[0].new_token_ids for p, sp in zip(ps, PROCESSED)]
    together = [o.new_token_ids for o in eng.generate(ps, PROCESSED)]
    assert together == solo
    chunked = local_engine(tiny_dir, "float32", EngineConfig(max_num_batched_tokens=7, num_microbatches=2))
    assert [o.new_token_ids for o in chunked.generate(ps, PROCESSED)] == solo
    # the effects, on the prompt where the tiny model repeats itself ("Un deux trois " x 12)
    rep = ps[2]
    plain = eng.generate([rep], GREEDY)[0].new_token_ids
    assert len(set(plain)) < len(plain)
    for sp in PROCESSED[:2]:
        got = eng.generate([rep], sp)[0].new_token_ids
        assert got != plain and len(set(got)) > len(set(plain)), sp
    biased = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logit_bias={plain[3]: -100.0, 13: 100.0})
    got = eng.generate([rep], biased)[0].new_token_ids
    assert got == [13] * 12


def test_min_tokens_holds_off_every_stop(tiny_dir):
    eng = local_engine(tiny_dir, "float32", EngineConfig())
    p = eng.tokenizer.encode("Hello there")
    full = eng.generate([p], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    t0 = full.new_token_ids[0]
    early = eng.generate([p], SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[t0]))[0]
    assert early.new_token_ids == [t0] and early.stop_reason == t0
    held = eng.generate([p], SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[t0], min_tokens=6))[0]
    assert len(held.new_token_ids) >= 6 and t0 not in held.new_token_ids[:6]
    # a stop string inside the first min_tokens tokens' text does not end it
    stop = full.text[:3]
    cut = eng.generate([p], SamplingParams(max_tokens=12, temperature=0, stop=[stop], ignore_eos=True, min_tokens=8))[0]
    assert cut.completion_tokens >= 8


def test_stop_string_kept_when_asked_and_stop_reason(tiny_dir):
    eng = local_engine(tiny_dir, "float32", EngineConfig())
    p = eng.tokenizer.encode("Hello there")
    full = eng.generate([p], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    stop = full.text[5:8]
    kept = eng.generate(
        [p], SamplingParams(max_tokens=12, temperature=0, stop=[stop], ignore_eos=True, include_stop_str_in_output=True)
    )[0]
    i = full.text.find(stop)
    assert kept.text == full.text[: i + len(stop)] and kept.stop_reason == stop and kept.finish_reason == "stop"
    assert full.stop_reason is None
    t3 = full.new_token_ids[3]
    st = eng.generate(
        [p], SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[t3], include_stop_str_in_output=True)
    )[0]
    assert st.text == eng.tokenizer.decode(p + full.new_token_ids[:4])[len(eng.tokenizer.decode(p)) :]


def test_special_tokens_are_text_only_when_asked(tiny_dir):
    eng = local_engine(tiny_dir, "float32", EngineConfig())
    p = eng.tokenizer.encode("Specials")
    eos = eng.tokenizer.eos_id
    sp = dict(max_tokens=4, temperature=0, ignore_eos=True, logit_bias={eos: 100.0})
    skipped = eng.generate([p], SamplingParams(**sp))[0]
    kept = eng.generate([p], SamplingParams(**sp, skip_special_tokens=False))[0]
    assert skipped.new_token_ids == kept.new_token_ids == [eos] * 4
    assert skipped.text == "" and kept.text == "</s>" * 4


def reference_routes(tiny_dir, ids: list[int]) -> list:
    """Every position's top-k experts per layer from one full forward: [T][layers][k]."""
    from model.attention import KVPool, build_attn_meta
    from model.moe import run_local

    model = Transformer.from_pretrained(tiny_dir, "float32")
    routes: list = []
    kv = KVPool(model.cfg, len(ids), model.dense.dtype)
    meta = build_attn_meta([(list(range(len(ids))), len(ids))], model.cfg.sliding_window)
    run_local(model.dense.forward(torch.tensor(ids), meta, kv, None, routes), model.experts)
    return torch.stack(routes, dim=1).tolist()


def test_routed_experts_are_each_positions_routing_whatever_the_batch(tiny_dir):
    eng = local_engine(tiny_dir, "float32", EngineConfig())
    ps = prompts(eng.tokenizer)
    sp = SamplingParams(
        max_tokens=8, temperature=0, ignore_eos=True, return_routed_experts=True, return_prompt_routed_experts=True
    )
    outs = eng.generate(ps, [sp] + [GREEDY] * (len(ps) - 1))
    o = outs[0]
    ref = reference_routes(tiny_dir, ps[0] + o.new_token_ids)
    P, cfg = len(ps[0]), eng.dense.cfg
    assert o.prompt_routed_experts == ref[:P]
    assert o.routed_experts == ref[P - 1 : P - 1 + len(o.new_token_ids)]  # the position that chose each token
    assert len(o.routed_experts[0]) == cfg.num_hidden_layers and len(o.routed_experts[0][0]) == cfg.num_experts_per_tok
    assert all(outs[i].routed_experts is None for i in range(1, len(ps)))  # off unless asked
    # chunked prefill, micro-batches and preemption give the same routes
    tight = local_engine(
        tiny_dir,
        "float32",
        EngineConfig(max_num_batched_tokens=7, num_microbatches=2, kv_cache_tokens=96, block_size=8),
    )
    again = tight.generate(ps, [sp] * len(ps))
    assert again[0].routed_experts == o.routed_experts and again[0].prompt_routed_experts == o.prompt_routed_experts
    for p, a in zip(ps[1:], again[1:]):
        want = reference_routes(tiny_dir, p + a.new_token_ids)
        assert a.prompt_routed_experts == want[: len(p)]
        assert a.routed_experts == want[len(p) - 1 : len(p) - 1 + len(a.new_token_ids)]


def test_prompt_logprobs_equal_the_whole_models_whatever_the_chunking_company_and_preemption(tiny_dir, model):
    """Each prompt token's logprob given the ones before it, computed on the prompt rows of the batched
    forward: equal to the whole model's log-softmax, with prefill chunked into pieces of 7 tokens, in a
    batch with other requests (which ask for none and are unchanged), and under KV pressure."""
    asks = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, prompt_logprobs=2)
    for cfg in (
        EngineConfig(),
        EngineConfig(max_num_batched_tokens=7),
        EngineConfig(kv_cache_tokens=96, block_size=8, max_num_batched_tokens=16),
    ):
        eng = local_engine(tiny_dir, "float32", cfg)
        ps = prompts(eng.tokenizer)
        outs = eng.generate(ps, [asks, GREEDY] * 2 + [asks])
        for ids, out, sp in zip(ps, outs, [asks, GREEDY] * 2 + [asks]):
            if sp.prompt_logprobs is None:
                assert out.prompt_logprobs is None
                assert out.new_token_ids == local_engine(tiny_dir, "float32").generate([ids], GREEDY)[0].new_token_ids
                continue
            ref = torch.log_softmax(model.logits(ids), dim=-1)
            assert len(out.prompt_logprobs) == len(ids) and out.prompt_logprobs[0] is None
            for i, (t, lp, rank, alts) in enumerate(out.prompt_logprobs[1:], start=1):
                assert t == ids[i] and abs(lp - ref[i - 1, t].item()) < 1e-4
                assert rank == int((ref[i - 1] > ref[i - 1, t]).sum()) + 1 and len(alts) == 2
                assert alts[0][0] == int(ref[i - 1].argmax())

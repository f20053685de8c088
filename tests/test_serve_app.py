"""The Serve application (AttentionWorker + ExpertDeployments) on a local Ray: same tokens as in-process."""

from __future__ import annotations

import pytest
import ray
from ray import serve

from cluster.app import build_attention
from cluster.config import AppConfig
from model.sampling import SamplingParams
from router.engine import LLMEngine

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def app(tiny_dir):
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    cfg = AppConfig(model=tiny_dir, dtype="float32",
                    attention={"num_cpus": 0}, experts={"num_cpus": 0, "experts_per_worker": 2})
    handle = serve.run(build_attention(cfg), name="mixserve", route_prefix=None)
    yield handle
    serve.shutdown()
    ray.shutdown()


def test_streamed_generation_equals_in_process(app, tiny_dir):
    local = LLMEngine.local(tiny_dir, "float32")
    texts = ["Hello there", "The quick brown fox jumps over the lazy dog", "1 2 3"]
    prompts = [local.tokenizer.encode(t) for t in texts]
    want = local.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    gens = [app.options(stream=True).generate.remote(p, params) for p in prompts]  # concurrent
    for g, w in zip(gens, want):
        toks, text, last = [], "", None
        for out in g:
            toks += out.new_token_ids
            text += out.text
            last = out
        assert toks == w.new_token_ids and text == w.text
        assert last.finished and last.finish_reason == "length" and last.completion_tokens == 12
    st = app.stats.remote().result()
    assert st["running"] == 0 and st["waiting"] == 0 and st["kv_usage"] == 0.0
    # measured inside the attention replica: exactly the dense part, in the serving dtype (float32)
    from math import prod

    from model.checkpoint import Checkpoint, dense_names

    assert st["dense_bytes"] == 4 * sum(prod(s) for s in dense_names(Checkpoint(tiny_dir).config).values())


def test_bad_request_does_not_take_the_worker_down(app, tiny_dir):
    """A request the engine refuses ends with one error output; the replica goes on serving."""
    outs = list(app.options(stream=True).generate.remote([1, 99999], SamplingParams(max_tokens=3)))
    assert len(outs) == 1 and outs[0].finished and outs[0].error_kind == "invalid" and "token ids" in outs[0].error
    outs = list(app.options(stream=True).generate.remote([1, 2, 3], SamplingParams(max_tokens=3, temperature=0.0)))
    assert outs[-1].finished and outs[-1].error is None and outs[-1].completion_tokens == 3

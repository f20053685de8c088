"""The Serve application (AttentionWorker + ExpertDeployments) on a local Ray: same tokens as in-process."""

from __future__ import annotations

import pytest
import ray
from ray import serve

from cluster.build import local_engine
from cluster.config import AppConfig
from cluster.serve.app import build_attention
from model.sampling import SamplingParams

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def app(tiny_dir):
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    cfg = AppConfig(
        model=tiny_dir,
        dtype="float32",
        attention={"num_cpus": 0, "num_threads": 2},
        experts={"num_cpus": 0, "experts_per_worker": 2},
    )
    handle = serve.run(build_attention(cfg), name="mixserve", route_prefix=None)
    yield handle
    serve.shutdown()
    ray.shutdown()


def test_streamed_generation_equals_in_process(app, tiny_dir):
    local = local_engine(tiny_dir, "float32")
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
    assert st.running == 0 and st.waiting == 0 and st.kv_usage == 0.0
    # measured inside the attention replica: exactly the dense part, in the serving dtype (float32)
    from math import prod

    from model.checkpoint import Checkpoint, dense_names

    assert st.dense_bytes == 4 * sum(prod(s) for s in dense_names(Checkpoint(tiny_dir).config).values())


def test_bad_request_does_not_take_the_worker_down(app, tiny_dir):
    """A request the engine refuses ends with one error output; the replica goes on serving."""
    outs = list(app.options(stream=True).generate.remote([1, 99999], SamplingParams(max_tokens=3)))
    assert len(outs) == 1 and outs[0].finished and outs[0].error_kind == "invalid" and "token ids" in outs[0].error
    outs = list(app.options(stream=True).generate.remote([1, 2, 3], SamplingParams(max_tokens=3, temperature=0.0)))
    assert outs[-1].finished and outs[-1].error is None and outs[-1].completion_tokens == 3


def test_the_app_reaches_its_experts_over_the_data_plane(app, tiny_dir):
    """Expert replicas announce their listeners to the directory; the attention replica sends each
    layer's batches over those channels, not through Serve handles."""
    import time

    from cluster.serve.directory import REFRESH_S

    directory = serve.get_deployment_handle("expert-directory", app_name="mixserve")
    deadline = time.monotonic() + 30
    while len(view := directory.view.remote().result()) < 4:
        assert time.monotonic() < deadline, f"expert replicas did not register: {view}"
        time.sleep(0.2)
    for g in range(4):
        info = serve.get_deployment_handle(f"expert-group-{g}", app_name="mixserve").info.remote().result()
        assert view[g] == [(info["replica"], *info["channel_address"])]
    time.sleep(3 * REFRESH_S)  # the attention replica has read the view
    before = app.stats.remote().result()
    outs = list(app.options(stream=True).generate.remote([1, 2, 3, 4], SamplingParams(max_tokens=8, temperature=0.0)))
    assert outs[-1].finished and outs[-1].error is None
    after = app.stats.remote().result()
    assert after.expert_channel_calls > before.expert_channel_calls
    assert after.expert_ray_calls == before.expert_ray_calls, "a call went through Serve handles"
    assert len(after.expert_channels) == 4 and after.expert_retries == 0


def test_the_engine_takes_its_configured_threads_though_the_replica_reserves_no_cpu(app):
    """Ray gives an actor without CPUs one OpenMP thread; the attention engine (num_cpus: 0 here) sets
    the threads its config names instead (num_threads: 2; without it, AttentionConfig.threads()'s rule,
    unit-tested in test_config.py)."""
    assert app.stats.remote().result().torch_threads == 2


def test_the_engine_process_runs_with_mixserves_short_openmp_spin(app):
    """The attention replica's torch threads spin briefly, then sleep (cluster/config.py THREAD_ENV):
    libgomp reads the setting when torch loads, so it has to be in the replica process's environment."""
    from cluster.config import THREAD_ENV

    pid = app.stats.remote().result().pid
    with open(f"/proc/{pid}/environ", "rb") as f:
        env = dict(kv.split("=", 1) for kv in f.read().decode(errors="replace").split("\0") if "=" in kv)
    assert {k: env.get(k) for k in THREAD_ENV} == THREAD_ENV

"""The disaggregated engine on a local Ray: same tokens as in-process, exact memory shares, survives
an expert replica dying mid-generation. One Ray instance for the module."""

from __future__ import annotations

import time

import pytest
import ray

from cluster.build import local_engine
from cluster.config import ExpertsConfig
from cluster.runtime.actors import RayExperts
from model.checkpoint import Checkpoint, dense_names, expert_names
from model.model import MixtralDense
from model.sampling import SamplingParams
from model.tiny import preset_config, write_checkpoint
from router.engine import EngineConfig, LLMEngine
from router.experts import expert_groups

pytestmark = pytest.mark.ray
GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
TEXTS = ["Hi", "The quick brown fox jumps over the lazy dog", "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17", "Bonjour"]


@pytest.fixture(scope="module", autouse=True)
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def top3_dir(tmp_path_factory):
    cfg = preset_config("tiny", num_local_experts=4, num_experts_per_tok=3, num_hidden_layers=3)
    return str(write_checkpoint(tmp_path_factory.mktemp("top3"), cfg, seed=5))


def disaggregated(model_dir, experts_cfg, engine_cfg=None):
    ckpt = Checkpoint(model_dir)
    groups = expert_groups(ckpt.config.num_local_experts, experts_cfg.experts_per_worker)
    experts = RayExperts(model_dir, groups, "float32", experts_cfg)
    experts.wait_ready()
    local = local_engine(model_dir, "float32")
    eng = LLMEngine(
        MixtralDense.from_checkpoint(ckpt, "float32"),
        experts,
        local.tokenizer,
        engine_cfg or EngineConfig(num_microbatches=2, max_num_batched_tokens=16),
    )
    return eng, local, experts


@pytest.mark.parametrize(
    "which,per_worker,transport",
    [
        ("tiny", 1, "channel"),
        ("tiny", 2, "channel"),
        ("top3", 1, "channel"),
        ("top3", 2, "channel"),
        ("tiny", 1, "ray"),
    ],
)
def test_same_tokens_as_in_process(request, tiny_dir, top3_dir, which, per_worker, transport):
    model_dir = tiny_dir if which == "tiny" else top3_dir
    eng, local, experts = disaggregated(
        model_dir, ExpertsConfig(num_cpus=0, experts_per_worker=per_worker, transport=transport)
    )
    try:
        ps = [local.tokenizer.encode(t) for t in TEXTS]
        got = [o.new_token_ids for o in eng.generate(ps, GREEDY)]
        want = [o.new_token_ids for o in local.generate(ps, GREEDY)]
        assert got == want
        infos = experts.wait_ready()
        assert sum(i["stats"]["calls"] for i in infos) > 0
        # The data plane really in use: every call over the channels, or every call through Ray.
        if transport == "channel":
            assert experts.channel_calls > 0 and experts.ray_calls == 0
        else:
            assert experts.ray_calls > 0 and experts.channel_calls == 0
        assert sorted(e for i in infos for e in i["experts"]) == list(range(local.dense.cfg.num_local_experts))
    finally:
        experts.shutdown()


def test_each_worker_holds_exactly_its_share(tiny_dir):
    ckpt = Checkpoint(tiny_dir)
    cfg = ckpt.config
    experts = RayExperts(
        tiny_dir, expert_groups(cfg.num_local_experts, 2), "auto", ExpertsConfig(num_cpus=0, experts_per_worker=2)
    )
    try:
        infos = experts.wait_ready()
        size = lambda names: sum(cfg.dtype.itemsize * __import__("math").prod(s) for s in names.values())
        for info in infos:  # measured inside each worker process
            share = {}
            for l in range(cfg.num_hidden_layers):
                for e in info["experts"]:
                    share.update(expert_names(cfg, l, e))
            assert info["bytes_read"] == size(share)
            assert info["weight_bytes"] == size(share)
        dense = MixtralDense.from_checkpoint(ckpt)
        assert dense.nbytes() == size(dense_names(cfg))
    finally:
        experts.shutdown()


def generate_with_fault(eng, local, max_tokens: int, at_step: int, fault) -> tuple[list, list]:
    """Greedy TEXTS through `eng`, calling `fault()` before step `at_step`: (tokens got, tokens wanted)."""
    ps = [local.tokenizer.encode(t) for t in TEXTS]
    sp = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    want = [o.new_token_ids for o in local.generate(ps, sp)]
    rids = [eng.add_request(p, sp) for p in ps]
    got = {r: [] for r in rids}
    steps = 0
    while eng.has_unfinished():
        if steps == at_step:
            fault()
        for o in eng.step():
            got[o.req_id] += o.new_token_ids
        steps += 1
    return [got[r] for r in rids], want


def restarted_pids(actors, timeout_s: float = 120) -> list[int]:
    """Each actor's pid once it answers again (a killed one is restarting for a while)."""
    deadline, out = time.monotonic() + timeout_s, []
    for a in actors:
        while True:
            try:
                out.append(ray.get(a.info.remote(), timeout=30)["pid"])
                break
            except (ray.exceptions.ActorUnavailableError, ray.exceptions.RayActorError):
                assert time.monotonic() < deadline, "a killed expert actor did not come back"
                time.sleep(0.5)
    return out


def test_expert_replica_killed_mid_generation(tiny_dir):
    eng, local, experts = disaggregated(tiny_dir, ExpertsConfig(num_cpus=0, replicas=2, call_timeout_s=20))
    try:
        killed = [experts.replicas[0][0], experts.replicas[1][1]]  # one replica of groups 0 and 1
        pids = [ray.get(a.info.remote())["pid"] for a in killed]

        def kill():  # they restart; calls in flight on them are re-sent, new ones go to the live replicas
            for a in killed:
                ray.kill(a, no_restart=False)

        got, want = generate_with_fault(eng, local, 24, 4, kill)
        assert got == want
        # The kill happened during the run (the actors were restarted), and the data plane carried the
        # calls. Whether a call was in flight on a killed replica (a retry) or the client saw the broken
        # connection first (no retry) depends on timing; either way no token changed.
        assert restarted_pids(killed) != pids
        assert experts.channel_calls > 0
    finally:
        experts.shutdown()


def test_a_draining_replica_gets_no_new_calls_and_the_tokens_stay_the_same(tiny_dir):
    """Draining one replica of every group mid-generation (what Serve's removal of a replica does):
    frames it refuses are re-sent to the other replica at once, nothing fails, no token changes,
    and afterwards only the live replicas carry calls."""
    eng, local, experts = disaggregated(tiny_dir, ExpertsConfig(num_cpus=0, experts_per_worker=4, replicas=2))
    try:
        seen = {}

        def drain():
            seen["drained"] = ray.get([reps[0].drain.remote(5.0) for reps in experts.replicas])
            seen["served"] = [ray.get(reps[0].info.remote())["stats"]["tokens"] for reps in experts.replicas]

        got, want = generate_with_fault(eng, local, 20, 3, drain)
        assert got == want
        assert seen["drained"] == [True, True]  # nothing was left running when the listeners closed
        after = [ray.get(reps[0].info.remote())["stats"]["tokens"] for reps in experts.replicas]
        assert after == seen["served"], "a drained replica ran calls after its drain"
        assert experts.ray_calls == 0 and experts.channel_calls > 0
        assert all(k.endswith("/1") for k in experts.channels)  # only the live replicas have connections
    finally:
        experts.shutdown()

"""Placement on a multi-node cluster (several raylets on one machine, as Ray tests itself)."""

from __future__ import annotations

import pytest
import ray
from ray.cluster_utils import Cluster

from cluster.build import local_engine
from cluster.config import ExpertsConfig
from cluster.runtime.actors import RayExperts
from model.sampling import SamplingParams
from router.experts import expert_groups

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    expert_nodes = [c.add_node(num_cpus=1, resources={"expert_slot": 8}) for _ in range(2)]
    ray.init(address=c.address, log_to_driver=False)
    c.wait_for_nodes()
    yield c, {n.node_id for n in expert_nodes}
    ray.shutdown()
    c.shutdown()


def test_expert_replicas_on_expert_nodes_spread(cluster, tiny_dir):
    _, expert_nodes = cluster
    cfg = ExpertsConfig(num_cpus=0, replicas=2, experts_per_worker=2, resources={"expert_slot": 1})
    experts = RayExperts(tiny_dir, expert_groups(8, cfg.experts_per_worker), "float32", cfg)
    try:
        experts.wait_ready(timeout_s=240)
        for g, reps in enumerate(experts.replicas):
            nodes = [i["node_id"] for i in ray.get([a.info.remote() for a in reps])]
            assert set(nodes) <= expert_nodes, "an expert replica landed off the expert nodes"
            assert len(set(nodes)) == len(nodes), f"replicas of group {g} share a node"
        # and the engine runs across them
        from model.checkpoint import Checkpoint
        from model.model import MixtralDense
        from router.engine import EngineConfig, LLMEngine

        local = local_engine(tiny_dir, "float32")
        eng = LLMEngine(
            MixtralDense.from_checkpoint(Checkpoint(tiny_dir), "float32"),
            experts,
            local.tokenizer,
            EngineConfig(num_microbatches=2),
        )
        p = [local.tokenizer.encode("Across nodes")]
        sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
        assert eng.generate(p, sp)[0].new_token_ids == local.generate(p, sp)[0].new_token_ids
    finally:
        experts.shutdown()

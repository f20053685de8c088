"""Shared fixtures. Unit tests here need no Ray; Ray tests share one cluster per module group."""

from __future__ import annotations

import pytest
import torch

from model.config import MixtralConfig
from model.tiny import preset_config, write_checkpoint


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return str(write_checkpoint(tmp_path_factory.mktemp("tiny"), preset_config("tiny")))


@pytest.fixture(scope="session")
def tiny_sharded_dir(tmp_path_factory):
    return str(write_checkpoint(tmp_path_factory.mktemp("tiny-sharded"), preset_config("tiny"), shards=3))


def hf_checkpoint(path, *, kv_heads=2, experts=4, top_k=2, dtype=torch.float32, shard=False, layers=2, seed=0,
                  old_form=False):
    """A random MixtralForCausalLM written by transformers itself (save_pretrained)."""
    from transformers import MixtralConfig as HFConfig
    from transformers import MixtralForCausalLM

    torch.manual_seed(seed)
    c = HFConfig(
        vocab_size=32000, hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=kv_heads, num_local_experts=experts, num_experts_per_tok=top_k,
        max_position_embeddings=512, rope_theta=10000.0,
    )
    m = MixtralForCausalLM(c)
    with torch.no_grad():  # larger weights than HF's init, so logits have a real spread
        for n, p in m.named_parameters():
            if "norm" not in n:
                p.normal_(0, 1.0 / p.shape[-1] ** 0.5 if "embed" not in n else 1.0)
    m = m.to(dtype).eval()
    m.save_pretrained(path, max_shard_size="200KB" if shard else "10GB")
    if old_form:  # rewrite config.json in the older Hub form (rope_theta, torch_dtype at top level)
        import json

        cfgp = path / "config.json"
        d = json.loads(cfgp.read_text())
        d["rope_theta"] = d.pop("rope_parameters")["rope_theta"]
        d["torch_dtype"] = d.pop("dtype")
        cfgp.write_text(json.dumps(d))
    return m


@pytest.fixture
def small_cfg() -> MixtralConfig:
    return MixtralConfig(vocab_size=32000, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                         torch_dtype="float32")

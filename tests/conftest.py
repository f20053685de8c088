"""Shared fixtures. tests/unit/ needs no Ray and no subprocess; tests/integration/ shares one Ray (and
Serve) per module. Helpers that are not fixtures: tests/support.py."""

from __future__ import annotations

import pytest

from model.config import MixtralConfig
from model.tiny import preset_config, write_checkpoint


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return str(write_checkpoint(tmp_path_factory.mktemp("tiny"), preset_config("tiny")))


@pytest.fixture(scope="session")
def tiny_sharded_dir(tmp_path_factory):
    return str(write_checkpoint(tmp_path_factory.mktemp("tiny-sharded"), preset_config("tiny"), shards=3))


@pytest.fixture
def small_cfg() -> MixtralConfig:
    return MixtralConfig(
        vocab_size=32000,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        torch_dtype="float32",
    )


@pytest.fixture(scope="module")
def grpc_port() -> int:
    """A free port for a module's Serve gRPC proxy (picked when the module's server starts, not at import)."""
    from tests.support import free_port

    return free_port()

"""The YAML config: shipped files validate; unknown keys and bad values name the key and the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.config import ConfigFileError, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("name", ["tiny.yaml", "mini.yaml", "mixtral-8x7b.yaml"])
def test_shipped_configs_validate(name):
    cfg = load_config(CONFIGS / name)
    assert cfg.server.port == 8000


def test_real_model_config_places_workers():
    cfg = load_config(CONFIGS / "mixtral-8x7b.yaml")
    assert cfg.experts.resources == {"expert_slot": 1} and cfg.experts.num_gpus == 1
    assert cfg.attention.resources == {"attention_slot": 1}


@pytest.mark.parametrize(
    "text,key",
    [
        ("engine:\n  max_num_seqz: 4\n", "engine.max_num_seqz"),
        ("servr:\n  port: 1\n", "servr"),
        ("server:\n  port: 70000\n", "server.port"),
        ("dtype: int8\n", "dtype"),
        ("experts:\n  replicas: 0\n", "experts.replicas"),
    ],
)
def test_bad_config_names_key_and_file(tmp_path, text, key):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigFileError) as e:
        load_config(p)
    assert key in str(e.value) and str(p) in str(e.value)


def test_overrides_win_and_are_validated():
    cfg = load_config(CONFIGS / "tiny.yaml", {"server.port": 8123, "engine.max_num_seqs": 3, "model": None})
    assert (cfg.server.port, cfg.engine.max_num_seqs) == (8123, 3)
    with pytest.raises(ConfigFileError, match="server.port"):
        load_config(CONFIGS / "tiny.yaml", {"server.port": -1})


@pytest.mark.parametrize(
    "cores,reserved,explicit,want",
    [(2, 0, None, 1), (16, 0, None, 8), (1, 0, None, 1), (16, 4, None, 4), (16, 0.5, None, 8), (16, 0, 3, 3)],
)
def test_attention_threads(monkeypatch, cores, reserved, explicit, want):
    """The engine's torch threads: as set; else its reserved CPUs; else half the node's cores (the
    unreserved cores are shared with the experts and Serve), at least one."""
    import os

    from cluster.config import AttentionConfig

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    assert AttentionConfig(num_cpus=reserved, num_threads=explicit).threads() == want

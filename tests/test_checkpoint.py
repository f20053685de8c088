"""Config parsing, subset loading (only the asked-for bytes), and clear errors for bad inputs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from model.checkpoint import Checkpoint, CheckpointError, all_expert_pairs, dense_names, expert_names
from model.config import ConfigError, MixtralConfig
from model.tiny import preset_config, write_checkpoint


def _bytes(cfg, names):
    n = 0
    for shape in names.values():
        k = 1
        for s in shape:
            k *= s
        n += k * cfg.dtype.itemsize
    return n


@pytest.mark.parametrize("fixture", ["tiny_dir", "tiny_sharded_dir"])
def test_subset_loading_reads_only_that_subset(request, fixture):
    ckpt = Checkpoint(request.getfixturevalue(fixture))
    cfg = ckpt.config
    dense = ckpt.load_dense()
    assert set(dense.tensors) == set(dense_names(cfg))
    assert dense.bytes_read == _bytes(cfg, dense_names(cfg))
    pairs = [(l, 3) for l in range(cfg.num_hidden_layers)]
    ex = ckpt.load_experts(pairs)
    want = {}
    for l, e in pairs:
        want.update(expert_names(cfg, l, e))
    assert set(ex.tensors) == set(want)
    assert ex.bytes_read == _bytes(cfg, want)
    total = _bytes(cfg, dense_names(cfg)) + sum(_bytes(cfg, expert_names(cfg, l, e)) for l, e in all_expert_pairs(cfg))
    assert ex.bytes_read * cfg.num_local_experts + dense.bytes_read == total


def test_dtype_conversion(tiny_dir):
    ckpt = Checkpoint(tiny_dir)
    assert ckpt.load_dense("auto").tensors["model.norm.weight"].dtype == torch.bfloat16
    assert ckpt.load_dense("float32").tensors["model.norm.weight"].dtype == torch.float32
    with pytest.raises(ValueError, match="dtype"):
        ckpt.load_dense("int8")


def test_both_config_forms(tmp_path):
    new = {
        "model_type": "mixtral",
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rope_parameters": {"rope_theta": 5000.0, "rope_type": "default"},
        "dtype": "float32",
        "head_dim": None,
    }
    old = {
        "model_type": "mixtral",
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rope_theta": 5000.0,
        "torch_dtype": "float32",
    }
    for i, d in enumerate([new, old]):
        p = tmp_path / f"c{i}.json"
        p.write_text(json.dumps(d))
        c = MixtralConfig.from_file(p)
        assert (c.rope_theta, c.torch_dtype, c.head_dim) == (5000.0, "float32", 16)


@pytest.mark.parametrize(
    "change,field",
    [
        ({"num_attention_heads": 5}, "num_attention_heads"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
        ({"num_experts_per_tok": 0}, "num_experts_per_tok"),
        ({"torch_dtype": "int4"}, "torch_dtype"),
        ({"hidden_size": -1}, "hidden_size"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"model_type": "llama"}, "model_type"),
    ],
)
def test_bad_configs_name_the_field(tmp_path, change, field):
    d = preset_config("tiny").to_hf_dict() | change
    p = tmp_path / "config.json"
    p.write_text(json.dumps(d))
    with pytest.raises(ConfigError) as e:
        MixtralConfig.from_file(p)
    assert field in str(e.value) and str(p) in str(e.value)


def test_bad_checkpoints_give_clear_errors(tmp_path):
    cfg = preset_config("tiny", num_hidden_layers=1)
    d = write_checkpoint(tmp_path / "ok", cfg)
    from safetensors.torch import load_file

    w = load_file(d / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"

    missing = dict(w)
    del missing[name]
    save_file(missing, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        Checkpoint(d).load_dense()

    bad = dict(w)
    bad[name] = torch.zeros(3, 3, dtype=torch.bfloat16)
    save_file(bad, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match="shape") as e:
        Checkpoint(d).load_dense()
    assert "model.safetensors" in str(e.value) and name in str(e.value)

    extra = dict(w)
    extra["model.layers.0.mystery.weight"] = torch.zeros(2)
    save_file(extra, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match="mystery"):
        Checkpoint(d).check_names()

    pk = tmp_path / "pickle"
    pk.mkdir()
    (pk / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    torch.save({"x": torch.zeros(1)}, pk / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        Checkpoint(pk)

    with pytest.raises(ConfigError, match="config.json"):
        Checkpoint(tmp_path / "pickle" / "..")  # tmp_path has no config.json

"""Config parsing, subset loading (only the asked-for bytes), and clear errors for bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

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


def _sharded(tmp_path):
    """A real 2-shard checkpoint (1 layer) and its index, for the shard-path tests."""
    d = write_checkpoint(tmp_path / "ckpt", preset_config("tiny", num_hidden_layers=1), shards=2)
    return d, json.loads((d / "model.safetensors.index.json").read_text())


def _point_first_entry(d, index, target):
    name = sorted(index["weight_map"])[0]
    wm = dict(index["weight_map"], **{name: target})
    (d / "model.safetensors.index.json").write_text(json.dumps({**index, "weight_map": wm}))
    return name


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink-out", "nested-dotdot"])
def test_index_shard_paths_stay_inside_the_folder(tmp_path, kind):
    d, index = _sharded(tmp_path)
    # A valid safetensors file outside the checkpoint folder that holds every tensor of the model.
    outside = tmp_path / "outside"
    outside.mkdir()
    from safetensors.torch import load_file

    merged = {}
    for f in sorted(set(index["weight_map"].values())):
        merged.update(load_file(d / f))
    save_file(merged, str(outside / "stolen.safetensors"))
    target = {
        "absolute": str(outside / "stolen.safetensors"),
        "dotdot": "../outside/stolen.safetensors",
        "nested-dotdot": "sub/../../outside/stolen.safetensors",
        "symlink-out": "link.safetensors",
    }[kind]
    if kind == "symlink-out":
        (d / "link.safetensors").symlink_to(outside / "stolen.safetensors")
    name = _point_first_entry(d, index, target)
    with pytest.raises(CheckpointError) as e:
        Checkpoint(d)
    msg = str(e.value)
    assert "model.safetensors.index.json" in msg and name in msg and target in msg, msg


def test_index_shards_in_subfolders_and_symlinks_inside_are_fine(tmp_path):
    d, index = _sharded(tmp_path)
    shard = sorted(set(index["weight_map"].values()))[0]
    (d / "sub").mkdir()
    (d / shard).rename(d / "sub" / shard)
    (d / shard).symlink_to(Path("sub") / shard)  # a link that stays inside the folder
    Checkpoint(d).load_dense()
    wm = {n: (f"sub/{f}" if f == shard else f) for n, f in index["weight_map"].items()}
    (d / "model.safetensors.index.json").write_text(json.dumps({**index, "weight_map": wm}))
    (d / shard).unlink()
    Checkpoint(d).load_dense()


def test_hf_hub_cache_layout_is_accepted(tmp_path):
    """snapshots/<rev>/ holds links to the same repository's blobs/, as huggingface_hub writes them."""
    src, _ = _sharded(tmp_path)
    repo = tmp_path / "hub" / "models--org--tiny"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for i, f in enumerate(sorted(src.iterdir())):
        (blobs / f"blob{i}").write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / f"blob{i}")
    Checkpoint(snap).load_dense()
    # ... but not a link from the snapshot to anywhere else.
    (snap / "model-00001-of-00002.safetensors").unlink()
    (snap / "model-00001-of-00002.safetensors").symlink_to(src / "model-00001-of-00002.safetensors")
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        Checkpoint(snap)


def test_single_file_symlinked_outside_is_refused(tmp_path):
    d = write_checkpoint(tmp_path / "ckpt", preset_config("tiny", num_hidden_layers=1))
    (d / "model.safetensors").rename(tmp_path / "elsewhere.safetensors")
    (d / "model.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        Checkpoint(d)


@pytest.mark.parametrize(
    "field,value",
    [
        ("num_local_experts", 1025),
        ("max_position_embeddings", (1 << 20) + 1),
        ("vocab_size", (1 << 20) + 1),
        ("hidden_size", 65536 * 2),
        ("intermediate_size", (1 << 18) + 1),
        ("num_hidden_layers", 1025),
        ("num_attention_heads", 2048),
        ("num_key_value_heads", 2048),
        ("head_dim", 8193),
        ("num_experts_per_tok", 1025),
        ("sliding_window", (1 << 20) + 1),
    ],
)
def test_config_sizes_have_upper_bounds(tmp_path, field, value):
    d = preset_config("tiny").to_hf_dict() | {field: value}
    p = tmp_path / "config.json"
    p.write_text(json.dumps(d))
    with pytest.raises(ConfigError) as e:
        MixtralConfig.from_file(p)
    assert field in str(e.value) and str(p) in str(e.value) and "less than or equal" in str(e.value)


def test_derived_head_dim_is_bounded(tmp_path):
    d = preset_config("tiny").to_hf_dict() | {"hidden_size": 65536, "num_attention_heads": 1, "num_key_value_heads": 1}
    d.pop("head_dim")
    p = tmp_path / "config.json"
    p.write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="head_dim=65536"):
        MixtralConfig.from_file(p)


@pytest.mark.parametrize(
    "real",
    [
        # Mixtral-8x22B
        dict(hidden_size=6144, intermediate_size=16384, num_hidden_layers=56, num_attention_heads=48,
             num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, vocab_size=32768,
             max_position_embeddings=65536),
        # DeepSeek-V3-sized shapes in the Mixtral layout
        dict(hidden_size=7168, intermediate_size=18432, num_hidden_layers=61, num_attention_heads=128,
             num_key_value_heads=128, num_local_experts=256, num_experts_per_tok=8, vocab_size=129280,
             max_position_embeddings=163840),
    ],
)  # fmt: skip
def test_real_large_configs_are_within_the_bounds(tmp_path, real):
    p = tmp_path / "config.json"
    p.write_text(json.dumps({"model_type": "mixtral", **real}))
    assert MixtralConfig.from_file(p).num_local_experts == real["num_local_experts"]

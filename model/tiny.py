"""Built-in checkpoints with deterministic random weights, written in the Hugging Face layout.

`tiny` is the embedded default (seconds to load, real Mixtral tokenizer and vocab); `mini` has larger
layers so that compute, not overhead, dominates a benchmark. Weights are drawn with std 1/sqrt(fan_in)
(embeddings std 1) so that logits have a real spread and greedy decoding has few near-ties.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from .checkpoint import INDEX_FILE, all_expert_pairs, dense_names, expert_names
from .config import MixtralConfig
from .hf_tokenizer import write_tokenizer_files
from .presets import PRESETS, cache_root, default_model_dir, preset_of  # noqa: F401 - re-exported
from .tokenizer import DEFAULT_TOKENIZER

log = logging.getLogger(__name__)


def preset_config(name: str, **overrides) -> MixtralConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return MixtralConfig(**{**PRESETS[name], **overrides})


def random_weights(cfg: MixtralConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor of the model, drawn from one seeded generator in name-table order."""
    g = torch.Generator().manual_seed(seed)
    names = dict(dense_names(cfg))
    for l, e in all_expert_pairs(cfg):
        names.update(expert_names(cfg, l, e))
    out = {}
    for n, shape in names.items():
        if n.endswith("norm.weight"):
            t = torch.ones(shape)
        elif n == "model.embed_tokens.weight":
            t = torch.randn(shape, generator=g)
        else:
            t = torch.randn(shape, generator=g) / shape[-1] ** 0.5
        out[n] = t
    return {n: t.to(cfg.dtype).contiguous() for n, t in out.items()}


def skew_routing(weights: dict[str, torch.Tensor], cfg: MixtralConfig, hot_expert: int, strength: float = 4.0) -> None:
    """Make every layer's router prefer `hot_expert` (in place): a constant offset on hidden dimension 0
    of every token embedding, which the residual stream carries through the layers, and a large weight
    on that dimension in the hot expert's gate row. With top-k >= 2 the hot expert then takes one slot
    of nearly every token, as a Mixtral router's favourite expert does in a burst of similar tokens."""
    if not 0 <= hot_expert < cfg.num_local_experts:
        raise ValueError(f"hot_expert must be in [0, {cfg.num_local_experts})")
    emb = weights["model.embed_tokens.weight"]
    emb[:, 0] += strength
    for l in range(cfg.num_hidden_layers):
        gate = weights[f"model.layers.{l}.block_sparse_moe.gate.weight"]
        gate[hot_expert, 0] += strength


def write_checkpoint(
    path: str | Path, cfg: MixtralConfig, seed: int = 0, shards: int = 1, hot_expert: int | None = None
) -> Path:
    """Write config.json, safetensors (one file, or `shards` files plus the index), tokenizer.model, and
    the Hugging Face tokenizer files and generation_config.json a Mixtral repo has.
    `hot_expert`: a checkpoint whose router sends most tokens to that expert (see `skew_routing`)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights = random_weights(cfg, seed)
    if hot_expert is not None:
        skew_routing(weights, cfg, hot_expert)
    (path / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2) + "\n")
    if shards <= 1:
        save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    else:
        names = list(weights)
        per = -(-len(names) // shards)
        weight_map, total = {}, 0
        for i in range(shards):
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: weights[n] for n in names[i * per : (i + 1) * per]}
            save_file(part, str(path / fname), metadata={"format": "pt"})
            weight_map.update({n: fname for n in part})
            total += sum(t.numel() * t.element_size() for t in part.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    shutil.copyfile(DEFAULT_TOKENIZER, path / "tokenizer.model")
    # The rest of a Hugging Face repo: AutoTokenizer gives mixserve's ids, generate() its BOS/EOS.
    write_tokenizer_files(path, DEFAULT_TOKENIZER, cfg.max_position_embeddings)
    gen = {"_from_model_config": True, "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    log.info("wrote checkpoint", extra={"path": str(path), "params": cfg.total_params()})
    return path


def init_preset(path: str | Path, preset: str = "tiny") -> Path:
    """Write a preset checkpoint unless one with the same config is already there.

    Safe when several processes of one machine race for it (replicas starting together): each writes
    into a private temporary folder and renames it into place; the weights are deterministic, so
    whichever rename wins, every process reads the same checkpoint.
    """
    path = Path(path)
    cfg = preset_config(preset)
    cj = path / "config.json"
    # A copy written before the Hugging Face tokenizer files were is written again, whole.
    if cj.is_file() and (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file():
        try:
            if MixtralConfig.from_file(cj) == cfg:
                return path
        except ValueError:
            pass
    path.parent.mkdir(parents=True, exist_ok=True)
    size = cfg.total_params() * (4 if cfg.torch_dtype == "float32" else 2) / 2**20
    print(f"mixserve: writing the {preset} checkpoint ({size:.0f} MiB) to {path}, once", file=sys.stderr, flush=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        write_checkpoint(tmp, cfg)
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)  # a stale or different checkpoint
        try:
            os.rename(tmp, path)
        except OSError:
            if not (path / "model.safetensors").is_file():  # not another process's finished copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def resolve_model(model: str | Path | None) -> str:
    """A config's `model`: a checkpoint folder, or None for the embedded tiny model. A preset's
    first-use folder (configs/mini.yaml's ~/.cache/mixserve/mini) that does not exist yet is written,
    by every process that needs it (CLI, ingress, attention and expert replicas on any node)."""
    if not model:
        return str(init_preset(default_model_dir(), "tiny"))
    path = os.path.expanduser(str(model))
    preset = preset_of(path)
    if preset is not None and not (Path(path) / "config.json").is_file():
        init_preset(path, preset)
    return path

"""Safetensors checkpoint loading, whole or by subset.

The checkpoint keeps Hugging Face's tensor names; `dense_names` and `expert_names` are the one name
table. A loader for a subset (the dense part, or some (layer, expert) pairs) opens each file lazily
with `safe_open` and reads only the tensors it was asked for, so an expert worker's resident weight
memory is its share of the model and nothing more. `LoadedWeights.bytes_read` counts the bytes
materialised from disk, which tests compare with the subset's size.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath

import torch
from safetensors import safe_open

from .config import DTYPES, MixtralConfig, resolve_device

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Names a checkpoint may carry that the model does not use (old HF exports store RoPE frequencies).
SKIPPED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
EXPERT_RE = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight")


def open_safetensors(path: Path, device: str = "cpu"):
    """`safe_open` of one file (its tensors read onto `device`); a file it cannot read (truncated, not
    safetensors) is a CheckpointError naming it, not the library's bare error."""
    try:
        return safe_open(path, framework="pt", device=device)
    except Exception as e:  # noqa: BLE001 - SafetensorError has no public import path
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


# safetensors' dtype names (the header) -> torch's, for tensors built from the header alone (meta)
SAFETENSORS_DTYPES = {
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the tensor."""


def dense_names(cfg: MixtralConfig) -> dict[str, tuple[int, ...]]:
    """Every non-expert tensor with its expected shape."""
    D, hd = cfg.hidden_size, cfg.head_dim
    H, Hkv, E = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_local_experts
    names: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (cfg.vocab_size, D),
        "model.norm.weight": (D,),
    }
    if not cfg.tie_word_embeddings:
        names["lm_head.weight"] = (cfg.vocab_size, D)
    for l in range(cfg.num_hidden_layers):
        p = f"model.layers.{l}."
        names[p + "input_layernorm.weight"] = (D,)
        names[p + "post_attention_layernorm.weight"] = (D,)
        names[p + "self_attn.q_proj.weight"] = (H * hd, D)
        names[p + "self_attn.k_proj.weight"] = (Hkv * hd, D)
        names[p + "self_attn.v_proj.weight"] = (Hkv * hd, D)
        names[p + "self_attn.o_proj.weight"] = (D, H * hd)
        names[p + "block_sparse_moe.gate.weight"] = (E, D)
    return names


def expert_names(cfg: MixtralConfig, layer: int, expert: int) -> dict[str, tuple[int, ...]]:
    """The three tensors of one expert in one layer with their shapes (w1, w3: [F, D]; w2: [D, F])."""
    D, F = cfg.hidden_size, cfg.intermediate_size
    p = f"model.layers.{layer}.block_sparse_moe.experts.{expert}."
    return {p + "w1.weight": (F, D), p + "w2.weight": (D, F), p + "w3.weight": (F, D)}


def all_expert_pairs(cfg: MixtralConfig) -> list[tuple[int, int]]:
    return [(l, e) for l in range(cfg.num_hidden_layers) for e in range(cfg.num_local_experts)]


@dataclass
class LoadedWeights:
    tensors: dict[str, torch.Tensor]
    bytes_read: int = 0  # bytes materialised from the files, before any dtype conversion
    files_opened: list[str] = field(default_factory=list)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


class Checkpoint:
    """A checkpoint folder: config, and a map from tensor name to the file holding it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a directory")
        self.config = MixtralConfig.from_file(self.path / "config.json")
        self.weight_map = self._weight_map()

    def _weight_map(self) -> dict[str, str]:
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                wm = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
            if not isinstance(wm, dict):
                raise CheckpointError(f"{index}: weight_map is not an object")
            by_file: dict[str, str] = {}
            for name, fname in wm.items():
                if not isinstance(fname, str):
                    raise CheckpointError(f"{index}: weight_map[{name!r}] is not a file name: {fname!r}")
                by_file.setdefault(fname, name)
            for fname, name in sorted(by_file.items()):
                what = f"{index}: weight_map[{name!r}] = {fname!r}"
                if not self._shard_path(fname, what).is_file():
                    raise CheckpointError(f"{index}: shard {fname} is missing")
            return dict(wm)
        single = self.path / SINGLE_FILE
        if single.is_file():
            self._shard_path(SINGLE_FILE, str(single))
            with open_safetensors(single) as f:
                return {k: SINGLE_FILE for k in f.keys()}
        shards = sorted(self.path.glob("*.safetensors"))
        if shards:
            wm = {}
            for s in shards:
                self._shard_path(s.name, str(s))
                with open_safetensors(s) as f:
                    wm.update({k: s.name for k in f.keys()})
            return wm
        pickles = [p.name for p in self.path.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise CheckpointError(
                f"{self.path}: only pickle weights found ({', '.join(sorted(pickles))}); pickle files can "
                "run arbitrary code and are refused. Convert them to safetensors first."
            )
        raise CheckpointError(f"{self.path}: no model.safetensors, shards or {INDEX_FILE} found")

    def _shard_path(self, fname: str, what: str) -> Path:
        """`fname` inside the checkpoint folder, or a CheckpointError naming `what` (the index file and
        entry): no absolute path, no `..`, and no symlink that resolves outside the folder. The one
        exception is the Hugging Face hub cache, whose `snapshots/<rev>/` files link to the same
        repository's `blobs/`."""
        rel, win = Path(fname), PureWindowsPath(fname)
        if not fname or rel.is_absolute() or win.drive or win.root:
            raise CheckpointError(f"{what}: shard paths must be relative to {self.path}, not absolute")
        if ".." in rel.parts or ".." in win.parts:
            raise CheckpointError(f"{what}: shard paths must stay inside {self.path}, '..' is refused")
        path = self.path / rel
        real, root = path.resolve(), self.path.resolve()
        allowed = [root]
        if root.parent.name == "snapshots":  # <cache>/models--org--name/snapshots/<rev>/
            allowed.append(root.parent.parent / "blobs")
        if not any(real.is_relative_to(a) for a in allowed):
            raise CheckpointError(f"{what}: shard resolves to {real}, outside the checkpoint folder {root}")
        return path

    def check_names(self) -> None:
        """Every tensor in the files is one the model uses or one deliberately skipped."""
        cfg = self.config
        known = set(dense_names(cfg))
        for l, e in all_expert_pairs(cfg):
            known.update(expert_names(cfg, l, e))
        unexpected = sorted(k for k in self.weight_map if k not in known and not SKIPPED.fullmatch(k))
        if unexpected:
            head = ", ".join(unexpected[:5]) + (" ..." if len(unexpected) > 5 else "")
            raise CheckpointError(f"{self.path}: {len(unexpected)} tensor(s) the config does not describe: {head}")

    def load(
        self, names: dict[str, tuple[int, ...]], dtype: torch.dtype | str = "auto", device: torch.device | str = "cpu"
    ) -> LoadedWeights:
        """Read exactly `names` (name -> expected shape), converting to `dtype` ('auto' keeps it), each
        tensor straight onto `device` (safetensors copies it from the mapped file to a CUDA device
        without a host copy of the whole file). On `meta` nothing is read: the tensors have the
        shapes and dtype only (`bytes_read` counts what a real load would read)."""
        target = resolve_dtype(dtype, self.config)
        device = resolve_device(device)  # safetensors takes "cuda:N"; meta is built from the header alone
        where = "cpu" if device.type == "meta" else str(device)
        by_file: dict[str, list[str]] = {}
        for n in names:
            fname = self.weight_map.get(n)
            if fname is None:
                raise CheckpointError(f"{self.path}: tensor {n} is missing from the checkpoint")
            by_file.setdefault(fname, []).append(n)
        out = LoadedWeights(tensors={})
        for fname, keys in sorted(by_file.items()):
            fpath = self.path / fname
            out.files_opened.append(fname)
            with open_safetensors(fpath, where) as f:
                present = set(f.keys())
                for n in keys:
                    if n not in present:
                        raise CheckpointError(f"{fpath}: tensor {n} is listed in the index but not in the file")
                    sl = f.get_slice(n)
                    shape = tuple(sl.get_shape())
                    if shape != tuple(names[n]):
                        raise CheckpointError(
                            f"{fpath}: tensor {n} has shape {list(shape)}, the config implies {list(names[n])}"
                        )
                    if device.type == "meta":
                        t = torch.empty(shape, dtype=SAFETENSORS_DTYPES[sl.get_dtype()], device="meta")
                    else:
                        t = f.get_tensor(n)
                    out.bytes_read += t.numel() * t.element_size()
                    out.tensors[n] = t if t.dtype == target else t.to(target)
        return out

    def load_dense(self, dtype: torch.dtype | str = "auto", device: torch.device | str = "cpu") -> LoadedWeights:
        return self.load(dense_names(self.config), dtype, device)

    def load_experts(
        self, pairs: Iterable[tuple[int, int]], dtype: torch.dtype | str = "auto", device: torch.device | str = "cpu"
    ) -> LoadedWeights:
        names: dict[str, tuple[int, ...]] = {}
        for l, e in pairs:
            if not (0 <= l < self.config.num_hidden_layers and 0 <= e < self.config.num_local_experts):
                raise CheckpointError(f"expert (layer={l}, expert={e}) is outside the model")
            names.update(expert_names(self.config, l, e))
        return self.load(names, dtype, device)


def resolve_dtype(dtype: torch.dtype | str, cfg: MixtralConfig) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return cfg.dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]

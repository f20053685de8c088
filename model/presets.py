"""The built-in checkpoints' shapes and where they are written on first use (~/.cache/mixserve/<preset>).

Plain data and paths, no torch: the CLI reads it before anything heavy is imported. model/tiny.py writes
the checkpoints.
"""

from __future__ import annotations

import os
from pathlib import Path

PRESETS: dict[str, dict] = {
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=4096,
        torch_dtype="bfloat16",
    ),
    "mini": dict(
        hidden_size=512,
        intermediate_size=1792,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=4096,
        torch_dtype="bfloat16",
    ),
    # The real Mixtral-8x7B shapes (~46.7B parameters): config only, or layer slices, for GPU
    # benchmarks and for building the deployment graph offline; far too big to write whole here.
    "mixtral-8x7b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        num_local_experts=8,
        num_experts_per_tok=2,
        vocab_size=32000,
        max_position_embeddings=32768,
        rope_theta=1e6,
        rms_norm_eps=1e-5,
        torch_dtype="bfloat16",
    ),
}


# Written on first use when a config names their folder; the real Mixtral shape (~47B parameters) never is.
FIRST_USE = ("tiny", "mini")


def cache_root() -> Path:
    """Where the presets' checkpoints are written on first use (per machine): ~/.cache/mixserve/<preset>."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mixserve"


def default_model_dir() -> Path:
    """Where the embedded tiny checkpoint is written on first use (per machine)."""
    return cache_root() / "tiny"


def preset_of(model: str | Path) -> str | None:
    """The preset whose first-use folder `model` is (~/.cache/mixserve/tiny, .../mini), else None."""
    p = Path(os.path.expanduser(str(model)))
    return p.name if p.parent == cache_root() and p.name in FIRST_USE else None

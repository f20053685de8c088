"""MixtralConfig: the model's shape, read from a Hugging Face `config.json`.

Both forms of the HF file are accepted: the old one (top-level `rope_theta`, `torch_dtype`) and the
newer one (`rope_parameters: {rope_theta, rope_type}`, `dtype`). Keys that do not change the math
(initializer_range, use_cache, ...) are ignored; keys that would change it in ways we do not implement
(a non-default RoPE scaling, an activation other than SiLU) are refused by name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: torch.device | str) -> torch.device:
    """A device to place weights and compute on, checked: `cpu`, `meta`, or `cuda[:N]` where this
    machine has that GPU (`cuda` alone is the current one, made explicit)."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r} is not a device torch knows ({e})") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {str(device)!r}: no CUDA device here (torch {torch.__version__}, built for CUDA "
                f"{torch.version.cuda}); set the device to cpu or run where num_gpus places it on a GPU"
            )
        if d.index is None:
            d = torch.device("cuda", torch.cuda.current_device())
        elif d.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif d.type not in ("cpu", "meta"):
        raise ValueError(f"device {str(device)!r}: mixserve runs on cpu or cuda")
    return d


# The largest value each size field may take. Real configs for scale: Mixtral-8x22B has D=6144,
# F=16384, L=56, H=48, E=8, 64K context; DeepSeek-V3 has D=7168, L=61, H=128, E=256, top-8,
# vocab 129280, 160K context.
MAX: dict[str, int] = {
    "vocab_size": 1 << 20,
    "hidden_size": 65536,
    "intermediate_size": 1 << 18,
    "num_hidden_layers": 1024,
    "num_attention_heads": 1024,
    "num_key_value_heads": 1024,
    "head_dim": 8192,
    "num_local_experts": 1024,
    "num_experts_per_tok": 1024,
    "max_position_embeddings": 1 << 20,
    "sliding_window": 1 << 20,
}


class ConfigError(ValueError):
    """A config.json that cannot describe a model we can run; the message names file and field."""


class MixtralConfig(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    # Upper bounds (MAX) are far above any real Mixtral, Mixtral-8x22B or DeepSeek-size config; they
    # refuse a config.json whose sizes would make the loader allocate or loop without end.
    vocab_size: int = Field(32000, gt=0, le=MAX["vocab_size"], description="Rows of the embedding and the LM head.")
    hidden_size: int = Field(4096, gt=0, le=MAX["hidden_size"], description="Residual stream width D.")
    intermediate_size: int = Field(14336, gt=0, le=MAX["intermediate_size"], description="Expert FFN width F.")
    num_hidden_layers: int = Field(32, gt=0, le=MAX["num_hidden_layers"], description="Decoder layers L.")
    num_attention_heads: int = Field(32, gt=0, le=MAX["num_attention_heads"], description="Query heads H.")
    num_key_value_heads: int = Field(
        8, gt=0, le=MAX["num_key_value_heads"], description="KV heads (GQA); must divide H."
    )
    head_dim: int | None = Field(
        None, gt=0, le=MAX["head_dim"], description="Per-head width; hidden_size / H when absent."
    )
    num_local_experts: int = Field(8, gt=0, le=MAX["num_local_experts"], description="Experts per layer E.")
    num_experts_per_tok: int = Field(
        2, gt=0, le=MAX["num_experts_per_tok"], description="Experts per token (top-k); at most E."
    )
    rope_theta: float = Field(1e6, gt=0, description="RoPE base.")
    rms_norm_eps: float = Field(1e-5, gt=0, description="RMSNorm epsilon.")
    max_position_embeddings: int = Field(32768, gt=0, le=MAX["max_position_embeddings"], description="Context length.")
    # Mixtral-8x7B has no sliding window; HF configs carry `null` (or a window >= the context).
    sliding_window: int | None = Field(
        None, le=MAX["sliding_window"], description="Attention window, None for full attention."
    )
    tie_word_embeddings: bool = Field(False, description="LM head shares the embedding matrix.")
    torch_dtype: str = Field("bfloat16", description="Dtype the checkpoint is stored in.")
    bos_token_id: int = 1
    eos_token_id: int | list[int] = 2
    hidden_act: str = "silu"

    @model_validator(mode="before")
    @classmethod
    def _normalise_forms(cls, raw: Any) -> Any:
        if not isinstance(raw, dict):
            return raw
        d = dict(raw)
        rp = d.pop("rope_parameters", None) or d.pop("rope_scaling", None)
        if rp:
            kind = rp.get("rope_type", rp.get("type", "default"))
            if kind != "default":
                raise ValueError(f"rope_parameters.rope_type={kind!r} is not supported (only 'default')")
            if "rope_theta" in rp:
                d.setdefault("rope_theta", rp["rope_theta"])
        if "dtype" in d and d["dtype"] is not None:
            d["torch_dtype"] = d.pop("dtype")
        d.pop("dtype", None)
        if d.get("torch_dtype") is None:
            d.pop("torch_dtype", None)
        if d.get("head_dim") is None:
            d.pop("head_dim", None)
        return d

    @model_validator(mode="after")
    def _check(self) -> MixtralConfig:
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"num_attention_heads={self.num_attention_heads} does not divide "
                    f"hidden_size={self.hidden_size} (and no head_dim is given)"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
            if self.head_dim > MAX["head_dim"]:
                raise ValueError(
                    f"head_dim={self.head_dim} (hidden_size / num_attention_heads) is above the "
                    f"maximum {MAX['head_dim']}"
                )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_key_value_heads={self.num_key_value_heads} does not divide "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if not 1 <= self.num_experts_per_tok <= self.num_local_experts:
            raise ValueError(
                f"num_experts_per_tok={self.num_experts_per_tok} must be in "
                f"[1, num_local_experts={self.num_local_experts}]"
            )
        if self.torch_dtype not in DTYPES:
            raise ValueError(f"torch_dtype={self.torch_dtype!r} is not one of {sorted(DTYPES)}")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act={self.hidden_act!r} is not supported (Mixtral uses 'silu')")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"sliding_window={self.sliding_window} must be positive or null")
        return self

    # Derived values, computed from fields only.
    @property
    def eos_ids(self) -> tuple[int, ...]:
        e = self.eos_token_id
        return tuple(e) if isinstance(e, list) else (e,)

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.torch_dtype]

    def expert_params(self) -> int:
        """Parameters of one expert in one layer (w1, w3: [F, D]; w2: [D, F])."""
        return 3 * self.hidden_size * self.intermediate_size

    def dense_params(self) -> int:
        D, hd = self.hidden_size, self.head_dim
        attn = D * hd * (self.num_attention_heads * 2 + self.num_key_value_heads * 2)
        per_layer = attn + 2 * D + self.num_local_experts * D
        head = 0 if self.tie_word_embeddings else self.vocab_size * D
        return self.vocab_size * D + head + D + self.num_hidden_layers * per_layer

    def total_params(self) -> int:
        return self.dense_params() + self.num_hidden_layers * self.num_local_experts * self.expert_params()

    def active_params(self) -> int:
        """Parameters touched per token: the dense part plus top-k experts per layer."""
        return self.dense_params() + self.num_hidden_layers * self.num_experts_per_tok * self.expert_params()

    @classmethod
    def from_file(cls, path: str | Path) -> MixtralConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: no config.json found")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON: {e}") from None
        mt = raw.get("model_type")
        if mt not in (None, "mixtral"):
            raise ConfigError(f"{path}: model_type={mt!r}, expected 'mixtral'")
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            raise ConfigError(f"{path}: {_describe(e)}") from None

    def to_hf_dict(self) -> dict:
        """The config.json a HF checkpoint of this model carries (old form, as on the Hub)."""
        d = self.model_dump()
        d.update(architectures=["MixtralForCausalLM"], model_type="mixtral")
        return d


def _describe(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "config"
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)

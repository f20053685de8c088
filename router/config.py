"""The engine's settings: pure pydantic (no torch), so that reading a config file imports no engine."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_num_seqs: int = Field(64, ge=1, description="Sequences running at once.")
    max_num_batched_tokens: int = Field(512, ge=1, description="Token budget of one step (prefill chunks + decodes).")
    kv_cache_tokens: int = Field(65536, ge=16, description="KV-cache capacity in tokens (fixed memory budget).")
    block_size: int = Field(16, ge=1, description="Tokens per KV-cache block.")
    max_model_len: int | None = Field(None, ge=2, description="Context limit; the model's own when null.")
    num_microbatches: int = Field(1, ge=1, le=8, description="Micro-batches in flight per step (ping-pong).")
    max_waiting: int = Field(256, ge=1, description="Requests queued beyond the running ones before refusing.")

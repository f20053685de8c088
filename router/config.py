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
    num_microbatches: int = Field(
        2,
        ge=1,
        le=8,
        description="Micro-batches in flight per step: one's expert round trip overlaps another's attention.",
    )
    max_waiting: int = Field(256, ge=1, description="Requests queued beyond the running ones before refusing.")
    enable_prefix_caching: bool = Field(
        True, description="Keep computed full KV blocks and reuse them for prompts that start with the same tokens."
    )

    def context_len(self, max_position_embeddings: int) -> int:
        """Tokens one sequence may hold (prompt + output): `max_model_len`, at most the model's own."""
        return min(self.max_model_len or max_position_embeddings, max_position_embeddings)

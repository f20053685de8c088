"""The one place that builds an engine from a config.

    AppConfig -> plan(): the checkpoint (names checked), its expert groups
              -> experts(plan): where the experts live (this process, Ray actors, Serve deployments)
              -> dense weights, tokenizer -> LLMEngine(cfg.engine)

Every engine is built here: the Serve attention worker (experts = its expert deployments), the
Ray-actor engine of `mixserve generate` and the benchmark (`ray_engine`), and the in-process engine
(`local_engine`: unit tests, `generate --local`, the baseline). Their defaults are the config's.
Importing this module imports neither Ray nor Serve; `ray_engine` imports the Ray runtime when called.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from model.checkpoint import Checkpoint
from model.model import MixtralDense
from model.tiny import resolve_model
from model.tokenizer import Tokenizer
from router.config import EngineConfig
from router.engine import LLMEngine
from router.experts import ExpertBackend, InProcessExperts, expert_groups, expert_map

from .config import AppConfig, AttentionConfig, ExpertsConfig

if TYPE_CHECKING:
    from cluster.runtime.actors import Runtime


@dataclass(frozen=True)
class ModelPlan:
    """What every builder knows about the model before any weight is read."""

    model_dir: str
    checkpoint: Checkpoint
    groups: list[list[int]]  # expert group g holds experts groups[g], every layer

    @property
    def expert_map(self) -> dict[int, int]:
        return expert_map(self.groups)


def plan(cfg: AppConfig) -> ModelPlan:
    """The checkpoint of `cfg.model` (the embedded tiny one when null), names checked, and its groups."""
    model_dir = str(resolve_model(cfg.model))
    ckpt = Checkpoint(model_dir)
    ckpt.check_names()
    return ModelPlan(model_dir, ckpt, expert_groups(ckpt.config.num_local_experts, cfg.experts.experts_per_worker))


Experts = Callable[[ModelPlan], ExpertBackend]


def in_process(cfg: AppConfig) -> Experts:
    """Experts held in this process, one worker per group (the default)."""
    return lambda p: InProcessExperts(p.model_dir, p.groups, cfg.dtype, cfg.experts.device)


def build_engine(cfg: AppConfig, experts: Experts | None = None) -> LLMEngine:
    """The engine `cfg` describes; `experts` builds its expert backend from the plan (in this process
    when None). The experts are built first: remote ones load while the dense weights do."""
    p = plan(cfg)
    backend = (experts or in_process(cfg))(p)
    dense = MixtralDense.from_checkpoint(p.checkpoint, cfg.dtype, cfg.attention.device)
    return LLMEngine(dense, backend, Tokenizer.for_model(p.model_dir), cfg.engine)


def local_engine(
    model: str | None = None,
    dtype: str = "auto",
    engine: EngineConfig | None = None,
    experts_per_worker: int = 1,
    device: str = "cpu",
) -> LLMEngine:
    """The whole engine in one process, on `device` (dense and experts): `build_engine` of a config
    with these fields."""
    cfg = AppConfig(
        model=model,
        dtype=dtype,
        engine=engine or EngineConfig(),
        attention=AttentionConfig(device=device),
        experts=ExpertsConfig(experts_per_worker=experts_per_worker, device=device),
    )
    return build_engine(cfg)


def ray_engine(cfg: AppConfig) -> tuple[LLMEngine, Runtime]:
    """An engine in this process whose experts are Ray actors, started here (on the Ray this process
    is connected to, else a new local one) and ready on return. `Runtime.shutdown()` stops them."""
    from cluster.runtime.actors import RayExperts, Runtime, ensure_ray

    started = ensure_ray()
    made: list = []

    def actors(p: ModelPlan) -> ExpertBackend:
        made.append(RayExperts(p.model_dir, p.groups, cfg.dtype, cfg.experts, cfg.attention.device))
        made[0].wait_ready()
        return made[0]

    try:
        engine = build_engine(cfg, actors)
    except BaseException:
        if made:
            made[0].shutdown()
        if started:
            import ray

            ray.shutdown()
        raise
    return engine, Runtime(made[0], started)

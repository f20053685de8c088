"""The device setting is honoured end to end: weights, KV cache, every tensor of a step and the expert
workers' outputs sit on the configured device, and nothing is created on torch's default device by
accident (proved by making `meta` the default while the engine runs on `cpu`, and by running the
dense forward and the expert workers on `meta` itself)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cluster.build import build_engine, local_engine
from cluster.config import AppConfig, ConfigFileError, load_config
from model.attention import KVPool, build_attn_meta
from model.checkpoint import Checkpoint
from model.config import resolve_device
from model.model import MixtralDense
from model.sampling import SamplingParams
from router.config import EngineConfig
from workers.expert import ExpertWorker


class Devices(TorchDispatchMode):
    """Every device an op's tensor outputs landed on while the mode was active."""

    def __init__(self):
        super().__init__()
        self.seen: dict[str, str] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.seen.setdefault(t.device.type, str(func))
        return out


def mixed_requests(engine) -> dict[str, SamplingParams]:
    """Requests that reach every sampling and bookkeeping path: greedy, seeded sampling with
    top-k / top-p / min-p, penalties and logit_bias with min_tokens, logprobs, prompt logprobs, n > 1
    (forked choices), routed experts, and a prompt that shares its prefix with another (the cache)."""
    p1 = list(range(5, 45))
    reqs = [
        (p1, SamplingParams(max_tokens=6, temperature=0.0, logprobs=3, prompt_logprobs=2)),
        (p1 + [7, 8], SamplingParams(max_tokens=6, temperature=0.0, return_routed_experts=True)),
        (list(range(50, 70)), SamplingParams(max_tokens=6, temperature=0.9, top_k=20, top_p=0.8, seed=3)),
        (list(range(80, 93)), SamplingParams(max_tokens=6, temperature=1.0, min_p=0.05, seed=4)),
        (
            list(range(100, 131)),
            SamplingParams(
                max_tokens=6,
                temperature=0.0,
                repetition_penalty=1.3,
                presence_penalty=0.5,
                frequency_penalty=0.2,
                logit_bias={11: 5.0, 12: -100.0},
                min_tokens=3,
            ),
        ),
    ]
    ids = {}
    for prompt, sp in reqs:
        ids[engine.add_request(prompt, sp)] = sp
    fork = engine.add_request(list(range(200, 230)), SamplingParams(max_tokens=5, temperature=0.0))
    engine.add_request(list(range(200, 230)), SamplingParams(max_tokens=5, temperature=0.0), fork_of=fork)
    return ids


def run_to_end(engine) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for o in engine.step():
            assert o.error is None, o.error
            tokens.setdefault(o.req_id, []).extend(o.new_token_ids)
    return tokens


@pytest.fixture(scope="module")
def engine(tiny_dir):
    return local_engine(tiny_dir, "float32", EngineConfig(max_num_batched_tokens=64, block_size=8))


def test_config_places_the_engine_and_its_experts(engine):
    assert engine.device == torch.device("cpu") and engine.kv.k.device.type == "cpu"
    assert all(t.device.type == "cpu" for t in engine.dense.w.tensors() if isinstance(t, torch.Tensor))
    assert all(w.device.type == "cpu" for w in engine.experts.workers)


def test_a_step_creates_nothing_on_the_default_device(engine):
    """With `meta` as torch's default device, a tensor made without the model's device would be a
    meta tensor: the step would fail, or an op would report a meta output. Neither happens, and the
    tokens equal those of the same requests run with the default device left alone."""
    mixed_requests(engine)
    want = run_to_end(engine)
    mixed_requests(engine)
    rec = Devices()
    torch.set_default_device("meta")
    try:
        with rec:
            got = run_to_end(engine)
    finally:
        torch.set_default_device(None)
    assert sorted(rec.seen) == ["cpu"], rec.seen
    assert sorted(got.values()) == sorted(want.values())
    assert len(got) == 7 and all(len(v) >= 5 for v in got.values())


def test_the_dense_forward_runs_on_the_device_of_its_weights(tiny_dir):
    """The dense model loaded onto `meta` (shapes only) runs a whole forward there: attention metadata,
    rotary tables, the KV pool, the router and the logits all follow the weights."""
    ckpt = Checkpoint(tiny_dir)
    dense = MixtralDense.from_checkpoint(ckpt, "float32", "meta")
    assert dense.device.type == "meta"
    cfg = dense.cfg
    kv = KVPool(cfg, 64, dense.dtype, dense.device)
    # a decode row (context 10) and a prefill piece over a cached context (4 new of 12)
    meta = build_attn_meta([(list(range(10)), 1), (list(range(20, 32)), 4)], cfg.sliding_window).to("meta")
    ids = torch.zeros(5, dtype=torch.long, device="meta")
    rec = Devices()
    with rec:
        gen = dense.forward(ids, meta, kv, torch.tensor([0, 4], device="meta"))
        m = next(gen)
        layers = 1
        try:
            while True:
                assert m.x.device.type == m.weights.device.type == m.experts.device.type == "meta"
                m = gen.send(torch.zeros_like(m.x))
                layers += 1
        except StopIteration as stop:
            logits = stop.value
    assert layers == cfg.num_hidden_layers
    assert logits.device.type == "meta" and tuple(logits.shape) == (2, cfg.vocab_size)
    assert sorted(rec.seen) == ["meta"], rec.seen


def test_an_expert_worker_loads_and_runs_on_its_device(tiny_dir):
    real = ExpertWorker(tiny_dir, [1, 3], "float32")
    w = ExpertWorker(tiny_dir, [1, 3], "float32", device="meta")
    assert w.device.type == "meta" and w.bytes_read == real.bytes_read and w.weight_bytes() == real.weight_bytes()
    assert all(t.device.type == "meta" for f in w.weights.values() for t in f.tensors())
    x = torch.randn(5, w.cfg.hidden_size)  # the data plane hands the worker host tensors
    out = w.run(0, {1: x, 3: x[:2]})
    assert {e: (y.device.type, tuple(y.shape)) for e, y in out.items()} == {
        1: ("meta", (5, w.cfg.hidden_size)),
        3: ("meta", (2, w.cfg.hidden_size)),
    }
    assert real.run(0, {1: x})[1].device.type == "cpu"


def test_devices_are_checked_before_anything_loads(tiny_dir):
    with pytest.raises(ValueError, match="not a device torch knows"):
        resolve_device("gpu7")
    with pytest.raises(ValueError, match="cpu or cuda"):
        resolve_device("mps")
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device here"):
            resolve_device("cuda")
        cfg = AppConfig(model=tiny_dir, attention={"device": "cuda"})
        with pytest.raises(ValueError, match="no CUDA device here"):
            build_engine(cfg)
    with pytest.raises(ConfigFileError, match="device"):
        load_config(None, {"experts.device": "tpu"})
    cfg = load_config(None, {"attention.device": "cuda:1", "experts.device": "cpu"})
    assert (cfg.attention.device, cfg.experts.device) == ("cuda:1", "cpu")


def test_the_cli_device_flag_sets_both_sides():
    from cluster.cli import build_parser, resolve_config

    a = build_parser().parse_args(["serve", "--device", "cuda"])
    cfg = resolve_config(a)
    assert cfg.attention.device == cfg.experts.device == "cuda"
    cfg = resolve_config(build_parser().parse_args(["serve"]))
    assert cfg.attention.device == cfg.experts.device == "cpu"


def test_every_shipped_config_runs_where_it_reserves():
    """A config that reserves GPUs for a side runs that side on cuda, and one that reserves none on cpu
    (a GPU reserved and left idle, or cuda asked for without a GPU, is a deployment that cannot work)."""
    from pathlib import Path

    configs = [
        p for p in sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml")) if p.name != "serve.yaml"
    ]
    assert len(configs) >= 3
    gpu = []
    for path in configs:
        cfg = load_config(path)
        for side in (cfg.attention, cfg.experts):
            assert (side.num_gpus >= 1) == side.device.startswith("cuda"), (path.name, side)
            gpu.append(side.device != "cpu")
    assert any(gpu) and not all(gpu)

"""The clients users already run against vLLM's server, run unchanged against mixserve's: guidellm,
NVIDIA's aiperf, kubernetes-sigs inference-perf and lm-evaluation-harness (loglikelihood through
echo + logprobs, generation through chat). Each must finish with no failed request, and the tokens it
reports must be the server's own count (`vllm:prompt_tokens_total`, `vllm:generation_tokens_total`).

The clients are not dependencies of mixserve (each pins its own stack; inference-perf needs Python
3.12): a test runs when its command is on PATH or in one of the folders of MIXSERVE_CLIENTS
(os.pathsep-separated, e.g. each client's virtualenv bin/), and is skipped with that reason
otherwise. docs/testing.md has the recipe that installs them."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest

from cluster.build import local_engine
from cluster.config import load_config
from model.sampling import SamplingParams
from tests.support import serve_app

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
M = "tiny-clients"


def tool(name: str) -> str | None:
    dirs = [d for d in os.environ.get("MIXSERVE_CLIENTS", "").split(os.pathsep) if d]
    return shutil.which(name, path=os.pathsep.join(dirs + [os.environ.get("PATH", "")]))


def needs(name: str):
    return pytest.mark.skipif(
        tool(name) is None, reason=f"{name} is not installed (on PATH or in MIXSERVE_CLIENTS): docs/testing.md"
    )


pytestmark = [
    pytest.mark.ray,
    pytest.mark.skipif(
        not any(tool(t) for t in ("guidellm", "aiperf", "inference-perf", "lm_eval")),
        reason="none of guidellm, aiperf, inference-perf, lm_eval is installed (MIXSERVE_CLIENTS): docs/testing.md",
    ),
]


@pytest.fixture(scope="module")
def server(grpc_port, tiny_dir):
    cfg = load_config(
        CONFIG,
        {"model": tiny_dir, "dtype": "float32", "server.served_model_name": M, "server.metrics_refresh_s": 0},
    )
    with serve_app(cfg, "mixserve", grpc_port) as base:
        yield base


def counters(base: str) -> tuple[float, float]:
    """The server's prompt and generated token counters (vLLM's names), summed over their labels."""
    text = urllib.request.urlopen(base + "/metrics", timeout=30).read().decode()
    total = {"prompt": 0.0, "generation": 0.0}
    for line in text.splitlines():
        m = re.match(r"vllm:(prompt|generation)_tokens_total(\{[^}]*\})? ([0-9.e+]+)$", line)
        if m:
            total[m.group(1)] += float(m.group(3))
    return total["prompt"], total["generation"]


def run(cmd: list[str], cwd: Path, timeout: int = 600, offline: bool = True) -> str:
    """Run a client; `offline` tells Hugging Face libraries not to look for the Hub (aiperf's offline
    mode cannot load a tokenizer from a local folder, and needs none of it)."""
    env = dict(os.environ)
    if offline:
        env |= {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    p = subprocess.run(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout
    )
    assert p.returncode == 0, p.stdout[-4000:]
    return p.stdout


@needs("guidellm")
def test_guidellm(server, tiny_dir, tmp_path):
    """guidellm's chat benchmark (synthetic prompts, 4 concurrent streams): every request succeeds and
    its token counts are the server's."""
    p0, g0 = counters(server)
    out = tmp_path / "guidellm.json"
    run(
        [
            tool("guidellm"),
            "run",
            "--backend",
            f"kind=openai_http,target={server},model={M}",
            "--profile",
            "kind=concurrent,streams=4",
            "--constraint",
            "kind=max_requests,count=16",
            "--data",
            "kind=synthetic_text,prompt_tokens=32,output_tokens=16",
            "--tokenizer",
            f"kind=huggingface_auto,model={tiny_dir}",
            "--output",
            f"kind=json,path={out}",
            "--disable-console-interactive",
        ],
        tmp_path,
    )
    reqs = json.loads(out.read_text())["benchmarks"][0]["requests"]
    assert len(reqs["successful"]) == 16 and not reqs["errored"] and not reqs["incomplete"]
    p1, g1 = counters(server)
    assert sum(r["prompt_tokens"] for r in reqs["successful"]) == p1 - p0
    assert sum(r["output_tokens"] for r in reqs["successful"]) == g1 - g0


@needs("aiperf")
@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_aiperf(server, tiny_dir, tmp_path, endpoint):
    """NVIDIA's aiperf, chat and completions, streaming, with the server's token counts (its own
    re-tokenisation of a random model's text differs, as it would against any server)."""
    p0, g0 = counters(server)
    out = tmp_path / "aiperf"
    run(
        [
            tool("aiperf"),
            "profile",
            "--model",
            M,
            "--url",
            server,
            "--endpoint-type",
            endpoint,
            "--streaming",
            "--tokenizer",
            tiny_dir,
            "--synthetic-input-tokens-mean",
            "32",
            "--synthetic-input-tokens-stddev",
            "0",
            "--output-tokens-mean",
            "16",
            "--output-tokens-stddev",
            "0",
            "--extra-inputs",
            "ignore_eos:true",
            "--use-server-token-count",
            "--request-count",
            "12",
            "--concurrency",
            "4",
            "--random-seed",
            "1",
            "--artifact-dir",
            str(out),
            "--ui-type",
            "none",
        ],
        tmp_path,
        offline=False,
    )
    res = json.loads((out / "profile_export_aiperf.json").read_text())
    assert res["request_count"]["avg"] == 12 and not res.get("error_summary"), res.get("error_summary")
    p1, g1 = counters(server)
    assert res["total_osl"]["avg"] == g1 - g0 == 12 * 16
    assert res["usage_prompt_tokens"]["sum"] == p1 - p0


@needs("inference-perf")
def test_inference_perf(server, tiny_dir, tmp_path):
    """kubernetes-sigs inference-perf: a constant-rate stage of streamed completions; no failure, and
    its prompt and output token totals (server-reported usage) are the server's counters."""
    cfg = {
        "load": {"type": "constant", "stages": [{"rate": 2, "duration": 6}], "num_workers": 1},
        "api": {"type": "completion", "streaming": True},
        "server": {"type": "vllm", "model_name": M, "base_url": server, "ignore_eos": True},
        "tokenizer": {"pretrained_model_name_or_path": tiny_dir},
        "data": {
            "type": "random",
            "input_distribution": {"min": 16, "max": 32, "mean": 24, "std_dev": 4, "total_count": 40},
            "output_distribution": {"min": 8, "max": 16, "mean": 12, "std_dev": 2, "total_count": 40},
        },
        "report": {"request_lifecycle": {"summary": True, "per_request": True, "use_server_output_tokens": True}},
        "storage": {"local_storage": {"path": str(tmp_path / "out")}},
    }
    (tmp_path / "config.yml").write_text(json.dumps(cfg))  # JSON is YAML
    p0, g0 = counters(server)
    run([tool("inference-perf"), "-c", str(tmp_path / "config.yml")], tmp_path)
    summary = json.loads((tmp_path / "out" / "summary_lifecycle_metrics.json").read_text())
    assert summary["failures"]["count"] == 0 and summary["successes"]["count"] >= 10
    p1, g1 = counters(server)
    assert summary["successes"]["prompt_tokens"]["total"] == p1 - p0
    assert summary["successes"]["output_tokens"]["total"] == g1 - g0
    assert summary["successes"]["client_fallback_requests"] == {"prompt": 0, "output": 0}


MC = [
    ("The capital of France is", ["Paris", "Rome", "Berlin"], 0),
    ("Two plus two is", ["four", "five"], 0),
    ("The colour of the sky is", ["blue", "green", "loud", "red"], 0),
]


def write_tasks(d: Path) -> None:
    with open(d / "mc.jsonl", "w") as f:
        for q, c, a in MC:
            f.write(json.dumps({"question": q, "choices": c, "answer": a}) + "\n")
    with open(d / "gen.jsonl", "w") as f:
        for q, c, a in MC:
            f.write(json.dumps({"question": q, "answer": c[a]}) + "\n")
    common = "dataset_path: json\ntest_split: test\ndoc_to_text: '{{question}}'\n"
    (d / "mixserve_mc.yaml").write_text(
        f"task: mixserve_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {d / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n"
    )
    (d / "mixserve_gen.yaml").write_text(
        f"task: mixserve_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {d / 'gen.jsonl'}\n"
        "output_type: generate_until\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 8\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n"
    )


def samples(out: Path, task: str) -> list[dict]:
    (f,) = out.rglob(f"samples_{task}_*.jsonl")
    return [json.loads(line) for line in f.read_text().splitlines()]


@needs("lm_eval")
def test_lm_eval_loglikelihood_and_generation(server, tiny_dir, tmp_path):
    """lm-evaluation-harness: a multiple-choice task through `local-completions` (loglikelihood by
    echo + logprobs), whose per-choice loglikelihoods equal the in-process engine's log-softmax of the
    same token ids, and a generation task through `local-chat-completions`."""
    from transformers import AutoTokenizer

    write_tasks(tmp_path)
    base = [tool("lm_eval"), "run", "--include_path", str(tmp_path), "--log_samples"]
    run(
        base
        + [
            "--model",
            "local-completions",
            "--model_args",
            f"model={M},base_url={server}/v1/completions,tokenizer={tiny_dir},num_concurrent=2,max_retries=1",
            "--tasks",
            "mixserve_mc",
            "--output_path",
            str(tmp_path / "mc"),
        ],
        tmp_path,
    )
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    eng = local_engine(tiny_dir, "float32")
    got = samples(tmp_path / "mc", "mixserve_mc")
    assert len(got) == len(MC)
    for s in got:
        q, choices = s["doc"]["question"], s["doc"]["choices"]
        for c, resp in zip(choices, s["filtered_resps"]):
            # lm-eval's pair encoding (no BOS): the whole text's ids, split after the context's
            ctx = tok(q, add_special_tokens=False).input_ids
            whole = tok(q + " " + c, add_special_tokens=False).input_ids
            o = eng.generate([whole], SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0))[0]
            want = sum(lp[1] for lp in o.prompt_logprobs[len(ctx) :])
            assert abs(float(resp[0]) - want) < 2e-3, (q, c, resp, want)
    p0, g0 = counters(server)
    run(
        base
        + [
            "--model",
            "local-chat-completions",
            "--model_args",
            f"model={M},base_url={server}/v1/chat/completions,num_concurrent=2,max_retries=1",
            "--apply_chat_template",
            "--tasks",
            "mixserve_gen",
            "--output_path",
            str(tmp_path / "gen"),
        ],
        tmp_path,
    )
    gen = samples(tmp_path / "gen", "mixserve_gen")
    assert len(gen) == len(MC) and all(isinstance(s["resps"][0][0], str) for s in gen)
    p1, g1 = counters(server)
    assert p1 > p0 and 0 < g1 - g0 <= 8 * len(MC)

"""The benchmark harness: its pieces, and one `mixserve bench --quick` run (the smoke version)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.bench import SYSTEMS, Timing, pct, summarize, workload

ROOT = Path(__file__).resolve().parents[2]


def test_workload_is_seeded_and_within_ranges():
    a = workload(20, 7, (8, 32), (4, 12), 32000)
    assert [(r.prompt, r.out_len) for r in a] == [
        (r.prompt, r.out_len) for r in workload(20, 7, (8, 32), (4, 12), 32000)
    ]
    assert a[0].prompt != workload(20, 8, (8, 32), (4, 12), 32000)[0].prompt
    assert all(8 <= len(r.prompt) <= 32 and 4 <= r.out_len <= 12 and r.prompt[0] == 1 for r in a)
    assert all(3 <= t < 32000 for r in a for t in r.prompt[1:])
    assert len({len(r.prompt) for r in a}) > 3 and len({r.out_len for r in a}) > 3  # varied, not constant


def test_summary_figures():
    ts = [Timing(0.0, [0.1, 0.2, 0.4]), Timing(1.0, [1.3, 1.4])]
    s = summarize(ts, 2.0)
    assert s["output_tokens"] == 5 and s["output_tok_s"] == 2.5 and s["req_s"] == 1.0
    assert s["ttft_ms_p50"] == pytest.approx(100.0) and s["ttft_ms_p99"] == pytest.approx(300.0)
    assert s["itl_ms_p50"] == pytest.approx(100.0) and s["itl_ms_p99"] == pytest.approx(200.0)
    assert pct([3.0, 1.0, 2.0], 50) == 2.0


@pytest.mark.ray
def test_quick_bench_runs_all_systems_and_writes_json_and_table(tmp_path):
    env = {**os.environ}
    env.pop("RAY_ADDRESS", None)
    env.pop("MIXSERVE_VLLM_PYTHON", None)  # the vLLM peer is optional and never part of the test run
    p = subprocess.run(
        [str(Path(sys.executable).with_name("mixserve")), "bench", "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((tmp_path / "bench-tiny-quick.json").read_text())
    assert set(res["systems"]) == set(SYSTEMS) - {"vllm"}
    for system, rows in res["systems"].items():
        assert [r["concurrency"] for r in rows] == [1, 4], system
        for r in rows:
            assert r["requests"] == 8 and r["output_tokens"] > 0 and r["output_tok_s"] > 0, (system, r)
            assert r["ttft_ms_p50"] > 0 and r["itl_ms_p50"] > 0, (system, r)
    # every system produced each request's own number of tokens
    totals = {s: [r["output_tokens"] for r in rows] for s, rows in res["systems"].items()}
    assert len({tuple(v) for v in totals.values()}) == 1, totals
    assert res["dispatch_ms_per_layer"]["disaggregated"] > 0
    assert res["ffn_vs_gemm"][0]["tokens"] == 256 and res["ffn_vs_gemm"][0]["gemm_gflops"] > 0
    assert len(res["expert_memory"]) == 8 and all(
        m["weight_mb"] > 0 and m["system"] == "disaggregated" for m in res["expert_memory"]
    )
    assert {t["target"].split(":")[0] for t in res["targets"]} >= {
        "expert FFN vs dense GEMM FLOP/s, >= 256 tokens",
        "disaggregated",
    }
    assert 0 < res["params"]["active_fraction"] < 1
    for system in ("inprocess", "disaggregated", "http"):  # the engine's step profile, per output token
        for row in res["systems"][system]:
            prof = row["profile"]
            assert prof["dense"] > 0 and prof["sample"] > 0
            assert min(prof[k] for k in ("schedule", "dispatch", "combine")) >= 0
    assert all(r["profile"]["wait"] > 0 for r in res["systems"]["disaggregated"])
    for row in res["systems"]["http"]:  # the served token's CPU by process (Linux: from /proc)
        cpu = row["cpu_ms_per_token"]
        assert min(cpu[k] for k in ("ingress", "engine", "experts")) > 0, cpu
        # HAProxy's share (~0.04 ms a token) can be under one /proc tick (10 ms) over a quick level
        assert cpu["http front"] >= 0, cpu
        assert cpu["total"] >= sum(v for k, v in cpu.items() if k != "total") - 0.01
    assert "Where a token's time goes" in (tmp_path / "bench-tiny-quick.md").read_text()
    assert "Where a served token's CPU goes" in (tmp_path / "bench-tiny-quick.md").read_text()
    md = (tmp_path / "bench-tiny-quick.md").read_text()
    assert "| system | concurrency | output tok/s" in md and "| http | 4 |" in md
    assert "[bench]" in p.stderr  # progress is shown


@pytest.mark.ray
def test_quick_prefix_bench_compares_caching_on_and_off(tmp_path):
    """The shared-prefix workload: the in-process engine with and without prefix caching and the Serve
    application, greedy; caching finds the shared prefix (the server's usage says so) and changes no token."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MIXSERVE_VLLM_PYTHON")}
    cmd = [str(Path(sys.executable).with_name("mixserve")), "bench", "--workload", "multi-turn", "--quick"]
    cmd += ["--systems", "inprocess", "inprocess-nocache", "http", "--temperature", "0", "--out", str(tmp_path)]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((tmp_path / "bench-tiny-multi-turn-quick.json").read_text())
    rows = {s: r[0] for s, r in res["systems"].items()}
    assert set(rows) == {"inprocess", "inprocess-nocache", "http"}
    turns = res["workload"]["sessions"] * res["workload"]["turns"]
    for s, r in rows.items():
        assert r["requests"] == turns and r["output_tokens"] == turns * res["workload"]["output_len"], (s, r)
        assert r["ttft_ms_p50"] > 0 and len(r["ttft_ms_p50_by_turn"]) == res["workload"]["turns"]
    assert rows["inprocess-nocache"]["cached_fraction"] == 0.0
    # every turn re-sends the history: most of each prompt is found (the same requests, the same share)
    assert rows["inprocess"]["cached_fraction"] == rows["http"]["cached_fraction"] > 0.5
    assert 0 < rows["http"]["server_hit_ratio"] <= 1
    assert res["greedy_identical"] == {"inprocess": True, "inprocess-nocache": True}
    assert any(t["target"] == "in-process TTFT p50, caching on vs off" for t in res["targets"])
    md = (tmp_path / "bench-tiny-multi-turn-quick.md").read_text()
    assert "TTFT p50 ms by turn" in md and "| http | 4 |" in md


def test_gpu_bench_runs_its_every_section_at_tiny_shapes_on_cpu(tmp_path):
    """`python -m benchmarks.gpu` is what a GPU machine runs; at tiny shapes on the CPU it exercises the
    same code (weights, engine, layer timings, an expert-worker process behind the data plane)."""
    cmd = [sys.executable, "-m", "benchmarks.gpu", "--device", "cpu", "--shape", "tiny", "--batches", "1", "4"]
    cmd += ["--context", "16", "--steps", "4", "--prefill", "64", "--layer-batch", "4", "--wire-tokens", "8"]
    cmd += ["--ffn-tokens", "64", "256", "--reps", "3", "--out", str(tmp_path), "--workdir", str(tmp_path / "w")]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads((tmp_path / "gpu-tiny-cpu.json").read_text())
    assert r["errors"] == {}
    assert [x["batch"] for x in r["local"]] == [x["batch"] for x in r["remote"]] == [1, 4]
    assert all(x["tokens_per_s"] > 0 and x["ms_per_layer"]["dense"] > 0 for x in r["local"] + r["remote"])
    assert all(x["ms_per_layer"]["wait"] > 0 for x in r["remote"])  # the experts answered from the other process
    assert r["remote_round_trip_ms_per_layer"] > 0 and r["prefill"]["tokens"] == 64
    assert [x["tokens"] for x in r["ffn"]] == [64, 256] and all(x["gemm_tflops"] > 0 for x in r["ffn"])
    assert r["layer"]["attention_ms"] > 0 and r["dataplane"]["round_trip_ms"] > 0
    assert {"local_engine", "expert_worker_after_load", "expert_worker_final"} <= set(r["memory"])
    assert {t["target"].split(",")[0] for t in r["targets"]} == {
        "expert FFN vs GEMM TFLOP/s",
        "attention + combine per layer",
        "data-plane round trip / copy time",
    }
    md = (tmp_path / "gpu-tiny-cpu.md").read_text()
    assert "| batch | local experts tok/s" in md and "Data plane, loopback" in md
    # a second run reuses the weights written by the first
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "weights:" not in p.stderr


def test_gpu_bench_exits_cleanly_when_a_section_fails(tmp_path):
    cmd = [sys.executable, "-m", "benchmarks.gpu", "--device", "cpu", "--shape", "tiny", "--batches", "2"]
    cmd += ["--context", "16", "--steps", "2", "--prefill", "32", "--layer-batch", "4096", "--ffn-tokens", "64"]
    cmd += ["--reps", "2", "--out", str(tmp_path), "--workdir", str(tmp_path / "w")]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, p.stderr[-3000:]
    r = json.loads((tmp_path / "gpu-tiny-cpu.json").read_text())
    assert list(r["errors"]) == ["layer"] and "exceeds the KV pool" in r["errors"]["layer"]
    assert r["remote"] and r["local"]  # the other sections ran
    assert "Sections that did not finish: layer" in (tmp_path / "gpu-tiny-cpu.md").read_text()

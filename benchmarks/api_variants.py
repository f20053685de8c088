"""Send the same request variants to mixserve and to vLLM's OpenAI server; print both answers' status.

    python -m benchmarks.api_variants --server mixserve=http://127.0.0.1:8000 --model tiny \
        --server vllm=http://127.0.0.1:8001 [--json out.json]

Each variant is an ordinary request: OpenAI's own parameters and vLLM's common sampling extensions,
on /v1/completions, /v1/chat/completions, /tokenize and /detokenize, plus a few shape checks of the
answer (n choices, the usage chunk of a stream). A row is "same" when both servers give the same
status class and, for 200s, the same shape; both servers must serve the same checkpoint under the
same model name.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request

P = {"prompt": "The capital of France is", "max_tokens": 8}
C = {"messages": [{"role": "user", "content": "Name a color."}], "max_tokens": 8}

VARIANTS: list[tuple[str, str, dict]] = [
    ("completion plain", "/v1/completions", P),
    ("greedy", "/v1/completions", P | {"temperature": 0}),
    ("seed", "/v1/completions", P | {"seed": 7, "temperature": 0.8}),
    ("n=3", "/v1/completions", P | {"n": 3, "temperature": 0.8, "seed": 1}),
    ("prompt list", "/v1/completions", P | {"prompt": ["a b c", "d e f"]}),
    ("prompt token ids", "/v1/completions", P | {"prompt": [1, 415, 5565, 302]}),
    ("prompt list of token ids", "/v1/completions", P | {"prompt": [[1, 415], [1, 5565, 302]]}),
    ("presence_penalty", "/v1/completions", P | {"presence_penalty": 1.0}),
    ("frequency_penalty", "/v1/completions", P | {"frequency_penalty": -0.5}),
    ("logit_bias", "/v1/completions", P | {"logit_bias": {"13": 50}}),
    ("echo", "/v1/completions", P | {"echo": True}),
    ("logprobs=2", "/v1/completions", P | {"logprobs": 2}),
    ("user", "/v1/completions", P | {"user": "someone"}),
    ("stop string", "/v1/completions", P | {"stop": ["\n"]}),
    ("stream", "/v1/completions", P | {"stream": True}),
    ("stream include_usage", "/v1/completions", P | {"stream": True, "stream_options": {"include_usage": True}}),
    ("top_k (vLLM)", "/v1/completions", P | {"top_k": 20}),
    ("min_p (vLLM)", "/v1/completions", P | {"min_p": 0.1}),
    ("repetition_penalty (vLLM)", "/v1/completions", P | {"repetition_penalty": 1.2}),
    ("min_tokens (vLLM)", "/v1/completions", P | {"min_tokens": 4}),
    ("stop_token_ids (vLLM)", "/v1/completions", P | {"stop_token_ids": [13]}),
    ("ignore_eos (vLLM)", "/v1/completions", P | {"ignore_eos": True}),
    ("skip_special_tokens (vLLM)", "/v1/completions", P | {"skip_special_tokens": False}),
    ("include_stop_str_in_output (vLLM)", "/v1/completions", P | {"stop": ["a"], "include_stop_str_in_output": True}),
    ("add_special_tokens (vLLM)", "/v1/completions", P | {"add_special_tokens": False}),
    ("chat plain", "/v1/chat/completions", C),
    ("chat n=2", "/v1/chat/completions", C | {"n": 2, "temperature": 0.8}),
    (
        "chat content parts",
        "/v1/chat/completions",
        C | {"messages": [{"role": "user", "content": [{"type": "text", "text": "Name a color."}]}]},
    ),
    ("chat max_completion_tokens", "/v1/chat/completions", {"messages": C["messages"], "max_completion_tokens": 8}),
    ("chat response_format text", "/v1/chat/completions", C | {"response_format": {"type": "text"}}),
    ("chat logprobs", "/v1/chat/completions", C | {"logprobs": True, "top_logprobs": 2}),
    ("chat penalties", "/v1/chat/completions", C | {"presence_penalty": 0.5, "frequency_penalty": 0.5}),
    ("chat logit_bias", "/v1/chat/completions", C | {"logit_bias": {"13": -100}}),
    (
        "chat stream include_usage",
        "/v1/chat/completions",
        C | {"stream": True, "stream_options": {"include_usage": True}},
    ),
    (
        "chat system + user",
        "/v1/chat/completions",
        C | {"messages": [{"role": "system", "content": "Be brief."}] + C["messages"]},
    ),
    ("tokenize prompt", "/tokenize", {"prompt": "Hello world"}),
    ("tokenize messages", "/tokenize", {"messages": C["messages"]}),
    ("detokenize", "/detokenize", {"tokens": [1, 22557, 1526]}),
    # refusals both servers should give
    ("bad: unknown field", "/v1/completions", P | {"bogus_field": 1}),
    ("bad: temperature -1", "/v1/completions", P | {"temperature": -1}),
    ("bad: presence_penalty 3", "/v1/completions", P | {"presence_penalty": 3}),
    ("bad: n=0", "/v1/completions", P | {"n": 0}),
    ("bad: logit_bias out of vocab", "/v1/completions", P | {"logit_bias": {"99999999": 1}}),
    ("bad: prompt past the context", "/v1/completions", P | {"prompt": "word " * 100000}),
    ("bad: max_tokens -1", "/v1/completions", P | {"max_tokens": -1}),
]


def call(base: str, model: str, route: str, body: dict) -> tuple[int, str]:
    """(status, a short description of the answer's shape)."""
    data = json.dumps(({"model": model} if route.startswith("/v1") or "model" in body else {}) | body).encode()
    req = urllib.request.Request(base + route, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            raw = r.read().decode()
            status = r.status
    except urllib.error.HTTPError as e:
        err = json.loads(e.read() or b"{}")
        msg = err.get("error", err).get("message", str(err)) if isinstance(err.get("error", err), dict) else str(err)
        return e.code, str(msg)[:80]
    if body.get("stream"):
        chunks = [json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: {")]
        usage_last = bool(chunks) and chunks[-1].get("choices") == [] and "usage" in chunks[-1]
        return status, f"{len(chunks)} chunks, usage chunk last: {usage_last}"
    out = json.loads(raw)
    if "choices" in out:
        return status, f"{len(out['choices'])} choice(s)"
    return status, ",".join(sorted(k for k in out if out[k] is not None))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server", action="append", required=True, help="NAME=URL (give two)")
    p.add_argument("--model", required=True, help="the model name both servers serve")
    p.add_argument("--json", help="write the rows here")
    a = p.parse_args(argv)
    servers = [s.split("=", 1) for s in a.server]
    rows = []
    for i, (name, route, body) in enumerate(VARIANTS):
        print(f"\r[variants] {i + 1}/{len(VARIANTS)} {name:40}", end="", file=sys.stderr, flush=True)
        row = {"variant": name, "route": route}
        for sname, url in servers:
            row[sname] = call(url, a.model, route, body)
        rows.append(row)
    print(file=sys.stderr)
    names = [s for s, _ in servers]
    print("| variant | " + " | ".join(names) + " | same |")
    print("|---|" + "---|" * (len(names) + 1))
    for r in rows:
        statuses = [r[n][0] // 100 for n in names]
        shapes = [r[n][1] for n in names if r[n][0] == 200]
        same = len(set(statuses)) == 1 and (len(set(shapes)) <= 1 or statuses[0] != 2)
        r["same"] = same
        print(
            f"| {r['variant']} | "
            + " | ".join(f"{r[n][0]} {r[n][1]}" for n in names)
            + f" | {'yes' if same else 'NO'} |"
        )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

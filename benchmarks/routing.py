"""`mixserve routing`: the Mixtral paper's routing analysis (its section 5) against a running server.

Each text file is one domain. Its text is cut into chunks, and every chunk is sent to the server as
a prompt with `return_prompt_routed_experts` (one generated token, which is discarded), so the
routing of every prompt token comes back. Per file and layer the report gives:

- the share of expert assignments each expert received (each token counts once for each of its
  top-k experts), as in the paper's figure 7;
- how often consecutive tokens keep their first-choice expert, and how often they keep any of
  their top-k. These are set against what independent uniform routing would give: 1/E for the
  first choice, 1 - C(E-k, k) / C(E, k) for any of the top-k (46.4% for 8 experts, top-2, as in the
  paper's table 5).

It writes report.json, report.md, shares.png and repetition.png to --out.
"""

from __future__ import annotations

import json
import math
import sys
import urllib.error
import urllib.request
from pathlib import Path


def post(url: str, body: dict, api_key: str | None, timeout: float = 600) -> dict:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise ValueError(f"{url}: {e.code} {e.read()[:300].decode(errors='replace')}") from None


def chunks(text: str, chars: int) -> list[str]:
    """The text in pieces of at most about `chars` characters, cut at whitespace where possible."""
    out, start = [], 0
    while start < len(text):
        end = min(len(text), start + chars)
        if end < len(text):
            cut = text.rfind(" ", start + chars // 2, end)
            end = cut if cut > start else end
        piece = text[start:end].strip()
        if piece:
            out.append(piece)
        start = end
    return out


def random_rates(num_experts: int, k: int) -> tuple[float, float]:
    """(first choice kept, any of the top-k kept) for independent uniform top-k routing."""
    return 1 / num_experts, 1 - math.comb(num_experts - k, k) / math.comb(num_experts, k)


def analyse(sequences: list[list], num_experts: int) -> dict:
    """sequences: per chunk, routes [tokens][layers][k] -> shares and repetition rates per layer."""
    layers = len(sequences[0][0])
    k = len(sequences[0][0][0])
    counts = [[0] * num_experts for _ in range(layers)]
    first_counts = [[0] * num_experts for _ in range(layers)]
    same_first, same_any, pairs = [0] * layers, [0] * layers, 0
    tokens = 0
    for routes in sequences:
        tokens += len(routes)
        for t, per_layer in enumerate(routes):
            for l, chosen in enumerate(per_layer):
                for e in chosen:
                    counts[l][e] += 1
                first_counts[l][chosen[0]] += 1
                if t:
                    prev = routes[t - 1][l]
                    same_first[l] += chosen[0] == prev[0]
                    same_any[l] += bool(set(chosen) & set(prev))
        pairs += max(0, len(routes) - 1)
    return {
        "tokens": tokens,
        "layers": layers,
        "top_k": k,
        "share": [[c / max(1, sum(row)) for c in row] for row in counts],
        "first_choice_share": [[c / max(1, sum(row)) for c in row] for row in first_counts],
        "keep_first": [n / max(1, pairs) for n in same_first],
        "keep_any": [n / max(1, pairs) for n in same_any],
    }


def plot(report: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = list(report["files"])
    first = report["files"][files[0]]
    L, E = first["layers"], report["num_experts"]
    cols = min(L, 4)
    rows = -(-L // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    width = 0.8 / len(files)
    for l in range(L):
        ax = axes[l // cols][l % cols]
        for i, f in enumerate(files):
            share = report["files"][f]["share"][l]
            ax.bar([e + i * width for e in range(E)], share, width, label=f)
        ax.axhline(1 / E, color="gray", linestyle="--", linewidth=0.8)
        ax.set_title(f"layer {l}")
        ax.set_xticks(range(E))
        ax.set_xlabel("expert")
        ax.set_ylabel("share of assignments")
    for j in range(L, rows * cols):
        axes[j // cols][j % cols].axis("off")
    axes[0][0].legend(fontsize="small")
    fig.suptitle("Expert assignment per layer and file (dashed: uniform)")
    fig.tight_layout()
    shares = out / "shares.png"
    fig.savefig(shares, dpi=100)
    plt.close(fig)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.5))
    rnd_first, rnd_any = report["random"]["keep_first"], report["random"]["keep_any"]
    for f in files:
        a1.plot(range(L), report["files"][f]["keep_first"], marker="o", label=f)
        a2.plot(range(L), report["files"][f]["keep_any"], marker="o", label=f)
    a1.axhline(rnd_first, color="gray", linestyle="--", label="random")
    a2.axhline(rnd_any, color="gray", linestyle="--", label="random")
    a1.set_title("consecutive tokens keep the first choice")
    a2.set_title(f"consecutive tokens share one of the top-{first['top_k']}")
    for a in (a1, a2):
        a.set_xlabel("layer")
        a.set_xticks(range(L))
        a.set_ylim(0, 1)
        a.legend(fontsize="small")
    fig.tight_layout()
    rep = out / "repetition.png"
    fig.savefig(rep, dpi=100)
    plt.close(fig)
    return [str(shares), str(rep)]


def markdown(report: dict) -> str:
    rf, ra = report["random"]["keep_first"], report["random"]["keep_any"]
    lines = [
        f"# Routing report: {report['model']} at {report['url']}",
        "",
        f"{report['num_experts']} experts, top-{report['top_k']}. Independent uniform routing would keep the first "
        f"choice {100 * rf:.1f}% of the time and any of the top-{report['top_k']} {100 * ra:.1f}%.",
        "",
        "| file | tokens | layer | keep first | keep any | most used expert (share) | least used (share) |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for f, r in report["files"].items():
        for l in range(r["layers"]):
            share = r["share"][l]
            hi, lo = max(range(len(share)), key=share.__getitem__), min(range(len(share)), key=share.__getitem__)
            lines.append(
                f"| {f} | {r['tokens']} | {l} | {100 * r['keep_first'][l]:.1f}% | {100 * r['keep_any'][l]:.1f}% "
                f"| {hi} ({100 * share[hi]:.1f}%) | {lo} ({100 * share[lo]:.1f}%) |"
            )
    return "\n".join(lines) + "\n"


def run(url: str, model: str | None, files: list[str], out: str, api_key: str | None, chunk_chars: int) -> dict:
    url = url.rstrip("/")
    models = urllib.request.Request(
        url + "/v1/models", headers={"Authorization": f"Bearer {api_key}"} if api_key else {}
    )
    with urllib.request.urlopen(models, timeout=60) as r:
        card = json.loads(r.read())["data"][0]
    model = model or card["id"]
    num_experts = card.get("num_experts")  # mixserve's model card says; otherwise inferred below
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    report: dict = {"url": url, "model": model, "files": {}}
    top_k = None
    for f in files:
        pieces = chunks(Path(f).read_text(encoding="utf-8"), chunk_chars)
        if not pieces:
            raise ValueError(f"{f}: no text")
        seqs = []
        for i, piece in enumerate(pieces):
            print(f"\r[routing] {Path(f).name}: chunk {i + 1}/{len(pieces)}", end="", file=sys.stderr, flush=True)
            body = {
                "model": model,
                "prompt": piece,
                "max_tokens": 1,
                "temperature": 0,
                "return_prompt_routed_experts": True,
            }
            r = post(url + "/v1/completions", body, api_key)
            seqs.append(r["prompt_routed_experts"])
        print(file=sys.stderr)
        top_k = len(seqs[0][0][0])
        num_experts = num_experts or _num_experts(seqs)
        report["files"][Path(f).name] = analyse(seqs, num_experts)
    report["num_experts"], report["top_k"] = num_experts, top_k
    keep_first, keep_any = random_rates(num_experts, top_k)
    report["random"] = {"keep_first": keep_first, "keep_any": keep_any}
    (outdir / "report.json").write_text(json.dumps(report, indent=1))
    (outdir / "report.md").write_text(markdown(report))
    report["figures"] = plot(report, outdir)
    print(f"[routing] wrote {outdir}/report.json, report.md, shares.png, repetition.png", file=sys.stderr)
    return report


def _num_experts(seqs: list) -> int:
    """The experts a server without a model card entry has: the highest id seen, plus one."""
    return 1 + max(e for routes in seqs for per_layer in routes for chosen in per_layer for e in chosen)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import os
    import urllib.error

    p = argparse.ArgumentParser(prog="mixserve routing", description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", help="text files, one per domain")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default: mixserve serve's)")
    p.add_argument("--model", help="the served model name (default: the one the server lists)")
    p.add_argument(
        "--api-key", default=os.environ.get("MIXSERVE_API_KEY"), help="the server's key (default: $MIXSERVE_API_KEY)"
    )
    p.add_argument("--chunk-chars", type=int, default=1500, help="characters of text per request")
    p.add_argument("--out", default="routing-report", help="folder for report.json, report.md and the PNGs")
    a = p.parse_args(argv)
    try:
        run(a.url, a.model, a.files, a.out, a.api_key, a.chunk_chars)
    except urllib.error.HTTPError as e:
        print(f"mixserve: error: {a.url} answered {e.code}: {e.read()[:300].decode(errors='replace')}", file=sys.stderr)
        return 2
    except urllib.error.URLError as e:  # nothing listens there
        print(f"mixserve: error: no server at {a.url} ({e.reason}); start one with `mixserve serve`", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:
        print(f"mixserve: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

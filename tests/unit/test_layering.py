"""The import structure of docs/architecture.md, read from the source (every import, also those inside
functions): each layer imports only the layers below it, never a peer's or one above; nothing the
package ships imports tests/; the product (model/, workers/, router/, cluster/) never imports
benchmarks/; and no two modules import each other, directly or around a loop."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("model", "workers", "router", "cluster", "benchmarks")

# (layer, rank): a module may import modules of its own layer and of layers of lower rank only.
LAYERS = [
    ("model", 0),
    ("workers", 1),
    ("router", 2),
    ("cluster.config", 3),
    ("cluster.proto", 3),
    ("cluster.runtime", 4),
    ("cluster.api", 4),
    ("cluster.build", 5),
    ("cluster.serve", 6),
    ("cluster.cli", 7),
    ("cluster.__main__", 8),
    ("benchmarks", 9),
]


def layer_of(module: str) -> tuple[str, int] | None:
    best = None
    for name, rank in LAYERS:
        if (module == name or module.startswith(name + ".")) and (best is None or len(name) > len(best[0])):
            best = (name, rank)
    if best is None and module in ("cluster", "cluster.__init__"):
        return ("cluster", 3)
    return best


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> set[str]:
    """Every module this file imports (absolute names; `from x import y` counts as x and x.y)."""
    mod = module_name(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            out.add(target)
            out.update(f"{target}.{a.name}" for a in node.names)
    return out


def graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py") if "_pb2" not in p.name]
    mods = {module_name(p): p for p in files}
    return {m: {i for i in imports(p) if i in mods or i.split(".")[0] == "tests"} for m, p in mods.items()}


G = graph()


def test_the_graph_is_read():
    assert "cluster.serve.app" in G and "cluster.build" in G["cluster.serve.attention"]
    assert len(G) > 40


@pytest.mark.parametrize("module", sorted(G))
def test_each_import_points_down(module):
    mine = layer_of(module)
    assert mine is not None, f"{module} belongs to no layer of docs/architecture.md"
    for target in G[module]:
        assert not target.startswith("tests"), f"{module} imports {target}: tests/ is not shipped"
        theirs = layer_of(target)
        if theirs is None or theirs[0] == mine[0] or target in ("cluster", "cluster.__init__"):
            continue
        assert theirs[1] < mine[1], f"{module} ({mine[0]}) imports {target} ({theirs[0]}): not below it"


def test_the_rule_catches_an_upward_and_a_sideways_import():
    assert layer_of("cluster.api.ingress")[1] == layer_of("cluster.runtime.experts")[1]  # peers: neither below
    assert layer_of("router.engine")[1] < layer_of("cluster.config")[1] < layer_of("cluster.serve.app")[1]
    assert layer_of("benchmarks.bench")[1] > layer_of("cluster.cli")[1]


def test_no_import_cycle():
    seen: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(m: str, path: list[str]) -> None:
        seen[m] = 1
        for t in sorted(G.get(m, ())):
            if t not in G:
                continue
            if seen.get(t) == 1:
                loop = path[path.index(t) :] + [t]
                raise AssertionError("import cycle: " + " -> ".join(loop))
            if t not in seen:
                visit(t, path + [t])
        seen[m] = 2

    for m in sorted(G):
        if m not in seen:
            visit(m, [m])

"""The README and docs/ against the tree: every path they name exists, every `file::test` names a test
in that file, every dotted config key is a key of the schema, every link into docs/ reaches a file
and a heading, and docs/configuration.md mentions every key the schema has."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from cluster.config import AppConfig

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TOP = ("model", "router", "workers", "cluster", "configs", "k8s", "tests", "benchmarks", "docs")
# A path ends where no path character follows: `bench-<preset>.json` or `x.{json,md}` are patterns, not paths.
TOPS = "|".join(TOP)
PATH = re.compile(r"(?<![\w./~-])((?:" + TOPS + r")/[\w./*-]*\w/?)(?![\w/*{<-]|\.\w|\.\{)(?:::(\w+))?")
SECTIONS = ("engine", "attention", "experts", "server")
KEY = re.compile(r"`((?:" + "|".join(SECTIONS) + r")\.[\w.*]+)")
LINK = re.compile(r"\]\(((?:docs/)?[\w-]+\.md)(?:#([\w-]+))?\)")


def texts() -> list[tuple[Path, str]]:
    return [(p, p.read_text()) for p in DOCS]


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    s = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return s.replace(" ", "-")


def schema_has(key: str) -> bool:
    """`a.b.c` is a key of AppConfig (a trailing `*` matches any key with that prefix)."""
    model: type[BaseModel] = AppConfig
    *parents, last = key.split(".")
    for part in parents:
        field = model.model_fields.get(part)
        if field is None:
            return False
        sub = next((t for t in _types(field.annotation) if isinstance(t, type) and issubclass(t, BaseModel)), None)
        if sub is None:
            return False
        model = sub
    if last.endswith("*"):
        return any(name.startswith(last[:-1]) for name in model.model_fields)
    return last in model.model_fields


def _types(annotation) -> list:
    args = getattr(annotation, "__args__", None)
    return [annotation] if not args else [t for a in args for t in _types(a)]


@pytest.mark.parametrize("doc,text", texts(), ids=lambda v: v.name if isinstance(v, Path) else "")
def test_every_path_and_test_named_exists(doc, text):
    missing = []
    for m in PATH.finditer(text):
        path, test = m.group(1).rstrip("."), m.group(2)
        hits = list(ROOT.glob(path)) if "*" in path else [ROOT / path] if (ROOT / path).exists() else []
        if not hits:
            missing.append(path)
        elif test and not re.search(rf"^\s*(async def|def|class) {test}\b", hits[0].read_text(), re.M):
            missing.append(f"{path}::{test}")
    assert not missing, f"{doc.name} names what the tree does not have: {sorted(set(missing))}"


@pytest.mark.parametrize("doc,text", texts(), ids=lambda v: v.name if isinstance(v, Path) else "")
def test_every_dotted_config_key_is_in_the_schema(doc, text):
    unknown = sorted({k.rstrip(".") for k in KEY.findall(text) if not schema_has(k.rstrip("."))})
    assert not unknown, f"{doc.name} names config keys the schema lacks: {unknown}"


@pytest.mark.parametrize("doc,text", texts(), ids=lambda v: v.name if isinstance(v, Path) else "")
def test_every_link_into_docs_reaches_a_heading(doc, text):
    broken = []
    for target, anchor in LINK.findall(text):
        path = (doc.parent / target) if (doc.parent / target).exists() else ROOT / target
        if not path.exists():
            broken.append(target)
            continue
        if anchor:
            heads = {slug(h) for h in re.findall(r"^#+ (.+)$", path.read_text(), re.M)}
            if anchor not in heads:
                broken.append(f"{target}#{anchor}")
    assert not broken, f"{doc.name} links to what does not exist: {broken}"


def test_the_configuration_doc_names_every_key():
    text = (ROOT / "docs" / "configuration.md").read_text()

    def keys(model: type[BaseModel], prefix: str):
        for name, field in model.model_fields.items():
            yield prefix + name
            for t in _types(field.annotation):
                if isinstance(t, type) and issubclass(t, BaseModel):
                    yield from keys(t, f"{prefix}{name}.")

    def named(key: str) -> bool:
        """`a.b.c` written out, or `c` on a line that is about its section (`a.*`, `a.b`)."""
        if f"`{key}`" in text or f"`{key}.*`" in text:
            return True
        parts = key.split(".")
        if len(parts) == 1:
            return False
        above = [".".join(parts[:i]) for i in range(1, len(parts))]
        sections = [f"`{a}.*`" for a in above] + [f"`{parts[-2]}`"]
        return any(f"`{parts[-1]}`" in line and any(s in line for s in sections) for line in text.splitlines())

    absent = [k for k in keys(AppConfig, "") if not named(k)]
    assert not absent, f"docs/configuration.md does not mention: {absent}"


def test_the_checks_can_fail():
    assert schema_has("attention.num_threads") and schema_has("server.max_request_*")
    assert not schema_has("attention.num_thread") and not schema_has("engine.max_num_seqs.x")
    assert slug("Network requirements of the data plane") == "network-requirements-of-the-data-plane"
    assert PATH.search("see `cluster/nothing.py::test_x`").groups() == ("cluster/nothing.py", "test_x")
    assert PATH.search("in cluster/config.py.").group(1) == "cluster/config.py"
    assert PATH.search("writes benchmarks/results/bench-<preset>.json") is None

"""The layers import only downwards, and only ``credentials.py`` reads a secret.

Read from the source (every ``import`` in every module, those inside functions and
``TYPE_CHECKING`` blocks too), so a lazy import cannot hide a cycle or a shortcut. The rules
are the README's ("Development: layers"): the faces (``cli``, ``gateway``) over the
``engine`` over ``cloud``, ``node`` and ``store``; the gateway reaches nodes and the cloud
only through the engine's calls; the node layer's types are the node layer's own.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from gpuctl.credentials import _ENV_NAMES

PACKAGE = Path(__file__).resolve().parents[1] / "gpuctl"

#: What each part of the package may import, besides itself. ``None``: anything.
ALLOWED: dict[str, frozenset[str] | None] = {
    "errors": frozenset(),
    "asgi": frozenset(),
    "tasks": frozenset(),
    "config": frozenset({"errors"}),
    "credentials": frozenset({"errors"}),
    "store": frozenset({"errors", "config", "tasks"}),
    "cloud": frozenset({"errors", "config", "credentials"}),
    # The node client fills a workspace's address into ``gpu.ollama_url``: the one type
    # it takes from the cloud layer.
    "node": frozenset({"errors", "config", "cloud.base"}),
    "engine": frozenset({"errors", "config", "tasks", "cloud", "node", "store"}),
    "gateway": frozenset({"errors", "config", "tasks", "asgi", "engine", "store"}),
    # The simulators stand in for the outside world in the demo, tests and benchmarks; they
    # may serve themselves the way the gateway serves (nothing below may import them).
    "sim": frozenset({"errors", "config", "tasks", "asgi", "cloud", "node", "store",
                      "engine", "gateway"}),
    "cli": None,
    "__init__": None,
    "__main__": None,
}


def _part(module: Path) -> str:
    rel = module.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(module: Path) -> list[tuple[int, str]]:
    """``(line, "engine.api")`` for each gpuctl module that ``module`` imports."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(module.read_text(), str(module))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        found += [(node.lineno, n.removeprefix("gpuctl."))
                  for n in names if n.startswith("gpuctl.")]
    return found


def _allowed(target: str, allowed: frozenset[str]) -> bool:
    return any(target == a or target.startswith(a + ".") for a in allowed)


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("module", MODULES, ids=lambda m: str(m.relative_to(PACKAGE)))
def test_each_module_imports_only_the_layers_below_it(module: Path) -> None:
    part = _part(module)
    assert part in ALLOWED, f"gpuctl/{part} is new: say in ALLOWED (and README) what it imports"
    allowed = ALLOWED[part]
    if allowed is None:
        return
    wrong = [f"line {line}: gpuctl.{target}" for line, target in _imports(module)
             if target.split(".")[0] != part and not _allowed(target, allowed)]
    assert not wrong, f"{part} may import only {sorted(allowed)}: {wrong}"


def test_the_rules_see_a_forbidden_import(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from gpuctl.node.client import NodeClient\n")
    assert _imports(sample) == [(2, "node.client")]
    assert not _allowed("node.client", ALLOWED["gateway"] or frozenset())
    assert _allowed("cloud.base", ALLOWED["node"] or frozenset())
    assert not _allowed("cloud.surf", ALLOWED["node"] or frozenset())


SECRET_VARIABLES = frozenset(name for names in _ENV_NAMES.values() for name in names)


def _secret_reads(module: Path) -> list[str]:
    """Lookups of a secret's variable: ``x.get("GPUCTL_NODE_TOKEN")``, ``os.getenv(...)``,
    ``environ["..."]``. A hint that only names the variable is no read."""
    reads: list[str] = []
    for node in ast.walk(ast.parse(module.read_text(), str(module))):
        key: ast.expr | None = None
        if isinstance(node, ast.Call) and node.args and isinstance(node.func, ast.Attribute) \
                and node.func.attr in ("get", "getenv", "pop"):
            key = node.args[0]
        elif isinstance(node, ast.Subscript):
            key = node.slice
        if isinstance(key, ast.Constant) and key.value in SECRET_VARIABLES:
            reads.append(f"line {node.lineno}: {key.value}")
    return reads


@pytest.mark.parametrize("module", [m for m in MODULES if m.name != "credentials.py"],
                         ids=lambda m: str(m.relative_to(PACKAGE)))
def test_only_credentials_reads_a_secret_from_the_environment(module: Path) -> None:
    assert _secret_reads(module) == []


def test_the_secret_rule_sees_a_read(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text('import os\nhint = "set GPUCTL_NODE_TOKEN"\n'
                      'token = os.environ.get("GPUCTL_NODE_TOKEN")\n')
    assert _secret_reads(sample) == ["line 3: GPUCTL_NODE_TOKEN"]

"""The codebase's own rules (docs/architecture.md), checked on the source tree: layers
point one way, no import cycles, small files, few attribute probes."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# top-level folder -> importable package (pyproject's package-dir mapping)
PACKAGES = {"stepserve": "stepserve", "server": "stepserve.server",
            "engines": "stepserve.engines", "models": "stepserve.models",
            "loadtests": "stepserve.loadtests"}
LAYERS = ("server", "engines", "models")  # each may import only the ones after it


def modules() -> dict[str, Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join((package, *parts))] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every stepserve module `name` imports, at any depth (function-level too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def test_no_import_cycles():
    g = graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(g[node]):
            if nxt.startswith(node + "."):  # a package importing its own submodule
                continue
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_layers_point_one_way():
    wrong = []
    for name, targets in graph().items():
        layer = name.split(".")[1] if name.count(".") else ""
        if layer not in LAYERS:
            continue
        below = LAYERS[LAYERS.index(layer):]
        for t in targets:
            target_layer = t.split(".")[1] if t.count(".") else "stepserve"
            if target_layer in LAYERS and target_layer not in below:
                wrong.append(f"{name} imports {t}")
    assert not wrong, "\n".join(wrong)


def test_the_scheduler_knows_nothing_of_http_or_redis():
    for path in (ROOT / "server" / "scheduler").glob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*(from|import) (fastapi|starlette|redis|httpx)", text, re.M)
        assert not re.search(r"\b(status_code|[45]0[0-9])\b", text.split('"""', 2)[-1]), path


def test_small_files_and_few_attribute_probes():
    sources = [p for folder in PACKAGES for p in (ROOT / folder).rglob("*.py")]
    big = [f"{p.relative_to(ROOT)}: {n}" for p in sources
           if (n := len(p.read_text().splitlines())) > 400]
    assert not big, big
    probes = []
    for folder in LAYERS:
        for p in (ROOT / folder).rglob("*.py"):
            for i, line in enumerate(p.read_text().splitlines(), 1):
                if re.search(r"\b(hasattr|getattr)\(", line):
                    prev = p.read_text().splitlines()[i - 2]
                    assert "#" in line or prev.strip().startswith("#"), (
                        f"{p.relative_to(ROOT)}:{i}: an attribute probe needs a comment "
                        "saying why")
                    probes.append(f"{p.relative_to(ROOT)}:{i}")
    assert len(probes) <= 15, probes

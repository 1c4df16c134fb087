"""The import layers that docs/architecture.md declares, enforced: every import in src/nin walked with `ast`."""

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "nin"
PACKAGES = ("data", "engine", "deploy", "tools")
LAZY_IMPORTS_ALLOWED = {"cli"}  # the CLI loads each command's module when that command runs


def declared_layers(text: str) -> dict[str, tuple[int, int]]:
    """Module name (relative to nin, "" for the package itself) -> (layer, position in its package), from the
    text block that follows the "layers" marker in docs/architecture.md."""
    block = re.search(r"<!-- layers:.*?-->\s*```text\n(.*?)```", text, re.S)
    assert block, "docs/architecture.md has no layer table"
    layers: dict[str, tuple[int, int]] = {}
    for line in block.group(1).strip().splitlines():
        number, rest = line.split(maxsplit=1)
        package, _, names = rest.rpartition(":") if ":" in rest else ("", "", rest)
        for position, name in enumerate(names.split()):
            if package:
                module = package.strip() if name == "__init__" else f"{package.strip()}.{name}"
            else:
                module = "" if name == "__init__" else name
            assert module not in layers, f"{module or 'nin'} is declared twice"
            layers[module] = (int(number), position)
    return layers


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def nin_imports(source: str, modules: set[str]) -> list[tuple[str, int, bool]]:
    """(imported module relative to nin, line, at the module's top level) for every import of nin's own code."""
    tree = ast.parse(source)
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and (node.module == "nin" or node.module.startswith("nin.")):
            base = node.module[4:]
            for alias in node.names:  # `from nin.tools import figures` imports the module nin.tools.figures
                child = f"{base}.{alias.name}" if base else alias.name
                found.append((child if child in modules else base, node.lineno, id(node) in top))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "nin" or alias.name.startswith("nin."):
                    found.append((alias.name[4:], node.lineno, id(node) in top))
    return found


def violations(sources: dict[str, str], layers: dict[str, tuple[int, int]]) -> list[str]:
    """Every import against the layers, every module the table lacks, every lazy import of nin's own code."""
    problems = [f"{name or 'nin'}: not in the layer table" for name in sources if name not in layers]
    for name, source in sources.items():
        if name not in layers:
            continue
        for target, line, at_top in nin_imports(source, set(sources)):
            where = f"{name or 'nin'}:{line} imports {target or 'nin'}"
            if target not in layers:
                problems.append(f"{where}, which is not in the layer table")
                continue
            (layer, position), (target_layer, target_position) = layers[name], layers[target]
            same_package = layer == target_layer and name.split(".")[0] == target.split(".")[0] in PACKAGES
            if target_layer > layer or (target_layer == layer and not (same_package and target_position < position)):
                problems.append(f"{where}: against the layers (layer {layer} may import only layers before it)")
            if not at_top and name not in LAZY_IMPORTS_ALLOWED:
                problems.append(f"{where} inside a function or class: imports of nin's modules go at the top")
    return problems


def cycles(sources: dict[str, str]) -> list[list[str]]:
    """Import circles among nin's modules (any import, top-level or not)."""
    graph = {name: {t for t, _, _ in nin_imports(src, set(sources)) if t in sources and t != name}
             for name, src in sources.items()}
    found, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


@pytest.fixture(scope="module")
def sources() -> dict[str, str]:
    return {module_name(path): path.read_text() for path in sorted(SRC.rglob("*.py"))}


@pytest.fixture(scope="module")
def layers() -> dict[str, tuple[int, int]]:
    return declared_layers((REPO / "docs" / "architecture.md").read_text())


def test_every_import_follows_the_declared_layers(sources, layers):
    assert not violations(sources, layers)
    assert set(layers) == set(sources), sorted(set(layers) ^ set(sources))  # the table names what exists


def test_no_import_circle(sources):
    assert cycles(sources) == []


@pytest.mark.parametrize("module, added, fault", [
    ("models", "from nin.pretrained import load", "against the layers"),            # upward
    ("checkpoint", "from nin.inference import fold_batch_norm", "against the layers"),
    ("classifier", "from nin.evaluate import evaluate", "against the layers"),        # same layer, not a package
    ("engine.config", "from nin.engine.loop import train", "against the layers"),     # later in its package
    ("data.readers", "from nin.cli import main", "against the layers"),
    ("files", "from nin.wizard import spell", "not in the layer table"),
])
def test_an_import_against_the_layers_is_caught(sources, layers, module, added, fault):
    changed = {**sources, module: sources[module] + f"\n{added}\n"}
    assert any(fault in problem for problem in violations(changed, layers)), (module, added)


def test_a_lazy_import_and_a_circle_are_caught(sources, layers):
    lazy = {**sources, "models": sources["models"] + "\n\ndef _late():\n    from nin.layers import MLPConv\n"}
    assert any("inside a function" in problem for problem in violations(lazy, layers))
    circle = {**sources, "layers": sources["layers"] + "\nfrom nin.models import NiN\n"}
    assert ["layers", "models", "layers"] in cycles(circle) or ["models", "layers", "models"] in cycles(circle)


def test_an_undeclared_module_is_caught(sources, layers):
    assert any("not in the layer table" in p for p in violations({**sources, "helpers": "x = 1\n"}, layers))

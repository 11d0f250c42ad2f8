"""The layout's rules, checked on the source: no import cycle between modules, and subpackages
depend one way only (docs/architecture.md draws the order)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "raee_server"
# Lower layers never import higher ones. Same rank: independent of each other.
RANK = {"errors": 0, "types": 1, "settings": 1, "protos": 1, "tracing": 1, "client": 2, "models": 3, "stores": 4,
        "migrations": 5, "core": 5, "serving": 6, "bench": 7, "cli": 8}
# migrations/ at the root ships as raee_server.migrations (pyproject's package-dir); its env.py reads the models.
MIGRATIONS_ENV = ROOT / "migrations" / "env.py"


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if "protos" in parts:
            continue
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    found["raee_server.migrations.env"] = MIGRATIONS_ENV
    return found


def imports(path: Path, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("raee_server"):
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("raee_server"))
    return out


def layer(module: str) -> str:
    return module.split(".")[1] if module.count(".") else module


def test_no_import_cycle_between_modules() -> None:
    mods = modules()
    # Lazy imports (inside a function) count: a cycle through one is a cycle all the same.
    graph = {m: {i for i in imports(p, top_level_only=False) if i in mods and i != m} for m, p in mods.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in graph[m]:
            assert state.get(n) != 1, "import cycle: " + " -> ".join([*path, m, n])
            if n not in state:
                visit(n, [*path, m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])


def test_subpackages_depend_one_way() -> None:
    for module, path in modules().items():
        if module == "raee_server":
            continue
        here = layer(module)
        for imported in imports(path, top_level_only=False):  # lazy imports count too
            there = layer(imported)
            if there in RANK and there != here:
                assert RANK[there] < RANK[here], f"{module} imports {imported}: {here} must not depend on {there}"


def test_a_planted_lazy_upward_import_is_found(tmp_path: Path) -> None:
    """An import inside a function counts: a store that lazily imports the server is caught."""
    planted = tmp_path / "planted.py"
    planted.write_text("def later():\n    from raee_server.serving.server import serve\n    return serve\n")
    found = imports(planted, top_level_only=False)
    assert "raee_server.serving.server" in found and not imports(planted, top_level_only=True)
    assert RANK[layer("raee_server.serving.server")] > RANK[layer("raee_server.stores.metadata")]


ARCHITECTURE = ROOT / "docs" / "architecture.md"
MAX_LINES = 500  # a module past this holds more than one job (issue 26)


def documented_tree() -> dict[str, set[str]]:
    """docs/architecture.md's module tree: folder under raee_server/ ('' for the top) -> the .py files it names."""
    text = ARCHITECTURE.read_text()
    block = text[text.index("```\nraee_server/\n") + 4:]
    block = block[: block.index("```")]
    named: dict[str, set[str]] = {}
    folder = ""
    for line in block.splitlines()[1:]:
        if not line.startswith("  "):  # migrations/, corpora/, ...: outside the package
            break
        head = line[2:].split(" ", 1)[0]
        if head.endswith("/") and not line.startswith("   "):
            folder = head.rstrip("/")
        elif head.endswith(".py") and not line.startswith("   "):
            folder = ""
        named.setdefault(folder, set()).update(re.findall(r"\b(\w+\.py)\b", line))
    return named


def test_the_documented_module_tree_is_the_code() -> None:
    named = documented_tree()
    actual: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).parts
        if "protos" in parts or path.name == "__init__.py" or len(parts) > 2:
            continue
        actual.setdefault(parts[0] if len(parts) == 2 else "", set()).add(path.name)
    assert {folder: files for folder, files in named.items() if files} == actual


def test_the_documented_failure_table_gives_every_status_code() -> None:
    from raee_server.serving.status import STATUS_CODES

    text = ARCHITECTURE.read_text()
    table = text[text.index("| failure | status code |"):]
    documented = set(re.findall(r"\| ([A-Z_]+)(?: \(|\s*\|)", table))
    assert documented == {code.name for code in STATUS_CODES.values()} | {"INTERNAL"}


def test_no_hand_written_module_is_over_the_limit() -> None:
    long = {str(path.relative_to(ROOT)): n for path in [*PACKAGE.rglob("*.py"), *(ROOT / "migrations").rglob("*.py")]
            if "protos" not in path.parts and (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}

"""The import graph of `fastalign/` has no circles and no upward edges, the ZeRO-3 fused-head order
is written in one place, and function-local imports say why they are local.

LAYERS is the one written statement of the layer order (docs/architecture.md shows it): a module
may import modules of its own layer or of layers below, never above. Imports inside functions
count as edges too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# bottom first; a name is a module or a package (its whole subtree)
LAYERS: list[tuple[str, ...]] = [
    (
        "fastalign",
        "fastalign.constants",
        "fastalign.errors",
        "fastalign.files",
        "fastalign.lazy",
        "fastalign.kernels",
        "fastalign.configs",
        "fastalign.csrc",
    ),
    ("fastalign.ops",),
    ("fastalign.losses",),
    ("fastalign.config",),
    ("fastalign.data", "fastalign.models"),
    ("fastalign.engine",),
    ("fastalign.rollout",),
    ("fastalign.trainers",),
    ("fastalign.cai", "fastalign.demo", "fastalign.plot", "fastalign.plot_figures", "fastalign.recipes"),
    ("fastalign.cli",),
]

# Third-party packages that a function may import locally without a comment: slow to import or
# optional, so importing them at module level would slow down `fastalign --help`, `import
# fastalign.ops` and every test process that never uses them.
HEAVY = {"deepspeed", "transformers", "peft", "triton", "matplotlib", "tqdm", "datasets", "huggingface_hub",
         "gguf", "tensorboard", "zstandard", "psutil", "torch.utils.tensorboard"}  # fmt: skip


def _modules() -> dict[str, Path]:
    mods = {}
    for base, prefix in ((ROOT / "fastalign", ("fastalign",)), (ROOT / "kernels", ("fastalign", "kernels"))):
        for p in base.rglob("*.py"):
            parts = [*prefix, *p.relative_to(base).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = p
    mods["fastalign.csrc"] = ROOT / "csrc" / "__init__.py"
    mods["fastalign.configs"] = ROOT / "configs" / "__init__.py"
    return mods


MODULES = _modules()


def _resolve(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: Path) -> list[tuple[str, int, bool]]:
    """(imported fastalign module, line, inside a function) for every import statement."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    local_lines = {
        n.lineno
        for f in ast.walk(tree)
        if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)
        for n in ast.walk(f)
        if isinstance(n, ast.Import | ast.ImportFrom)
    }
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for name in names:
            target = _resolve(name) if name.startswith("fastalign") else None
            if target and target != module:
                out.append((target, node.lineno, node.lineno in local_lines))
    return out


def _layer(module: str) -> int:
    best, depth = -1, -1
    for i, names in enumerate(LAYERS):
        for n in names:
            if (module == n or module.startswith(n + ".")) and len(n) > depth:
                best, depth = i, len(n)
    assert best >= 0, f"{module} is in no layer: add it to LAYERS"
    return best


def _graph() -> dict[str, set[str]]:
    g: dict[str, set[str]] = defaultdict(set)
    for m, p in MODULES.items():
        for target, _, _ in _imports(m, p):
            g[m].add(target)
    return g


def _cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(set(g) | {w for ws in g.values() for w in ws}):
        if v not in index:
            visit(v)
    return out


def test_every_module_has_a_layer():
    for m in MODULES:
        _layer(m)


def test_no_import_circles():
    assert _cycles(_graph()) == []


def test_no_upward_imports():
    bad = []
    for m, p in MODULES.items():
        for target, line, _ in _imports(m, p):
            if _layer(target) > _layer(m):
                bad.append(f"{p.relative_to(ROOT)}:{line}: {m} (layer {_layer(m)}) imports {target} "
                           f"(layer {_layer(target)})")  # fmt: skip
    assert not bad, "\n".join(bad)


def test_the_checker_sees_circles_and_upward_edges():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _layer("fastalign.trainers.loop") > _layer("fastalign.engine.forward") > _layer("fastalign.ops")
    assert _layer("fastalign.cli") == len(LAYERS) - 1


def test_fused_head_order_lives_in_one_function():
    """Only engine/forward.py (fused_head_loss) enters `fused_head_params`: a recipe that gathered
    the head itself could compute its loss outside the gather (wrong gradients under ZeRO-3)."""
    users = []
    for m, p in MODULES.items():
        if m in ("fastalign.engine.gather", "fastalign.engine", "fastalign.engine.forward"):
            continue
        if "fused_head_params" in p.read_text():
            users.append(m)
    assert users == []


def test_function_local_imports_say_why():
    """A function-local import is either of a HEAVY third-party package or carries a comment (on
    its line or the line above) saying why it is not at module level."""
    bad = []
    for p in MODULES.values():
        lines = p.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        for f in ast.walk(tree):
            if not isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(f):
                if not isinstance(node, ast.Import | ast.ImportFrom):
                    continue
                names = (
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                )
                if all(any(n == h or n.startswith(h + ".") for h in HEAVY) for n in names):
                    continue
                here, above = lines[node.lineno - 1], lines[node.lineno - 2].strip()
                if "#" not in here and not above.startswith("#"):
                    bad.append(f"{p.relative_to(ROOT)}:{node.lineno}: {here.strip()}")
    assert not bad, "function-local imports without a reason:\n" + "\n".join(bad)

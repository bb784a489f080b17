"""The shape of src/lipkit, checked: no import cycles (between packages, or between modules of one
package), no module importing a layer above its own, no file over 400 lines, no function over 80.

Layers, lowest first (a module may import its own layer's package and any layer below):

    foundation   lipkit (the version), errors, config (+ config_eval), device, malloc, atomic (file writes)
    data         sources, records, batches, images
    text, models tokenizer; towers and the dual encoder (neither imports the other's package cycle)
    checkpoint   the checkpoint directory format; builds a DualEncoder, so it sits right above models
    objectives   one file per method
    eval         zero-shot, retrieval, probes, report (never imports train)
    train        trainer, launch (may call eval); adapt: few-shot adaptation of a checkpoint (LoRA); attack:
                 adversarial evaluation (PGD through eval)
    search, interop
    curate       data curation with a model: score, filter, dedup, cluster, reduce, associate (uses embed)
    cli, api     the command line (and __main__); the Python API (lipkit.load, fit, evaluate, ...)

The two edges that point up (FACADES below), both taken only on first use, so that `import lipkit`
loads none of it (tests/test_api.py): the package root forwards its public names to lipkit.api (PEP 562
`__getattr__`), and the train package is callable, `lipkit.train(config)`, forwarding to lipkit.api.fit.

Exceptions to the size rules live in tests/structure_allowlist.txt (at most 3, each with a reason).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "lipkit"
ALLOWLIST = Path(__file__).with_name("structure_allowlist.txt")
LAYERS = [
    {"lipkit", "errors", "config", "config_eval", "device", "malloc", "atomic"},
    {"data"},
    {"text", "models"},
    {"checkpoint"},
    {"objectives"},
    {"eval"},
    {"train", "adapt", "attack"},
    {"search", "interop"},
    {"curate"},
    {"cli", "__main__", "api"},
]
MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 80
# (module, what it may import lazily from above): the package root's PEP 562 forwarding, and the train
# package's __call__ (`lipkit.train(config)` — the name is the package's, so the package forwards)
FACADES = (("lipkit", "lipkit.api"), ("lipkit.train", "lipkit.api"))


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every lipkit module `name` imports, at any depth of the file (lazy imports count too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `import lipkit.a.b` imports lipkit.a.b; a name in it, its module
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    edges = {name: imports(name, path, set(mods)) for name, path in mods.items()}
    for module, target in FACADES:
        edges.get(module, set()).discard(target)
    return edges


def package(name: str) -> str:
    """The top-level part of lipkit a module belongs to ('data', 'checkpoint', 'lipkit' for the root)."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "lipkit"


def layer(name: str) -> int:
    pkg = package(name)
    found = [i for i, group in enumerate(LAYERS) if pkg in group]
    assert found, f"{name} belongs to no layer; add '{pkg}' to LAYERS in tests/test_structure.py"
    return found[0]


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_cycle_between_packages():
    edges: dict[str, set[str]] = defaultdict(set)
    for a, targets in graph().items():
        for b in targets:
            if package(a) != package(b):
                edges[package(a)].add(package(b))
    assert cycles(edges) == []


def test_no_cycle_between_modules_of_a_package():
    g = graph()
    same = {a: {b for b in bs if package(b) == package(a)} for a, bs in g.items()}
    assert cycles(same) == []


def test_no_module_imports_a_higher_layer():
    wrong = [
        f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})"
        for a, targets in graph().items()
        for b in targets
        if layer(b) > layer(a)
    ]
    assert wrong == []


def allowlist() -> dict[str, str]:
    entries = {}
    for line in ALLOWLIST.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            where, _, reason = line.partition(" - ")
            assert reason.strip(), f"allow-list entry '{line}' needs ' - <reason>'"
            entries[where.strip()] = reason.strip()
    assert len(entries) <= 3, "the allow-list holds at most 3 entries"
    return entries


def test_files_and_functions_are_short():
    allowed = allowlist()
    too_long = []
    for path in modules().values():
        rel = path.relative_to(SRC.parent).as_posix()
        text = path.read_text(encoding="utf-8")
        if len(text.splitlines()) > MAX_FILE_LINES and rel not in allowed:
            too_long.append(f"{rel}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES and f"{rel}::{node.name}" not in allowed:
                    too_long.append(f"{rel}::{node.name}: {n} lines")
    assert too_long == []
    stale = [w for w in allowed if not (SRC.parent / w.split("::")[0]).is_file()]
    assert stale == [], "allow-list entries for files that no longer exist"


def test_the_checks_catch_what_they_are_for():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    assert layer("lipkit.cli.train") > layer("lipkit.train.launch") > layer("lipkit.eval.evaluate")
    assert layer("lipkit.checkpoint") > layer("lipkit.models.dual_encoder") > layer("lipkit.data.records")
    # a lazy import inside a function counts
    mods = modules()
    found = imports("lipkit.cli.train", mods["lipkit.cli.train"], set(mods))
    assert "lipkit.train.launch" in found


def test_importing_lipkit_sets_no_process_wide_state():
    """Every module imported in a fresh process: the environment and PIL's global pixel limit are as
    they were (the CLI sets what it needs when it runs, not when it is imported)."""
    import subprocess
    import sys

    code = (
        "import os, pkgutil, importlib, PIL.Image as I\n"
        "env, limit = dict(os.environ), I.MAX_IMAGE_PIXELS\n"
        "import lipkit\n"
        "for m in pkgutil.walk_packages(lipkit.__path__, 'lipkit.'):\n"
        "    importlib.import_module(m.name)\n"
        "changed = sorted(k for k in set(env) | set(os.environ) if env.get(k) != os.environ.get(k))\n"
        "assert not changed, changed\n"
        "assert I.MAX_IMAGE_PIXELS == limit, I.MAX_IMAGE_PIXELS\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "OMP_WAIT_POLICY"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def test_the_command_line_starts_without_torch():
    """`lipkit --help` answers fast, and `main()` can still set OpenMP's wait policy before torch loads."""
    import subprocess
    import sys

    code = "import sys, lipkit.cli\nassert 'torch' not in sys.modules and 'PIL' not in sys.modules\n"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]

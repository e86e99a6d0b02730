"""The import rules of docs/ARCHITECTURE.md, checked on the code as it is.

* No import cycle among serve_app's modules, counting the imports inside functions too (a cycle
  hidden in a function is still a cycle: it only moves the failure to the first call).
* Nothing outside ``serve_app/serve/`` imports from it (the core never depends on the Serve layer).
* The core imports without Ray: every module outside ``serve_app/serve/`` is imported in a
  fresh interpreter where ``import ray`` fails.
* No file in serve_app/ is longer than 600 lines.
* The docstring examples of the core run (``doctest``).
"""

from __future__ import annotations

import ast
import doctest
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "serve_app"
MAX_LINES = 600


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """The serve_app modules ``path`` imports anywhere in it (a ``from pkg import sub`` of a
    sub-module counts as importing the sub-module; of a name, as importing ``pkg``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in known:
                    out.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("serve_app"):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.add(sub if sub in known else target)
    out.discard(name)
    return {m for m in out if m in known}


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(path, name, known) for name, path in mods.items()}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``g`` as a path ``[a, b, ..., a]``, or None."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(g, WHITE)
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        colour[n] = GREY
        stack.append(n)
        for m in sorted(g[n]):
            if colour[m] == GREY:
                return stack[stack.index(m) :] + [m]
            if colour[m] == WHITE:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        colour[n] = BLACK
        return None

    for n in sorted(g):
        if colour[n] == WHITE:
            found = visit(n)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    known = {"serve_app.x", "serve_app.x.y", "serve_app.x.z"}
    tmp = ROOT / "tests" / ".arch_probe.py"
    try:
        tmp.write_text("from serve_app.x import y\nfrom serve_app.x import thing\ndef f():\n    import serve_app.x.z\n", encoding="utf-8")
        assert imports_of(tmp, "tests.arch_probe", known) == {"serve_app.x.y", "serve_app.x", "serve_app.x.z"}
    finally:
        tmp.unlink()


def test_no_import_cycle_in_serve_app():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_nothing_below_serve_imports_from_it():
    bad = {name: sorted(m for m in deps if m == "serve_app.serve" or m.startswith("serve_app.serve.")) for name, deps in graph().items() if not (name == "serve_app.serve" or name.startswith("serve_app.serve."))}
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, f"modules outside serve_app/serve import from it: {bad}"


def test_no_file_in_serve_app_is_over_the_limit():
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


def core_modules() -> list[str]:
    return [m for m in modules() if not (m == "serve_app.serve" or m.startswith("serve_app.serve."))]


def test_the_core_imports_without_ray():
    """Every core module imports in an interpreter where ``import ray`` raises ImportError."""
    code = (
        "import sys\n"
        "sys.modules['ray'] = None\n"  # `import ray` (and ray.*) now raises ImportError
        "import importlib\n"
        f"for name in {core_modules()!r}:\n"
        "    importlib.import_module(name)\n"
        "assert 'ray' not in {k for k, v in sys.modules.items() if v is not None}\n"
        "print('ok', len(" + repr(core_modules()) + "))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("ok")


def test_blocking_ray_makes_a_ray_import_fail():
    """The check above can fail: a module that imports Ray at its top is refused."""
    done = subprocess.run([sys.executable, "-c", "import sys\nsys.modules['ray'] = None\nimport serve_app.serve.runner\nimport ray.serve"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode != 0
    assert "ImportError" in done.stderr or "ModuleNotFoundError" in done.stderr, done.stderr[-2000:]


DOCTEST_MODULES = [
    "serve_app.slo",
    "serve_app.funnel.results",
    "serve_app.index.docstore",
    "serve_app.rerank.coalesce",
    "serve_app.models",
    "serve_app.progress",
]


@pytest.mark.parametrize("name", DOCTEST_MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no docstring example"
    assert result.failed == 0


def test_the_core_pieces_import_no_ray():
    import serve_app.funnel as f
    import serve_app.rerank.cache as c
    import serve_app.slo as s

    for mod in (f, c, s):
        assert "import ray" not in open(mod.__file__).read()

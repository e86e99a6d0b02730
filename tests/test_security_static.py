"""Static guard of SECURITY.md's "no code-executing formats" rule over the serve_app package.

An AST scan (not a text search, so comments and docstrings do not count) flags:
pickle-family imports, ``torch.load`` without ``weights_only=True``, ``allow_pickle=True``,
YAML loaders other than the safe ones, ``trust_remote_code=True``, and ``eval``/``exec``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "serve_app"
FORBIDDEN_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}
UNSAFE_YAML = {"load", "load_all", "unsafe_load", "unsafe_load_all", "full_load", "full_load_all"}
SAFE_LOADERS = {"SafeLoader", "CSafeLoader"}


def _kw(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _dotted(node: ast.expr) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return "?." + ".".join(reversed(parts))  # e.g. model.to(x).eval: not a module function
    parts.append(node.id)
    return ".".join(reversed(parts))


def scan(source: str, filename: str = "<string>") -> list[str]:
    """Findings as ``file:line: what``."""
    findings = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            findings += [f"{where}: imports {a.name}" for a in node.names if a.name.split(".")[0] in FORBIDDEN_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in FORBIDDEN_MODULES:
            findings.append(f"{where}: imports from {node.module}")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name in ("eval", "exec"):
                findings.append(f"{where}: calls {name}")
            if name.endswith("torch.load") and not _is_true(_kw(node, "weights_only")):
                findings.append(f"{where}: torch.load without weights_only=True")
            if _is_true(_kw(node, "allow_pickle")):
                findings.append(f"{where}: allow_pickle=True")
            if _is_true(_kw(node, "trust_remote_code")):
                findings.append(f"{where}: trust_remote_code=True")
            if name.startswith("yaml.") and name.split(".")[-1] in UNSAFE_YAML:
                loader = _kw(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
                if loader is None or _dotted(loader).split(".")[-1] not in SAFE_LOADERS:
                    findings.append(f"{where}: {name} without a safe Loader")
            if name.endswith("read_pickle"):
                findings.append(f"{where}: {name}")
    return findings


@pytest.mark.parametrize(
    "snippet, expected",
    [
        ("import pickle", "imports pickle"),
        ("from joblib import load", "imports from joblib"),
        ("import torch\ntorch.load('x')", "torch.load without weights_only=True"),
        ("import torch\ntorch.load('x', weights_only=False)", "torch.load without weights_only=True"),
        ("import numpy as np\nnp.load('x', allow_pickle=True)", "allow_pickle=True"),
        ("import yaml\nyaml.load(open('x'))", "yaml.load without a safe Loader"),
        ("import yaml\nyaml.load(open('x'), Loader=yaml.FullLoader)", "yaml.load without a safe Loader"),
        ("from transformers import AutoModel\nAutoModel.from_pretrained('x', trust_remote_code=True)", "trust_remote_code=True"),
        ("eval('1+1')", "calls eval"),
    ],
)
def test_scanner_flags_unsafe_loading(snippet, expected):
    assert any(expected in f for f in scan(snippet)), scan(snippet)


@pytest.mark.parametrize(
    "snippet",
    [
        "import torch\ntorch.load('x', weights_only=True)",
        "import numpy as np\nnp.load('x', allow_pickle=False)",
        "import yaml\nyaml.safe_load(open('x'))\nyaml.load(open('x'), Loader=yaml.SafeLoader)",
        "model.eval()",
        "model.to('cpu').eval()",
        "'''docs may say import pickle'''",
    ],
)
def test_scanner_accepts_safe_loading(snippet):
    assert scan(snippet) == []


def test_package_loads_nothing_with_code_executing_formats():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 10
    findings = [f for path in files for f in scan(path.read_text(encoding="utf-8"), str(path.relative_to(PACKAGE.parent)))]
    assert not findings, "code-executing formats (SECURITY.md):\n" + "\n".join(findings)

"""Tables of docs/API.md and docs/METRICS.md generated from the code that defines them.

The limits (``RequestLimits``, ``FunnelLimits``), the configuration sections of ``AppConfig``,
the error types (``ERROR_TYPES``) and the metrics (``metrics.SPECS``) are declared once in
code; the docs hold a generated copy between ``<!-- BEGIN name -->`` / ``<!-- END name -->``
markers. ``python -m serve_app.serve.docs`` rewrites them; a test fails when they are stale.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Callable

from pydantic import BaseModel

from serve_app.config import FunnelLimits, WritesConfig
from serve_app.serve import metrics
from serve_app.serve.api import ERROR_TYPES
from serve_app.serve.config import AppConfig, RequestLimits, StageTimeouts
from serve_app.serve.flavours import flavours_table

DOCS_DIR = Path(__file__).resolve().parents[2] / "docs"


def _fields_table(model: type[BaseModel], prefix: str) -> str:
    rows = ["| Setting | Default | Meaning |", "|---|---|---|"]
    for name, field in model.model_fields.items():
        default = "(required)" if field.is_required() else repr(field.get_default(call_default_factory=True))
        if isinstance(field.get_default(call_default_factory=True), BaseModel):
            default = "{...}"
        rows.append(f"| `{prefix}{name}` | `{default}` | {field.description or ''} |")
    return "\n".join(rows)


def limits_table() -> str:
    """Request limits and funnel sizes with their defaults."""
    return _fields_table(RequestLimits, "limits.") + "\n\n" + _fields_table(FunnelLimits, "funnel.") + "\n\n" + _fields_table(StageTimeouts, "timeouts.")


def config_table() -> str:
    """Top-level application args."""
    return _fields_table(AppConfig, "")


def errors_table() -> str:
    """Error types and their status codes."""
    rows = ["| Status | `error.type` | When |", "|---|---|---|"]
    for name, (status, when) in sorted(ERROR_TYPES.items(), key=lambda kv: (kv[1][0], kv[0])):
        rows.append(f"| {status} | `{name}` | {when} |")
    return "\n".join(rows)


def writes_table() -> str:
    """Live-write settings with their defaults."""
    return _fields_table(WritesConfig, "writes.")


def metrics_table() -> str:
    """Custom metrics as exported to Prometheus (Ray adds the ``ray_`` prefix)."""
    rows = ["| Prometheus name | Type | Tags | Meaning |", "|---|---|---|---|"]
    for spec in metrics.SPECS.values():
        suffix = "_bucket / _count / _sum" if spec.kind == "histogram" else ""
        tags = ", ".join(spec.tags) or "-"
        rows.append(f"| `ray_{spec.name}`{suffix} | {spec.kind} | {tags} | {spec.description} |")
    return "\n".join(rows)


SECTIONS: dict[str, tuple[str, Callable[[], str]]] = {
    "limits": ("API.md", limits_table),
    "config": ("API.md", config_table),
    "errors": ("API.md", errors_table),
    "writes": ("API.md", writes_table),
    "flavours": ("API.md", flavours_table),
    "metrics": ("METRICS.md", metrics_table),
}


def render(text: str, name: str, body: str) -> str:
    """``text`` with the section ``name`` replaced by ``body``."""
    pattern = re.compile(rf"(<!-- BEGIN {name} -->).*?(<!-- END {name} -->)", re.S)
    if not pattern.search(text):
        raise ValueError(f"no <!-- BEGIN {name} --> ... <!-- END {name} --> markers")
    return pattern.sub(lambda m: f"{m.group(1)}\n{body}\n{m.group(2)}", text)


def stale_sections(docs_dir: Path = DOCS_DIR) -> list[str]:
    """Names of the generated sections whose copy in the docs differs from the code."""
    stale = []
    for name, (file, make) in SECTIONS.items():
        text = (docs_dir / file).read_text(encoding="utf-8")
        if render(text, name, make()) != text:
            stale.append(f"{file}:{name}")
    return stale


def write(docs_dir: Path = DOCS_DIR) -> None:
    """Rewrite every generated section in place."""
    for name, (file, make) in SECTIONS.items():
        path = docs_dir / file
        path.write_text(render(path.read_text(encoding="utf-8"), name, make()), encoding="utf-8")


if __name__ == "__main__":
    write()
    print("updated:", ", ".join(sorted({f for f, _ in SECTIONS.values()})), file=sys.stderr)

"""Render the cluster's Serve configs from the repo-root ``deployments.yaml`` plus an overlay.

``deployments.yaml`` is the one place where applications, deployments and their autoscaling
are defined. A cluster only adds what differs there (where the HTTP proxy listens, which node
type a deployment is pinned to, GPUs, paths), written as an *overlay*:

.. code-block:: yaml

    serve:        # merged into the top level of the Serve config (proxy_location, http_options)
      http_options: {host: 0.0.0.0, port: 8000}
    app_args:     # merged into the ``args`` of every application
      index_dir: /mnt/indexes/demo
    deployments:  # merged into the entry of that name in every application; it must exist
      CrossEncoderReranker:
        ray_actor_options: {num_gpus: 1, resources: {reranker_node: 0.01}}
    add_deployments:  # entries appended to every application; none may exist already
      - name: DenseQueryEncoder   # deployed only with a sharded dense retriever
        num_replicas: 2

Mappings merge key by key, anything else (scalars, lists) replaces, and ``null`` deletes the
key. The result is validated with Ray Serve's own ``ServeDeploySchema``.

Targets (``python cluster/render_rayservice.py [TARGET ...] [--check]``):

* ``rayservice``: ``cluster/kuberay/rayservice.yaml``, the KubeRay ``RayService``: the
  hand-written ``rayservice.template.yaml`` (cluster, worker groups, auth) with ``serveConfigV2``
  filled from ``deployments.yaml`` + ``overlays/kuberay.yaml``;
* ``rayservice-100m``: ``cluster/kuberay/rayservice-100m.yaml``, the layout sized for 100 million
  documents at 1,000 queries/s in docs/DEPLOYING.md (``rayservice-100m.template.yaml``;
  ``overlays/kuberay.yaml`` then ``overlays/kuberay-100m.yaml``);
* ``local``: ``cluster/local/deployments.local.yaml``, for the local multi-node cluster
  (``deployments.yaml`` + ``overlays/local.yaml``);
* ``aws``: ``cluster/launcher/deployments.aws.yaml``, for the VM cluster of
  ``cluster/launcher/aws.yaml`` (``deployments.yaml`` + ``overlays/aws.yaml``).

``--check`` writes nothing and exits 1 when a committed file differs from its rendering
(``tests/test_cluster_configs.py`` runs the same comparison). ``local --overlay EXTRA --out
FILE`` renders a copy with one more overlay applied, e.g. an absolute index directory
(``cluster/local/deploy.sh``).
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

CLUSTER_DIR = Path(__file__).resolve().parent
REPO_ROOT = CLUSTER_DIR.parent
BASE_CONFIG = REPO_ROOT / "deployments.yaml"
TEMPLATE_MARKER = "# @SERVE_CONFIG@"

OVERLAY_KEYS = ("serve", "app_args", "deployments", "add_deployments")


class RenderError(ValueError):
    """An input file is missing or malformed, or the rendered config is invalid; names the file."""


@dataclass(frozen=True)
class Target:
    """One rendered file: its overlay, optional template, and output path."""

    name: str
    overlay: Path
    output: Path
    template: Path | None = None
    more_overlays: tuple[Path, ...] = ()  # applied after ``overlay``, in order


TARGETS: dict[str, Target] = {
    "rayservice": Target(
        "rayservice",
        overlay=CLUSTER_DIR / "overlays" / "kuberay.yaml",
        output=CLUSTER_DIR / "kuberay" / "rayservice.yaml",
        template=CLUSTER_DIR / "kuberay" / "rayservice.template.yaml",
    ),
    "rayservice-100m": Target(
        "rayservice-100m",
        overlay=CLUSTER_DIR / "overlays" / "kuberay.yaml",
        more_overlays=(CLUSTER_DIR / "overlays" / "kuberay-100m.yaml",),
        output=CLUSTER_DIR / "kuberay" / "rayservice-100m.yaml",
        template=CLUSTER_DIR / "kuberay" / "rayservice-100m.template.yaml",
    ),
    "aws": Target(
        "aws",
        overlay=CLUSTER_DIR / "overlays" / "aws.yaml",
        output=CLUSTER_DIR / "launcher" / "deployments.aws.yaml",
    ),
    "local": Target(
        "local",
        overlay=CLUSTER_DIR / "overlays" / "local.yaml",
        output=CLUSTER_DIR / "local" / "deployments.local.yaml",
    ),
}


# --------------------------------------------------------------------------- loading


def load_yaml(path: Path) -> Any:
    """Parse one YAML document (safe loader), with the file named in every error."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RenderError(f"{path}: file not found") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise RenderError(f"{path}{where}: invalid YAML: {getattr(exc, 'problem', None) or exc}") from None


def load_overlay(path: Path) -> dict[str, Any]:
    """An overlay file: a mapping with only ``serve``, ``app_args``, ``deployments`` (mappings)
    and ``add_deployments`` (a list)."""
    data = load_yaml(path) or {}
    if not isinstance(data, dict):
        raise RenderError(f"{path}: an overlay must be a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - set(OVERLAY_KEYS))
    if unknown:
        raise RenderError(f"{path}: unknown overlay key(s) {unknown}; allowed: {list(OVERLAY_KEYS)}")
    for key in ("serve", "app_args", "deployments"):
        if not isinstance(data.get(key) or {}, dict):
            raise RenderError(f"{path}: '{key}' must be a mapping")
    if not isinstance(data.get("add_deployments") or [], list):
        raise RenderError(f"{path}: 'add_deployments' must be a list of deployments")
    for name, patch in (data.get("deployments") or {}).items():
        if not isinstance(patch, dict):
            raise RenderError(f"{path}: deployments.{name} must be a mapping")
    if "applications" in (data.get("serve") or {}):
        raise RenderError(f"{path}: serve.applications is not allowed; patch applications through app_args and deployments")
    return data


# --------------------------------------------------------------------------- merging


def deep_merge(base: Any, patch: Any) -> Any:
    """``patch`` applied to ``base``: mappings merge recursively, ``None`` deletes, the rest replaces."""
    if not isinstance(base, Mapping) or not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    out = {k: copy.deepcopy(v) for k, v in base.items()}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif key in out:
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_overlay(config: Mapping[str, Any], overlay: Mapping[str, Any], *, overlay_name: str = "overlay") -> dict[str, Any]:
    """The Serve config ``config`` with ``overlay`` applied (inputs are not modified)."""
    apps = config.get("applications")
    if not isinstance(apps, list) or not apps:
        raise RenderError("the base config has no 'applications' list")
    out = deep_merge(config, overlay.get("serve") or {})
    app_args = overlay.get("app_args") or {}
    patches: dict[str, Any] = dict(overlay.get("deployments") or {})
    matched: set[str] = set()
    for app in out["applications"]:
        if app_args:
            app["args"] = deep_merge(app.get("args") or {}, app_args)
        deps = app.get("deployments") or []
        for i, dep in enumerate(deps):
            name = dep.get("name")
            if name in patches:
                deps[i] = deep_merge(dep, patches[name])
                matched.add(name)
    missing = sorted(set(patches) - matched)
    if missing:
        known = sorted({d.get("name") for a in out["applications"] for d in a.get("deployments") or []})
        raise RenderError(f"{overlay_name}: deployment(s) {missing} not found in the base config (known: {known})")
    added = overlay.get("add_deployments") or []
    for app in out["applications"]:
        names = {d.get("name") for d in app.get("deployments") or []}
        for dep in added:
            if not isinstance(dep, Mapping) or not dep.get("name"):
                raise RenderError(f"{overlay_name}: every entry of add_deployments needs a name")
            if dep["name"] in names:
                raise RenderError(f"{overlay_name}: add_deployments: {dep['name']!r} is already in the base config (patch it under deployments)")
            app.setdefault("deployments", []).append(copy.deepcopy(dict(dep)))
    return out


def validate_serve_config(config: Mapping[str, Any], *, source: str) -> None:
    """Raise :class:`RenderError` unless ``config`` is a valid Serve config.

    Beyond Ray's ``ServeDeploySchema`` (which accepts unknown keys and does not look inside
    ``autoscaling_config``), deployment, ``ray_actor_options`` and ``autoscaling_config`` keys
    must be known to Ray and ``autoscaling_config`` must pass Ray's ``AutoscalingConfig``, so a
    typo in an overlay fails here instead of being ignored.
    """
    from pydantic import ValidationError
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import (
        DeploymentSchema,
        RayActorOptionsSchema,
        ServeDeploySchema,
    )

    try:
        ServeDeploySchema.model_validate(dict(config))
        for app in config["applications"]:
            for dep in app.get("deployments") or []:
                where = f"applications[{app.get('name')}].deployments[{dep.get('name')}]"
                for key_set, model, sub in (
                    (set(dep), DeploymentSchema, ""),
                    (set(dep.get("ray_actor_options") or {}), RayActorOptionsSchema, ".ray_actor_options"),
                    (set(dep.get("autoscaling_config") or {}), AutoscalingConfig, ".autoscaling_config"),
                ):
                    unknown = sorted(key_set - set(model.model_fields))
                    if unknown:
                        raise RenderError(f"{source}: not a valid Ray Serve config: {where}{sub}: unknown key(s) {unknown}")
                if isinstance(dep.get("autoscaling_config"), dict):
                    AutoscalingConfig.model_validate(dep["autoscaling_config"])
    except ValidationError as exc:
        lines = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors(include_url=False)]
        raise RenderError(f"{source}: not a valid Ray Serve config: " + "; ".join(lines)) from None


# --------------------------------------------------------------------------- rendering


class _Dumper(yaml.SafeDumper):
    """Block style; multi-line strings as literal blocks."""


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str_representer)


def dump_yaml(data: Any) -> str:
    """Deterministic YAML: key order kept, block style."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True, width=100)


def header(target: Target) -> str:
    rel = lambda p: p.relative_to(REPO_ROOT).as_posix()
    parts = [rel(BASE_CONFIG), rel(target.overlay), *(rel(p) for p in target.more_overlays)] + ([rel(target.template)] if target.template else [])
    return (
        f"# GENERATED by cluster/render_rayservice.py from {' + '.join(parts)}.\n"
        "# Do not edit: change those files and run `python cluster/render_rayservice.py`.\n"
    )


SHARDED_DEPLOYMENTS = {"bm25": "BM25Retriever", "dense": "DenseRetriever"}


def expand_shards(config: Mapping[str, Any]) -> dict[str, Any]:
    """An application whose ``args.sharding`` asks for N > 1 shards of a retriever deploys
    ``<Deployment>-shard0`` ... ``-shard{N-1}`` instead of ``<Deployment>`` (serve_app.serve.app):
    its entry is replaced by one copy per shard, under those names, so that the options an
    overlay gave the retriever apply to every shard."""
    out = copy.deepcopy(dict(config))
    for app in out.get("applications") or []:
        sharding = (app.get("args") or {}).get("sharding") or {}
        deps = app.get("deployments") or []
        for retriever, name in SHARDED_DEPLOYMENTS.items():
            n = int(sharding.get(retriever, 1) or 1)
            if n <= 1:
                continue
            for i, dep in enumerate(deps):
                if dep.get("name") == name:
                    deps[i : i + 1] = [{**copy.deepcopy(dep), "name": f"{name}-shard{k}"} for k in range(n)]
                    break
    return out


def render_serve_config(target: Target, base_path: Path = BASE_CONFIG, extra_overlays: Sequence[Path] = ()) -> dict[str, Any]:
    """The merged, validated Serve config of ``target`` (``extra_overlays`` applied last, in order)."""
    base = load_yaml(base_path)
    if not isinstance(base, dict):
        raise RenderError(f"{base_path}: must be a mapping (a Ray Serve config file)")
    validate_serve_config(base, source=str(base_path))
    merged = base
    overlays = (target.overlay, *target.more_overlays, *extra_overlays)
    for overlay in overlays:
        merged = apply_overlay(merged, load_overlay(overlay), overlay_name=str(overlay))
    merged = expand_shards(merged)
    validate_serve_config(merged, source=" + ".join(str(p) for p in (base_path, *overlays)))
    return merged


def render_text(target: Target, base_path: Path = BASE_CONFIG, extra_overlays: Sequence[Path] = ()) -> str:
    """The full text of ``target``'s output file."""
    serve_config = render_serve_config(target, base_path, extra_overlays)
    body = dump_yaml(serve_config)
    if target.template is None:
        return header(target) + body
    template = target.template.read_text(encoding="utf-8")
    lines = template.splitlines(keepends=True)
    hits = [i for i, line in enumerate(lines) if line.strip() == TEMPLATE_MARKER]
    if len(hits) != 1:
        raise RenderError(f"{target.template}: expected exactly one line '{TEMPLATE_MARKER}', found {len(hits)}")
    i = hits[0]
    indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
    block = "".join(f"{indent}{line}\n" if line else "\n" for line in body.splitlines())
    text = header(target) + "".join(lines[:i]) + block + "".join(lines[i + 1 :])
    check_rendered_manifest(text, serve_config, source=str(target.output))
    return text


def check_rendered_manifest(text: str, serve_config: Mapping[str, Any], *, source: str) -> None:
    """The manifest parses and its ``spec.serveConfigV2`` holds exactly ``serve_config``."""
    try:
        manifest = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RenderError(f"{source}: rendered manifest is not valid YAML: {exc}") from None
    embedded = ((manifest or {}).get("spec") or {}).get("serveConfigV2")
    if not isinstance(embedded, str) or yaml.safe_load(embedded) != serve_config:
        raise RenderError(f"{source}: spec.serveConfigV2 does not round-trip to the rendered Serve config (check the marker's indentation)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("targets", nargs="*", metavar="TARGET", help=f"what to render: {', '.join(sorted(TARGETS))} (default: all)")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a committed file differs from its rendering")
    parser.add_argument("--base", type=Path, default=BASE_CONFIG, help="base Serve config (default: deployments.yaml)")
    parser.add_argument("--overlay", type=Path, action="append", default=[], help="extra overlay applied last (repeatable; needs --out)")
    parser.add_argument("--out", type=Path, help="write the single target here instead of its committed path")
    args = parser.parse_args(argv)
    names = args.targets or sorted(TARGETS)
    unknown = sorted(set(names) - set(TARGETS))
    if unknown:
        parser.error(f"unknown target(s) {unknown}; choose from {sorted(TARGETS)}")
    if args.out and len(names) != 1:
        parser.error("--out needs exactly one target")
    if args.overlay and not args.out:
        parser.error("--overlay needs --out (the committed files are rendered from the committed overlays only)")
    status = 0
    try:
        for name in names:
            target = TARGETS[name]
            text = render_text(target, args.base, args.overlay)
            out = args.out or target.output
            if args.check:
                current = out.read_text(encoding="utf-8") if out.is_file() else None
                if current != text:
                    print(f"{out}: differs from its rendering; run `python cluster/render_rayservice.py {name}`", file=sys.stderr)
                    status = 1
            else:
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(text, encoding="utf-8")
                print(f"wrote {out}")
    except RenderError as exc:
        print(f"render_rayservice: error: {exc}", file=sys.stderr)
        return 2
    return status


if __name__ == "__main__":
    sys.exit(main())

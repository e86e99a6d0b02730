"""Static checks of the cluster deployment files (cluster/): they parse, match the schemas they
are written for, agree with the repo-root deployments.yaml, and keep the security settings.

No cluster is started here (tests/test_multinode.py does that).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "cluster"
DEPLOYMENTS_YAML = REPO / "deployments.yaml"
RAYSERVICE = CLUSTER / "kuberay" / "rayservice.yaml"
LAUNCHER = CLUSTER / "launcher" / "aws.yaml"
LOCAL_CONFIG = CLUSTER / "local" / "deployments.local.yaml"
AWS_CONFIG = CLUSTER / "launcher" / "deployments.aws.yaml"
DASHBOARD = CLUSTER / "monitoring" / "grafana-serve-app.json"
RAY_PORTS = {6379: "GCS", 8265: "dashboard", 10001: "Ray client"}
PIN_RESOURCES = {"BM25Retriever": "retriever_node", "DenseRetriever": "retriever_node", "CrossEncoderReranker": "reranker_node"}


def _load_module(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


render = _load_module(CLUSTER / "render_rayservice.py")
grafana = _load_module(CLUSTER / "monitoring" / "grafana_dashboard.py")


def _yaml_docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]


def _serve_schema():
    from ray.serve.schema import ServeDeploySchema

    return ServeDeploySchema


def _deployments(config: dict) -> dict[str, dict]:
    return {d["name"]: d for app in config["applications"] for d in app.get("deployments", [])}


def _walk(node: Any, path: str = ""):
    """Every (path, mapping) in a parsed YAML tree."""
    if isinstance(node, dict):
        yield path, node
        for k, v in node.items():
            yield from _walk(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")


@pytest.fixture(scope="module")
def base() -> dict:
    return yaml.safe_load(DEPLOYMENTS_YAML.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def rayservice() -> dict:
    (doc,) = _yaml_docs(RAYSERVICE)
    return doc


@pytest.fixture(scope="module")
def embedded(rayservice) -> dict:
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])


@pytest.fixture(scope="module")
def launcher() -> dict:
    return yaml.safe_load(LAUNCHER.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- parsing, rendering


def test_every_cluster_file_parses():
    yamls = sorted(CLUSTER.rglob("*.yaml")) + sorted(CLUSTER.rglob("*.yml"))
    assert len(yamls) >= 8, yamls
    for path in yamls:
        docs = _yaml_docs(path)
        assert docs, f"{path} holds no YAML document"
        for doc in docs:
            assert isinstance(doc, dict), f"{path}: top level must be a mapping"
    for path in sorted(CLUSTER.rglob("*.json")):
        assert isinstance(json.loads(path.read_text(encoding="utf-8")), dict), path


@pytest.mark.parametrize("target", sorted(render.TARGETS))
def test_committed_rendering_is_current(target):
    """cluster/kuberay/rayservice.yaml and cluster/local/deployments.local.yaml are generated from
    deployments.yaml + overlays: after any change there, re-run the renderer."""
    t = render.TARGETS[target]
    expected = render.render_text(t)
    assert t.output.read_text(encoding="utf-8") == expected, f"{t.output} is stale: run `python cluster/render_rayservice.py {target}`"


def test_committed_dashboard_is_current():
    assert DASHBOARD.read_text(encoding="utf-8") == grafana.render(), "run `python cluster/monitoring/grafana_dashboard.py`"


def test_deep_merge_rules():
    base = {"a": {"b": 1, "c": [1, 2], "d": {"e": 1}}, "keep": True}
    patch = {"a": {"b": 2, "c": [3], "d": None, "new": "x"}}
    assert render.deep_merge(base, patch) == {"a": {"b": 2, "c": [3], "new": "x"}, "keep": True}
    assert base["a"]["d"] == {"e": 1}, "inputs must not be modified"


def test_overlay_patches_named_deployments_only(base):
    overlay = {"deployments": {"CrossEncoderReranker": {"ray_actor_options": {"num_gpus": 1, "resources": {"reranker_node": 0.01}}}}, "app_args": {"index_dir": "/x"}}
    out = render.apply_overlay(base, overlay)
    deps, before = _deployments(out), _deployments(base)
    rr = deps["CrossEncoderReranker"]
    assert rr["ray_actor_options"]["num_gpus"] == 1 and rr["ray_actor_options"]["resources"] == {"reranker_node": 0.01}
    assert rr["ray_actor_options"]["num_cpus"] == before["CrossEncoderReranker"]["ray_actor_options"]["num_cpus"]
    assert rr["autoscaling_config"] == before["CrossEncoderReranker"]["autoscaling_config"]
    assert deps["BM25Retriever"] == before["BM25Retriever"]
    assert all(app["args"]["index_dir"] == "/x" for app in out["applications"])


def test_overlay_naming_an_unknown_deployment_fails(base):
    with pytest.raises(render.RenderError, match="NoSuchDeployment"):
        render.apply_overlay(base, {"deployments": {"NoSuchDeployment": {"num_replicas": 1}}}, overlay_name="ov.yaml")


def test_bad_overlay_files_fail_with_the_file_named(tmp_path):
    bad_key = tmp_path / "bad_key.yaml"
    bad_key.write_text("deploymnets: {}\n")
    with pytest.raises(render.RenderError, match=r"bad_key\.yaml: unknown overlay key"):
        render.load_overlay(bad_key)
    broken = tmp_path / "broken.yaml"
    broken.write_text("serve:\n  http_options: {host: [\n")
    with pytest.raises(render.RenderError, match=r"broken\.yaml:\d+: invalid YAML"):
        render.load_overlay(broken)


def test_rendering_rejects_an_invalid_serve_config(tmp_path):
    overlay = tmp_path / "invalid.yaml"
    overlay.write_text("deployments:\n  BM25Retriever:\n    autoscaling_config: {min_replicas: many}\n")
    with pytest.raises(render.RenderError, match="not a valid Ray Serve config.*min_replicas"):
        render.render_serve_config(render.TARGETS["local"], DEPLOYMENTS_YAML, [overlay])
    typo = tmp_path / "typo.yaml"
    typo.write_text("deployments:\n  BM25Retriever:\n    ray_actor_options: {num_gpu: 1}\n")
    with pytest.raises(render.RenderError, match=r"BM25Retriever\]\.ray_actor_options: unknown key\(s\) \['num_gpu'\]"):
        render.render_serve_config(render.TARGETS["local"], DEPLOYMENTS_YAML, [typo])


# --------------------------------------------------------------------------- RayService


def test_rayservice_schema(rayservice):
    assert rayservice["apiVersion"] == "ray.io/v1"
    assert rayservice["kind"] == "RayService"
    assert rayservice["metadata"]["name"]
    spec = rayservice["spec"]
    assert isinstance(spec["serveConfigV2"], str), "serveConfigV2 is a YAML string"
    cluster = spec["rayClusterConfig"]
    assert cluster["rayVersion"].startswith("2.")
    head = cluster["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert head["template"]["spec"]["containers"][0]["image"]
    groups = cluster["workerGroupSpecs"]
    assert len({g["groupName"] for g in groups}) == len(groups) >= 2
    for g in groups:
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
        assert g["maxReplicas"] > g["minReplicas"], f"{g['groupName']} cannot autoscale"
        assert isinstance(g["rayStartParams"], dict) and all(isinstance(v, str) for v in g["rayStartParams"].values()), "rayStartParams values are strings"
        assert g["template"]["spec"]["containers"][0]["image"]


def test_rayservice_embeds_a_valid_serve_config(embedded):
    _serve_schema().model_validate(embedded)


def test_rayservice_autoscaling_on(rayservice):
    cluster = rayservice["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True


def _start_resources(group: dict) -> dict[str, float]:
    raw = group["rayStartParams"].get("resources")
    if raw is None:
        return {}
    # KubeRay's format: a JSON object inside a quoted string, e.g. '"{\"retriever_node\": 1}"'.
    return json.loads(json.loads(raw))


def _gpu_limit(group: dict) -> int:
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    return int(limits.get("nvidia.com/gpu", 0))


def test_rayservice_gpu_group_serves_the_reranker(rayservice, embedded):
    groups = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    reranker = _deployments(embedded)["CrossEncoderReranker"]
    opts = reranker["ray_actor_options"]
    assert opts["num_gpus"] >= 1, "reranker replicas use a GPU on the cluster"
    gpu_groups = [g for g in groups if _gpu_limit(g) > 0]
    assert gpu_groups, "a worker group with nvidia.com/gpu limits"
    for g in gpu_groups:
        assert int(g["rayStartParams"]["num-gpus"]) == _gpu_limit(g), "Ray's GPU count equals the container's GPU limit"
    pinned = [g for g in gpu_groups if set(opts["resources"]) <= set(_start_resources(g))]
    assert pinned, f"no GPU group advertises {opts['resources']}"
    capacity = sum(g["maxReplicas"] * _gpu_limit(g) for g in pinned)
    needed = reranker["autoscaling_config"]["max_replicas"] * opts["num_gpus"]
    assert capacity >= needed, f"GPU groups hold {capacity} GPUs; reranker max_replicas needs {needed}"
    for g in groups:
        if _gpu_limit(g) == 0:
            assert "reranker_node" not in _start_resources(g), "CPU groups must not attract reranker replicas"


def test_every_pinned_deployment_has_a_node_group(rayservice, embedded):
    cluster = rayservice["spec"]["rayClusterConfig"]
    offered = [_start_resources(g) for g in cluster["workerGroupSpecs"]]
    for name, dep in _deployments(embedded).items():
        wanted = set((dep.get("ray_actor_options") or {}).get("resources") or {})
        assert any(wanted <= set(o) for o in offered), f"{name} asks for {wanted}; no worker group offers it"
        if name in PIN_RESOURCES:
            assert PIN_RESOURCES[name] in wanted, f"{name} is not pinned to {PIN_RESOURCES[name]}"


# --------------------------------------------------------------------------- consistency with deployments.yaml


@pytest.mark.parametrize("rendered", ["rayservice", "local", "aws"])
def test_rendered_configs_keep_deployments_yaml(base, embedded, rendered):
    paths = {"local": LOCAL_CONFIG, "aws": AWS_CONFIG}
    other = embedded if rendered == "rayservice" else yaml.safe_load(paths[rendered].read_text(encoding="utf-8"))
    assert [a["name"] for a in other["applications"]] == [a["name"] for a in base["applications"]]
    for a, b in zip(base["applications"], other["applications"]):
        assert b["import_path"] == a["import_path"]
        assert b.get("route_prefix") == a.get("route_prefix")
    mine, theirs = _deployments(base), _deployments(other)
    assert list(theirs) == list(mine), "same deployment names, same order"
    for name, dep in mine.items():
        for key in ("autoscaling_config", "max_ongoing_requests", "max_queued_requests", "user_config", "num_replicas"):
            assert theirs[name].get(key) == dep.get(key), f"{rendered}: {name}.{key} differs from deployments.yaml"
        assert "autoscaling_config" in dep, f"deployments.yaml: {name} has no autoscaling_config"


def test_autoscaling_bounds_are_sane(base):
    for name, dep in _deployments(base).items():
        cfg = dep["autoscaling_config"]
        assert 1 <= cfg["min_replicas"] <= cfg["max_replicas"], name


# --------------------------------------------------------------------------- launcher (AWS)


def test_launcher_matches_rays_schema(launcher):
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(launcher, schema)


def test_launcher_node_types(launcher):
    types = launcher["available_node_types"]
    assert launcher["provider"]["type"] == "aws"
    assert launcher["head_node_type"] in types
    head = types[launcher["head_node_type"]]
    assert "GPU" not in head["resources"]
    workers = {k: v for k, v in types.items() if k != launcher["head_node_type"]}
    gpu = [v for v in workers.values() if v["resources"].get("GPU", 0) >= 1]
    cpu = [v for v in workers.values() if not v["resources"].get("GPU")]
    assert gpu and cpu
    assert all(v["resources"].get("reranker_node") == 1 for v in gpu)
    assert any(v["resources"].get("retriever_node") == 1 for v in cpu)
    assert not any("reranker_node" in v["resources"] for v in cpu)
    for v in workers.values():
        assert v["max_workers"] > v["min_workers"] >= 0, "worker types autoscale"
    assert sum(v["max_workers"] for v in workers.values()) <= launcher["max_workers"]


def test_launcher_node_types_host_every_deployment(launcher):
    config = yaml.safe_load(AWS_CONFIG.read_text(encoding="utf-8"))
    _serve_schema().model_validate(config)
    types = {k: v for k, v in launcher["available_node_types"].items() if k != launcher["head_node_type"]}
    for name, dep in _deployments(config).items():
        opts = dep.get("ray_actor_options") or {}
        wanted = set(opts.get("resources") or {}) | ({"GPU"} if opts.get("num_gpus") else set())
        hosts = [t for t in types.values() if wanted <= set(t["resources"])]
        assert hosts, f"{name} asks for {wanted}; no launcher node type offers it"
        if name in PIN_RESOURCES:
            assert PIN_RESOURCES[name] in wanted, f"{name} is not pinned to {PIN_RESOURCES[name]}"
        if opts.get("num_gpus"):
            capacity = sum(t["max_workers"] * t["resources"]["GPU"] for t in hosts)
            assert capacity >= dep["autoscaling_config"]["max_replicas"] * opts["num_gpus"], f"{name}: not enough GPU nodes for max_replicas"


def test_launcher_security(launcher):
    starts = launcher["head_start_ray_commands"] + launcher["worker_start_ray_commands"]
    for cmd in starts:
        if "ray start" in cmd:
            assert "RAY_AUTH_MODE=token" in cmd, f"start without token auth: {cmd}"
    head_start = " ".join(launcher["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start, "dashboard bound to the head's loopback"
    assert "0.0.0.0" not in head_start
    assert any(dst.endswith("/.ray/auth_token") for dst in launcher["file_mounts"]), "the token is copied to every node"
    for rule in launcher["provider"]["security_group"]["IpPermissions"]:
        ports = set(range(rule["FromPort"], rule["ToPort"] + 1))
        assert not ports & set(RAY_PORTS), f"security group opens {sorted(ports & set(RAY_PORTS))}"
        assert all(r["CidrIp"] != "0.0.0.0/0" for r in rule.get("IpRanges", [])), "no rule open to the internet"


# --------------------------------------------------------------------------- security of the Kubernetes files


def _k8s_docs() -> list[tuple[Path, dict]]:
    return [(p, d) for p in sorted((CLUSTER / "kuberay").glob("*.yaml")) if p.name != "rayservice.template.yaml" for d in _yaml_docs(p)]


def test_token_auth_on(rayservice):
    auth = rayservice["spec"]["rayClusterConfig"]["authOptions"]
    assert auth["mode"] == "token"
    assert auth.get("secretName"), "the token comes from a Secret"
    text = RAYSERVICE.read_text()
    assert "auth_token:" not in text, "no token value in the manifest"


def test_no_service_exposed_outside_the_cluster(rayservice):
    spec = rayservice["spec"]
    assert spec["rayClusterConfig"]["headGroupSpec"]["serviceType"] == "ClusterIP"
    assert spec["serveService"]["spec"]["type"] == "ClusterIP"
    assert not spec["rayClusterConfig"]["headGroupSpec"].get("enableIngress"), "no Ingress to the head (dashboard/GCS/client)"
    for path, doc in _k8s_docs():
        for where, node in _walk(doc):
            assert node.get("type") not in ("LoadBalancer", "NodePort"), f"{path}: {where} is {node.get('type')}"
            assert node.get("serviceType") not in ("LoadBalancer", "NodePort"), f"{path}: {where}"
            assert "hostPort" not in node, f"{path}: {where} uses hostPort"
        assert doc.get("spec", {}).get("template", {}).get("spec", {}).get("hostNetwork") is not True


def test_ingress_is_tls_and_reaches_only_the_serve_service(rayservice):
    serve_svc = rayservice["spec"]["serveService"]["metadata"]["name"]
    serve_port = rayservice["spec"]["serveService"]["spec"]["ports"][0]["port"]
    ingresses = [d for _, d in _k8s_docs() if d["kind"] == "Ingress"]
    assert ingresses
    for ing in ingresses:
        tls_hosts = {h for t in ing["spec"]["tls"] for h in t["hosts"]}
        for rule in ing["spec"]["rules"]:
            assert rule["host"] in tls_hosts, f"{rule['host']} served without TLS"
            for p in rule["http"]["paths"]:
                backend = p["backend"]["service"]
                assert backend["name"] == serve_svc and backend["port"]["number"] == serve_port
                assert backend["port"]["number"] not in RAY_PORTS


def test_network_policy_keeps_ray_ports_inside(rayservice):
    policies = [d for _, d in _k8s_docs() if d["kind"] == "NetworkPolicy"]
    assert policies
    pod_labels = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["metadata"]["labels"]
    for group in rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        assert group["template"]["metadata"]["labels"].items() >= policies[0]["spec"]["podSelector"]["matchLabels"].items()
    assert pod_labels.items() >= policies[0]["spec"]["podSelector"]["matchLabels"].items(), "the policy selects the Ray pods"
    for pol in policies:
        assert "Ingress" in pol["spec"]["policyTypes"]
        for rule in pol["spec"]["ingress"]:
            sources = rule["from"]
            same_cluster = all("podSelector" in s and "namespaceSelector" not in s for s in sources)
            ports = {p["port"] for p in rule.get("ports", [])}
            if same_cluster:
                continue
            assert ports, "a rule from outside the Ray pods must name its ports"
            assert not ports & {6379, 10001}, f"GCS/client port open to {sources}"


def test_serve_http_host_is_explicit_everywhere(base, embedded):
    # Serve's config schema defaults http_options.host to 0.0.0.0: never rely on the default.
    assert base["http_options"]["host"] in ("127.0.0.1", "localhost", "::1"), "deployments.yaml serves on loopback"
    local = yaml.safe_load(LOCAL_CONFIG.read_text(encoding="utf-8"))
    assert local["http_options"]["host"] == "127.0.0.1"
    assert "host" in embedded["http_options"]


# --------------------------------------------------------------------------- local cluster scripts


def test_local_cluster_is_loopback_and_authenticated():
    start = (CLUSTER / "local" / "start.sh").read_text()
    assert "HOST=127.0.0.1" in start and '--node-ip-address "$HOST"' in start and '--dashboard-host "$HOST"' in start
    assert "export RAY_AUTH_MODE=token" in start
    assert "ray stop" not in start.replace("never `ray stop`", "")
    stop = (CLUSTER / "local" / "stop.sh").read_text()
    assert not re.search(r"^\s*[^#]*\bray stop\b", stop, re.MULTILINE), "stop.sh must end only its own processes"
    for name in ("retriever_node", "reranker_node", "head_node"):
        assert f'{{"{name}": 1}}' in start, name
    local = yaml.safe_load(LOCAL_CONFIG.read_text(encoding="utf-8"))
    assert local["proxy_location"] == "HeadOnly", "one proxy: every node shares 127.0.0.1"
    for name, dep in _deployments(local).items():
        res = (dep.get("ray_actor_options") or {}).get("resources") or {}
        if name in PIN_RESOURCES:
            assert PIN_RESOURCES[name] in res, name


# --------------------------------------------------------------------------- monitoring


def dashboard_metric_names() -> set[str]:
    """Metric names queried by the committed Grafana dashboard."""
    return grafana.queried_metric_names(json.loads(DASHBOARD.read_text(encoding="utf-8")))


def test_dashboard_covers_every_custom_metric():
    from serve_app.serve.metrics import SPECS

    used = dashboard_metric_names()
    for name, spec in SPECS.items():
        prom = "ray_" + name
        if spec.kind == "histogram":
            assert {prom + "_bucket", prom + "_sum", prom + "_count"} & used, f"{prom} not on the dashboard"
        else:
            assert (prom if prom.endswith("_total") else prom + "_total") in used, f"{prom} not on the dashboard"
    custom = {m for m in used if m.startswith("ray_serve_app_")}
    known = {"ray_" + n + s for n in SPECS for s in ("", "_bucket", "_sum", "_count", "_total")}
    assert custom <= known, f"dashboard queries unknown custom metrics: {sorted(custom - known)}"
    assert {"ray_serve_deployment_replica_healthy", "ray_serve_deployment_queued_queries"} <= used


def test_prometheus_config_reads_rays_service_discovery():
    cfg = yaml.safe_load((CLUSTER / "monitoring" / "prometheus.yml").read_text())
    files = [f for job in cfg["scrape_configs"] for sd in job.get("file_sd_configs", []) for f in sd["files"]]
    assert files and all(os.path.basename(f) == "prom_metrics_service_discovery.json" for f in files)
    from ray._private.ray_constants import PROMETHEUS_SERVICE_DISCOVERY_FILE

    assert PROMETHEUS_SERVICE_DISCOVERY_FILE == "prom_metrics_service_discovery.json"


# --------------------------------------------------------------------------- 100M-document layout

RAYSERVICE_100M = CLUSTER / "kuberay" / "rayservice-100m.yaml"
RAYJOB_100M = CLUSTER / "kuberay" / "rayjob-index-100m.yaml"
SIZING = REPO / "benchmarks" / "results" / "sizing" / "sizing.json"
GIB = 2**30


@pytest.fixture(scope="module")
def big() -> tuple[dict, dict]:
    (doc,) = _yaml_docs(RAYSERVICE_100M)
    return doc, yaml.safe_load(doc["spec"]["serveConfigV2"])


def _quantity_gib(q: str) -> float:
    units = {"Gi": 1, "Mi": 1 / 1024, "Ti": 1024}
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(Gi|Mi|Ti)", str(q))
    assert m, f"unexpected memory quantity {q!r}"
    return float(m.group(1)) * units[m.group(2)]


def test_expand_shards_lists_every_shard_deployment():
    config = {"applications": [{"name": "a", "import_path": "x:y", "args": {"sharding": {"bm25": 3}},
                                "deployments": [{"name": "BM25Retriever", "num_replicas": 2}, {"name": "DenseRetriever"}]}]}
    out = render.expand_shards(config)
    assert [d["name"] for d in out["applications"][0]["deployments"]] == ["BM25Retriever-shard0", "BM25Retriever-shard1", "BM25Retriever-shard2", "DenseRetriever"]
    assert all(d["num_replicas"] == 2 for d in out["applications"][0]["deployments"][:3])
    assert config["applications"][0]["deployments"][0]["name"] == "BM25Retriever"  # input untouched


def test_100m_layout_is_a_valid_app_with_one_deployment_per_shard(big):
    from serve_app.serve.config import AppConfig
    from serve_app.serve.shards import QUERY_ENCODER, deployment_names, encodes_queries_once

    _, embedded = big
    _serve_schema().model_validate(embedded)
    (app,) = embedded["applications"]
    cfg = AppConfig(**app["args"])
    assert (cfg.sharding.bm25, cfg.sharding.dense) == (20, 10)
    assert cfg.build_index_if_missing is False and cfg.index_dir.startswith("/mnt/serve-app/")
    names = [d["name"] for d in app["deployments"]]
    # a sharded dense retriever also deploys its query encoder (one encoding per query for every shard)
    assert encodes_queries_once(cfg)
    assert names == ["SearchIngress", *deployment_names(cfg), "CrossEncoderReranker", QUERY_ENCODER]


def test_100m_node_groups_hold_the_replicas(big):
    """Every pinned deployment has a group offering its resource, and at max_replicas the
    groups' pods hold the replicas' CPUs and memory (the sizing's arithmetic, checked)."""
    doc, embedded = big
    groups = doc["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    deps = _deployments(embedded)
    by_resource: dict[str, list[dict]] = {}
    for name, dep in deps.items():
        (res,) = dep["ray_actor_options"]["resources"]
        by_resource.setdefault(res, []).append(dep)
    for res, members in by_resource.items():
        (group,) = [g for g in groups if res in _start_resources(g)]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        pod_cpus, pod_gib = int(group["rayStartParams"]["num-cpus"]), _quantity_gib(limits["memory"])
        assert int(limits["cpu"]) == pod_cpus, group["groupName"]
        cpus = sum(d["autoscaling_config"]["max_replicas"] * d["ray_actor_options"].get("num_cpus", 1) for d in members)
        gib = sum(d["autoscaling_config"]["max_replicas"] * d["ray_actor_options"].get("memory", 0) / GIB for d in members)
        assert group["maxReplicas"] * pod_cpus >= cpus, f"{group['groupName']}: {group['maxReplicas']} pods x {pod_cpus} CPUs < {cpus} CPUs at max_replicas"
        assert group["maxReplicas"] * pod_gib >= gib, f"{group['groupName']}: pods hold {group['maxReplicas'] * pod_gib} GiB < {gib} GiB at max_replicas"
        mins = sum(d["autoscaling_config"]["min_replicas"] * d["ray_actor_options"].get("num_cpus", 1) for d in members)
        assert group["minReplicas"] * pod_cpus >= mins, f"{group['groupName']}: min pods cannot hold min_replicas"


def test_100m_shard_memory_follows_the_measured_sizes(big):
    """The dense replicas' memory covers a shard's measured bytes per document (HNSW32 = Flat
    vectors + graph), and a BM25 pod's memory covers its shard's postings page cache."""
    measured = json.loads(SIZING.read_text())["results"]
    per_doc = measured["bytes_per_document"]
    doc, embedded = big
    (app,) = embedded["applications"]
    deps = _deployments(embedded)
    docs_total = 100_000_000
    dense_shard = docs_total / app["args"]["sharding"]["dense"]
    dense_bytes = dense_shard * (per_doc["dense Flat index.faiss"] + per_doc["dense id map (doc_ids.json + chunk_owner.npy)"])
    hnsw_graph = dense_shard * 32 * 2 * 4  # HNSW32: up to 2 x 32 neighbour ids (int32) per vector on level 0
    assert deps["DenseRetriever-shard0"]["ray_actor_options"]["memory"] >= dense_bytes + hnsw_graph
    bm25_shard = docs_total / app["args"]["sharding"]["bm25"] * per_doc["bm25"]
    (bm25_group,) = [g for g in doc["spec"]["rayClusterConfig"]["workerGroupSpecs"] if "bm25_node" in _start_resources(g)]
    pod_gib = _quantity_gib(bm25_group["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"])
    replicas_per_pod = int(bm25_group["rayStartParams"]["num-cpus"])
    assert pod_gib * GIB >= bm25_shard + replicas_per_pod * deps["BM25Retriever-shard0"]["ray_actor_options"]["memory"]


def test_100m_index_build_job():
    (job,) = _yaml_docs(RAYJOB_100M)
    assert job["kind"] == "RayJob" and job["spec"]["rayClusterSpec"]["authOptions"]["mode"] == "token"
    entry = job["spec"]["entrypoint"].split()
    assert entry[:2] == ["serve-app", "index"] and "--ray" in entry and entry[entry.index("--address") + 1] == "auto"
    (doc,) = _yaml_docs(RAYSERVICE_100M)
    (app,) = yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"]
    shards = dict(part.split("=") for part in entry[entry.index("--shards") + 1].split(","))
    assert {k: int(v) for k, v in shards.items()} == app["args"]["sharding"], "the job builds the shard sets the service reads"
    assert entry[entry.index("--out") + 1] == app["args"]["index_dir"]
    assert entry[entry.index("--faiss-factory") + 1] == app["args"]["dense"]["factory"]
    from serve_app.cli import build_parser

    parsed = build_parser().parse_args(entry[1:])  # the command line is one serve-app accepts
    # the workers write the shards (no process holds the whole index), into the index's staging
    # directory on the volume: every node of the job mounts it where the driver does
    assert parsed.shards_only
    spec = job["spec"]["rayClusterSpec"]
    head_mounts = {m["mountPath"] for m in spec["headGroupSpec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
    out_root = "/" + Path(entry[entry.index("--out") + 1]).parts[1] + "/" + Path(entry[entry.index("--out") + 1]).parts[2]
    assert out_root in head_mounts
    for group in spec["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0].get("volumeMounts", [])}
        assert out_root in mounts, f"{group['groupName']} does not mount {out_root}"
        claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod.get("volumes", [])}
        assert claims[mounts[out_root]] == "serve-app-data", group["groupName"]


def test_overlays_can_add_a_deployment_once():

    base = {"applications": [{"name": "app", "import_path": "x:y", "deployments": [{"name": "A"}]}]}
    out = render.apply_overlay(base, {"add_deployments": [{"name": "B", "num_replicas": 2}]})
    assert [d["name"] for d in out["applications"][0]["deployments"]] == ["A", "B"]
    assert [d["name"] for d in base["applications"][0]["deployments"]] == ["A"]  # input untouched
    with pytest.raises(render.RenderError, match="already in the base config"):
        render.apply_overlay(base, {"add_deployments": [{"name": "A"}]})
    with pytest.raises(render.RenderError, match="needs a name"):
        render.apply_overlay(base, {"add_deployments": [{"num_replicas": 1}]})

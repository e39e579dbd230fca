"""docker-compose and Kubernetes manifests in deploy/: schemas and cross-references.

Schemas: Kubernetes kinds against the JSON schemas shipped in the
``kubernetes-validate`` wheel (strict: unknown fields fail), the compose file
against the compose-spec schema shipped in ``check-jsonschema``; each skips when
its package is missing. ServiceMonitor and Kustomization get small schemas of
the fields we use. The cross-reference tests (selectors, port names, the Envoy
upstream, mounts, CLI flags) run always.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import re

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
K8S_VERSION = "1.33"  # oldest supported: 1.30 (lifecycle.preStop.sleep)
GRPC_PORT, METRICS_PORT = 50051, 9400


def k8s_docs() -> list[dict]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def kustomization() -> dict:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def envoy_config() -> dict:
    return yaml.safe_load((K8S / "envoy" / "envoy.yaml").read_text())


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def by_kind(kind: str) -> list[dict]:
    return [d for d in k8s_docs() if d["kind"] == kind]


def named(kind: str, name: str) -> dict:
    (doc,) = [d for d in by_kind(kind) if d["metadata"]["name"] == name]
    return doc


def matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def pods_selected(selector: dict) -> list[dict]:
    return [d for d in by_kind("Deployment")
            if matches(selector, d["spec"]["template"]["metadata"]["labels"])]


def container_ports(deploy: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"]
            for c in deploy["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}


def expand_env_defaults(text: str) -> str:
    """Compose's ${VAR:-default} and ${VAR} with the defaults (or empty)."""
    return re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", lambda m: m.group(2) or "", text)


def serve_parser():
    """The real ``genserve`` parser with only its ``serve`` subcommand."""
    cli = pytest.importorskip("genserve.cli")
    if not hasattr(cli, "add_serve"):
        pytest.skip("genserve.cli has no add_serve")
    parser = argparse.ArgumentParser(prog="genserve")
    cli.add_serve(parser.add_subparsers(dest="command", required=True))
    return parser


def parse_serve(args: list[str]):
    """Parse ``genserve serve ...`` args with the real CLI; fail on unknown flags."""
    parser = serve_parser()
    try:
        return parser.parse_args(args)
    except SystemExit as exc:
        raise AssertionError(f"genserve rejects {args}") from exc


# -- Kubernetes schemas ------------------------------------------------------
SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": {"type": "object", "required": ["matchLabels"],
                             "properties": {"matchLabels": {
                                 "type": "object", "additionalProperties": {"type": "string"}}}},
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["port"], "additionalProperties": False,
                    "properties": {
                        "port": {"type": "string"}, "path": {"type": "string"},
                        "interval": {"type": "string", "pattern": r"^\d+(ms|s|m|h)$"},
                        "scrapeTimeout": {"type": "string", "pattern": r"^\d+(ms|s|m|h)$"},
                        "scheme": {"enum": ["http", "https"]}}}},
            },
        },
    },
}
PROMETHEUS_RULE_SCHEMA = {  # the parts of monitoring.coreos.com/v1 PrometheusRule used here
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {"type": "object", "required": ["groups"], "additionalProperties": False, "properties": {
            "groups": {"type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["name", "rules"], "additionalProperties": False,
                "properties": {"name": {"type": "string"}, "rules": {"type": "array", "items": {
                    "type": "object", "required": ["alert", "expr"], "additionalProperties": False,
                    "properties": {
                        "alert": {"type": "string"}, "expr": {"type": "string"},
                        "for": {"type": "string", "pattern": r"^\d+(ms|s|m|h)$"},
                        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                        "annotations": {"type": "object",
                                        "additionalProperties": {"type": "string"}}}}}}}}}},
    },
}
KUSTOMIZATION_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "resources"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "kustomize.config.k8s.io/v1beta1"},
        "kind": {"const": "Kustomization"},
        "namespace": {"type": "string"},
        "resources": {"type": "array", "items": {"type": "string"}},
        "configMapGenerator": {"type": "array", "items": {
            "type": "object", "required": ["name"], "additionalProperties": False,
            "properties": {"name": {"type": "string"},
                           "files": {"type": "array", "items": {"type": "string"}}}}},
    },
}


def builtin_docs():
    return [d for d in k8s_docs() if "." not in d["apiVersion"].split("/")[0]
            or d["apiVersion"].split("/")[0].endswith(".k8s.io")]


@pytest.mark.parametrize("doc", builtin_docs(),
                         ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_k8s_schema(doc):
    kv = pytest.importorskip("kubernetes_validate")
    kv.validate(doc, K8S_VERSION, strict=True)


def test_k8s_schema_rejects_typos():
    kv = pytest.importorskip("kubernetes_validate")
    doc = json.loads(json.dumps(named("Deployment", "genserve")))
    doc["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(Exception):
        kv.validate(doc, K8S_VERSION, strict=True)


def test_custom_kinds_schema():
    jsonschema = pytest.importorskip("jsonschema")
    for doc in by_kind("ServiceMonitor"):
        jsonschema.validate(doc, SERVICE_MONITOR_SCHEMA)
    for doc in by_kind("PrometheusRule"):
        jsonschema.validate(doc, PROMETHEUS_RULE_SCHEMA)
    jsonschema.validate(kustomization(), KUSTOMIZATION_SCHEMA)
    kinds = {d["kind"] for d in k8s_docs()}
    assert kinds <= {"Namespace", "Deployment", "Service", "ServiceMonitor", "PrometheusRule",
                     "PodDisruptionBudget", "PersistentVolumeClaim", "ConfigMap"}


# -- Kubernetes cross-references ---------------------------------------------
def test_kustomization_lists_every_manifest():
    kust = kustomization()
    listed = set(kust["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
    for gen in kust.get("configMapGenerator", []):
        for entry in gen["files"]:
            assert (K8S / entry.split("=", 1)[-1]).is_file(), entry
    assert named("Namespace", kust["namespace"])


def test_deployment_selectors_match_template_labels():
    for d in by_kind("Deployment"):
        assert matches(d["spec"]["selector"]["matchLabels"],
                       d["spec"]["template"]["metadata"]["labels"]), d["metadata"]["name"]


def test_services_select_pods_and_target_named_ports():
    for svc in by_kind("Service"):
        pods = pods_selected(svc["spec"]["selector"])
        assert len(pods) == 1, f"service {svc['metadata']['name']} selects {len(pods)} deployments"
        ports = container_ports(pods[0])
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in ports, (svc["metadata"]["name"], p)
            if p["name"] == "grpc":
                assert p["appProtocol"] == "grpc"


def test_server_pod():
    dep = named("Deployment", "genserve")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert container_ports(dep) == {"grpc": GRPC_PORT, "metrics": METRICS_PORT}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == GRPC_PORT, probe
    gpus = c["resources"]["limits"]["nvidia.com/gpu"]
    assert c["resources"]["requests"].get("nvidia.com/gpu", gpus) == gpus
    flags = dict(a.split("=", 1) for a in c["args"] if a.startswith("--") and "=" in a)
    assert int(flags["--num-workers"]) == gpus
    assert flags["--device"] == "cuda"
    assert int(flags["--port"]) == GRPC_PORT and int(flags["--metrics-port"]) == METRICS_PORT
    assert dep["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == 10001
    claims = {v["persistentVolumeClaim"]["claimName"] for v in dep["spec"]["template"]["spec"]["volumes"]
              if "persistentVolumeClaim" in v}
    assert claims <= {d["metadata"]["name"] for d in by_kind("PersistentVolumeClaim")}


def test_server_args_parse_with_cli():
    (c,) = named("Deployment", "genserve")["spec"]["template"]["spec"]["containers"]
    args = parse_serve(c["args"])
    assert args.port == GRPC_PORT and args.metrics_port == METRICS_PORT


def test_headless_service_for_envoy():
    svc = named("Service", "genserve-headless")
    assert svc["spec"]["clusterIP"] == "None"
    assert not svc["spec"].get("publishNotReadyAddresses", False)


def test_service_monitor_selects_metrics_service():
    (sm,) = by_kind("ServiceMonitor")
    selected = [s for s in by_kind("Service")
                if matches(sm["spec"]["selector"]["matchLabels"], s["metadata"].get("labels", {}))]
    assert [s["metadata"]["name"] for s in selected] == ["genserve-metrics"]
    port_names = {p["name"] for p in selected[0]["spec"]["ports"]}
    assert {e["port"] for e in sm["spec"]["endpoints"]} <= port_names


def test_pdb_selects_server():
    (pdb,) = by_kind("PodDisruptionBudget")
    assert [d["metadata"]["name"] for d in pods_selected(pdb["spec"]["selector"]["matchLabels"])] \
        == ["genserve"]


def test_envoy_routes_per_request_to_headless_service():
    cfg = envoy_config()
    ns = kustomization()["namespace"]
    (listener,) = cfg["static_resources"]["listeners"]
    clusters = {c["name"]: c for c in cfg["static_resources"]["clusters"]}
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    routed = {r["route"]["cluster"] for vh in hcm["route_config"]["virtual_hosts"]
              for r in vh["routes"]}
    assert routed <= set(clusters)
    for name in routed:
        cl = clusters[name]
        assert cl["type"] == "STRICT_DNS" and cl["lb_policy"] == "LEAST_REQUEST"
        opts = cl["typed_extension_protocol_options"][
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
        assert "http2_protocol_options" in opts["explicit_http_config"]
        assert any("grpc_health_check" in h for h in cl["health_checks"])
        (addr,) = [e["endpoint"]["address"]["socket_address"]
                   for grp in cl["load_assignment"]["endpoints"] for e in grp["lb_endpoints"]]
        host = addr["address"].split(".")
        assert host[0] == "genserve-headless" and host[1] == ns
        assert named("Service", host[0])["spec"]["clusterIP"] == "None"
        assert addr["port_value"] == container_ports(named("Deployment", "genserve"))["grpc"]


def test_envoy_pod_matches_config():
    cfg = envoy_config()
    dep = named("Deployment", "genserve-envoy")
    ports = container_ports(dep)
    (listener,) = cfg["static_resources"]["listeners"]
    assert listener["address"]["socket_address"]["port_value"] == ports["grpc"]
    assert cfg["admin"]["address"]["socket_address"]["port_value"] == ports["admin"]
    gateway = named("Service", "genserve-gateway")
    assert [p["targetPort"] for p in gateway["spec"]["ports"]] == ["grpc"]
    (vol,) = [v for v in dep["spec"]["template"]["spec"]["volumes"] if "configMap" in v]
    generated = {g["name"]: g for g in kustomization()["configMapGenerator"]}
    assert vol["configMap"]["name"] in generated
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == vol["name"]]
    keys = [f.split("=", 1)[0] for f in generated[vol["configMap"]["name"]]["files"]]
    assert c["args"][c["args"].index("-c") + 1] in {f"{mount['mountPath']}/{k}" for k in keys}


# -- docker compose ------------------------------------------------------------
def test_compose_schema():
    jsonschema = pytest.importorskip("jsonschema")
    resources = pytest.importorskip("importlib.resources")
    try:
        schema_file = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
        schema = json.loads(schema_file.read_text())
    except (ModuleNotFoundError, FileNotFoundError):
        pytest.skip("check-jsonschema (ships the compose-spec schema) not installed")
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{e.json_path}: {e.message}" for e in validator.iter_errors(compose())]
    assert not errors
    bad = compose()
    bad["services"]["prometheus"]["portz"] = []
    assert list(validator.iter_errors(bad)), "schema should reject unknown keys"


def server_services() -> dict[str, dict]:
    return {n: s for n, s in compose()["services"].items() if n.startswith("genserve")}


def test_compose_server_profiles():
    servers = server_services()
    assert {tuple(s["profiles"]) for s in servers.values()} == {("cpu",), ("cuda",)}
    env = dict(line.split("=", 1) for line in (DEPLOY / ".env").read_text().splitlines()
               if line and not line.startswith("#"))
    assert env["COMPOSE_PROFILES"] == "cpu"
    for svc in compose()["services"].values():  # always-on services must not need a server
        if "profiles" not in svc:
            assert not set(svc.get("depends_on", [])) & set(servers)
    cuda = servers["genserve-cuda"]
    (dev,) = cuda["deploy"]["resources"]["reservations"]["devices"]
    assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"]


def test_compose_server_build_and_command():
    for name, svc in server_services().items():
        dockerfile = (DEPLOY / svc["build"]["context"] / svc["build"]["dockerfile"]).resolve()
        assert dockerfile.is_file(), name
        assert "genserve" in svc["networks"]["default"]["aliases"]
        args = [expand_env_defaults(a) for a in svc["command"]]
        flags = dict(a.split("=", 1) for a in args if a.startswith("--") and "=" in a)
        assert int(flags["--port"]) == GRPC_PORT and int(flags["--metrics-port"]) == METRICS_PORT
        assert flags["--device"] == name.removeprefix("genserve-")
        published = {int(p.rsplit(":", 1)[1]) for p in svc["ports"]}
        assert published == {GRPC_PORT, METRICS_PORT}


def test_compose_server_command_parses_with_cli():
    for svc in server_services().values():
        args = parse_serve([expand_env_defaults(a) for a in svc["command"]])
        assert args.metrics_port == METRICS_PORT


def test_compose_bind_mounts_exist():
    for name, svc in compose()["services"].items():
        for vol in svc.get("volumes", []):
            src = expand_env_defaults(vol.split(":")[0])
            if src.startswith((".", "/")):
                assert (DEPLOY / src).exists(), f"{name}: {src}"


def test_prometheus_scrapes_the_server():
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (job,) = [j for j in prom["scrape_configs"] if j["job_name"] == "genserve"]
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"genserve:{METRICS_PORT}"]
    mounts = [v.split(":") for v in compose()["services"]["prometheus"]["volumes"]]
    assert ["./prometheus/prometheus.yml", "/etc/prometheus/prometheus.yml", "ro"] in mounts
    command = compose()["services"]["prometheus"]["command"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in command
    local = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.local.yml").read_text())
    assert local["scrape_configs"][0]["static_configs"][0]["targets"] == [f"127.0.0.1:{METRICS_PORT}"]


def test_grafana_wiring():
    graf = compose()["services"]["grafana"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in graf["volumes"]}
    assert mounts["/etc/grafana/provisioning"] == "./grafana/provisioning"
    prov = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/genserve.yaml").read_text())
    path = prov["providers"][0]["options"]["path"]
    assert mounts[path] == "./grafana/dashboards"
    home = graf["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(path + "/")
    assert (DEPLOY / "grafana/dashboards" / home.removeprefix(path + "/")).is_file()
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    url = ds["datasources"][0]["url"]
    host, port = url.removeprefix("http://").split(":")
    assert host in compose()["services"] and port == "9090"

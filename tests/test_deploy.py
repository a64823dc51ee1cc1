"""The deploy files agree with the code: probes hit real endpoints, the autoscaler reads
the real job stream, and every metric the alerts and dashboard query is exported."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from stepserve.server.metrics import Metrics
from stepserve.server.redis import keys

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def exported_metrics() -> set[str]:
    names = set()
    for family in Metrics().registry.collect():
        names.add(family.name)
        names.update(s.name for s in family.samples)
    return names | {f"{n}_total" for n in names}


def referenced(expr: str) -> set[str]:
    return set(re.findall(r"\b(stepserve_[a-z_]+)", expr))


@pytest.fixture(scope="module")
def rendered():
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed (it renders the kustomizations)")
    out = {}
    for overlay in ("base", "overlays/gpu"):
        text = subprocess.run(["kubectl", "kustomize", str(DEPLOY / "k8s" / overlay)],
                              check=True, capture_output=True, text=True).stdout
        out[overlay] = [d for d in yaml.safe_load_all(text) if d]
    return out


def find(docs, kind, name):
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


@pytest.mark.slow  # runs `kubectl kustomize`
def test_kustomizations_render_with_probes_drain_and_gpus(rendered):
    base = rendered["base"]
    api = find(base, "Deployment", "stepserve-api")["spec"]["template"]["spec"]
    c = api["containers"][0]
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["lifecycle"]["preStop"] and api["terminationGracePeriodSeconds"] >= 120
    assert api["securityContext"]["runAsNonRoot"]
    redis_args = find(base, "Deployment", "redis")["spec"]["template"]["spec"][
        "containers"][0]["args"]
    assert redis_args[redis_args.index("--appendonly") + 1] == "yes"  # jobs survive a crash
    kinds = {d["kind"] for d in base}
    assert {"PodDisruptionBudget", "HorizontalPodAutoscaler", "ScaledObject",
            "ServiceMonitor", "PrometheusRule", "ConfigMap", "Service"} <= kinds
    worker = find(rendered["overlays/gpu"], "Deployment", "stepserve-worker")
    wc = worker["spec"]["template"]["spec"]["containers"][0]
    assert wc["resources"]["limits"]["nvidia.com/gpu"] == 1 and wc["image"].endswith(":cuda")
    assert find(rendered["overlays/gpu"], "Deployment", "stepserve-api")["spec"]["template"][
        "spec"]["containers"][0]["image"].endswith(":cpu")


@pytest.mark.slow  # runs `kubectl kustomize`
def test_autoscaler_alerts_and_settings_match_the_code(rendered):
    base = rendered["base"]
    trigger = find(base, "ScaledObject", "stepserve-worker")["spec"]["triggers"][0]
    assert trigger["metadata"]["stream"] == keys.queue("builtin")
    assert trigger["metadata"]["consumerGroup"] == keys.GROUP
    rules = find(base, "PrometheusRule", "stepserve-alerts")["spec"]["groups"][0]["rules"]
    names = exported_metrics()
    for rule in rules:
        assert referenced(rule["expr"]) <= names, rule["alert"]
    # the ConfigMap's settings file is valid for the settings object
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    from stepserve.server.settings import Settings

    toml = find(base, "ConfigMap", "stepserve-config")["data"]["stepserve.toml"]
    Settings(**tomllib.loads(toml))


def test_dashboard_queries_exported_metrics():
    dash = json.loads((DEPLOY / "grafana" / "stepserve-dashboard.json").read_text())
    names = exported_metrics()
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert len(exprs) >= 8
    for expr in exprs:
        assert referenced(expr) <= names, expr
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for topic in ("throughput", "latency", "queue", "batch", "cache", "gpu memory"):
        assert topic in titles


CUSTOM_KINDS = {"ScaledObject": "keda.sh/v1alpha1", "ServiceMonitor": "monitoring.coreos.com/v1",
                "PodMonitor": "monitoring.coreos.com/v1",
                "PrometheusRule": "monitoring.coreos.com/v1"}


def base_documents() -> list[dict]:
    """The base's resource files as written (no kubectl needed to read them)."""
    docs = []
    for path in sorted((DEPLOY / "k8s" / "base").glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


@pytest.mark.slow  # runs `kubectl kustomize` where kubectl exists
def test_manifests_validate_against_kubernetes_schemas(request):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    docs = base_documents()
    if shutil.which("kubectl"):  # the rendered overlay too: patches applied
        docs += request.getfixturevalue("rendered")["overlays/gpu"]
    checked = 0
    for doc in docs:
        if doc["kind"] in CUSTOM_KINDS:  # CRDs: not in the Kubernetes schemas
            assert doc["apiVersion"] == CUSTOM_KINDS[doc["kind"]], doc["metadata"]["name"]
            continue
        kubernetes_validate.validate(doc, "1.32", strict=True)  # raises on any mistake
        checked += 1
    assert checked >= 8
    broken = find(docs, "Deployment", "stepserve-api")
    broken = json.loads(json.dumps(broken))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"][
        "portt"] = 8000  # a typo strict validation must catch
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.32", strict=True)


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], capture_output=True, text=True)


@pytest.mark.slow  # runs promtool
def test_alert_rules_pass_promtool_and_fire_when_they_should(tmp_path):
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (Debian package prometheus)")
    rules = find(base_documents(), "PrometheusRule", "stepserve-alerts")["spec"]
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
    checked = promtool("check", "rules", str(tmp_path / "rules.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "scrape.yaml").read_text())
    config = promtool("check", "config", "--syntax-only",
                      str(DEPLOY / "prometheus" / "scrape.yaml"))
    if "kubernetes_sd_configs not found" in config.stdout + config.stderr:
        # Debian builds Prometheus without Kubernetes discovery: check the rest (relabel
        # rules, job names) with the discovery swapped for a static target
        for job in scrape["scrape_configs"]:
            if job.pop("kubernetes_sd_configs", None) is not None:
                job["static_configs"] = [{"targets": ["127.0.0.1:9100"]}]
        (tmp_path / "scrape.yaml").write_text(yaml.safe_dump(scrape))
        config = promtool("check", "config", "--syntax-only", str(tmp_path / "scrape.yaml"))
    assert config.returncode == 0, config.stdout + config.stderr

    by_name = {r["alert"]: r for r in rules["groups"][0]["rules"]}

    def fires(name: str, at: str) -> dict:
        rule = by_name[name]
        return {"eval_time": at, "alertname": name,
                "exp_alerts": [{"exp_labels": rule["labels"],
                                "exp_annotations": rule["annotations"]}]}

    def quiet(name: str, at: str) -> dict:
        return {"eval_time": at, "alertname": name, "exp_alerts": []}

    le = ["0.5", "1", "5", "10", "30", "+Inf"]
    slow = [{"series": f'stepserve_request_latency_seconds_bucket{{le="{b}"}}',
             "values": f"0+{n}x30"} for b, n in zip(le, [0, 0, 1, 2, 10, 10])]
    tests = {"rule_files": ["rules.yml"], "evaluation_interval": "1m", "tests": [
        {"interval": "1m", "input_series": [
            {"series": 'stepserve_queue_depth{pod="a"}', "values": "150x30"},
            {"series": 'stepserve_requests_total{status="ok"}', "values": "0+100x30"},
            {"series": 'stepserve_requests_total{status="error"}', "values": "0+10x30"},
            {"series": 'stepserve_ready{pod="a"}', "values": "0x30"},
            {"series": 'stepserve_deadline_requests_total{outcome="met"}',
             "values": "0+30x30"},
            {"series": 'stepserve_deadline_requests_total{outcome="missed"}',
             "values": "0+10x30"},
            {"series": 'stepserve_deadline_refused_total{reason="late"}',
             "values": "0+20x30"}, *slow],
         "alert_rule_test": [quiet("StepserveBacklog", "3m"), fires("StepserveBacklog", "10m"),
                             fires("StepserveErrorRate", "10m"),
                             fires("StepserveLatencyP95", "20m"),
                             fires("StepserveNotReady", "15m"),
                             quiet("StepserveGoodputLow", "5m"),  # not yet for 10m
                             fires("StepserveGoodputLow", "20m")]},  # 30 / 60 = 0.5
        {"interval": "1m", "input_series": [  # a healthy service raises nothing
            {"series": 'stepserve_queue_depth{pod="a"}', "values": "3x30"},
            {"series": 'stepserve_requests_total{status="ok"}', "values": "0+100x30"},
            {"series": 'stepserve_ready{pod="a"}', "values": "1x30"},
            {"series": 'stepserve_deadline_requests_total{outcome="met"}',
             "values": "0+99x30"},
            {"series": 'stepserve_deadline_requests_total{outcome="missed"}',
             "values": "0+1x30"}],
         "alert_rule_test": [quiet(n, "20m") for n in by_name]}]}
    (tmp_path / "tests.yml").write_text(yaml.safe_dump(tests))
    tested = promtool("test", "rules", str(tmp_path / "tests.yml"))
    assert tested.returncode == 0, tested.stdout + tested.stderr


def stepserve_containers():
    """(file, pod spec, container) of every stepserve container in the manifests."""
    for path in sorted((DEPLOY / "k8s").rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            spec = ((doc or {}).get("spec") or {}).get("template", {}).get("spec") or {}
            for c in spec.get("containers", []):  # no image: an overlay's patch of one
                if str(c.get("image", "stepserve")).startswith("stepserve"):
                    yield path.name, spec, c


def test_manifests_match_what_the_image_and_the_settings_provide():
    """Every command, flag, environment variable, port, probe path and the user the
    manifests name exists in the image, the CLI, the settings and the app."""
    from stepserve.cli import build_parser
    from stepserve.server.app import create_app
    from stepserve.server.settings import Settings

    dockerfile = (DEPLOY.parent / "Dockerfile").read_text()
    exposed = {int(p) for line in re.findall(r"^EXPOSE (.+)$", dockerfile, re.M)
               for p in line.split()}
    uids = {int(u) for u in re.findall(r"useradd .*--uid (\d+)", dockerfile)}
    env_names = {f"STEPSERVE_{name.upper()}" for name in Settings.model_fields}
    routes = {r.path for r in create_app(Settings()).routes if hasattr(r, "path")}  # mounts: none
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.choices and "serve" in a.choices)
    seen = 0
    for name, spec, c in stepserve_containers():
        seen += 1
        command, args = (c.get("args") or ["worker"])[0], (c.get("args") or [])[1:]
        cmd = subparsers.choices[command]  # a real sub-command
        flags = {s for a in cmd._actions for s in a.option_strings}
        assert {a for a in args if a.startswith("--")} <= flags, (name, args)
        for e in c.get("env", []):
            assert e["name"] in env_names, (name, e["name"])
        ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
        assert set(ports.values()) <= exposed, (name, ports)
        for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
            get = (c.get(kind) or {}).get("httpGet")
            if get:  # the API's routes; a worker serves only /metrics on its own port
                assert get["path"] in (routes if command != "worker" else {"/metrics"})
                assert get["port"] in ports, (name, kind)
        if "securityContext" in spec:  # the image's own user
            assert spec["securityContext"]["runAsUser"] in uids
    assert seen >= 3  # api, worker, the GPU worker
    services = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    for name, svc in services.items():  # compose: the same commands, flags and settings
        if "STEPSERVE_IMAGE" not in svc["image"]:  # not Redis
            continue
        cmd = subparsers.choices[svc["command"][0]]
        flags = {s for a in cmd._actions for s in a.option_strings}
        assert {a for a in svc["command"] if a.startswith("--")} <= flags, name
        assert set(svc["environment"]) <= env_names, name
        mounted = svc["volumes"][0].split(":")[0]
        assert (DEPLOY / mounted).resolve() == DEPLOY / "k8s" / "base" / "stepserve.toml"

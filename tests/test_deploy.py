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


def test_kustomizations_render_with_probes_drain_and_gpus(rendered):
    base = rendered["base"]
    api = find(base, "Deployment", "stepserve-api")["spec"]["template"]["spec"]
    c = api["containers"][0]
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["lifecycle"]["preStop"] and api["terminationGracePeriodSeconds"] >= 120
    assert api["securityContext"]["runAsNonRoot"]
    kinds = {d["kind"] for d in base}
    assert {"PodDisruptionBudget", "HorizontalPodAutoscaler", "ScaledObject",
            "ServiceMonitor", "PrometheusRule", "ConfigMap", "Service"} <= kinds
    worker = find(rendered["overlays/gpu"], "Deployment", "stepserve-worker")
    wc = worker["spec"]["template"]["spec"]["containers"][0]
    assert wc["resources"]["limits"]["nvidia.com/gpu"] == 1 and wc["image"].endswith(":cuda")
    assert find(rendered["overlays/gpu"], "Deployment", "stepserve-api")["spec"]["template"][
        "spec"]["containers"][0]["image"].endswith(":cpu")


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

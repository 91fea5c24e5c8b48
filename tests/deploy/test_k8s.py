"""Kubernetes manifests: every kustomization renders and validates offline (strict schemas), and the probes,
ports, grace period and autoscaling metric agree with the service they deploy."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from app.http.main import create_app
from app.http.metrics import ServiceMetrics
from app.settings import ServiceSettings
from tests.conftest import ROOT

K8S = ROOT / "deploy" / "k8s"
KUSTOMIZATIONS = ["base", "overlays/cpu", "overlays/gpu"]

pytestmark = [pytest.mark.system,
              pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) not installed")]


def render(path: str) -> list[dict]:
    out = subprocess.run(["kubectl", "kustomize", str(K8S / path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _by_kind(docs: list[dict]) -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_kustomization_renders_and_validates_strictly(path, tmp_path):
    docs = render(path)
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy",
            "ConfigMap", "ServiceMonitor"} <= kinds
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(yaml.safe_dump_all(docs))
    tool = shutil.which("kubernetes-validate") or str(ROOT / ".venv/bin/kubernetes-validate")
    out = subprocess.run([tool, "--strict", "--quiet", str(rendered)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    # The one custom resource has no bundled schema: check the fields the Prometheus Operator needs.
    sm = next(d for d in docs if d["kind"] == "ServiceMonitor")
    assert sm["spec"]["endpoints"][0]["path"] == "/metrics" and sm["spec"]["selector"]["matchLabels"]


@pytest.mark.parametrize("path", ["overlays/cpu", "overlays/gpu"])
def test_manifests_agree_with_the_service(path):
    docs = _by_kind(render(path))
    settings_map = docs[("ConfigMap", "dmfnet-settings")]["data"]
    fields = ServiceSettings.model_fields
    unknown = [k for k in settings_map if k.removeprefix("DMFNET_").lower() not in fields]
    assert unknown == [], f"ConfigMap keys the service does not know: {unknown}"
    env = {k.removeprefix("DMFNET_").lower(): v for k, v in settings_map.items() if k != "DMFNET_API_KEY_FILE"}
    settings = ServiceSettings(**env)  # every value is valid for the service
    deploy = docs[("Deployment", "dmfnet")]
    pod = deploy["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    port = next(p for p in container["ports"] if p["name"] == "http")["containerPort"]
    assert port == settings.port
    routes = set(create_app(settings).openapi()["paths"])
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz" in routes
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz" in routes
    assert container["startupProbe"]["httpGet"]["path"] == "/readyz"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120  # model load + warm-up on a cold node
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    from app.http.shutdown import ANSWER_FLUSH_S, UVICORN_GRACE_S

    assert pod["terminationGracePeriodSeconds"] >= pre_stop + settings.shutdown_grace_s + ANSWER_FLUSH_S + \
        UVICORN_GRACE_S
    assert container["securityContext"]["readOnlyRootFilesystem"] and pod["securityContext"]["runAsNonRoot"]
    assert any(m["mountPath"] == "/tmp" for m in container["volumeMounts"])  # the only writable path
    key_file = settings_map["DMFNET_API_KEY_FILE"]
    assert any(key_file.startswith(m["mountPath"]) for m in container["volumeMounts"] if m["name"] == "api-key")
    service = docs[("Service", "dmfnet")]
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    hpa = docs[("HorizontalPodAutoscaler", "dmfnet")]
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert metric in {m.name for m in ServiceMetrics().registry.collect()}  # a gauge the service exports
    rules = yaml.safe_load((K8S / "prometheus-adapter" / "rules.yaml").read_text())["rules"]
    assert any(r["name"]["as"] == metric for r in rules)
    watcher = docs[("Deployment", "dmfnet-pacs-watch")]
    assert watcher["spec"]["replicas"] == 1 and watcher["spec"]["strategy"]["type"] == "Recreate"
    (watch,) = watcher["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in watch["env"] if "value" in e}
    from app.pacs.config import PacsSettings

    keys = {k.removeprefix("DMFNET_PACS_").lower(): v for k, v in env.items() if not k.endswith("_KEY_FILE")}
    pacs = PacsSettings(**{k: v for k, v in keys.items() if "__" not in k},
                        watch={k.split("__")[1]: v for k, v in keys.items() if k.startswith("watch__")})
    health = next(p for p in watch["ports"] if p["name"] == "health")["containerPort"]
    assert pacs.watch.health_port == health and pacs.watch.since == "7d"  # every key is a real setting
    assert watch["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    monitor = docs[("PodMonitor", "dmfnet-pacs-watch")]
    assert monitor["spec"]["podMetricsEndpoints"][0] == {"port": "health", "path": "/metrics", "interval": "30s"}
    if path.endswith("gpu"):
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1" and settings.precision == "bf16"

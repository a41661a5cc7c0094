"""LeaderWorkerSet and leader Service manifests of one vLLM deployment (pure: plain dicts).

One LWS group is one model replica spanning `nodesPerGroup` GPU nodes, one pod per node using
all of the node's GPUs. The leader (worker index 0) runs the HTTP API and rank 0; workers run
`vllm serve --headless` with their rank. Everything here is derived from an `EngineSpec`, so
components/vllm_deployment.py only adds namespaces, Secrets and Pulumi options.
"""

from __future__ import annotations

import math
from typing import Any, Final

from components.render.vision_flags import disaggregated, vision_mounts, vision_volumes
from components.render.vllm_command import (
    CACHE_MOUNT_PATH,
    LEADER,
    WORKER,
    EngineSpec,
    Role,
    build_vllm_command,
    build_vllm_env,
    rendezvous_target,
    served_model_name,
    startup_budget_seconds,
)
from stacks.catalog import GIB, MIB
from stacks.naming import (
    DEPLOYMENT_LABEL,
    EFA_LABEL,
    EFA_RESOURCE,
    ENGINE_COMPONENT,
    ENGINE_ROLE_LABEL,
    GPU_RESOURCE,
    GPU_TAINT_EFFECT,
    GPU_TAINT_KEY,
    GPU_TAINT_VALUE,
    HUGEPAGES_RESOURCE,
    LWS_NAME_LABEL,
    LWS_WORKER_INDEX_LABEL,
    MODEL_LABEL,
    NODE_GROUP_LABEL,
    VLLM_HEALTH_PATH,
    VLLM_PORT,
    VLLM_PORT_NAME,
    common_labels,
    leader_service_name,
    lws_name,
)
from stacks.pod_sizing import pod_cpu, pod_memory_gib, shm_size_bytes
from stacks.schema import DeploymentSettings

LWS_API_VERSION: Final = "leaderworkerset.x-k8s.io/v1"
LWS_KIND: Final = "LeaderWorkerSet"
EXCLUSIVE_TOPOLOGY_ANNOTATION: Final = "leaderworkerset.sigs.k8s.io/exclusive-topology"
CONTAINER_NAME: Final = "vllm"
SHM_VOLUME: Final = "dshm"
CACHE_VOLUME: Final = "model-cache"
# Node-local weights cache on the root volume (gpuNodeGroups[].diskGib is sized for it).
NODE_CACHE_PATH: Final = "/var/lib/qwen-vl-serving/cache"

EFA_HUGEPAGES_REQUEST: Final = "5120Mi"

# Probes. /health is open even when VLLM_API_KEY is set, and answers 503 once the engine is
# dead; /v1/models would need the key (docs/reference/vllm.md#open-paths).
PROBE_PERIOD_SECONDS: Final = 10
PROBE_TIMEOUT_SECONDS: Final = 5
LIVENESS_PERIOD_SECONDS: Final = 15
LIVENESS_TIMEOUT_SECONDS: Final = 10
LIVENESS_FAILURES: Final = 4
# Readiness is the group check (GROUP_READY_SCRIPT, docs/engines.md#failure-modes): /health alone
# stays 200 while a worker rank is dead or hung (docs/reference/vllm.md#failure-detection).
# Worst case from a rank's hang under load to "not ready": the first probe after the hang sees
# the last step (<= 1 period), the first probe with no step for more than READY_STALL_SECONDS
# comes 2 periods later, then READINESS_FAILURES - 1 more: 10 + 20 + 2 x 10 = 50 s < 60 s.
# 3 failures in a row, not 2: on 2 saturated cores single checks took up to 10 s (measured).
READINESS_FAILURES: Final = 3
READINESS_TIMEOUT_SECONDS: Final = 10
# the script's own deadline for all of its requests; the rest of the timeout is for starting
# the interpreter on a busy node (measured: one run took > 10 s on 2 saturated cores)
READY_BUDGET_SECONDS: Final = 6
READY_STALL_SECONDS: Final = 15  # requests in flight and no engine step for this long: hung
READY_STATE_FILE: Final = "/tmp/vllm-group-ready.json"
PYTHON: Final = "python3"  # on PATH in the vLLM image (the engine's own interpreter)

# Worker pods' rendezvous pre-check (an init container, RENDEZVOUS_CHECK_SCRIPT).
RENDEZVOUS_CHECK_NAME: Final = "rendezvous-check"
RENDEZVOUS_RETRY_SECONDS: Final = 2
RENDEZVOUS_CHECK_RESOURCES: Final = {"cpu": "100m", "memory": "128Mi"}

# The leader's readiness check, run by the kubelet as `python3 -c GROUP_READY_SCRIPT --port P
# --model NAME --stall-seconds S --budget-seconds B --state FILE` inside the leader container
# (stdlib only; the container's env has VLLM_API_KEY). Fails (exit 1, reason on stdout) when:
# * /health does not answer 200 (the server is down or the engine declared itself dead);
# * requests are in flight (vllm:num_requests_running + _waiting > 0) and vLLM's step counter
#   (vllm:iteration_tokens_total_count) has not moved for --stall-seconds: a hung rank;
# * the engine is idle and a 1-token completion does not succeed within the budget: a dead rank
#   answers 500 at once (and the leader's server then exits), a hung one not at all. Only an
#   idle engine gets this request, so a busy engine is never judged by a queued probe.
# The last step count and when it last moved live in FILE between runs.
GROUP_READY_SCRIPT: Final = """\
import json, os, sys, time, urllib.error, urllib.request
a = dict(zip(sys.argv[1::2], sys.argv[2::2]))
base = "http://127.0.0.1:" + a["--port"]
stall = float(a["--stall-seconds"])
end = time.monotonic() + float(a["--budget-seconds"])
path = a["--state"]
def left():
    return max(0.5, end - time.monotonic())
def save(state):
    with open(path + ".tmp", "w") as f:
        json.dump(state, f)
    os.replace(path + ".tmp", path)
def fail(why):
    print("group not ready: " + why)
    sys.exit(1)
def get(p):
    try:
        with urllib.request.urlopen(base + p, timeout=left()) as r:
            return r.read().decode()
    except urllib.error.HTTPError as e:
        fail(p + " answered " + str(e.code))
    except OSError as e:
        fail(p + ": " + str(e))
get("/health")
text = get("/metrics")
def total(name):
    return sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines()
               if l.startswith(name + "{") or l.startswith(name + " "))
busy = total("vllm:num_requests_running") + total("vllm:num_requests_waiting")
steps = total("vllm:iteration_tokens_total_count")
now = time.time()
try:
    with open(path) as f:
        state = json.load(f)
except (OSError, ValueError):
    state = {}
if busy:
    if state.get("steps") != steps:
        save({"steps": steps, "since": now})
    elif now - state["since"] > stall:
        fail("%g requests in flight and no engine step for %.0f s (a hung rank?)"
             % (busy, now - state["since"]))
    print("ok: busy")
    sys.exit(0)
body = json.dumps({"model": a["--model"], "prompt": [0], "max_tokens": 1}).encode()
req = urllib.request.Request(base + "/v1/completions", data=body, headers={
    "Content-Type": "application/json",
    "Authorization": "Bearer " + os.environ.get("VLLM_API_KEY", "")})
try:
    with urllib.request.urlopen(req, timeout=left()) as r:
        r.read()
except (OSError, ValueError) as e:
    save({"steps": steps, "since": now - stall - 1})  # stalled until a step proves otherwise
    fail("idle, and a 1-token completion failed: " + str(e) + " (a dead or hung rank?)")
save({"steps": steps, "since": now})
print("ok: idle, a 1-token completion succeeded")
"""

# The worker pods' init container: `python3 -c RENDEZVOUS_CHECK_SCRIPT --master-addr A
# --master-port P --timeout-seconds T --retry-seconds R`, with A and P taken from the worker's
# own vLLM argv. Waits until A resolves and something accepts a TCP connection at A:P (rank 0's
# rendezvous store, up once the leader's vLLM has started), at most T seconds; then fails with
# a message naming both flags and the leader address. vLLM itself would retry for
# --distributed-timeout-seconds (the startup budget, up to 90 min) without saying why.
RENDEZVOUS_CHECK_SCRIPT: Final = """\
import socket, sys, time
a = dict(zip(sys.argv[1::2], sys.argv[2::2]))
addr, port = a["--master-addr"], int(a["--master-port"])
timeout, retry = float(a["--timeout-seconds"]), float(a["--retry-seconds"])
start = time.monotonic()
end = start + timeout
last = "no attempt"
while True:
    try:
        with socket.create_connection((addr, port), timeout=max(1.0, min(5.0, end - time.monotonic()))):
            print("rendezvous pre-check: %s:%d accepts connections after %.0f s"
                  % (addr, port, time.monotonic() - start))
            sys.exit(0)
    except socket.gaierror as e:
        last = "--master-addr %s does not resolve (%s)" % (addr, e)
    except OSError as e:
        last = "nothing accepts connections at --master-addr %s --master-port %d (%s)" % (addr, port, e)
    left = end - time.monotonic()
    if left <= 0:
        break
    time.sleep(min(retry, left))
print("rendezvous pre-check failed after %.0f s: %s. vLLM's rank 0 on the leader (%s) listens on "
      "--master-port %d once it has started; check that the worker's --master-addr / --master-port "
      "match the leader's and that the leader pod is running."
      % (time.monotonic() - start, last, addr, port), file=sys.stderr)
sys.exit(1)
"""

# Drain (llm-d's graceful-shutdown recipe, docs/reference/peers.md#graceful-drain): the leader waits
# for endpoint removal to reach the gateway, then vLLM drains for --shutdown-timeout. Workers must
# outlive that drain, or the leader's in-flight requests lose their ranks mid-collective.
PRESTOP_SECONDS: Final = 15
TERMINATION_MARGIN_SECONDS: Final = 15


# --- sizing ---------------------------------------------------------------------------------------


def shm_bytes(spec: EngineSpec) -> int:
    return shm_size_bytes(spec.deployment, spec.min_shm_bytes)


def quantity(n_bytes: int) -> str:
    """A Kubernetes quantity in binary units: 8 GiB → "8Gi"."""
    for suffix, unit in (("Gi", GIB), ("Mi", MIB)):
        if n_bytes % unit == 0:
            return f"{n_bytes // unit}{suffix}"
    return str(n_bytes)


def build_resources(spec: EngineSpec) -> dict[str, Any]:
    """Requests == limits on leader and workers alike: every pod owns a whole node."""
    d, instance = spec.deployment, spec.instance
    amounts: dict[str, str] = {
        "cpu": str(pod_cpu(d, instance)),
        "memory": f"{pod_memory_gib(d, instance, spec.efa)}Gi",
        GPU_RESOURCE: str(instance.gpus),
    }
    if spec.efa:
        amounts[EFA_RESOURCE] = str(instance.efa_interfaces)
        amounts[HUGEPAGES_RESOURCE] = EFA_HUGEPAGES_REQUEST
    return {"requests": dict(amounts), "limits": dict(amounts)}


def termination_grace_seconds(d: DeploymentSettings) -> int:
    return worker_prestop_seconds(d) + TERMINATION_MARGIN_SECONDS


def worker_prestop_seconds(d: DeploymentSettings) -> int:
    return PRESTOP_SECONDS + d.shutdown_timeout_seconds


# --- pods -----------------------------------------------------------------------------------------


def deployment_labels(d: DeploymentSettings) -> dict[str, str]:
    """Labels of everything one deployment creates (Redis's NetworkPolicy selects on them)."""
    return {**common_labels(ENGINE_COMPONENT, d.name), DEPLOYMENT_LABEL: d.name}


def pod_labels(spec: EngineSpec, role: Role) -> dict[str, str]:
    return {**deployment_labels(spec.deployment), ENGINE_ROLE_LABEL: role}


def build_container(spec: EngineSpec, role: Role) -> dict[str, Any]:
    d = spec.deployment
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": spec.serving.vllm_image,
        "imagePullPolicy": "IfNotPresent",
        # exec form: vllm is PID 1, so SIGTERM reaches it and its exit fails the container
        "command": build_vllm_command(d, role),
        "env": build_vllm_env(spec, role),
        "resources": build_resources(spec),
        "volumeMounts": [
            {"name": SHM_VOLUME, "mountPath": "/dev/shm"},
            {"name": CACHE_VOLUME, "mountPath": CACHE_MOUNT_PATH},
        ],
        "lifecycle": {"preStop": {"sleep": {"seconds": _prestop_seconds(d, role)}}},
    }
    if disaggregated(d):
        container["volumeMounts"] += vision_mounts()
    if spec.efa:
        # libfabric pins (mlocks) its EFA buffers
        container["securityContext"] = {"capabilities": {"add": ["IPC_LOCK"]}}
    if role == LEADER:
        container["ports"] = [
            {"name": VLLM_PORT_NAME, "containerPort": VLLM_PORT, "protocol": "TCP"}
        ]
        container |= leader_probes(d)
    # Workers get no probes: `vllm serve --headless` has no HTTP server, and its process is the
    # container's PID 1, which exits within ~2 s when one of its GPU worker processes dies
    # (measured, docs/engines.md#failure-modes), so a dead rank fails the pod and LWS
    # recreates the group. A hung rank is seen by the leader's readiness (GROUP_READY_SCRIPT).
    return container


def build_rendezvous_check(spec: EngineSpec) -> dict[str, Any]:
    """The worker pods' init container: a bounded wait for the leader's rendezvous port."""
    d = spec.deployment
    addr, port = rendezvous_target(build_vllm_command(d, WORKER))
    command = [
        PYTHON, "-c", RENDEZVOUS_CHECK_SCRIPT,
        "--master-addr", addr,
        "--master-port", port,
        "--timeout-seconds", str(d.rendezvous_timeout_seconds),
        "--retry-seconds", str(RENDEZVOUS_RETRY_SECONDS),
    ]  # fmt: skip
    return {
        "name": RENDEZVOUS_CHECK_NAME,
        "image": spec.serving.vllm_image,
        "imagePullPolicy": "IfNotPresent",
        "command": command,
        # the same MASTER_ADDR (from LWS_LEADER_ADDRESS, which LWS injects into init containers
        # too) that the vLLM container's argv expands
        "env": build_vllm_env(spec, WORKER),
        "resources": {
            "requests": dict(RENDEZVOUS_CHECK_RESOURCES),
            "limits": dict(RENDEZVOUS_CHECK_RESOURCES),
        },
        # the message shows in `kubectl describe pod` (Last State: Terminated, Message)
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def _prestop_seconds(d: DeploymentSettings, role: Role) -> int:
    return PRESTOP_SECONDS if role == LEADER else worker_prestop_seconds(d)


def group_ready_command(d: DeploymentSettings) -> list[str]:
    """The leader's readiness check (GROUP_READY_SCRIPT) as an exec probe command."""
    return [
        PYTHON, "-c", GROUP_READY_SCRIPT,
        "--port", str(VLLM_PORT),
        "--model", served_model_name(d),
        "--stall-seconds", str(READY_STALL_SECONDS),
        "--budget-seconds", str(READY_BUDGET_SECONDS),
        "--state", READY_STATE_FILE,
    ]  # fmt: skip


def leader_probes(d: DeploymentSettings) -> dict[str, Any]:
    def http(period: int, timeout: int, failures: int) -> dict[str, Any]:
        return {
            "httpGet": {"path": VLLM_HEALTH_PATH, "port": VLLM_PORT_NAME},
            "periodSeconds": period,
            "timeoutSeconds": timeout,
            "failureThreshold": failures,
        }

    # The API only listens once every rank has joined and the weights are loaded, so the
    # startup probe alone carries the download + load + warmup budget.
    startup_failures = math.ceil(startup_budget_seconds(d) / PROBE_PERIOD_SECONDS)
    return {
        "startupProbe": http(PROBE_PERIOD_SECONDS, PROBE_TIMEOUT_SECONDS, startup_failures),
        # the whole group: a dead or hung rank (docs/engines.md#failure-modes)
        "readinessProbe": {
            "exec": {"command": group_ready_command(d)},
            "periodSeconds": PROBE_PERIOD_SECONDS,
            "timeoutSeconds": READINESS_TIMEOUT_SECONDS,
            "failureThreshold": READINESS_FAILURES,
        },
        # the server process: restarts a leader whose server hangs (a dead engine exits by itself)
        "livenessProbe": http(LIVENESS_PERIOD_SECONDS, LIVENESS_TIMEOUT_SECONDS, LIVENESS_FAILURES),
    }


def build_volumes(spec: EngineSpec) -> list[dict[str, Any]]:
    volumes: list[dict[str, Any]] = [
        # NCCL and vLLM's shm broadcast queues live here; Docker's 64 MiB breaks TP > 1
        {
            "name": SHM_VOLUME,
            "emptyDir": {"medium": "Memory", "sizeLimit": quantity(shm_bytes(spec))},
        },
    ]
    if spec.deployment.weights.cache == "node":
        volumes.append(
            {
                "name": CACHE_VOLUME,
                "hostPath": {"path": NODE_CACHE_PATH, "type": "DirectoryOrCreate"},
            }
        )
    if disaggregated(spec.deployment):
        volumes += vision_volumes()
    # cache "pvc": the LWS volumeClaimTemplates entry of the same name provides the volume
    return volumes


def build_node_selector(spec: EngineSpec) -> dict[str, str]:
    """The deployment's node group; on EFA groups also the EFA label, so a group whose EFA
    was switched off leaves the pods pending instead of running NCCL over TCP."""
    selector = {NODE_GROUP_LABEL: spec.node_group.name}
    if spec.node_group.efa:
        selector[EFA_LABEL] = "true"
    return selector


def build_pod_template(spec: EngineSpec, role: Role) -> dict[str, Any]:
    d = spec.deployment
    template: dict[str, Any] = {
        "metadata": {"labels": pod_labels(spec, role)},
        "spec": {
            # a Service named `vllm` would inject VLLM_PORT=tcp://... and stop vLLM
            # (docs/reference/peers.md#service-links)
            "enableServiceLinks": False,
            "automountServiceAccountToken": False,
            "terminationGracePeriodSeconds": termination_grace_seconds(d),
            "nodeSelector": build_node_selector(spec),
            "tolerations": [
                {
                    "key": GPU_TAINT_KEY,
                    "operator": "Equal",
                    "value": GPU_TAINT_VALUE,
                    "effect": GPU_TAINT_EFFECT,
                }
            ],
            "containers": [build_container(spec, role)],
            "volumes": build_volumes(spec),
        },
    }
    if role == WORKER:
        # a wrong --master-addr/--master-port fails here, in minutes, naming both
        template["spec"]["initContainers"] = [build_rendezvous_check(spec)]
    return template


# --- LeaderWorkerSet ------------------------------------------------------------------------------


def build_lws_metadata(spec: EngineSpec) -> dict[str, Any]:
    d = spec.deployment
    metadata: dict[str, Any] = {
        "name": lws_name(d.name),
        "labels": deployment_labels(d),
        "annotations": {MODEL_LABEL: f"{d.model}@{d.revision}"},
    }
    if spec.multi_node:
        # A group's pods share one node group (one EFA placement group) and no other group
        # lands there (LWS exclusive placement; stacks.rules keeps one group per node group).
        metadata["annotations"][EXCLUSIVE_TOPOLOGY_ANNOTATION] = NODE_GROUP_LABEL
    return metadata


def build_lws_spec(spec: EngineSpec) -> dict[str, Any]:
    d = spec.deployment
    template: dict[str, Any] = {
        "size": spec.nodes,
        "restartPolicy": restart_policy(spec),
    }
    if spec.multi_node:
        template["leaderTemplate"] = build_pod_template(spec, LEADER)
        template["workerTemplate"] = build_pod_template(spec, WORKER)
    else:
        # without a leaderTemplate LWS runs the worker template as the (only) leader pod
        template["workerTemplate"] = build_pod_template(spec, LEADER)
    if d.weights.cache == "pvc":
        template["volumeClaimTemplates"] = [_cache_claim(d)]
    return {
        "replicas": d.replicas,
        # Not LeaderReady: the leader's HTTP server (and so its readiness) only comes up after
        # every worker has joined the rendezvous, so waiting for it to create workers deadlocks.
        "startupPolicy": "LeaderCreated",
        # One group at a time, no surge: a surge group would need a spare set of GPU nodes.
        "rolloutStrategy": {
            "type": "RollingUpdate",
            "rollingUpdateConfiguration": {"maxUnavailable": 1, "maxSurge": 0},
        },
        # Shared: leader addresses are <lws>-<group>.<lws>.<ns> (stacks.naming.leader_address)
        "networkConfig": {"subdomainPolicy": "Shared"},
        "leaderWorkerTemplate": template,
    }


def restart_policy(spec: EngineSpec) -> str:
    """LWS restart policy (v0.10.0 semantics: docs/reference/lws.md#restart-policy).

    A multi-node engine cannot lose a rank and live: any container restart (init containers
    included) or pod deletion in the group deletes the leader pod, and with it the whole group,
    which LWS then creates anew. `RecreateGroupAfterStart` does that only once no pod of the
    group is Pending, so a worker whose rendezvous pre-check gives up while the leader is still
    pulling its image retries in place instead of deleting the leader mid-pull (which
    `RecreateGroupOnPodRestart` would do). A one-pod group gains nothing from recreation and
    loses its crash logs (aws-samples/aws-do-eks#68), so its container restarts in place.
    """
    return "RecreateGroupAfterStart" if spec.multi_node else "None"


def _cache_claim(d: DeploymentSettings) -> dict[str, Any]:
    return {
        "metadata": {"name": CACHE_VOLUME},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": d.weights.storage_class,
            "resources": {"requests": {"storage": f"{d.weights.pvc_size_gib}Gi"}},
        },
    }


def build_lws(spec: EngineSpec) -> dict[str, Any]:
    """The whole LeaderWorkerSet object (without its namespace)."""
    return {
        "apiVersion": LWS_API_VERSION,
        "kind": LWS_KIND,
        "metadata": build_lws_metadata(spec),
        "spec": build_lws_spec(spec),
    }


# --- leader Service -------------------------------------------------------------------------------


def build_leader_service(spec: EngineSpec) -> dict[str, Any]:
    """Headless Service over the ready leaders only: the gateway's upstream and the scrape target."""
    d = spec.deployment
    # the labels LWS itself puts on leader pods (and selects them by for HPA)
    leaders = {LWS_NAME_LABEL: lws_name(d.name), LWS_WORKER_INDEX_LABEL: "0"}
    return headless_vllm_service(leader_service_name(d.name), deployment_labels(d), leaders)


def headless_vllm_service(
    name: str, labels: dict[str, str], selector: dict[str, str]
) -> dict[str, Any]:
    """A headless Service over the ready pods of `selector`, on vLLM's HTTP port."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "labels": labels,
            # Pulumi would wait for endpoints, i.e. for a model load of up to an hour
            "annotations": {"pulumi.com/skipAwait": "true"},
        },
        "spec": {
            "clusterIP": "None",
            "selector": selector,
            "ports": [
                {
                    "name": VLLM_PORT_NAME,
                    "port": VLLM_PORT,
                    "targetPort": VLLM_PORT_NAME,
                    "protocol": "TCP",
                }
            ],
            "publishNotReadyAddresses": False,
        },
    }

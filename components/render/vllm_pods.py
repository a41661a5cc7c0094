"""LeaderWorkerSet and leader Service manifests of one vLLM deployment (pure: plain dicts).

One LWS group is one model replica spanning `nodesPerGroup` GPU nodes, one pod per node using
all of the node's GPUs. The leader (worker index 0) runs the HTTP API and rank 0; workers run
`vllm serve --headless` with their rank. Everything here is derived from an `EngineSpec`, so
components/vllm_deployment.py only adds namespaces, Secrets and Pulumi options.
"""

from __future__ import annotations

import math
from typing import Any, Final

from components.render.vllm_command import (
    CACHE_MOUNT_PATH,
    LEADER,
    WORKER,
    EngineSpec,
    Role,
    build_vllm_command,
    build_vllm_env,
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
READINESS_FAILURES: Final = 3
LIVENESS_PERIOD_SECONDS: Final = 15
LIVENESS_TIMEOUT_SECONDS: Final = 10
LIVENESS_FAILURES: Final = 4

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
    if spec.efa:
        # libfabric pins (mlocks) its EFA buffers
        container["securityContext"] = {"capabilities": {"add": ["IPC_LOCK"]}}
    if role == LEADER:
        container["ports"] = [
            {"name": VLLM_PORT_NAME, "containerPort": VLLM_PORT, "protocol": "TCP"}
        ]
        container |= leader_probes(d)
    # Workers get no probes: `vllm serve --headless` has no HTTP server, and its process is
    # the container's PID 1, so a crash already fails the pod and LWS recreates the group. A
    # hung rank stalls the leader's collectives; the leader's liveness probe sees that only
    # once vLLM declares the engine dead (/health 503), presumably when the mp executor's RPC
    # timeout (VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS, 300 s) fires: inferred, not observed.
    return container


def _prestop_seconds(d: DeploymentSettings, role: Role) -> int:
    return PRESTOP_SECONDS if role == LEADER else worker_prestop_seconds(d)


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
        "readinessProbe": http(PROBE_PERIOD_SECONDS, PROBE_TIMEOUT_SECONDS, READINESS_FAILURES),
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
    return {
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
        # A multi-node engine cannot lose a rank and live, so any pod failure restarts the
        # whole group. A one-pod group gains nothing from that and loses its crash logs
        # (aws-samples/aws-do-eks#68), so its container restarts in place.
        "restartPolicy": "RecreateGroupOnPodRestart" if spec.multi_node else "None",
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
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": leader_service_name(d.name),
            "labels": deployment_labels(d),
            # Pulumi would wait for endpoints, i.e. for a model load of up to an hour
            "annotations": {"pulumi.com/skipAwait": "true"},
        },
        "spec": {
            "clusterIP": "None",
            # the labels LWS itself puts on leader pods (and selects them by for HPA)
            "selector": {LWS_NAME_LABEL: lws_name(d.name), LWS_WORKER_INDEX_LABEL: "0"},
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

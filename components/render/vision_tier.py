"""The vision tier of a deployment (pure: plain dicts and strings, no Pulumi).

With `vision.mode: disaggregated` (docs/vision.md) a deployment gets:
- an encoder tier: a Deployment of encoder-only vLLM pods (`ec_producer`, which implies
  `--mm-encoder-only`) on GPU nodes, its headless Service (the gateway's encoder upstream), a
  PodMonitor and a KEDA ScaledObject on its own queue;
- its engines become `ec_consumer`s: the same EC transfer config, reading what the encoders
  wrote (engine_flags in vllm_command.py and the mounts in vllm_pods.py call in here);
- the shared vision cache: one ReadWriteMany claim on EFS, mounted by encoders and engines at
  VISION_CACHE_MOUNT; each deployment and model revision writes under its own directory, since
  vLLM keys encoder outputs by the image alone (docs/reference/vision-tier.md#layout);
- our connector (qwen_vl_ec_connector.py, atomic writes and checked reads) in a ConfigMap on
  PYTHONPATH, named by `ec_connector_module_path`; the stock vLLM image needs nothing else;
- an expiry CronJob that deletes outputs idle longer than the TTL and bounds the volume.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Final

from components.render.alert_rules import selector
from components.render.scrape_config import DEPLOYMENT, JOB_ENCODER
from components.render.vision_flags import (
    CONNECTOR_MODULE,
    PRODUCER,
    VISION_CACHE_VOLUME,
    cache_dir,
    connector_env,
    ec_transfer_config,
    vision_mounts,
    vision_volumes,
)
from components.render.vllm_command import (
    CACHE_MOUNT_PATH,
    HF_HOME_PATH,
    QUIET_ENDPOINTS,
    VLLM_CACHE_PATH,
    EngineSpec,
    image_guard_flags,
    served_model_name,
    startup_budget_seconds,
)
from components.render.vllm_pods import (
    CACHE_VOLUME,
    LIVENESS_FAILURES,
    NODE_CACHE_PATH,
    PROBE_PERIOD_SECONDS,
    PROBE_TIMEOUT_SECONDS,
    PYTHON,
    headless_vllm_service,
)
from stacks.catalog import GIB
from stacks.naming import (
    DEPLOYMENT_LABEL,
    EC_CONNECTOR_CONFIGMAP,
    EFS_PROVISIONER,
    ENCODER_COMPONENT,
    ENGINE_API_KEY_ENTRY,
    GPU_RESOURCE,
    GPU_TAINT_EFFECT,
    GPU_TAINT_KEY,
    GPU_TAINT_VALUE,
    HF_TOKEN_ENTRY,
    NODE_GROUP_LABEL,
    VISION_CACHE_CLAIM,
    VISION_CACHE_COMPONENT,
    VISION_CACHE_MOUNT,
    VISION_CACHE_STORAGE_CLASS,
    VLLM_HEALTH_PATH,
    VLLM_METRICS_PATH,
    VLLM_PORT,
    VLLM_PORT_NAME,
    common_labels,
    encoder_name,
    vision_expiry_name,
)
from stacks.schema import DeploymentSettings

CONNECTOR_SOURCE: Final = Path(__file__).with_name("qwen_vl_ec_connector.py")
ENCODER_CONTAINER: Final = "encoder"
# Encoder pods probe /health like the engines' leaders (vllm_pods.py); one pod is one engine,
# so /health alone is its readiness. The startup probe allows the deployment's startup budget
# for a cold image pull and weight download.
READINESS_FAILURES: Final = 2

# Expiry job: temporary files older than this are a writer that died mid-write.
STALE_TEMP_SECONDS: Final = 3600
# After a sweep over the bound, stop at this share of it so the next writes do not
# trigger another sweep at once.
SIZE_LOW_WATER: Final = 0.9
EXPIRY_RESOURCES: Final = {"cpu": "100m", "memory": "256Mi"}
EXPIRY_DEADLINE_SECONDS: Final = 600

# The expiry job, run as `python3 -c EXPIRY_SCRIPT --root DIR --ttl-seconds T --max-bytes B
# --stale-temp-seconds S --low-water W` in the vLLM image (stdlib only). Deletes encoder outputs
# unused for T seconds (the connector refreshes a file's mtime on every hit, so mtime is the
# last use), temporary files of dead writers, then the least recently used outputs until the
# total is under W x B, and empty folders. Prints what it did as one JSON line (the Job log).
EXPIRY_SCRIPT: Final = """\
import json, os, sys, time
a = dict(zip(sys.argv[1::2], sys.argv[2::2]))
root, ttl, cap = a["--root"], float(a["--ttl-seconds"]), int(a["--max-bytes"])
stale, low = float(a["--stale-temp-seconds"]), float(a["--low-water"])
now = time.time()
kept, report = [], {"expired": 0, "stale_temp": 0, "evicted": 0, "folders": 0}
def unlink(path, key):
    try:
        os.unlink(path)
        report[key] += 1
    except FileNotFoundError:
        pass
for folder, dirs, files in os.walk(root, topdown=False):
    for name in files:
        path = os.path.join(folder, name)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            continue
        if name.endswith(".tmp"):
            if now - st.st_mtime > stale:
                unlink(path, "stale_temp")
        elif now - st.st_mtime > ttl:
            unlink(path, "expired")
        else:
            kept.append((st.st_mtime, st.st_size, path))
    if folder != root and not os.listdir(folder) and now - os.stat(folder).st_mtime > stale:
        try:
            os.rmdir(folder)
            report["folders"] += 1
        except OSError:
            pass
total = sum(size for _, size, _ in kept)
if total > cap:
    for mtime, size, path in sorted(kept):
        if total <= cap * low:
            break
        unlink(path, "evicted")
        total -= size
report.update(files=len(kept) - report["evicted"], bytes=total, max_bytes=cap)
print(json.dumps(report))
"""


def encoder_command(d: DeploymentSettings) -> list[str]:
    """`vllm serve` of one encoder pod: the engine's model, encoder-only (producer)."""
    return [
        "vllm", "serve", d.weights.s3_uri or d.model,
        *([] if d.weights.s3_uri else ["--revision", d.revision]),
        "--served-model-name", served_model_name(d),
        "--tensor-parallel-size", str(d.vision.gpus_per_encoder),
        "--dtype", d.dtype,
        "--max-model-len", str(d.max_model_len),
        "--limit-mm-per-prompt", json.dumps(dict(d.limit_mm_per_prompt), separators=(",", ":")),
        "--mm-processor-cache-gb", _number(d.mm_processor_cache_gb),
        *image_guard_flags(d),
        "--shutdown-timeout", str(d.shutdown_timeout_seconds),
        "--port", str(VLLM_PORT),
        "--disable-access-log-for-endpoints", ",".join(QUIET_ENDPOINTS),
        "--ec-transfer-config", ec_transfer_config(d, PRODUCER),
        "--enable-request-id-headers",
        *(["--load-format", "runai_streamer"] if d.weights.s3_uri else []),
    ]  # fmt: skip


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


# --- what engines and encoders mount --------------------------------------------------------------


def build_connector_configmap() -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": EC_CONNECTOR_CONFIGMAP,
            "labels": common_labels(VISION_CACHE_COMPONENT, EC_CONNECTOR_CONFIGMAP),
        },
        "data": {f"{CONNECTOR_MODULE}.py": CONNECTOR_SOURCE.read_text()},
    }


# --- the shared volume ----------------------------------------------------------------------------


def build_storage_class(file_system_id: str) -> dict[str, Any]:
    """EFS dynamic provisioning: one access point per volume (docs/reference/vision-tier.md#efs)."""
    return {
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": {"name": VISION_CACHE_STORAGE_CLASS},
        "provisioner": EFS_PROVISIONER,
        "parameters": {
            "provisioningMode": "efs-ap",
            "fileSystemId": file_system_id,
            # the access point's root: only its owner (the uid/gid the access point enforces)
            "directoryPerms": "700",
            "basePath": "/vision-cache",
        },
        "reclaimPolicy": "Delete",
        "volumeBindingMode": "Immediate",
    }


def build_cache_claim(max_size_gib: int) -> dict[str, Any]:
    """ReadWriteMany: every encoder and engine pod mounts it. EFS ignores the size (it grows
    with the data); the expiry job is what bounds it."""
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": VISION_CACHE_CLAIM,
            "labels": common_labels(VISION_CACHE_COMPONENT, VISION_CACHE_CLAIM),
            "annotations": {"pulumi.com/skipAwait": "true"},
        },
        "spec": {
            "accessModes": ["ReadWriteMany"],
            "storageClassName": VISION_CACHE_STORAGE_CLASS,
            "resources": {"requests": {"storage": f"{max_size_gib}Gi"}},
        },
    }


# --- the encoder tier -----------------------------------------------------------------------------


def encoder_labels(d: DeploymentSettings) -> dict[str, str]:
    return {**common_labels(ENCODER_COMPONENT, encoder_name(d.name)), DEPLOYMENT_LABEL: d.name}


def encoder_resources(spec: EngineSpec, gpus: int) -> dict[str, Any]:
    """The encoder pod's share of an encoder node: its GPUs' share of CPU and memory."""
    instance = spec.instance
    share = gpus / instance.gpus
    amounts = {
        "cpu": str(max(1, math.floor((instance.vcpus - 1) * share))),
        "memory": f"{max(1, math.floor((instance.memory_gib - 2) * share))}Gi",
        GPU_RESOURCE: str(gpus),
    }
    return {"requests": dict(amounts), "limits": dict(amounts)}


def _encoder_env(spec: EngineSpec) -> list[dict[str, Any]]:
    def secret(key: str) -> dict[str, Any]:
        return {
            "name": key,
            "valueFrom": {"secretKeyRef": {"name": spec.secret_name, "key": key}},
        }

    env = [
        {"name": "HF_HOME", "value": HF_HOME_PATH},
        {"name": "VLLM_CACHE_ROOT", "value": VLLM_CACHE_PATH},
        {"name": "OMP_NUM_THREADS", "value": "1"},
        connector_env(),
        secret(ENGINE_API_KEY_ENTRY),  # the gateway calls encoders with the engines' key
    ]
    return [*env, secret(HF_TOKEN_ENTRY)] if spec.hf_token else env


def _probes(d: DeploymentSettings) -> dict[str, Any]:
    def http(failures: int) -> dict[str, Any]:
        return {
            "httpGet": {"path": VLLM_HEALTH_PATH, "port": VLLM_PORT_NAME},
            "periodSeconds": PROBE_PERIOD_SECONDS,
            "timeoutSeconds": PROBE_TIMEOUT_SECONDS,
            "failureThreshold": failures,
        }

    return {
        "startupProbe": http(math.ceil(startup_budget_seconds(d) / PROBE_PERIOD_SECONDS)),
        "readinessProbe": http(READINESS_FAILURES),
        "livenessProbe": http(LIVENESS_FAILURES),
    }


def build_encoder_deployment(spec: EngineSpec, encoder_spec: EngineSpec) -> dict[str, Any]:
    """`spec` is the deployment's; `encoder_spec` the same deployment on the encoder node group."""
    d = spec.deployment
    labels = encoder_labels(d)
    container = {
        "name": ENCODER_CONTAINER,
        "image": spec.serving.vllm_image,
        "imagePullPolicy": "IfNotPresent",
        "command": encoder_command(d),
        "env": _encoder_env(spec),
        "resources": encoder_resources(encoder_spec, d.vision.gpus_per_encoder),
        "ports": [{"name": VLLM_PORT_NAME, "containerPort": VLLM_PORT, "protocol": "TCP"}],
        "volumeMounts": [
            {"name": CACHE_VOLUME, "mountPath": CACHE_MOUNT_PATH},
            *vision_mounts(),
        ],
        **_probes(d),
    }
    pod = {
        "metadata": {"labels": labels},
        "spec": {
            "enableServiceLinks": False,
            "automountServiceAccountToken": False,
            "terminationGracePeriodSeconds": d.shutdown_timeout_seconds + PROBE_PERIOD_SECONDS,
            "nodeSelector": {NODE_GROUP_LABEL: encoder_spec.node_group.name},
            "tolerations": [_gpu_toleration()],
            "containers": [container],
            "volumes": [
                {
                    "name": CACHE_VOLUME,
                    "hostPath": {"path": NODE_CACHE_PATH, "type": "DirectoryOrCreate"},
                },
                *vision_volumes(),
            ],
        },
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": encoder_name(d.name), "labels": labels},
        "spec": {
            "replicas": d.vision.encoders,
            "selector": {"matchLabels": labels},
            # a surge pod would need a spare GPU; one at a time keeps the rest serving
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0},
            },
            "template": pod,
        },
    }


def _gpu_toleration() -> dict[str, str]:
    return {
        "key": GPU_TAINT_KEY,
        "operator": "Equal",
        "value": GPU_TAINT_VALUE,
        "effect": GPU_TAINT_EFFECT,
    }


def build_encoder_service(d: DeploymentSettings) -> dict[str, Any]:
    """Headless, ready pods only: the gateway resolves it and balances over the encoders."""
    return headless_vllm_service(encoder_name(d.name), encoder_labels(d), encoder_labels(d))


# --- the expiry job -------------------------------------------------------------------------------


def expiry_command(d: DeploymentSettings) -> list[str]:
    c = d.vision.cache
    return [
        PYTHON, "-c", EXPIRY_SCRIPT,
        "--root", cache_dir(d).rsplit("/", 1)[0],  # every revision of the deployment
        "--ttl-seconds", str(c.ttl_hours * 3600),
        "--max-bytes", str(c.max_size_gib * GIB),
        "--stale-temp-seconds", str(STALE_TEMP_SECONDS),
        "--low-water", str(SIZE_LOW_WATER),
    ]  # fmt: skip


def build_expiry_cronjob(spec: EngineSpec, encoder_spec: EngineSpec) -> dict[str, Any]:
    """Runs on the encoder node group, in the vLLM image its nodes already hold."""
    d = spec.deployment
    labels = {
        **common_labels(VISION_CACHE_COMPONENT, vision_expiry_name(d.name)),
        DEPLOYMENT_LABEL: d.name,
    }
    container = {
        "name": "expire",
        "image": spec.serving.vllm_image,
        "imagePullPolicy": "IfNotPresent",
        "command": expiry_command(d),
        "resources": {"requests": dict(EXPIRY_RESOURCES), "limits": dict(EXPIRY_RESOURCES)},
        "volumeMounts": [{"name": VISION_CACHE_VOLUME, "mountPath": VISION_CACHE_MOUNT}],
    }
    pod = {
        "metadata": {"labels": labels},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "nodeSelector": {NODE_GROUP_LABEL: encoder_spec.node_group.name},
            "tolerations": [_gpu_toleration()],
            "containers": [container],
            "volumes": [vision_volumes()[0]],
        },
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": {"name": vision_expiry_name(d.name), "labels": labels},
        "spec": {
            "schedule": d.vision.cache.expiry_schedule,
            "timeZone": "Etc/UTC",
            "concurrencyPolicy": "Forbid",  # two sweeps would race over the same files
            "successfulJobsHistoryLimit": 1,
            "failedJobsHistoryLimit": 3,
            "jobTemplate": {
                "spec": {
                    "backoffLimit": 1,
                    "activeDeadlineSeconds": EXPIRY_DEADLINE_SECONDS,
                    "template": pod,
                }
            },
        },
    }


# --- monitoring and autoscaling -------------------------------------------------------------------


def encoder_queue_query(deployment: str) -> str:
    """Encoder requests waiting over all encoder pods of the deployment."""
    return f"sum({selector('vllm:num_requests_waiting', job=JOB_ENCODER, deployment=deployment)})"


def build_encoder_pod_monitor(
    d: DeploymentSettings, namespace: str, interval: str
) -> dict[str, Any]:
    """PodMonitor spec: every encoder pod, job `vllm-encoder`, with the deployment label."""
    return {
        "namespaceSelector": {"matchNames": [namespace]},
        "selector": {"matchLabels": encoder_labels(d)},
        "podMetricsEndpoints": [
            {
                "path": VLLM_METRICS_PATH,
                "port": VLLM_PORT_NAME,
                "interval": interval,
                "relabelings": [
                    {"action": "replace", "targetLabel": "job", "replacement": JOB_ENCODER},
                    {"action": "replace", "targetLabel": DEPLOYMENT, "replacement": d.name},
                ],
            }
        ],
    }


def build_encoder_scaled_object(
    d: DeploymentSettings, *, prometheus_url: str, polling_interval_seconds: int
) -> dict[str, Any]:
    """KEDA scales the encoder Deployment on its own queue, one pod per step."""
    a = d.vision.autoscaling
    name = encoder_name(d.name)
    return {
        "metadata": {"name": name, "labels": encoder_labels(d)},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "pollingInterval": polling_interval_seconds,
            "minReplicaCount": a.min_replicas,
            "maxReplicaCount": a.max_replicas,
            "triggers": [
                {
                    "type": "prometheus",
                    "name": "encoder-queue-depth",
                    "metricType": "AverageValue",
                    "metadata": {
                        "serverAddress": prometheus_url,
                        "query": encoder_queue_query(d.name),
                        "threshold": str(a.queue_depth_target),
                        "ignoreNullValues": "true",
                    },
                }
            ],
        },
    }

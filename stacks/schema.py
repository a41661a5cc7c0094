"""The typed, frozen settings of a stack: one dataclass per config section.

Every field carries its documentation in `setting(...)` metadata; the parser
(stacks/parse.py), the configuration reference (scripts/config_docs.py) and the
promotion script all read the schema from here, so it is written once.

Config keys are the camelCase form of the field names (`tensor_parallel` →
`tensorParallel`) under the project namespace (`qwen-vl-serving:serving`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

PROJECT = "qwen-vl-serving"

_MISSING: Any = dataclasses.MISSING


def setting(doc: str, default: Any = _MISSING, *, promotable: bool = False) -> Any:
    """A schema field: its documentation, default and whether promotion copies it.

    `promotable` marks values that describe *what* runs (images, model ids and
    revisions, serving options) as opposed to *how much* runs in a stack (sizes,
    counts, AZs, domains, secrets); python -m scripts.promote copies only the former.
    """
    metadata = {"doc": doc, "promotable": promotable}
    if default is _MISSING:
        return dataclasses.field(metadata=metadata)
    if isinstance(default, Mapping):
        # mappings are unhashable, which dataclasses reject as plain defaults
        return dataclasses.field(default_factory=lambda: default, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def default_of(f: dataclasses.Field[Any]) -> Any:
    """A field's default value, or MISSING when the field is required."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def frozen_map(**items: Any) -> Mapping[str, Any]:
    """An immutable mapping usable as a dataclass default."""
    return MappingProxyType(dict(items))


@dataclass(frozen=True)
class Secret:
    """A `secure:` config value. Never decrypted by the file loader, never printed.

    Under the Pulumi engine `value` holds the decrypted value wrapped as a secret
    Output; when a stack file is read directly it holds None and only the
    ciphertext's presence is known.
    """

    key: str
    value: Any = dataclasses.field(default=None, repr=False, compare=False)

    def __str__(self) -> str:
        return f"<secret {self.key}>"


Environment = Literal["dev", "staging", "prod"]
CapacityType = Literal["onDemand", "spot", "capacityBlock"]
KvCacheDtype = Literal["auto", "bfloat16", "float16", "fp8", "fp8_e4m3", "fp8_e5m2"]


@dataclass(frozen=True, kw_only=True)
class NetworkSettings:
    mode: Literal["new", "existing"] = setting(
        "Create a new VPC, or use an existing VPC and its subnets.", "new"
    )
    cidr: str = setting("IPv4 CIDR of a new VPC.", "10.0.0.0/16")
    availability_zones: tuple[str, ...] = setting(
        "Availability zones of a new VPC (mode new: at least 2, EKS needs two for its "
        "control plane; mode existing takes them from privateSubnetIds).",
        (),
    )
    nat_gateways: Literal["single", "perAz"] = setting(
        "One NAT gateway (cheap, dev) or one per AZ (survives an AZ outage, prod).", "single"
    )
    vpc_id: str | None = setting("Existing VPC id (mode existing).", None)
    private_subnet_ids: Mapping[str, str] = setting(
        "Existing private subnets, AZ → subnet id (mode existing). Nodes run here.", frozen_map()
    )
    public_subnet_ids: Mapping[str, str] = setting(
        "Existing public subnets, AZ → subnet id (mode existing), for internet-facing NLBs.",
        frozen_map(),
    )
    s3_endpoint: bool = setting(
        "Add an S3 gateway endpoint so model weights do not cross (and pay for) the NAT.", True
    )


@dataclass(frozen=True, kw_only=True)
class ClusterSettings:
    mode: Literal["new", "existing"] = setting(
        "Create a new EKS cluster, or deploy onto an existing one by name.", "new"
    )
    name: str = setting("EKS cluster name.")
    version: str = setting("Kubernetes version of a new cluster.", "1.33", promotable=True)
    endpoint_public_access: bool = setting("Expose the API server endpoint publicly.", True)
    endpoint_private_access: bool = setting("Expose the API server endpoint inside the VPC.", True)
    public_access_cidrs: tuple[str, ...] = setting(
        "CIDRs allowed to reach the public API endpoint.", ("0.0.0.0/0",)
    )
    admin_role_arns: tuple[str, ...] = setting(
        "IAM roles of the platform team granted cluster-admin through EKS access entries.", ()
    )


@dataclass(frozen=True, kw_only=True)
class SystemNodeSettings:
    instance_type: str = setting(
        "CPU instance type for the gateway, Redis and monitoring.", "m7i.xlarge"
    )
    min_size: int = setting("Minimum nodes.", 2)
    desired_size: int = setting("Initial nodes.", 2)
    max_size: int = setting("Maximum nodes.", 4)
    disk_gib: int = setting("Root volume (gp3) size.", 50)


@dataclass(frozen=True, kw_only=True)
class GpuNodeGroupSettings:
    name: str = setting("Node group name (DNS label); deployments refer to it.")
    instance_type: str = setting("GPU instance type (see the instance catalog).")
    capacity_type: CapacityType = setting(
        "On-demand, spot, or an EC2 Capacity Block for ML.", "onDemand"
    )
    capacity_reservation_id: str | None = setting(
        "Capacity reservation id (required for capacityBlock).", None
    )
    min_size: int = setting("Minimum nodes (0 lets Cluster Autoscaler scale from zero).", 0)
    desired_size: int = setting("Initial nodes.", 1)
    max_size: int = setting("Maximum nodes.", 1)
    efa: bool = setting(
        "Attach every EFA interface the type supports, in a cluster placement group in one AZ.",
        False,
    )
    availability_zone: str | None = setting(
        "Single AZ for the group (required with efa: EFA traffic does not cross subnets).", None
    )
    disk_gib: int = setting("Root volume (gp3) for the vLLM image and cached weights.", 300)
    labels: Mapping[str, str] = setting("Extra Kubernetes node labels.", frozen_map())


@dataclass(frozen=True, kw_only=True)
class WeightsSettings:
    cache: Literal["node", "pvc"] = setting(
        "Where HF_HOME lives: a node-local hostPath cache (survives pod restarts on the "
        "node) or a PersistentVolumeClaim per pod.",
        "node",
    )
    pvc_size_gib: int = setting("PVC size when cache is pvc.", 200)
    storage_class: str = setting("StorageClass of the PVC.", "gp3")
    s3_uri: str | None = setting(
        "Load weights from this S3 prefix with vLLM's Run:ai streamer instead of the Hub.",
        None,
        promotable=True,
    )


@dataclass(frozen=True, kw_only=True)
class DeploymentAutoscalingSettings:
    min_replicas: int = setting("Fewest groups KEDA keeps.", 1)
    max_replicas: int = setting("Most groups KEDA may run.", 1)
    queue_depth_target: int = setting(
        "Waiting requests per group (vllm:num_requests_waiting) that triggers a scale-up.", 5
    )
    kv_cache_usage_target: float | None = setting(
        "Optional second trigger: mean KV-cache usage (0-1) per group.", None
    )
    scale_to_zero: bool = setting("Allow zero groups when idle (cold starts take minutes).", False)
    scale_down_stabilization_seconds: int = setting(
        "Wait before removing a group, so groups that take minutes to load are not flapped.", 300
    )


@dataclass(frozen=True, kw_only=True)
class VisionCacheSettings:
    ttl_hours: int = setting(
        "Encoder outputs unused for this long are deleted by the expiry job (the seed's "
        "vision:<hash> TTL; a hit restarts the clock).",
        24,
    )
    max_size_gib: int = setting(
        "Bound on the shared volume: above it the expiry job deletes the least recently used "
        "files first.",
        100,
    )
    expiry_schedule: str = setting(
        "Cron schedule of the expiry job (five fields, UTC).", "*/15 * * * *"
    )
    throughput_mode: Literal["elastic", "bursting"] = setting(
        "EFS throughput mode of the shared volume (elastic follows the load; bursting earns "
        "credits by stored size, which a small cache lacks).",
        "elastic",
    )


@dataclass(frozen=True, kw_only=True)
class VisionEncoderAutoscalingSettings:
    min_replicas: int = setting("Fewest encoder pods KEDA keeps.", 1)
    max_replicas: int = setting("Most encoder pods KEDA may run.", 1)
    queue_depth_target: int = setting(
        "Waiting encoder requests per encoder pod (vllm:num_requests_waiting) that triggers a "
        "scale-up.",
        5,
    )


@dataclass(frozen=True, kw_only=True)
class VisionSettings:
    mode: Literal["aggregated", "disaggregated"] = setting(
        "aggregated: every engine runs its own vision encoder (vLLM's default). disaggregated: "
        "an encoder tier of encoder-only vLLM pods encodes images once into a shared volume "
        "and the engines load the result (docs/vision.md).",
        "aggregated",
    )
    encoders: int = setting("Encoder pods at creation (disaggregated).", 1)
    node_group: str | None = setting(
        "The gpuNodeGroups entry the encoder pods run on (default: the deployment's).", None
    )
    gpus_per_encoder: int = setting(
        "GPUs per encoder pod (its --tensor-parallel-size); must divide the node's GPUs, so "
        "several encoder pods share a multi-GPU node.",
        1,
    )
    timeout_seconds: float = setting(
        "Per-attempt timeout of the gateway's encoder step; past it the request goes to the "
        "engine, which encodes locally.",
        10.0,
    )
    retries: int = setting(
        "Extra encoder attempts (on another encoder pod) before falling back.", 1
    )
    autoscaling: VisionEncoderAutoscalingSettings = setting(
        "KEDA scaling of the encoder pods on their own queue.", VisionEncoderAutoscalingSettings()
    )
    cache: VisionCacheSettings = setting(
        "The shared vision cache (an EFS volume).", VisionCacheSettings()
    )


@dataclass(frozen=True, kw_only=True)
class DeploymentSettings:
    name: str = setting("Deployment name (DNS label): LWS name, gateway route /<name>/v1.")
    model: str = setting("Hugging Face model id from the model catalog.", promotable=True)
    revision: str = setting(
        "Pinned model revision (commit sha) passed as --revision.", promotable=True
    )
    served_model_name: str | None = setting(
        "Name clients send as `model` (default: the deployment name).", None, promotable=True
    )
    model_aliases: tuple[str, ...] = setting(
        "More names clients may send as `model` (the gateway routes them, vLLM accepts them).",
        (),
    )
    priority_scheduling: bool = setting(
        "--scheduling-policy priority; the gateway sets each request's priority from its key's "
        "class.",
        True,
    )
    max_image_pixels: int | None = setting(
        "Images are scaled down to at most this many pixels (--mm-processor-kwargs max_pixels); "
        "none: the model's own limit.",
        None,
        promotable=True,
    )
    node_group: str = setting("The gpuNodeGroups entry this deployment runs on.")
    replicas: int = setting("Groups (model replicas) at creation.", 1)
    nodes_per_group: int = setting("GPU nodes per group (LWS size); >1 is multi-node.", 1)
    tensor_parallel: int = setting("--tensor-parallel-size.", 1)
    pipeline_parallel: int = setting("--pipeline-parallel-size.", 1)
    dtype: Literal["auto", "bfloat16", "float16"] = setting("--dtype.", "auto", promotable=True)
    kv_cache_dtype: KvCacheDtype = setting("--kv-cache-dtype.", "auto", promotable=True)
    max_model_len: int = setting("--max-model-len (tokens).", 32768, promotable=True)
    gpu_memory_utilization: float = setting("--gpu-memory-utilization.", 0.9, promotable=True)
    limit_mm_per_prompt: Mapping[str, int] = setting(
        "--limit-mm-per-prompt (JSON). Capping video avoids profiling 2048-frame dummy videos.",
        frozen_map(image=4, video=0),
        promotable=True,
    )
    mm_encoder_tp_mode: Literal["weights", "data"] = setting(
        "--mm-encoder-tp-mode: shard the vision encoder (weights) or replicate it (data).",
        "weights",
        promotable=True,
    )
    mm_processor_cache_gb: float = setting(
        "--mm-processor-cache-gb (0 disables).", 4.0, promotable=True
    )
    expert_parallel: bool = setting("--enable-expert-parallel (MoE models).", False)
    shm_size_gib: int | None = setting(
        "In-memory /dev/shm size (default: the planner's minimum for the group).", None
    )
    startup_budget_minutes: int = setting(
        "Time the leader's startup probe allows for download + load + warmup.", 60
    )
    shutdown_timeout_seconds: int = setting(
        "--shutdown-timeout: drain time for in-flight requests on SIGTERM.", 45, promotable=True
    )
    execute_model_timeout_seconds: int = setting(
        "VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS: a model step (all ranks) that takes longer fails "
        "the engine, which then exits so LWS recreates the group (a hung rank). vLLM's "
        "default is 300.",
        60,
    )
    rendezvous_timeout_seconds: int = setting(
        "Multi-node: how long each worker pod's rendezvous pre-check waits for the leader's "
        "--master-addr:--master-port before failing with a message naming them.",
        600,
    )
    extra_args: tuple[str, ...] = setting(
        "Extra `vllm serve` flags (checked against vLLM 0.33's real flags).", (), promotable=True
    )
    cpu: int | None = setting("CPU request=limit per pod (default: derived from the type).", None)
    memory_gib: int | None = setting(
        "Memory request=limit per pod (default: derived from the type).", None
    )
    kv_offload_redis: bool = setting(
        "Use Redis as LMCache's remote KV backend (needs serving.imageIncludesLmcache).", False
    )
    weights: WeightsSettings = setting("Model weight source and cache.", WeightsSettings())
    autoscaling: DeploymentAutoscalingSettings = setting(
        "KEDA scaling of whole groups.", DeploymentAutoscalingSettings()
    )
    vision: VisionSettings = setting(
        "The vision tier: encoder disaggregation with a shared vision cache (off by default).",
        VisionSettings(),
    )


@dataclass(frozen=True, kw_only=True)
class ServingSettings:
    namespace: str = setting(
        "Kubernetes namespace of the engines, gateway, Redis, web UI.", "qwen-vl"
    )
    vllm_image: str = setting(
        "vLLM 0.33 OpenAI server image (prod: pinned by digest).", promotable=True
    )
    efa_libfabric_version: str | None = setting(
        "libfabric version inside vllmImage; picks the FI_* variables for EFA groups.",
        None,
        promotable=True,
    )
    efa_aws_ofi_nccl_version: str | None = setting(
        "aws-ofi-nccl version inside vllmImage; picks the NCCL/FI variables for EFA groups.",
        None,
        promotable=True,
    )
    image_includes_lmcache: bool = setting(
        "The vLLM image contains LMCache (required by kvOffloadRedis).", False, promotable=True
    )
    # Not promotable: which deployments exist differs between stacks.
    default_deployment: str | None = setting("Deployment served at /v1 (default: the first).", None)
    deployments: tuple[DeploymentSettings, ...] = setting("Model deployments.")


@dataclass(frozen=True, kw_only=True)
class ApiKeySettings:
    priority_class: str | None = setting(
        "gateway.priorityClasses entry of this key's requests (default: defaultPriorityClass).",
        None,
    )
    requests_per_minute: int | None = setting(
        "Requests per minute, counted across all gateway replicas in Redis (none: no quota).",
        None,
    )


@dataclass(frozen=True, kw_only=True)
class RateLimitSettings:
    requests_per_second: float = setting("Sustained requests per second per API key.", 20.0)
    burst: int = setting("Requests allowed above the rate before 429.", 40)


@dataclass(frozen=True, kw_only=True)
class GatewaySettings:
    replicas: int = setting("Nginx gateway pods.", 2)
    image: str = setting("Nginx image (>= 1.27.3 for upstream `resolve`).", promotable=True)
    exporter_image: str = setting("nginx-prometheus-exporter image.", promotable=True)
    client_max_body_size_mib: int = setting(
        "Largest request body (base64 images inflate 4/3; nginx's 1 MiB default gives 413).",
        64,
        promotable=True,
    )
    read_timeout_seconds: int = setting(
        "proxy_read_timeout / send_timeout: longest silence between two reads.",
        600,
        promotable=True,
    )
    load_balancing: Literal["leastConn", "sessionAffinity"] = setting(
        "least_conn, or hashing on affinityHeader so a session reuses one engine's prefix cache.",
        "leastConn",
        promotable=True,
    )
    affinity_header: str = setting(
        "Header carrying the session id.", "X-Session-Id", promotable=True
    )
    api_key_ids: tuple[str, ...] = setting(
        "Clients that get a generated API key (key ids appear in logs, keys never do).",
        ("default",),
    )
    rate_limit: RateLimitSettings = setting("Per-key rate limit.", RateLimitSettings())
    api_keys: Mapping[str, ApiKeySettings] = setting(
        "Priority class and quota per key id (ids from apiKeyIds; unlisted keys: defaults).",
        frozen_map(),
    )
    priority_classes: Mapping[str, int] = setting(
        "Class -> vLLM request priority (lower is served earlier): GUI agents before chat "
        "before batch OCR.",
        frozen_map(agent=0, interactive=10, batch=20),
    )
    default_priority_class: str = setting("Class of keys without one.", "interactive")
    session_ttl_seconds: int = setting(
        "How long an idle session keeps its engine (sessionAffinity): in each replica's "
        "memory and, shared, in Redis (session:<deployment>:<id>).",
        1800,
    )
    shared_session_placement: bool = setting(
        "With sessionAffinity and 2+ replicas, keep each session's engine in Redis (through "
        "the sidecar) so that every replica sends it to the same engine.",
        True,
    )
    affinity_load_bound: float = setting(
        "A session leaves its engine when that engine has more than this times the "
        "deployment's mean open requests (bounded-load affinity).",
        1.5,
    )
    quota_image: str | None = setting(
        "Python image of the quota sidecar (needed when a key has requestsPerMinute).",
        None,
        promotable=True,
    )
    scheme: Literal["internal", "internet-facing"] = setting("NLB scheme.", "internal")
    tls_certificate_arn: str | None = setting("ACM certificate for a TLS NLB listener.", None)


@dataclass(frozen=True, kw_only=True)
class RedisSettings:
    enabled: bool = setting("Run Redis (vision-embedding and session cache).", True)
    image: str = setting("Official Redis image.", promotable=True)
    exporter_image: str = setting("redis_exporter image.", promotable=True)
    maxmemory_mib: int = setting("maxmemory; eviction starts here.", 1024)
    maxmemory_policy: Literal[
        "allkeys-lru", "allkeys-lfu", "volatile-lru", "volatile-lfu", "volatile-ttl"
    ] = setting("Eviction policy (a cache wants allkeys-*).", "allkeys-lfu", promotable=True)
    appendfsync: Literal["always", "everysec", "no"] = setting(
        "AOF fsync policy.", "everysec", promotable=True
    )
    volume_gib: int = setting("PVC (gp3) for the AOF.", 10)
    vision_cache_ttl_seconds: int = setting(
        "TTL of vision:<sha256> entries.", 86400, promotable=True
    )
    session_ttl_seconds: int = setting("TTL of session:<id> entries.", 3600, promotable=True)


@dataclass(frozen=True, kw_only=True)
class AlertThresholds:
    queue_backlog: int = setting("Waiting requests per group that count as a backlog.", 20)
    queue_backlog_minutes: int = setting("How long the backlog must last.", 10)
    kv_cache_usage: float = setting("KV-cache usage ratio that is too high.", 0.9)
    kv_cache_minutes: int = setting("How long KV usage must stay high.", 15)
    ttft_p95_seconds: float = setting("Time-to-first-token p95 SLO.", 5.0)
    gateway_5xx_ratio: float = setting("Share of 5xx responses at the gateway.", 0.05)
    clock_offset_seconds: float = setting("Node clock offset that is too large.", 0.05)
    redis_memory_ratio: float = setting("used_memory / maxmemory that is near the limit.", 0.9)
    worker_restarts_per_hour: int = setting("Engine pod restarts per hour.", 3)
    vision_local_fallback_ratio: float = setting(
        "Share of a disaggregated deployment's image lookups its engines encode locally (the "
        "encoder tier down, slow or behind) that fires VisionEncoderFallback.",
        0.5,
    )


@dataclass(frozen=True, kw_only=True)
class MonitoringSettings:
    enabled: bool = setting("Run kube-prometheus-stack, dashboards and alerts.", True)
    retention_days: int = setting("Prometheus retention.", 15)
    volume_gib: int = setting("Prometheus volume (gp3).", 50)
    grafana_volume_gib: int = setting("Grafana volume (gp3).", 10)
    scrape_interval_seconds: int = setting("Scrape interval.", 15)
    alerts: AlertThresholds = setting("Alert thresholds.", AlertThresholds())


@dataclass(frozen=True, kw_only=True)
class AutoscalingSettings:
    keda: bool = setting("Install KEDA and a ScaledObject per deployment.", True)
    cluster_autoscaler: bool = setting("Install Cluster Autoscaler for the node groups.", True)
    polling_interval_seconds: int = setting("KEDA polling interval.", 15)


@dataclass(frozen=True, kw_only=True)
class WebUiSettings:
    enabled: bool = setting("Run Open WebUI.", True)
    image: str = setting("Open WebUI image.", promotable=True)
    exposure: Literal["loadBalancer", "internal"] = setting(
        "An internal NLB of its own, or only the in-cluster Service (kubectl port-forward). "
        "Not /ui/ on the gateway: Open WebUI has no base-path setting (docs/data.md).",
        "loadBalancer",
    )
    replicas: int = setting(
        "Web UI pods. Must be 1: Open WebUI keeps users and chats in SQLite on a "
        "ReadWriteOnce volume (its websocket state is in Redis all the same).",
        1,
    )
    volume_gib: int = setting("PVC for uploads and the user database.", 10)
    admin_email: str = setting(
        "Admin account e-mail; Open WebUI >= 0.7.0 creates the account at startup with the "
        "generated password (output webui_admin_password).",
        "admin@example.com",
    )


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything a stack is made of, validated."""

    stack: str = setting("Stack name (from the file name or the engine).")
    environment: Environment = setting(
        "Tier of the stack; prod turns on the strictest rules (digests, EFA, protection)."
    )
    region: str = setting("AWS region (the `aws:region` key).")
    tags: Mapping[str, str] = setting("Tags on every AWS resource.", frozen_map())
    protect: bool = setting(
        "Protect stateful resources and retain their volumes on delete (prod).", False
    )
    network: NetworkSettings = setting("VPC and subnets.")
    cluster: ClusterSettings = setting("EKS cluster.")
    system_nodes: SystemNodeSettings = setting("CPU node group.", SystemNodeSettings())
    gpu_node_groups: tuple[GpuNodeGroupSettings, ...] = setting("GPU node groups.")
    serving: ServingSettings = setting("vLLM model deployments.")
    gateway: GatewaySettings = setting("Nginx gateway.")
    redis: RedisSettings = setting("Redis cache.")
    monitoring: MonitoringSettings = setting("Prometheus, Grafana, alerts.", MonitoringSettings())
    autoscaling: AutoscalingSettings = setting(
        "KEDA and Cluster Autoscaler.", AutoscalingSettings()
    )
    webui: WebUiSettings = setting("Open WebUI.")
    hf_token: Secret | None = setting(
        "Hugging Face token (`pulumi config set --secret hfToken ...`), for gated models.", None
    )

    def deployment(self, name: str) -> DeploymentSettings:
        return next(d for d in self.serving.deployments if d.name == name)

    def node_group(self, name: str) -> GpuNodeGroupSettings:
        return next(g for g in self.gpu_node_groups if g.name == name)

    @property
    def default_deployment(self) -> DeploymentSettings:
        name = self.serving.default_deployment or self.serving.deployments[0].name
        return self.deployment(name)


# Keys that live outside the project namespace, mapped to Settings fields.
FOREIGN_KEYS = {"aws:region": "region"}
# Derived from the stack, never written in config.
DERIVED_FIELDS = frozenset({"stack"})

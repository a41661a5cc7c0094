"""Prometheus alert rules of a stack, with every threshold taken from its settings.

`build_alert_rules` returns the rule groups as data (the `spec` of the in-cluster
PrometheusRule); `render_alert_rules` returns the same groups as a rule file for the
offline rehearsal and for `promtool`. Every metric name used here exists in the
exporter that serves it (vLLM 0.33, dcgm-exporter's default counters, the nginx,
Redis and node exporters, kube-state-metrics); tests/unit/test_alert_rules.py checks
that and proves with `promtool test rules` that each alert fires when it should and
stays silent when it should not.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import yaml

from components.render.scrape_config import (
    DEPLOYMENT,
    GROUP,
    JOB_DCGM,
    JOB_ENCODER,
    JOB_NODE,
    JOB_REDIS,
    JOB_VLLM,
    MODEL,
    NODE,
    label_name,
)
from stacks.naming import LWS_NAME_LABEL, NODE_GROUP_LABEL, lws_name
from stacks.schema import DeploymentSettings, Settings

GROUP_PREFIX: Final = "qwen-vl-serving"
SEVERITY: Final = "severity"
CRITICAL: Final = "critical"
WARNING: Final = "warning"

# Fixed windows (the thresholds themselves come from settings.monitoring.alerts).
RATE_WINDOW: Final = "5m"
TTFT_FOR_MINUTES: Final = 10
GATEWAY_5XX_FOR_MINUTES: Final = 5
GPU_NODE_NOT_READY_FOR_MINUTES: Final = 5
CLOCK_OFFSET_FOR_MINUTES: Final = 5
CLOCK_UNSYNCED_FOR_MINUTES: Final = 10
REDIS_MEMORY_FOR_MINUTES: Final = 10

# vLLM's HTTP `status` label: "5.." matches a grouped "5xx" (the instrumentator's default)
# as well as a plain "503".
SERVER_ERROR: Final = 'status=~"5.."'
NOT_SERVER_ERROR: Final = 'status!~"5.."'

# Prometheus alert templates (Go text/template), kept out of f-strings for readability.
VALUE: Final = "{{ $value | humanize }}"
VALUE_PERCENT: Final = "{{ $value | humanizePercentage }}"
VALUE_DURATION: Final = "{{ $value | humanizeDuration }}"
VALUE_INT: Final = '{{ $value | printf "%.0f" }}'


def label(key: str) -> str:
    """The alert template that prints one of the alert's labels."""
    return "{{ $labels." + key + " }}"


def ksm_label(key: str) -> str:
    """The metric label kube-state-metrics makes of an allow-listed Kubernetes label."""
    return "label_" + label_name(key)


def selector(metric: str, *written: str, **matchers: str) -> str:
    """`metric{k="v",...}`: equality matchers, then matchers already written (`SERVER_ERROR`)."""
    inner = ",".join([*(f'{key}="{value}"' for key, value in matchers.items()), *written])
    return f"{metric}{{{inner}}}"


@dataclass(frozen=True, kw_only=True)
class Alert:
    name: str
    expr: str
    for_minutes: int
    severity: str
    summary: str
    description: str
    labels: Mapping[str, str] = field(default_factory=dict)

    def rule(self) -> dict[str, Any]:
        """The rule as Prometheus reads it."""
        rule: dict[str, Any] = {"alert": self.name, "expr": self.expr}
        if self.for_minutes:
            rule["for"] = f"{self.for_minutes}m"
        rule["labels"] = {SEVERITY: self.severity, **self.labels}
        rule["annotations"] = {"summary": self.summary, "description": self.description}
        return rule


def build_alert_rules(settings: Settings) -> dict[str, Any]:
    """Prometheus rule groups (the body of a rule file / a PrometheusRule spec)."""
    groups = [
        _group("engines", _engine_rules(settings)),
        _group("gateway", _gateway_rules(settings)),
        _group("gpu", _gpu_rules(settings)),
        _group("nodes", _clock_rules(settings)),
    ]
    if settings.redis.enabled:
        groups.append(_group("redis", _redis_rules(settings)))
    vision = [a for d in settings.serving.deployments for a in _vision_rules(settings, d)]
    if vision:
        groups.append(_group("vision", vision))
    return {"groups": groups}


def render_alert_rules(settings: Settings) -> str:
    return yaml.safe_dump(build_alert_rules(settings), sort_keys=False, width=1000)


def _group(name: str, rules: list[Alert]) -> dict[str, Any]:
    return {"name": f"{GROUP_PREFIX}-{name}", "rules": [a.rule() for a in rules]}


def may_scale_to_zero(settings: Settings, d: DeploymentSettings) -> bool:
    return settings.autoscaling.keda and d.autoscaling.min_replicas == 0


def _engine_rules(s: Settings) -> list[Alert]:
    rules: list[Alert] = []
    for d in s.serving.deployments:
        rules += _per_deployment_rules(s, d)
    return rules + _queue_and_latency_rules(s)


def _per_deployment_rules(s: Settings, d: DeploymentSettings) -> list[Alert]:
    """Rules whose `for` or selector differs per deployment."""
    where = {DEPLOYMENT: d.name}
    # A leader answers /metrics only once its model is loaded, so a leader that is down
    # for less than the startup budget may just be loading (after a group restart too).
    budget = d.startup_budget_minutes
    rules = [
        Alert(
            name="VllmEngineDown",
            expr=selector("up", job=JOB_VLLM, deployment=d.name) + " == 0",
            for_minutes=budget,
            severity=CRITICAL,
            summary=f"vLLM leader of {d.name} group {label(GROUP)} down",
            description=f"{label('instance')} ({d.name}, {d.model}) has not answered /metrics "
            f"for {budget} minutes, the deployment's startup budget.",
            labels=where,
        )
    ]
    if not may_scale_to_zero(s, d):
        rules.append(
            Alert(
                name="VllmMetricsAbsent",
                expr=f"absent({selector('vllm:num_requests_running', job=JOB_VLLM, deployment=d.name)})",
                for_minutes=budget,
                severity=CRITICAL,
                summary=f"No vLLM metrics from {d.name}",
                description=f"No leader of {d.name} ({d.model}) has exported metrics for "
                f"{budget} minutes: no group is serving, or the monitor selects no pod.",
                labels=where,
            )
        )
    rules.append(_restart_rule(s, d))
    return rules


def vision_lookups(d: DeploymentSettings, outcome: str, job: str = JOB_VLLM) -> str:
    """Our EC connector's lookup counter (docs/vision.md#counting), for one outcome."""
    return selector("vllm:ec_cache_lookups_total", job=job, deployment=d.name, outcome=outcome)


def _vision_rules(s: Settings, d: DeploymentSettings) -> list[Alert]:
    """The encoder tier down (no encoder answers /metrics) or slow (engines encode locally)."""
    if d.vision.mode != "disaggregated":
        return []
    where = {DEPLOYMENT: d.name}
    limit = s.monitoring.alerts.vision_local_fallback_ratio
    local = f"sum(rate({vision_lookups(d, 'local')}[10m]))"
    loaded = f"sum(rate({vision_lookups(d, 'loaded')}[10m]))"
    encoders = selector("up", job=JOB_ENCODER, deployment=d.name)
    return [
        Alert(
            name="VisionEncoderDown",
            expr=f"sum({encoders}) == 0 or absent({encoders})",
            for_minutes=d.startup_budget_minutes,
            severity=CRITICAL,
            summary=f"No encoder of {d.name} is up",
            description=f"No encoder pod of {d.name} has answered /metrics for "
            f"{d.startup_budget_minutes} minutes: the gateway sends images straight to the "
            "engines, which encode them locally (slower time to first token, no reuse).",
            labels=where,
        ),
        Alert(
            name="VisionEncoderFallback",
            expr=f"{local} / ({local} + {loaded}) > {limit:g}",
            for_minutes=10,
            severity=WARNING,
            summary=f"{d.name} engines encode images themselves",
            description=f"{VALUE_PERCENT} of the images {d.name}'s engines looked up in the "
            "shared vision cache were missing, so they encoded them locally: the encoder tier "
            "is down, slow (past vision.timeoutSeconds) or not reached by the gateway.",
            labels=where,
        ),
        Alert(
            name="VisionCacheRejectedFiles",
            expr=f"sum(increase({vision_lookups(d, 'rejected')}[1h])) > 0",
            for_minutes=0,
            severity=WARNING,
            summary=f"Incomplete or corrupt files in {d.name}'s vision cache",
            description="The connector refused cache files whose size does not match their "
            "header and encoded those images again (no engine crashed); look for a writer "
            "that is not our atomic connector, or a full volume.",
            labels=where,
        ),
    ]


def _restart_rule(s: Settings, d: DeploymentSettings) -> Alert:
    limit = s.monitoring.alerts.worker_restarts_per_hour
    ns = s.serving.namespace
    pods = selector(
        "kube_pod_labels", namespace=ns, **{ksm_label(LWS_NAME_LABEL): lws_name(d.name)}
    )
    restarts = selector("kube_pod_container_status_restarts_total", namespace=ns)
    # kube_pod_labels carries the LWS name (allow-listed in kube-state-metrics), so the
    # join counts leader AND worker containers of this deployment and nothing else.
    expr = f"sum(increase({restarts}[1h]) * on (namespace, pod) group_left () {pods}) > {limit}"
    return Alert(
        name="VllmEngineRestarts",
        expr=expr,
        for_minutes=0,
        severity=WARNING,
        summary=f"{d.name} engine containers keep restarting",
        description=f"{VALUE_INT} container restarts in the last hour across the leader and "
        f"worker pods of {d.name} (threshold {limit}).",
        labels={DEPLOYMENT: d.name},
    )


def _queue_and_latency_rules(s: Settings) -> list[Alert]:
    a = s.monitoring.alerts
    per_group = f"{DEPLOYMENT}, {MODEL}, {GROUP}"
    per_deployment = f"{DEPLOYMENT}, {MODEL}"
    waiting = selector("vllm:num_requests_waiting", job=JOB_VLLM)
    kv = selector("vllm:kv_cache_usage_perc", job=JOB_VLLM)
    ttft = selector("vllm:time_to_first_token_seconds_bucket", job=JOB_VLLM)
    where = f"{label(DEPLOYMENT)} group {label(GROUP)}"
    return [
        Alert(
            name="VllmQueueBacklog",
            expr=f"max by ({per_group}) ({waiting}) > {a.queue_backlog}",
            for_minutes=a.queue_backlog_minutes,
            severity=WARNING,
            summary=f"Requests queueing on {where}",
            description=f"{VALUE} requests waiting (more than {a.queue_backlog} for "
            f"{a.queue_backlog_minutes} minutes): autoscaling is at its maximum or too slow.",
        ),
        Alert(
            name="VllmKvCacheHigh",
            expr=f"max by ({per_group}) ({kv}) > {a.kv_cache_usage}",
            for_minutes=a.kv_cache_minutes,
            severity=WARNING,
            summary=f"KV cache nearly full on {where}",
            description=f"KV-cache usage {VALUE_PERCENT} (above {a.kv_cache_usage:.0%} for "
            f"{a.kv_cache_minutes} minutes): requests will be preempted or queued.",
        ),
        Alert(
            name="VllmTtftP95High",
            expr=f"histogram_quantile(0.95, sum by ({per_deployment}, le) "
            f"(rate({ttft}[{RATE_WINDOW}]))) > {a.ttft_p95_seconds}",
            for_minutes=TTFT_FOR_MINUTES,
            severity=WARNING,
            summary=f"Time to first token over its SLO on {label(DEPLOYMENT)}",
            description=f"TTFT p95 is {VALUE_DURATION} (SLO {a.ttft_p95_seconds:g}s) for "
            f"{TTFT_FOR_MINUTES} minutes.",
        ),
    ]


def _gateway_rules(s: Settings) -> list[Alert]:
    ratio = s.monitoring.alerts.gateway_5xx_ratio
    by = f"{DEPLOYMENT}, {MODEL}"
    # stub_status (the nginx exporter's only source) has no status codes, so the ratio
    # comes from vLLM's own HTTP metrics for the requests the gateway proxied to it;
    # 502/504 that nginx produces itself show up as VllmEngineDown / VllmMetricsAbsent.
    errors = selector("http_requests_total", SERVER_ERROR, job=JOB_VLLM)
    total = selector("http_requests_total", job=JOB_VLLM)
    expr = (
        f"(sum by ({by}) (rate({errors}[{RATE_WINDOW}])) / "
        f"sum by ({by}) (rate({total}[{RATE_WINDOW}]))) > {ratio}"
    )
    return [
        Alert(
            name="Gateway5xxRatioHigh",
            expr=expr,
            for_minutes=GATEWAY_5XX_FOR_MINUTES,
            severity=WARNING,
            summary=f"5xx responses from {label(DEPLOYMENT)}",
            description=f"{VALUE_PERCENT} of the requests proxied to {label(DEPLOYMENT)} "
            f"failed with 5xx (threshold {ratio:.0%}).",
        )
    ]


def _gpu_rules(s: Settings) -> list[Alert]:
    xid = selector("DCGM_FI_DEV_XID_ERRORS", job=JOB_DCGM)
    group_label = ksm_label(NODE_GROUP_LABEL)
    gpu_groups = "|".join(g.name for g in s.gpu_node_groups)
    ready = 'kube_node_status_condition{condition="Ready",status="true"}'
    gpu_nodes = f'kube_node_labels{{{group_label}=~"{gpu_groups}"}}'
    return [
        Alert(
            name="GpuXidError",
            # dcgm-exporter reports the code of the last XID error seen (0 when none).
            expr=f"max by ({NODE}, gpu, UUID) ({xid}) > 0",
            for_minutes=0,
            severity=CRITICAL,
            summary=f"GPU {label('gpu')} on {label(NODE)} reported an XID error",
            description=f"XID {VALUE_INT} on GPU {label('gpu')} ({label('UUID')}) of node "
            f"{label(NODE)}; look it up in NVIDIA's XID catalogue and drain the node if it "
            "is fatal (48, 63, 64, 74, 79, 94, 95).",
        ),
        Alert(
            name="GpuNodeNotReady",
            expr=f"(max by (node) ({ready}) == 0) * on (node) group_left ({group_label}) "
            f"max by (node, {group_label}) ({gpu_nodes})",
            for_minutes=GPU_NODE_NOT_READY_FOR_MINUTES,
            severity=CRITICAL,
            summary=f"GPU node {label('node')} is NotReady",
            description=f"Node {label('node')} of GPU node group {label(group_label)} has not "
            f"been Ready for {GPU_NODE_NOT_READY_FOR_MINUTES} minutes; its groups are down.",
        ),
    ]


def _clock_rules(s: Settings) -> list[Alert]:
    limit = s.monitoring.alerts.clock_offset_seconds
    offset = selector("node_timex_offset_seconds", job=JOB_NODE)
    synced = selector("node_timex_sync_status", job=JOB_NODE)
    return [
        Alert(
            name="NodeClockOffsetHigh",
            expr=f"abs({offset}) > {limit}",
            for_minutes=CLOCK_OFFSET_FOR_MINUTES,
            severity=WARNING,
            summary=f"Clock of {label(NODE)} is off",
            description=f"The kernel clock offset is {VALUE_DURATION} (limit {limit * 1000:g} "
            "ms): check chrony (`chronyc tracking`) on the node.",
        ),
        Alert(
            name="NodeClockNotSynchronised",
            expr=f"{synced} == 0",
            for_minutes=CLOCK_UNSYNCED_FOR_MINUTES,
            severity=WARNING,
            summary=f"Clock of {label(NODE)} is not synchronised",
            description=f"The kernel reports the clock of {label(NODE)} unsynchronised for "
            f"{CLOCK_UNSYNCED_FOR_MINUTES} minutes: chrony lost its sources.",
        ),
    ]


def _redis_rules(s: Settings) -> list[Alert]:
    ratio = s.monitoring.alerts.redis_memory_ratio
    used = selector("redis_memory_used_bytes", job=JOB_REDIS)
    # maxmemory 0 means "no limit": drop those series instead of dividing by zero.
    limit = selector("redis_memory_max_bytes", job=JOB_REDIS)
    return [
        Alert(
            name="RedisMemoryNearLimit",
            expr=f"{used} / ({limit} > 0) > {ratio}",
            for_minutes=REDIS_MEMORY_FOR_MINUTES,
            severity=WARNING,
            summary="Redis is close to maxmemory",
            description=f"Redis {label('instance')} uses {VALUE_PERCENT} of maxmemory "
            f"(threshold {ratio:.0%}); eviction will drop cached vision embeddings and sessions.",
        )
    ]

"""Helpers shared by the alert_rules tests of several layers."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from components.render.alert_rules import build_alert_rules
from stacks.schema import Settings
from stacks.settings import ROOT, load_stack_file

# The series kube-state-metrics exports for the allow-listed labels qwen-vl-serving/node-group
# and leaderworkerset.sigs.k8s.io/name: "label_" + the key with every invalid character as "_"
# (kube-state-metrics docs, --metric-labels-allowlist).
KSM_NODE_GROUP = "label_qwen_vl_serving_node_group"


KSM_LWS_NAME = "label_leaderworkerset_sigs_k8s_io_name"


Series = list[dict[str, str]]


Case = dict[str, Any]  # one promtool test group


def settings_of(stack: str) -> Settings:
    return load_stack_file(ROOT / f"Pulumi.{stack}.yaml")


def series(metric: str, labels: Mapping[str, str], values: str) -> dict[str, str]:
    inner = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{metric}{{{inner}}}", "values": values}


def rules_of(settings: Settings) -> list[dict[str, Any]]:
    return [r for g in build_alert_rules(settings)["groups"] for r in g["rules"]]


def expected(rule: Mapping[str, Any], labels: Mapping[str, str], value: str = "") -> dict[str, Any]:
    """The alert promtool must report: the rule's labels plus the series', and its annotations
    with $labels and $value filled in as Prometheus' templates would."""
    all_labels = {**labels, **rule["labels"]}

    def fill(text: str) -> str:
        text = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: all_labels[m.group(1)], text)
        return re.sub(r"\{\{ \$value[^}]*\}\}", value, text)

    return {
        "exp_labels": all_labels,
        "exp_annotations": {k: fill(v) for k, v in rule["annotations"].items()},
    }


def the_rule(settings: Settings, name: str, **labels: str) -> dict[str, Any]:
    found = [
        r for r in rules_of(settings)
        if r["alert"] == name and all(r["labels"].get(k) == v for k, v in labels.items())
    ]  # fmt: skip
    assert len(found) == 1, f"expected one {name} rule with {labels}, found {len(found)}"
    return found[0]


def group(series_: Series, *evals: tuple[str, str, list[dict[str, Any]]]) -> Case:
    return {
        "interval": "1m",
        "input_series": series_,
        "alert_rule_test": [
            {"eval_time": at, "alertname": name, "exp_alerts": alerts} for at, name, alerts in evals
        ],
    }


def engine_down_cases(s: Settings) -> list[Case]:
    cases = []
    for d in s.serving.deployments:
        rule = the_rule(s, "VllmEngineDown", deployment=d.name)
        budget = d.startup_budget_minutes
        down = {"job": "vllm", "deployment": d.name, "group": "0", "instance": "10.0.0.1:8000"}
        up = {**down, "group": "1", "instance": "10.0.0.2:8000"}
        length = f"x{budget + 10}"
        cases.append(group(
            [series("up", down, "0" + length), series("up", up, "1" + length)],
            # still within the startup budget: silent
            (f"{budget - 1}m", "VllmEngineDown", []),
            (f"{budget + 2}m", "VllmEngineDown", [expected(rule, down)]),
        ))  # fmt: skip
    return cases


def metrics_absent_cases(s: Settings) -> list[Case]:
    # A deployment KEDA may scale to zero has no absent-metrics alert.
    with_rule = [
        d for d in s.serving.deployments
        if not (s.autoscaling.keda and d.autoscaling.min_replicas == 0)
    ]  # fmt: skip
    cases = []
    for d in with_rule:
        rule = the_rule(s, "VllmMetricsAbsent", deployment=d.name)
        budget = d.startup_budget_minutes
        present = [
            series("vllm:num_requests_running", {"job": "vllm", "deployment": o.name, "group": "0"},
                   f"1x{budget + 10}")
            for o in with_rule if o is not d
        ]  # fmt: skip
        cases.append(group(
            present,
            (f"{budget - 1}m", "VllmMetricsAbsent", []),
            (f"{budget + 2}m", "VllmMetricsAbsent",
             [expected(rule, {"job": "vllm", "deployment": d.name})]),
        ))  # fmt: skip
    return cases


def restart_cases(s: Settings) -> list[Case]:
    limit = s.monitoring.alerts.worker_restarts_per_hour
    ns = s.serving.namespace

    def restarts(pod: str, values: str) -> dict[str, str]:
        return series(
            "kube_pod_container_status_restarts_total",
            {"namespace": ns, "pod": pod, "container": "vllm"},
            values,
        )

    def pod_labels(pod: str, lws_value: str | None) -> dict[str, str]:
        extra = {KSM_LWS_NAME: lws_value} if lws_value else {}
        return series("kube_pod_labels", {"namespace": ns, "pod": pod, **extra}, "1x70")

    cases = []
    for d in s.serving.deployments:
        rule = the_rule(s, "VllmEngineRestarts", deployment=d.name)
        lws = d.name  # LeaderWorkerSet names its pods <lws>-<group>[-<worker>]

        # limit+1 restarts early in the window, none afterwards: increase over the hour at
        # t=60m spans exactly the samples 0m..60m, so there is no extrapolation.
        ramp = " ".join(str(i) for i in range(limit + 2)) + f" {limit + 1}x65"
        busy = [
            restarts(f"{lws}-0", ramp),
            pod_labels(f"{lws}-0", lws),
            restarts(f"{lws}-0-1", "0x70"),
            pod_labels(f"{lws}-0-1", lws),
            # the gateway restarting is not this deployment's business
            restarts("gateway-7d9f-abc12", "0+1x70"),
            pod_labels("gateway-7d9f-abc12", None),
        ]
        calm_ramp = " ".join(str(i) for i in range(limit + 1)) + f" {limit}x65"
        calm = [restarts(f"{lws}-0", calm_ramp), pod_labels(f"{lws}-0", lws)]
        cases.append(
            group(busy, ("60m", "VllmEngineRestarts", [expected(rule, {}, str(limit + 1))]))
        )
        cases.append(group(calm, ("60m", "VllmEngineRestarts", [])))  # exactly the limit
    return cases


def first(s: Settings) -> tuple[str, str]:
    d = s.serving.deployments[0]
    return d.name, d.model


def queue_cases(s: Settings) -> list[Case]:
    a = s.monitoring.alerts
    name, model = first(s)
    rule = the_rule(s, "VllmQueueBacklog")
    hot = {"job": "vllm", "deployment": name, "model": model, "group": "0", "instance": "a"}
    at_limit = {**hot, "group": "1", "instance": "b"}
    length = f"x{a.queue_backlog_minutes + 10}"
    return [group(
        [series("vllm:num_requests_waiting", hot, f"{a.queue_backlog + 5}{length}"),
         series("vllm:num_requests_waiting", at_limit, f"{a.queue_backlog}{length}")],
        (f"{a.queue_backlog_minutes - 1}m", "VllmQueueBacklog", []),
        (f"{a.queue_backlog_minutes + 2}m", "VllmQueueBacklog",
         [expected(rule, {"deployment": name, "model": model, "group": "0"},
                   str(a.queue_backlog + 5))]),
    )]  # fmt: skip


def percent(ratio: float) -> str:
    """Prometheus' humanizePercentage: %.4g of ratio x 100."""
    return f"{ratio * 100:.4g}%"


def kv_cases(s: Settings) -> list[Case]:
    a = s.monitoring.alerts
    name, model = first(s)
    rule = the_rule(s, "VllmKvCacheHigh")
    high = round((1 + a.kv_cache_usage) / 2, 4)
    hot = {"job": "vllm", "deployment": name, "model": model, "group": "0"}
    cool = {**hot, "group": "1"}
    length = f"x{a.kv_cache_minutes + 10}"
    return [group(
        [series("vllm:kv_cache_usage_perc", hot, f"{high}{length}"),
         series("vllm:kv_cache_usage_perc", cool, f"{a.kv_cache_usage / 2}{length}")],
        (f"{a.kv_cache_minutes - 1}m", "VllmKvCacheHigh", []),
        (f"{a.kv_cache_minutes + 2}m", "VllmKvCacheHigh",
         [expected(rule, {"deployment": name, "model": model, "group": "0"}, percent(high))]),
    )]  # fmt: skip


def ttft_cases(s: Settings) -> list[Case]:
    t = s.monitoring.alerts.ttft_p95_seconds
    name, model = first(s)
    rule = the_rule(s, "VllmTtftP95High")
    slow = {"job": "vllm", "deployment": name, "model": model}
    fast = {"job": "vllm", "deployment": "quiet", "model": "other/model"}
    metric = "vllm:time_to_first_token_seconds_bucket"
    # Slow: 60 requests a minute, all with TTFT in (t, 4t]. histogram_quantile interpolates
    # linearly inside that bucket: p95 = t + 0.95 x (4t - t) = 3.85 t.
    # Fast: all within (0, t/2], so p95 <= t/2.
    buckets = [
        series(metric, {**slow, "le": f"{t:g}"}, "0x20"),
        series(metric, {**slow, "le": f"{4 * t:g}"}, "0+60x20"),
        series(metric, {**slow, "le": "+Inf"}, "0+60x20"),
        series(metric, {**fast, "le": f"{t / 2:g}"}, "0+60x20"),
        series(metric, {**fast, "le": f"{4 * t:g}"}, "0+60x20"),
        series(metric, {**fast, "le": "+Inf"}, "0+60x20"),
    ]
    return [group(
        buckets,
        ("9m", "VllmTtftP95High", []),  # `for: 10m` not yet reached
        ("15m", "VllmTtftP95High",
         [expected(rule, {"deployment": name, "model": model}, f"{3.85 * t:.4g}s")]),
    )]  # fmt: skip


def gateway_cases(s: Settings) -> list[Case]:
    ratio = s.monitoring.alerts.gateway_5xx_ratio
    name, model = first(s)
    rule = the_rule(s, "Gateway5xxRatioHigh")
    errors = round(min(200 * ratio, 100 * (1 + ratio) / 2))  # per 100 requests, above the limit
    http = {
        "job": "vllm",
        "deployment": name,
        "model": model,
        "handler": "/v1/chat/completions",
        "method": "POST",
    }
    healthy = {**http, "deployment": "quiet", "model": "other/model"}
    return [group(
        [series("http_requests_total", {**http, "status": "5xx"}, f"0+{errors}x20"),
         series("http_requests_total", {**http, "status": "2xx"}, f"0+{100 - errors}x20"),
         series("http_requests_total", {**healthy, "status": "2xx"}, "0+100x20"),
         series("http_requests_total", {**healthy, "status": "4xx"}, "0+30x20")],
        ("4m", "Gateway5xxRatioHigh", []),
        ("10m", "Gateway5xxRatioHigh",
         [expected(rule, {"deployment": name, "model": model}, percent(errors / 100))]),
    )]  # fmt: skip


def xid_cases(s: Settings) -> list[Case]:
    rule = the_rule(s, "GpuXidError")
    bad = {
        "job": "dcgm-exporter",
        "node": "ip-10-0-1-1",
        "gpu": "0",
        "UUID": "GPU-aaaa",
        "Hostname": "dcgm-exporter-x1",
    }
    good = {**bad, "gpu": "1", "UUID": "GPU-bbbb"}
    return [group(
        [series("DCGM_FI_DEV_XID_ERRORS", bad, "0 0 0 79x10"),
         series("DCGM_FI_DEV_XID_ERRORS", good, "0x12")],
        ("1m", "GpuXidError", []),
        ("5m", "GpuXidError",
         [expected(rule, {"node": "ip-10-0-1-1", "gpu": "0", "UUID": "GPU-aaaa"}, "79")]),
    )]  # fmt: skip


def node_not_ready_cases(s: Settings) -> list[Case]:
    rule = the_rule(s, "GpuNodeNotReady")
    group_key = KSM_NODE_GROUP
    gpu_group = s.gpu_node_groups[-1].name

    def node(name: str, ready: str, group: str | None) -> Series:
        labels = {"node": name, **({group_key: group} if group else {})}
        return [series("kube_node_status_condition",
                       {"node": name, "condition": "Ready", "status": "true"}, f"{ready}x15"),
                series("kube_node_labels", labels, "1x15")]  # fmt: skip

    nodes = [*node("gpu-down", "0", gpu_group), *node("gpu-up", "1", gpu_group),
             # a NotReady node outside every GPU node group (a system node) is not this alert's
             *node("system-down", "0", None)]  # fmt: skip
    return [group(
        nodes,
        ("4m", "GpuNodeNotReady", []),
        ("10m", "GpuNodeNotReady", [expected(rule, {"node": "gpu-down", group_key: gpu_group})]),
    )]  # fmt: skip


def duration(seconds: float) -> str:
    """Prometheus' humanizeDuration for values under a minute."""
    return f"{seconds * 1000:.4g}ms" if seconds < 1 else f"{seconds:.4g}s"


def clock_cases(s: Settings) -> list[Case]:
    limit = s.monitoring.alerts.clock_offset_seconds
    offset = the_rule(s, "NodeClockOffsetHigh")
    synced = the_rule(s, "NodeClockNotSynchronised")
    off = {"job": "node-exporter", "node": "ip-10-0-2-2", "instance": "10.0.2.2:9100"}
    fine = {"job": "node-exporter", "node": "ip-10-0-3-3", "instance": "10.0.3.3:9100"}
    behind = round(1.6 * limit, 6)
    return [
        group(
            # a clock *behind* by more than the limit counts too (abs)
            [series("node_timex_offset_seconds", off, f"-{behind}x15"),
             series("node_timex_offset_seconds", fine, f"{limit / 2}x15")],
            ("4m", "NodeClockOffsetHigh", []),
            ("10m", "NodeClockOffsetHigh", [expected(offset, off, duration(behind))]),
        ),
        group(
            [series("node_timex_sync_status", off, "0x20"),
             series("node_timex_sync_status", fine, "1x20")],
            ("9m", "NodeClockNotSynchronised", []),
            ("15m", "NodeClockNotSynchronised", [expected(synced, off)]),
        ),
    ]  # fmt: skip


def redis_cases(s: Settings) -> list[Case]:
    ratio = s.monitoring.alerts.redis_memory_ratio
    rule = the_rule(s, "RedisMemoryNearLimit")
    full = {"job": "redis-exporter", "instance": "10.0.4.4:9121"}
    roomy = {"job": "redis-exporter", "instance": "10.0.4.5:9121"}
    unlimited = {"job": "redis-exporter", "instance": "10.0.4.6:9121"}  # maxmemory 0
    used = round(1000 * (1 + ratio) / 2)
    return [group(
        [series("redis_memory_used_bytes", full, f"{used}x20"),
         series("redis_memory_max_bytes", full, "1000x20"),
         series("redis_memory_used_bytes", roomy, f"{round(500 * ratio)}x20"),
         series("redis_memory_max_bytes", roomy, "1000x20"),
         series("redis_memory_used_bytes", unlimited, "5000x20"),
         series("redis_memory_max_bytes", unlimited, "0x20")],
        ("9m", "RedisMemoryNearLimit", []),
        ("15m", "RedisMemoryNearLimit", [expected(rule, full, percent(used / 1000))]),
    )]  # fmt: skip


BUILDERS: dict[str, Callable[[Settings], list[Case]]] = {
    "VllmEngineDown": engine_down_cases,
    "VllmMetricsAbsent": metrics_absent_cases,
    "VllmEngineRestarts": restart_cases,
    "VllmQueueBacklog": queue_cases,
    "VllmKvCacheHigh": kv_cases,
    "VllmTtftP95High": ttft_cases,
    "Gateway5xxRatioHigh": gateway_cases,
    "GpuXidError": xid_cases,
    "GpuNodeNotReady": node_not_ready_cases,
    "NodeClockOffsetHigh": clock_cases,
    "RedisMemoryNearLimit": redis_cases,
}


def unit_tests(s: Settings) -> dict[str, Any]:
    return {
        "rule_files": ["rules.yml"],
        "evaluation_interval": "1m",
        "tests": [case for build in BUILDERS.values() for case in build(s)],
    }

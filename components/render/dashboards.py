"""Grafana dashboards of a stack, generated from its settings.

Two dashboards: "inference" (the gateway, then one row per model deployment) and
"infrastructure" (one row per GPU node group, Redis, node clocks). Rows, titles,
filters and threshold lines all come from the settings, so adding a deployment or a
node group adds its row and nothing is copied per model. The JSON is Grafana's
dashboard model (schemaVersion 39), built with the small helpers below; Grafana's
dashboard sidecar loads it from ConfigMaps (components/monitoring.py).

Where the numbers come from is documented in docs/observability.md; in short, the
gateway's nginx exporter only knows stub_status (no status codes), so success ratios
come from vLLM's own `http_requests_total{status}` of the requests proxied to it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final

from components.render.alert_rules import NOT_SERVER_ERROR, ksm_label, selector, vision_lookups
from components.render.scrape_config import (
    DEPLOYMENT,
    GROUP,
    JOB_DCGM,
    JOB_ENCODER,
    JOB_NGINX,
    JOB_NODE,
    JOB_REDIS,
    JOB_ROUTER,
    JOB_VLLM,
    NODE,
)
from stacks.naming import NODE_GROUP_LABEL
from stacks.schema import DeploymentSettings, GpuNodeGroupSettings, Settings

INFERENCE_FILE: Final = "qwen-vl-serving-inference.json"
INFRASTRUCTURE_FILE: Final = "qwen-vl-serving-infrastructure.json"
TAG: Final = "qwen-vl-serving"
SCHEMA_VERSION: Final = 39
DATASOURCE: Final = {"type": "prometheus", "uid": "${datasource}"}
GRID_COLUMNS: Final = 24
PANELS_PER_LINE: Final = 3
PANEL_HEIGHT: Final = 8
WINDOW: Final = "5m"
QUANTILES: Final = (0.5, 0.95, 0.99)
NODE_LEGEND: Final = "{{" + NODE + "}}"


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str


@dataclass(frozen=True)
class Panel:
    title: str
    queries: tuple[Query, ...]
    unit: str
    description: str = ""
    threshold: float | None = None  # drawn as a red line (an alert threshold)
    max: float | None = None


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...]
    key: str = ""  # what the row is about (a deployment or node group name), for tests


@dataclass
class _Ids:
    """Panel ids, unique within a dashboard."""

    last: int = 0

    def new(self) -> int:
        self.last += 1
        return self.last


def build_dashboards(settings: Settings) -> dict[str, dict[str, Any]]:
    """Dashboard JSON models by file name."""
    return {
        INFERENCE_FILE: dashboard(
            "qwen-vl-inference", "Qwen-VL serving: inference", inference_rows(settings)
        ),
        INFRASTRUCTURE_FILE: dashboard(
            "qwen-vl-infrastructure",
            "Qwen-VL serving: GPUs, Redis, clocks",
            infrastructure_rows(settings),
        ),
    }


def dashboard(uid: str, title: str, rows: Sequence[Row]) -> dict[str, Any]:
    return {
        "uid": uid,
        "title": title,
        "tags": [TAG],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "annotations": {"list": []},
        "templating": {"list": [_datasource_variable()]},
        "panels": list(_layout(rows)),
    }


def _datasource_variable() -> dict[str, Any]:
    return {
        "name": "datasource",
        "label": "Data source",
        "type": "datasource",
        "query": "prometheus",
        "hide": 0,
        "refresh": 1,
        "regex": "",
        "options": [],
    }


def _layout(rows: Sequence[Row]) -> Iterator[dict[str, Any]]:
    """Grafana panels: each row header, then its panels three to a line."""
    ids = _Ids()
    width = GRID_COLUMNS // PANELS_PER_LINE
    y = 0
    for row in rows:
        yield {
            "id": ids.new(),
            "type": "row",
            "title": row.title,
            "collapsed": False,
            "panels": [],
            "gridPos": {"h": 1, "w": GRID_COLUMNS, "x": 0, "y": y},
        }
        y += 1
        for i, panel in enumerate(row.panels):
            x = (i % PANELS_PER_LINE) * width
            line_y = y + (i // PANELS_PER_LINE) * PANEL_HEIGHT
            yield _timeseries(
                ids.new(), panel, {"h": PANEL_HEIGHT, "w": width, "x": x, "y": line_y}
            )
        y += -(-len(row.panels) // PANELS_PER_LINE) * PANEL_HEIGHT


def _timeseries(panel_id: int, panel: Panel, grid: dict[str, int]) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": panel.unit, "min": 0}
    if panel.max is not None:
        defaults["max"] = panel.max
    if panel.threshold is not None:
        defaults["thresholds"] = {
            "mode": "absolute",
            "steps": [
                {"color": "green", "value": None},
                {"color": "red", "value": panel.threshold},
            ],
        }
        defaults["custom"] = {"thresholdsStyle": {"mode": "line"}}
    return {
        "id": panel_id,
        "type": "timeseries",
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": grid,
        "targets": [
            {
                "refId": chr(ord("A") + i),
                "datasource": DATASOURCE,
                "expr": q.expr,
                "legendFormat": q.legend,
                "range": True,
            }
            for i, q in enumerate(panel.queries)
        ],
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
    }


def rate(series: str) -> str:
    return f"rate({series}[{WINDOW}])"


def ratio(part: str, whole: str, by: str = "") -> str:
    """sum(rate(part)) / sum(rate(whole)), optionally per label set."""
    agg = f"sum by ({by}) " if by else "sum "
    return f"{agg}({rate(part)}) / {agg}({rate(whole)})"


def quantiles(histogram: str, by: str = "") -> tuple[Query, ...]:
    keys = f"{by}, le" if by else "le"
    return tuple(
        Query(f"histogram_quantile({q}, sum by ({keys}) ({rate(histogram)}))", f"p{round(q * 100)}")
        for q in QUANTILES
    )


# --- inference ------------------------------------------------------------------------------


def inference_rows(s: Settings) -> list[Row]:
    vision = [_vision_row(s, d) for d in s.serving.deployments if d.vision.mode == "disaggregated"]
    return [_gateway_row(s), *(_deployment_row(s, d) for d in s.serving.deployments), *vision]


# Goal of the vision tier with repeated images (docs/vision.md#measure): encoder runs per image.
ENCODER_RUNS_GOAL = 0.25


def _vision_row(s: Settings, d: DeploymentSettings) -> Row:
    """Hits, misses and local fallbacks of the shared vision cache, from our connector's
    counters on engines (job vllm) and encoders (job vllm-encoder)."""

    def lookups(outcome: str, job: str = JOB_VLLM) -> str:
        return f"sum({rate(vision_lookups(d, outcome, job))})"

    encoded, loaded, local = lookups("encoded", JOB_ENCODER), lookups("loaded"), lookups("local")
    outcomes = tuple(
        Query(lookups(outcome, job), f"{who}: {outcome}")
        for who, job, names in (
            ("engines", JOB_VLLM, ("loaded", "local", "rejected")),
            ("encoders", JOB_ENCODER, ("encoded", "reused", "rejected")),
        )
        for outcome in names
    )
    waiting = selector("vllm:num_requests_waiting", job=JOB_ENCODER, deployment=d.name)
    up = selector("up", job=JOB_ENCODER, deployment=d.name)
    return Row(
        f"{d.name}: vision tier",
        (
            Panel(
                "Vision cache lookups by outcome",
                outcomes,
                "ops",
                "loaded = an engine used an encoder's output (hit); local = no output, the engine "
                "encoded itself (miss or fallback); encoded/reused = an encoder ran or found the "
                "image already cached; rejected = an incomplete file was refused.",
            ),
            Panel(
                "Encoder runs per engine image lookup",
                (Query(f"{encoded} / ({loaded} + {local})", "encoder runs / image lookups"),),
                "percentunit",
                f"With repeated images this falls under {ENCODER_RUNS_GOAL:g}: each image is "
                "encoded once and loaded by every replica.",
                threshold=ENCODER_RUNS_GOAL,
            ),
            Panel(
                "Local fallback ratio on engines",
                (Query(f"{local} / ({local} + {loaded})", "local / lookups"),),
                "percentunit",
                "Images the engines encoded themselves: the encoder tier down or slow.",
                threshold=s.monitoring.alerts.vision_local_fallback_ratio,
                max=1,
            ),
            Panel(
                "Encoder pods and queue",
                (Query(f"sum({up})", "encoders up"), Query(f"sum({waiting})", "waiting")),
                "short",
            ),
        ),
        key=f"{d.name}-vision",
    )


def _gateway_row(s: Settings) -> Row:
    nginx = selector("nginx_http_requests_total", job=JOB_NGINX)
    engine = selector("http_requests_total", job=JOB_VLLM)
    ok = selector("http_requests_total", NOT_SERVER_ERROR, job=JOB_VLLM)
    connections = tuple(
        Query(f"sum({selector(f'nginx_connections_{state}', job=JOB_NGINX)})", state)
        for state in ("active", "reading", "writing", "waiting")
    )
    return Row(
        "Gateway",
        (
            Panel(
                "Request rate: gateway vs engines",
                (
                    Query(f"sum({rate(nginx)})", "gateway (all responses)"),
                    Query(f"sum({rate(engine)})", "proxied to an engine"),
                ),
                "reqps",
                "The gap is answered by nginx alone: 401 (key), 429 (rate limit), 413 (body), "
                "/healthz, and 502/504 when no engine answers.",
            ),
            Panel("Gateway connections", connections, "short"),
            *_routing_panels(),
            Panel(
                "Success ratio by deployment (non-5xx)",
                (Query(ratio(ok, engine, DEPLOYMENT), f"{{{{{DEPLOYMENT}}}}}"),),
                "percentunit",
                "From vLLM's http_requests_total{status} of the requests the gateway proxied; "
                "nginx's stub_status has no status codes.",
                threshold=1 - s.monitoring.alerts.gateway_5xx_ratio,
                max=1,
            ),
        ),
    )


def _routing_panels() -> tuple[Panel, ...]:
    """The routing tier's counters (components/render/gateway_router.js, docs/gateway.md)."""
    routed = selector("gateway_routed_requests_total", job=JOB_ROUTER)
    rejected = selector("gateway_rejected_requests_total", job=JOB_ROUTER)
    shared = selector("gateway_quota_shared", job=JOB_ROUTER)
    alone = selector("gateway_placement_fallbacks_total", job=JOB_ROUTER)
    return (
        Panel(
            "Routed requests by model and class",
            (Query(f"sum by (model, class) ({rate(routed)})", "{{model}} / {{class}}"),),
            "reqps",
        ),
        Panel(
            "Routing decisions",
            (Query(f"sum by (decision) ({rate(routed)})", "{{decision}}"),),
            "reqps",
            "sticky: a session kept its engine; new_session: placed on the engine with the "
            "fewest sessions; shared: placed by another replica (Redis); moved: its engine "
            "failed or was overloaded; least_conn: no session.",
        ),
        Panel(
            "Refused by the gateway, by reason and key",
            (
                Query(
                    f"sum by (status, reason, key_id) ({rate(rejected)})",
                    "{{status}} {{reason}} {{key_id}}",
                ),
            ),
            "reqps",
            "429 quota (requests per minute, all replicas) or rate_limit (per pod), 404 "
            "model_not_found, 400 too_many_images or invalid_json.",
        ),
        Panel(
            "Quota counting shared across replicas (1) or per replica (0: Redis unreachable)",
            (Query(f"min({shared})", "shared"),),
            "short",
            max=1,
        ),
        Panel(
            "Session placements made without Redis (replicas may disagree)",
            (Query(f"sum by (deployment) ({rate(alone)})", "{{deployment}}"),),
            "reqps",
            "Redis or the pod's sidecar did not answer: the replica placed the session alone "
            "(docs/gateway.md#shared-placement).",
        ),
    )


def deployment_title(s: Settings, d: DeploymentSettings) -> str:
    group = s.node_group(d.node_group)
    shape = f"TP{d.tensor_parallel}xPP{d.pipeline_parallel}"
    nodes = f"{d.nodes_per_group}x{group.instance_type}"
    return f"{d.name}: {d.model} ({shape} on {nodes} per group)"


def _deployment_row(s: Settings, d: DeploymentSettings) -> Row:
    a = s.monitoring.alerts

    def m(metric: str, *written: str) -> str:
        return selector(metric, *written, job=JOB_VLLM, deployment=d.name)

    ok = m("http_requests_total", NOT_SERVER_ERROR)
    by_group = f"sum by ({GROUP}) "
    panels = [
        Panel(
            "Requests by HTTP status",
            (Query(f"sum by (status) ({rate(m('http_requests_total'))})", "{{status}}"),),
            "reqps",
        ),
        Panel(
            "Success ratio (non-5xx)",
            (Query(ratio(ok, m("http_requests_total")), "success"),),
            "percentunit",
            threshold=1 - a.gateway_5xx_ratio,
            max=1,
        ),
        Panel(
            "Time to first token",
            quantiles(m("vllm:time_to_first_token_seconds_bucket")),
            "s",
            f"Red line: the TTFT p95 SLO ({a.ttft_p95_seconds:g}s).",
            threshold=a.ttft_p95_seconds,
        ),
        Panel("Inter-token latency", quantiles(m("vllm:inter_token_latency_seconds_bucket")), "s"),
        Panel(
            "End-to-end request latency",
            quantiles(m("vllm:e2e_request_latency_seconds_bucket")),
            "s",
        ),
        Panel("Queue time", quantiles(m("vllm:request_queue_time_seconds_bucket")), "s"),
        Panel(
            "Tokens per second",
            (
                Query(f"sum({rate(m('vllm:prompt_tokens_total'))})", "prompt"),
                Query(f"sum({rate(m('vllm:generation_tokens_total'))})", "generation"),
            ),
            "short",
        ),
        Panel(
            "Running vs waiting requests per group",
            (
                Query(by_group + f"({m('vllm:num_requests_running')})", "running, group {{group}}"),
                Query(by_group + f"({m('vllm:num_requests_waiting')})", "waiting, group {{group}}"),
            ),
            "short",
            f"KEDA adds a group when waiting requests average more than "
            f"{d.autoscaling.queue_depth_target} per group; red line: the backlog alert.",
            threshold=a.queue_backlog,
        ),
        Panel(
            "KV-cache usage per group",
            (Query(f"max by ({GROUP}) ({m('vllm:kv_cache_usage_perc')})", "group {{group}}"),),
            "percentunit",
            threshold=a.kv_cache_usage,
            max=1,
        ),
        Panel(
            "Prefix-cache hit ratio",
            (
                Query(
                    ratio(m("vllm:prefix_cache_hits_total"), m("vllm:prefix_cache_queries_total")),
                    "hits / queries (tokens)",
                ),
            ),
            "percentunit",
            max=1,
        ),
        Panel(
            "Groups serving, preemptions",
            (
                Query(f"count({m('up')} == 1)", "groups answering /metrics"),
                Query(f"sum({rate(m('vllm:num_preemptions_total'))})", "preemptions/s"),
            ),
            "short",
            f"Autoscaling bounds: {d.autoscaling.min_replicas} to {d.autoscaling.max_replicas} groups.",
        ),
    ]
    if d.mm_processor_cache_gb > 0:
        # vLLM exports the multimodal processor cache counters only when that cache is on.
        panels.append(
            Panel(
                "Multimodal cache hit ratio",
                (
                    Query(
                        ratio(m("vllm:mm_cache_hits_total"), m("vllm:mm_cache_queries_total")),
                        "hits / queries (items)",
                    ),
                ),
                "percentunit",
                max=1,
            )
        )
    return Row(deployment_title(s, d), tuple(panels), key=d.name)


# --- infrastructure -------------------------------------------------------------------------


def infrastructure_rows(s: Settings) -> list[Row]:
    rows = [_gpu_row(g) for g in s.gpu_node_groups]
    if s.redis.enabled:
        rows.append(_redis_row(s))
    rows.append(_clock_row(s))
    return rows


def _gpu_row(g: GpuNodeGroupSettings) -> Row:
    # kube-state-metrics knows each node's group (allow-listed label); DCGM knows the node.
    in_group = (
        f" * on ({NODE}) group_left () max by ({NODE}) "
        f'(kube_node_labels{{{ksm_label(NODE_GROUP_LABEL)}="{g.name}"}})'
    )

    def per_node(agg: str, metric: str, by: str = NODE) -> str:
        return f"{agg} by ({by}) ({selector(metric, job=JOB_DCGM)}){in_group}"

    used = per_node("sum", "DCGM_FI_DEV_FB_USED")
    free = per_node("sum", "DCGM_FI_DEV_FB_FREE")
    return Row(
        f"GPU node group {g.name} ({g.instance_type})",
        (
            Panel(
                "GPU utilisation (mean per node)",
                (Query(per_node("avg", "DCGM_FI_DEV_GPU_UTIL"), NODE_LEGEND),),
                "percent",
                max=100,
            ),
            Panel(
                "GPU memory used (share per node)",
                (Query(f"({used}) / (({used}) + ({free}))", NODE_LEGEND),),
                "percentunit",
                max=1,
            ),
            Panel("GPU memory used (per node)", (Query(used, NODE_LEGEND),), "mbytes"),
            Panel(
                "GPU temperature (hottest per node)",
                (Query(per_node("max", "DCGM_FI_DEV_GPU_TEMP"), NODE_LEGEND),),
                "celsius",
            ),
            Panel(
                "GPU power (per node)",
                (Query(per_node("sum", "DCGM_FI_DEV_POWER_USAGE"), NODE_LEGEND),),
                "watt",
            ),
            Panel(
                "Last XID error per GPU",
                (
                    Query(
                        per_node("max", "DCGM_FI_DEV_XID_ERRORS", f"{NODE}, gpu"),
                        f"{NODE_LEGEND} GPU {{{{gpu}}}}",
                    ),
                ),
                "none",
                "0 means none; any other value is an XID code (alert GpuXidError).",
                threshold=1,
            ),
        ),
        key=g.name,
    )


def _redis_row(s: Settings) -> Row:
    def r(metric: str) -> str:
        return selector(metric, job=JOB_REDIS)

    hits, misses = rate(r("redis_keyspace_hits_total")), rate(r("redis_keyspace_misses_total"))
    return Row(
        "Redis",
        (
            Panel(
                "Memory used vs maxmemory",
                (
                    Query(f"sum({r('redis_memory_used_bytes')})", "used"),
                    Query(f"sum({r('redis_memory_max_bytes')})", "maxmemory"),
                ),
                "bytes",
                f"Alert RedisMemoryNearLimit at {s.monitoring.alerts.redis_memory_ratio:.0%} of maxmemory.",
            ),
            Panel(
                "Keyspace hit ratio",
                (Query(f"sum({hits}) / (sum({hits}) + sum({misses}))", "hits / lookups"),),
                "percentunit",
                max=1,
            ),
            Panel(
                "Evictions and clients",
                (
                    Query(f"sum({rate(r('redis_evicted_keys_total'))})", "evicted keys/s"),
                    Query(f"sum({r('redis_connected_clients')})", "connected clients"),
                ),
                "short",
            ),
        ),
    )


def _clock_row(s: Settings) -> Row:
    limit = s.monitoring.alerts.clock_offset_seconds
    return Row(
        "Node clocks (chrony)",
        (
            Panel(
                "Clock offset per node (absolute)",
                (
                    Query(
                        f"abs({selector('node_timex_offset_seconds', job=JOB_NODE)})", NODE_LEGEND
                    ),
                ),
                "s",
                f"Red line: the {limit * 1000:g} ms alert threshold.",
                threshold=limit,
            ),
            Panel(
                "Clock synchronised (1 = yes)",
                (Query(selector("node_timex_sync_status", job=JOB_NODE), NODE_LEGEND),),
                "none",
                max=1,
            ),
            Panel(
                "Clock maximum error per node",
                (Query(selector("node_timex_maxerror_seconds", job=JOB_NODE), NODE_LEGEND),),
                "s",
            ),
        ),
    )

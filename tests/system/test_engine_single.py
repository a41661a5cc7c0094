"""A real single-node engine from dev's rendered pod: its probes, run as the kubelet runs them,
and the vLLM metric names every dashboard, rule and KEDA trigger uses, scraped from its /metrics.

One engine for the module (~25-45 s to start on 2 cores, ~2-3 GiB); the tests run in order
against it: before ready, ready, traffic and metrics, hung (SIGSTOP), killed (SIGKILL).
"""

from __future__ import annotations

import json
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from components.autoscaling import activity_query, build_triggers, kv_cache_query, queue_query
from components.render.alert_rules import build_alert_rules
from components.render.dashboards import build_dashboards
from components.render.scrape_config import render_prometheus_config
from components.render.vllm_command import spec_for
from components.render.vllm_pods import GROUP_READY_SCRIPT, build_lws
from scripts.loadtest import make_png, png_data_url
from tests.support.dashboards import STACKS, settings_of
from tests.support.engines import pod_templates
from tests.support.metric_names import exposed_names, metric_names, reference_names
from tests.support.scrape_config import rehearsal_targets
from tests.support.vllm_engine import (
    Pod,
    PortMap,
    Prober,
    get_text,
    post,
    probers,
    require_engine,
)

STACK, DEPLOYMENT = "dev", "qwen3-vl-2b"
READY_WITHIN_S = 240.0  # the CPU engine: ~25-45 s alone, up to ~3 min on a loaded machine


@pytest.fixture(scope="module")
def pod(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pod]:
    require_engine()
    settings = settings_of(STACK)
    spec = spec_for(settings, settings.deployment(DEPLOYMENT))
    template = pod_templates(build_lws(spec))["leader"]
    pod = Pod(template, 0, 1, PortMap(), tmp_path_factory.mktemp("engine-single"))
    pod.start()
    try:
        yield pod
    finally:
        pod.stop()


@pytest.fixture(scope="module")
def probes(pod: Pod) -> dict[str, Prober]:
    return probers(pod)


def test_probes_fail_before_the_engine_is_ready(probes: dict[str, Prober]) -> None:
    """Right after the container starts, nothing listens yet: every probe fails."""
    assert set(probes) == {"startupProbe", "readinessProbe", "livenessProbe"}
    for kind, prober in probes.items():
        result = prober.once()
        assert not result.ok, (kind, result.detail)


def test_startup_probe_passes_once_ready_within_the_budget(
    pod: Pod, probes: dict[str, Prober]
) -> None:
    startup = probes["startupProbe"]
    budget = startup.period * startup.failure_threshold  # the rendered startup budget
    took, results = startup.watch("ready", min(budget, READY_WITHIN_S))
    print(f"startup probe passed after {took:.0f} s ({len(results)} probes)")
    assert not results[0].ok  # it was probing before the engine was up
    assert results[-1].ok


def test_readiness_and_liveness_pass_once_ready(probes: dict[str, Prober]) -> None:
    _, results = probes["readinessProbe"].watch("ready", 30)
    assert results[-1].detail == "ok: idle, a 1-token completion succeeded"
    assert probes["livenessProbe"].once().ok


def _traffic(pod: Pod, model: str) -> None:
    """Text, image and streaming chats and a completion: what fills every metric family."""
    image = png_data_url(make_png(64, 64))
    bodies = [
        {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 8},
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "what is this?"},
                        {"type": "image_url", "image_url": {"url": image}},
                    ],
                }
            ],
            "max_tokens": 8,
        },
        {"messages": [{"role": "user", "content": "stream"}], "max_tokens": 8, "stream": True},
    ]
    for body in bodies:
        status, text = post(
            pod.ports.http,
            "/v1/chat/completions",
            json.dumps({"model": model, **body}).encode(),
            60,
        )
        assert status == 200, text[:300]
    status, text = post(
        pod.ports.http,
        "/v1/completions",
        json.dumps({"model": model, "prompt": "hi", "max_tokens": 4}).encode(),
        60,
    )
    assert status == 200, text[:300]


def used_vllm_metric_names() -> dict[str, set[str]]:
    """vLLM names (vllm:*) each consumer uses, over every stack, extracted from what is rendered."""
    used: dict[str, set[str]] = {}

    def add(source: str, names: set[str]) -> None:
        used.setdefault(source, set()).update(n for n in names if n.startswith("vllm:"))

    for stack in STACKS:
        s = settings_of(stack)
        for board in build_dashboards(s).values():
            for panel in board["panels"]:
                for target in panel.get("targets", []):
                    add("dashboards", metric_names(target["expr"]))
        for group in build_alert_rules(s)["groups"]:
            kind = "recording rules" if any("record" in r for r in group["rules"]) else "alerts"
            for rule in group["rules"]:
                add("recording rules" if "record" in rule else kind, metric_names(rule["expr"]))
        for d in s.serving.deployments:
            for trigger in build_triggers(d, "http://prometheus:9090"):
                add("KEDA triggers", metric_names(trigger["metadata"]["query"]))
            for query in (queue_query(d.name), kv_cache_query(d.name), activity_query(d.name)):
                add("KEDA triggers", metric_names(query))
        config = render_prometheus_config(rehearsal_targets(stack))
        add("scrape config", set(re.findall(r"vllm:[A-Za-z0-9_:]+", config)))
    add("leader readiness probe", set(re.findall(r"vllm:[A-Za-z0-9_:]+", GROUP_READY_SCRIPT)))
    return used


def test_every_vllm_metric_name_in_use_exists_on_the_real_engine(
    pod: Pod, probes: dict[str, Prober]
) -> None:
    model = pod.argv()[pod.argv().index("--served-model-name") + 1]
    _traffic(pod, model)
    exposed = exposed_names(get_text(pod.ports.http, "/metrics"))
    used = used_vllm_metric_names()
    for source in ("dashboards", "alerts", "KEDA triggers"):
        assert used[source], source
    assert used["leader readiness probe"] == {
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:iteration_tokens_total_count",
    }
    # The vision tier's connector adds its own names only where it is loaded: test_vision_tier.py
    # reads them from real engines that load it.
    exposed |= reference_names("vision_metrics.txt")
    missing = {source: sorted(names - exposed) for source, names in used.items() if names - exposed}
    assert missing == {}, f"not on the real engine's /metrics: {missing}"


def test_the_name_check_can_fail(pod: Pod) -> None:
    """A 0.5-era name the dashboards once used is not exposed: the comparison above bites."""
    exposed = exposed_names(get_text(pod.ports.http, "/metrics"))
    assert "vllm:gpu_cache_usage_perc" not in exposed
    assert "vllm:kv_cache_usage_perc" in exposed


def test_hung_engine_fails_readiness_and_liveness(pod: Pod, probes: dict[str, Prober]) -> None:
    """SIGSTOP (a hung host: sockets stay open, nothing answers): readiness turns not ready
    within failureThreshold periods and a liveness probe fails by its timeout; after SIGCONT
    readiness comes back."""
    ready, live = probes["readinessProbe"], probes["livenessProbe"]
    pod.signal_all(signal.SIGSTOP)
    try:
        took, _ = ready.watch("failed", 60)
        result = live.once()
    finally:
        pod.signal_all(signal.SIGCONT)
    print(f"hung: not ready after {took:.0f} s; liveness: {result.detail} ({result.seconds:.1f} s)")
    assert took <= ready.period * ready.failure_threshold + ready.timeout
    assert not result.ok
    assert result.seconds >= live.timeout - 0.5  # it waited for the probe's timeout
    back, _ = ready.watch("ready", 60)
    print(f"resumed: ready again after {back:.0f} s")


def test_killed_engine_fails_every_probe(pod: Pod, probes: dict[str, Prober]) -> None:
    ready = probes["readinessProbe"]
    assert ready.once().ok
    pod.signal_all(signal.SIGKILL)
    took, results = ready.watch("failed", 30)
    print(f"killed: not ready after {took:.0f} s: {results[-1].detail}")
    assert took <= ready.period * ready.failure_threshold
    for kind in ("startupProbe", "livenessProbe"):
        assert not probes[kind].once().ok, kind


def test_module_used_the_rendered_command(pod: Pod) -> None:
    """The engine ran the pod's argv with the rehearsal's CPU substitutions only."""
    argv = pod.argv()
    assert "--served-model-name" in argv
    assert "--disable-access-log-for-endpoints" in argv
    assert Path(argv[2]).name == "tiny-qwen3-vl"

"""Helpers shared by the scrape_config tests of several layers."""

from __future__ import annotations

from components.render.scrape_config import ScrapeTarget, leader_labels
from stacks.settings import ROOT, load_stack_file


def rehearsal_targets(stack: str) -> dict[str, list[ScrapeTarget]]:
    """What the rehearsal would pass: one loopback port per leader and exporter."""
    s = load_stack_file(ROOT / f"Pulumi.{stack}.yaml")
    leaders = [
        ScrapeTarget(f"127.0.0.1:{18000 + i}", leader_labels(d.name, d.model, 0))
        for i, d in enumerate(s.serving.deployments)
    ]
    return {
        "vllm": leaders,
        "nginx-exporter": [ScrapeTarget("127.0.0.1:19113")],
        "gateway-router": [ScrapeTarget("127.0.0.1:19145")],
        "redis-exporter": [ScrapeTarget("127.0.0.1:19121")],
        "node-exporter": [ScrapeTarget("127.0.0.1:19100", {"node": "rehearsal"})],
    }

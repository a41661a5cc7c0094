"""Prometheus hosts: every scrape target up, the stack's alert rules loaded, nothing firing."""

from __future__ import annotations

from collections import Counter
from typing import Any

import httpx
import pytest

from tests.infra import probes
from tests.infra.probes import InfraHost

# The first scrape of each target happens within one scrape interval of Prometheus' start.
FIRST_SCRAPE_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def http() -> httpx.Client:
    return probes.client()


def api(http: httpx.Client, role_vars: dict[str, Any], path: str) -> Any:
    response = http.get(f"{role_vars['url']}/api/v1/{path}")
    assert response.status_code == 200, response.text
    body = probes.json_of(response)
    assert body["status"] == "success"
    return body["data"]


def test_listens(host: InfraHost, role_vars: dict[str, Any]) -> None:
    assert probes.listening(host, role_vars["port"])


def test_every_scrape_target_is_up(http: httpx.Client, role_vars: dict[str, Any]) -> None:
    def all_up() -> list[dict[str, Any]] | None:
        targets = api(http, role_vars, "targets?state=active")["activeTargets"]
        return targets if targets and all(t["health"] == "up" for t in targets) else None

    targets = probes.wait_for(all_up, timeout=FIRST_SCRAPE_TIMEOUT_S, interval=2)
    if targets is None:
        targets = api(http, role_vars, "targets?state=active")["activeTargets"]
        down = [
            (t["scrapeUrl"], t["health"], t["lastError"]) for t in targets if t["health"] != "up"
        ]
        pytest.fail(f"targets not up after {FIRST_SCRAPE_TIMEOUT_S:g} s: {down or 'none at all'}")
    expected = role_vars.get("targets")
    if expected is not None:
        assert Counter(t["labels"]["job"] for t in targets) == Counter(expected)


def test_the_alert_rules_are_loaded(http: httpx.Client, role_vars: dict[str, Any]) -> None:
    groups = api(http, role_vars, "rules?type=alert")["groups"]
    loaded = {g["name"] for g in groups}
    assert set(role_vars["rule_groups"]) <= loaded
    broken = [r["name"] for g in groups for r in g["rules"] if r["health"] == "err"]
    assert not broken


def test_no_alert_is_firing(http: httpx.Client, role_vars: dict[str, Any]) -> None:
    tolerated = role_vars.get("tolerated_alerts", {})
    firing = [
        a["labels"]["alertname"]
        for a in api(http, role_vars, "alerts")["alerts"]
        if a["state"] == "firing" and a["labels"]["alertname"] not in tolerated
    ]
    assert not firing

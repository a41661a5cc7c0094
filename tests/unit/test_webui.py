"""Open WebUI as the real program builds it, under Pulumi mocks; its settings rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stacks.rules.data import webui_warnings
from stacks.settings import ROOT, load_stack_file
from tests.support.harness import StackRun, run_stack
from tests.support.redis import NS, problems, stack_config


@pytest.fixture(scope="module")
def dev() -> StackRun:
    return run_stack("dev")


def test_the_web_ui_needs_its_gateway_key() -> None:
    text = problems("dev", gateway={"apiKeyIds": ["default", "loadtest"]})
    assert (
        "gateway.apiKeyIds=[default, loadtest]: must include 'webui' while webui.enabled is true"
    ) in text


def test_the_web_ui_needs_redis_and_one_replica() -> None:
    text = problems("dev", redis={"enabled": False}, webui={"replicas": 2})
    assert "webui.enabled=true: needs redis.enabled: true" in text
    assert "webui.replicas=2: must be 1" in text


def test_exposure_at_a_gateway_sub_path_is_refused() -> None:
    assert "webui.exposure=gateway: must be one of loadBalancer, internal" in problems(
        "dev", webui={"exposure": "gateway"}
    )


def test_images_that_cannot_create_the_admin_are_warned_about(tmp_path: Path) -> None:
    assert webui_warnings(load_stack_file(ROOT / "Pulumi.dev.yaml")) == []  # pins v0.7.0
    older = tmp_path / "Pulumi.dev.yaml"
    config = stack_config("dev")
    config[NS + "webui"] = {
        **config[NS + "webui"],
        "image": "ghcr.io/open-webui/open-webui:v0.6.18",
    }
    older.write_text(json.dumps({"config": config}))
    (warning,) = webui_warnings(load_stack_file(older))
    assert warning.path == "webui.image"
    assert "before 0.7.0 ignores WEBUI_ADMIN_EMAIL" in warning.reason

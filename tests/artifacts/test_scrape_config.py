"""The offline rehearsal's prometheus.yml: the real promtool accepts it (rule files included), and its jobs and labels are the ones the in-cluster monitors produce.

This module: rendered files checked by the real programs that read them. The other layers' tests
of the same code: tests/unit/test_scrape_config.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from components.render.alert_rules import render_alert_rules
from components.render.scrape_config import ScrapeTarget, render_prometheus_config
from stacks.settings import ROOT, load_stack_file
from tests.support.metric_names import promtool
from tests.support.scrape_config import rehearsal_targets

STACKS = ["dev", "staging", "prod"]


@pytest.mark.parametrize("stack", STACKS)
def test_promtool_check_config_accepts_the_rendered_config(stack: str, tmp_path: Path) -> None:
    rules = tmp_path / "alerts.yml"
    rules.write_text(render_alert_rules(load_stack_file(ROOT / f"Pulumi.{stack}.yaml")))
    config = tmp_path / "prometheus.yml"
    config.write_text(render_prometheus_config(rehearsal_targets(stack), rule_files=[str(rules)]))
    result = promtool("check", "config", config)
    assert result.returncode == 0, result.stdout + result.stderr
    # promtool follows rule_files and checks them too
    assert f"Checking {rules}" in result.stdout
    assert "SUCCESS" in result.stdout


def test_promtool_rejects_a_broken_config(tmp_path: Path) -> None:
    """The check is real: a duplicate job name is refused."""
    text = render_prometheus_config({"vllm": [ScrapeTarget("127.0.0.1:1")]})
    document = yaml.safe_load(text)
    document["scrape_configs"] *= 2
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(document))
    result = promtool("check", "config", config)
    assert result.returncode == 1
    assert "found multiple scrape configs with job name" in result.stdout + result.stderr

"""The rehearsal's plan against what the cluster gets: only the documented substitutions differ.

This module: running processes: servers on loopback and in network namespaces. The other layers'
tests of the same code: tests/unit/test_rehearsal_plan.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from components.render.vllm_command import WORKER, build_vllm_command
from scripts.rehearsal import plan as P
from tests.support.rehearsal_plan import plan_of, settings_of

ROOT = Path(__file__).resolve().parents[2]


def test_the_docs_print_the_substitution_table() -> None:
    docs = (ROOT / "docs" / "rehearsal.md").read_text()
    assert P.substitution_table() in docs


def test_rehearse_prints_the_same_table() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "scripts.rehearse", "substitutions"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert result.stdout == P.substitution_table()


def rehearse(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "scripts.rehearse", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


def test_an_unknown_stack_is_one_message(tmp_path: Path) -> None:
    result = rehearse("--stack", "nosuch", "--state-dir", str(tmp_path))
    assert result.returncode == 1
    assert result.stderr == (
        f"rehearse: {ROOT}/Pulumi.nosuch.yaml: 1 configuration problem(s):\n"
        "  - file: no such stack file\n"
    )


def test_an_invalid_stack_file_names_the_setting(tmp_path: Path) -> None:
    bad = tmp_path / "Pulumi.bad.yaml"
    bad.write_text("config:\n  qwen-vl-serving:region: 12\n")
    result = rehearse("--stack", str(bad), "--state-dir", str(tmp_path / "state"))
    assert result.returncode == 1
    assert result.stderr.startswith(f"rehearse: {bad}: ")
    assert "  - serving: required" in result.stderr
    assert "Traceback" not in result.stderr


def test_down_with_nothing_to_do(tmp_path: Path) -> None:
    result = rehearse("down", "--state-dir", str(tmp_path / "none"))
    if os.geteuid() == 0:
        assert (result.returncode, result.stdout) == (
            0,
            f"nothing to tear down in {tmp_path}/none\n",
        )
    else:
        assert result.returncode == 1
        assert (
            result.stderr
            == "rehearse: the rehearsal needs root (network namespaces, ip netns exec)\n"
        )


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="drops root")
@pytest.mark.parametrize("command", ["status", "down"])
def test_status_and_down_as_another_user_say_root_is_needed(command: str) -> None:
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    result = subprocess.run(
        [*nobody, sys.executable, "-m", "scripts.rehearse", command],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert (
        result.stderr == "rehearse: the rehearsal needs root (network namespaces, ip netns exec)\n"
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="up checks for root before it looks for `ip`")
def test_up_without_ip_on_path_is_one_message(tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    with tempfile.TemporaryDirectory(prefix="qvr-noip-") as parent:
        Path(parent).chmod(0o755)  # nginx's user must reach the state dir (pytest's is 0700)
        state = Path(parent) / "state"
        result = rehearse("--stack", "dev", "--state-dir", str(state), env={"PATH": str(empty)})
        assert not state.exists()
    assert result.returncode == 1
    assert result.stderr == "rehearse: `ip` is not on PATH: install iproute2 (`make debs`)\n"


@pytest.mark.parametrize("stack", ["dev", "staging", "prod"])
def test_engine_argv_is_the_builders_command_with_the_stand_in(stack: str) -> None:
    plan, _, settings = plan_of(stack)
    ns = settings.serving.namespace
    engines = [p for p in plan.processes if p.pod is not None]
    assert engines
    for proc in engines:
        pod = next(p for p in P.engine_pods(settings, 1) if p.name == proc.pod)
        master = f"{pod.deployment.name}-{pod.group}.{pod.deployment.name}.{ns}"
        expected = build_vllm_command(
            pod.deployment,
            pod.role,
            rank=pod.rank if pod.role == WORKER else None,
            master_addr=master,
        )
        prefix = (*P.STANDIN, "--join-timeout", "30")
        assert proc.argv[: len(prefix)] == prefix
        assert list(proc.argv[len(prefix) :]) == expected[1:]
        assert expected[0] == "vllm"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_promtool_accepts_the_rehearsal_prometheus_config(tmp_path: Path) -> None:
    layout = P.Layout(tmp_path)
    settings = settings_of("staging")
    plan = P.plan_rehearsal(
        settings, P.generate_secrets(settings), P.Options(run="staging", layout=layout)
    )
    for spec in plan.files:
        if spec.path.parent == P.prometheus_dir(layout):
            spec.path.parent.mkdir(parents=True, exist_ok=True)
            spec.path.write_text(spec.text)
    config = P.prometheus_dir(layout) / "prometheus.yml"
    result = subprocess.run(
        ["promtool", "check", "config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout + result.stderr

"""The gateway's Kubernetes objects per stack (the real program under mocks), its pod's start script run by a real shell, its NLB annotations and the gateway settings rules.

This module: rendered files checked by the real programs that read them. The other layers' tests
of the same code: tests/program/test_gateway.py, tests/unit/test_gateway.py.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from components.render.gateway_pod import build_start_script
from components.render.nginx_conf import (
    build_nginx_conf_args,
)
from stacks.settings import load_stack_file, stack_file


@pytest.fixture
def fake_nginx(tmp_path: Path) -> Path:
    """A directory whose `nginx` records its arguments instead of serving."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nginx").write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/nginx-args\n')
    (bin_dir / "nginx").chmod(0o755)
    return bin_dir


@pytest.mark.parametrize(
    ("resolv", "resolver_line"),
    [
        (
            "search qwen-vl.svc.cluster.local svc.cluster.local\nnameserver 172.20.0.10\noptions ndots:5\n",
            "resolver 172.20.0.10 valid=5s ipv6=off;\n",
        ),
        (
            "nameserver fd00:10:100::a\nnameserver 10.0.0.2\n",
            "resolver [fd00:10:100::a] valid=5s ipv6=off;\n",
        ),
    ],
)
def test_the_start_script_points_the_resolver_at_kube_dns(
    tmp_path: Path,
    fake_nginx: Path,
    resolv: str,
    resolver_line: str,
) -> None:
    settings = load_stack_file(stack_file("dev"))
    conf = build_nginx_conf_args(settings)
    runtime = tmp_path / "run"
    runtime.mkdir()
    conf = replace(conf, paths=replace(conf.paths, runtime_dir=str(runtime)))
    (tmp_path / "resolv.conf").write_text(resolv)
    script = build_start_script(conf, resolv_conf=str(tmp_path / "resolv.conf"))
    result = subprocess.run(
        ["sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=10,
        env={**os.environ, "PATH": f"{fake_nginx}:/usr/bin:/bin"},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert (runtime / "resolver.conf").read_text() == resolver_line
    assert (tmp_path / "nginx-args").read_text() == "-e stderr -c /etc/nginx/gateway/nginx.conf\n"


def test_the_start_script_fails_clearly_without_a_nameserver(
    tmp_path: Path, fake_nginx: Path
) -> None:
    conf = build_nginx_conf_args(load_stack_file(stack_file("dev")))
    (tmp_path / "resolv.conf").write_text("search example\n")
    result = subprocess.run(
        ["sh", "-c", build_start_script(conf, str(tmp_path / "resolv.conf"))],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
        env={**os.environ, "PATH": f"{fake_nginx}:/usr/bin:/bin"},
    )
    assert result.returncode == 1
    assert "gateway: no nameserver in" in result.stderr
    assert not (tmp_path / "nginx-args").exists()

"""Engine workers (rank > 0): headless, with their rank, connected to the leader's master port."""

from __future__ import annotations

from typing import Any

from tests.infra import probes
from tests.infra.probes import InfraHost


def test_serves_no_http(host: InfraHost, role_vars: dict[str, Any]) -> None:
    assert not probes.listening_anywhere(host, role_vars["port"])


def test_runs_headless_with_its_rank(host: InfraHost, role_vars: dict[str, Any]) -> None:
    argv = probes.engine_command(host, role_vars["model"])
    assert argv, f"no `vllm serve {role_vars['model']}` process on this host"
    assert "--headless" in argv
    assert probes.flag(argv, "--node-rank") == str(role_vars["rank"])
    assert probes.flag(argv, "--nnodes") == str(role_vars["nnodes"])
    assert probes.flag(argv, "--master-addr") == role_vars["master_addr"]
    assert probes.flag(argv, "--master-port") == str(role_vars["master_port"])


def test_connected_to_the_leader(host: InfraHost, role_vars: dict[str, Any]) -> None:
    leader = probes.resolve(host, role_vars["master_addr"])
    port = role_vars["master_port"]
    connections = [
        s for s in probes.established(host) if (s.remote, s.remote_port) == (leader, port)
    ]
    assert connections, f"no established connection to {leader}:{port}"

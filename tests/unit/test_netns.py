"""Simulated hosts for the rehearsal: network planning (pure) and real namespaces (root).

The live tests create namespaces named qvr-t<pid><letter>-*, send traffic only between
them, and assert that teardown leaves none of their namespaces, /etc/netns entries,
processes or files behind, also when the process that built them crashed.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts.rehearsal import netns


def test_plan_assigns_namespaces_and_addresses_in_order() -> None:
    net = netns.plan_network(
        "dev",
        [
            ("gateway", ["gateway.serving.svc.cluster.local", "gateway"]),
            ("qwen-0", ["qwen-0.qwen.serving"]),
            ("chrony", []),
        ],
    )
    assert net.bridge_netns == "qvr-dev-br"
    assert [h.netns for h in net.hosts] == ["qvr-dev-gateway", "qvr-dev-qwen-0", "qvr-dev-chrony"]
    assert [str(h.address) for h in net.hosts] == ["10.231.0.1", "10.231.0.2", "10.231.0.3"]
    assert net.host("qvr-dev-gateway").names == ("gateway.serving.svc.cluster.local", "gateway")


def test_hosts_file_maps_every_named_host() -> None:
    net = netns.plan_network(
        "dev", [("gw", ["gateway", "gateway.serving"]), ("t", []), ("n", ["n0"])]
    )
    assert net.hosts_file() == (
        "# Written by the qwen-vl-serving rehearsal (scripts/rehearsal/netns.py).\n"
        "127.0.0.1\tlocalhost\n"
        "::1\tlocalhost ip6-localhost ip6-loopback\n"
        "10.231.0.1\tgateway gateway.serving\n"
        "10.231.0.3\tn0\n"
    )


@pytest.mark.parametrize(
    ("run", "hosts", "message"),
    [
        ("Dev", [("gw", [])], "run 'Dev' must be lower-case"),
        ("dev", [("gw_1", [])], "role 'gw_1' must be lower-case"),
        ("dev", [("x" * 70, [])], "longer than 64 characters"),
        ("dev", [("gw", []), ("gw", [])], "role 'gw' is listed twice"),
        ("dev", [("a", ["same"]), ("b", ["same"])], "host name 'same' is claimed by a and b"),
    ],
)
def test_bad_plans_are_refused(run: str, hosts: list[tuple[str, list[str]]], message: str) -> None:
    with pytest.raises(netns.NetnsError, match=message):
        netns.plan_network(run, hosts)


def test_a_full_subnet_is_refused() -> None:
    tiny = ipaddress.IPv4Network("10.231.0.0/30")  # two usable addresses
    with pytest.raises(
        netns.NetnsError, match=re.escape("10.231.0.0/30 has no address left for 'c'")
    ):
        netns.plan_network("dev", [("a", []), ("b", []), ("c", [])], tiny)


def test_state_survives_a_round_trip_through_its_file(tmp_path: Path) -> None:
    state = netns.State(path=tmp_path / "state.json")
    state.record_namespace("qvr-dev-gw")
    state.processes.append(
        netns.ProcessRecord("web", "qvr-dev-gw", 4242, 99, ["nginx", "-g", "daemon off;"], "w.log")
    )
    state.save()
    loaded = netns.State.load(tmp_path / "state.json")
    assert loaded.namespaces == ["qvr-dev-gw"]
    assert loaded.processes == state.processes
    assert netns.State.load(tmp_path / "absent.json") == netns.State(path=tmp_path / "absent.json")


def test_state_refuses_names_without_the_prefix(tmp_path: Path) -> None:
    state = netns.State(path=tmp_path / "state.json")
    with pytest.raises(netns.NetnsError, match="not a rehearsal namespace name"):
        state.record_namespace("default")
    assert not (tmp_path / "state.json").exists()


@pytest.fixture
def state(tmp_path: Path) -> Iterator[netns.State]:
    """A state file under tmp_path; whatever a test leaves up is torn down afterwards."""
    current = netns.State(path=tmp_path / ".rehearsal" / "state.json")
    yield current
    netns.teardown(netns.State.load(current.path) if current.path.exists() else current)

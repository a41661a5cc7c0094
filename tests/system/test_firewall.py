"""The rehearsal's firewall enforced by the kernel: network namespaces of this test's own, the
staging stack's rendered NetworkPolicies translated by scripts/rehearsal/firewall.py and loaded
with `nft`, tiny TCP listeners, and connections tried from inside the namespaces.

This module: real packets. The other layer's test of the same code: tests/unit/test_firewall.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from components.render.network_policies import build_network_policies
from scripts.rehearsal import netns
from scripts.rehearsal.firewall import translate
from stacks.naming import MASTER_PORT, VLLM_PORT
from tests.support.engines import settings_of
from tests.support.firewall import STACK, endpoints

ROLES = ("gateway", "leader", "worker", "stranger", "other")

needs_root_ip_nft = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("nft") is None,
    reason="needs root, iproute2's `ip` and nftables' `nft`",
)

LISTEN = textwrap.dedent(
    """
    import socket, sys, threading
    def serve(port):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port))
        s.listen()
        while True:
            conn, _ = s.accept()
            conn.sendall(b"ok")
            conn.close()
    for port in sys.argv[1:]:
        threading.Thread(target=serve, args=(int(port),), daemon=True).start()
    threading.Event().wait()
    """
)
CONNECT = textwrap.dedent(
    """
    import socket, sys
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1.5) as s:
        assert s.recv(2) == b"ok"
    """
)


@pytest.fixture
def net(tmp_path: Path) -> Iterator[tuple[netns.State, netns.Network]]:
    state = netns.State(path=tmp_path / ".rehearsal" / "state.json")
    network = netns.plan_network(f"fw{os.getpid()}", [(role, [role]) for role in ROLES])
    try:
        netns.create_network(state, network)
        yield state, network
    finally:
        netns.teardown(netns.State.load(state.path) if state.path.exists() else state)


def reaches(network: netns.Network, src: str, dst: str, port: int) -> bool:
    address = str(network.hosts[ROLES.index(dst)].address)
    done = netns.run_in(
        network.hosts[ROLES.index(src)].netns,
        [sys.executable, "-c", CONNECT, address, str(port)],
        timeout=10,
    )
    return done.returncode == 0


@pytest.mark.netns
@needs_root_ip_nft
def test_the_kernel_enforces_the_rendered_policies(
    net: tuple[netns.State, netns.Network], tmp_path: Path
) -> None:
    state, network = net
    addresses = {role: str(network.hosts[i].address) for i, role in enumerate(ROLES)}
    rules = translate(build_network_policies(settings_of(STACK)), endpoints(addresses))
    for role, host in zip(ROLES, network.hosts, strict=True):
        script = tmp_path / f"{role}.nft"
        script.write_text(rules[addresses[role]])
        loaded = subprocess.run(
            ["ip", "netns", "exec", host.netns, "nft", "-f", str(script)],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert loaded.returncode == 0, f"{role}: {loaded.stderr}"
    ports = [str(VLLM_PORT), str(MASTER_PORT)]
    for role in ("leader", "worker"):
        netns.start_process(
            state, network.hosts[ROLES.index(role)].netns,
            [sys.executable, "-c", LISTEN, *ports], name=f"{role}-listen",
        )  # fmt: skip
    # the listeners need a moment; the allowed path is polled, then everything is asked once
    for _ in range(50):
        if reaches(network, "gateway", "leader", VLLM_PORT):
            break
        time.sleep(0.1)
    found = {
        (src, dst, port): reaches(network, src, dst, port)
        for src, dst, port in [
            ("gateway", "leader", VLLM_PORT),
            ("worker", "leader", MASTER_PORT),  # the group's own rank: rendezvous
            ("leader", "worker", MASTER_PORT),
            ("other", "leader", VLLM_PORT),
            ("other", "leader", MASTER_PORT),
            ("other", "worker", MASTER_PORT),
            ("gateway", "leader", MASTER_PORT),
            ("gateway", "worker", VLLM_PORT),
            ("stranger", "leader", MASTER_PORT),  # a rank of group 1
        ]
    }
    assert found == {
        ("gateway", "leader", VLLM_PORT): True,
        ("worker", "leader", MASTER_PORT): True,
        ("leader", "worker", MASTER_PORT): True,
        ("other", "leader", VLLM_PORT): False,
        ("other", "leader", MASTER_PORT): False,
        ("other", "worker", MASTER_PORT): False,
        ("gateway", "leader", MASTER_PORT): False,
        ("gateway", "worker", VLLM_PORT): False,
        ("stranger", "leader", MASTER_PORT): False,
    }


@pytest.mark.netns
@needs_root_ip_nft
def test_the_printed_rules_are_what_nft_accepts_for_every_pod_host(
    net: tuple[netns.State, netns.Network],
) -> None:
    """`python -m scripts.rehearse firewall` (the README's command) prints a script per pod host;
    the real `nft`, in check mode inside a namespace of this test, accepts each one."""
    _, network = net
    printed = subprocess.run(
        [sys.executable, "-m", "scripts.rehearse", "firewall", "--stack", STACK],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert printed.returncode == 0, printed.stderr
    _, *parts = printed.stdout.split("# ---- host ")
    scripts = {part.split(" ", 1)[0]: part.split("\n", 1)[1] for part in parts}
    # staging with one group per deployment: the time server and the client stand outside
    assert sorted(scripts) == sorted(
        ["gateway-0", "gateway-1", "services", "qwen3-vl-2b-0", "qwen3-vl-32b-0",
         "qwen3-vl-32b-0-1"]
    )  # fmt: skip
    for host, script in scripts.items():
        checked = subprocess.run(
            ["ip", "netns", "exec", network.hosts[0].netns, "nft", "-c", "-f", "-"],
            input=script, capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert checked.returncode == 0, f"{host}: {checked.stderr}"

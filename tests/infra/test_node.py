"""Every node: chronyd runs the rendered chrony.conf and is synchronised to its source;
node_exporter makes the clock observable to Prometheus."""

from __future__ import annotations

import re
from typing import Any

import pytest

from scripts.rehearsal.plan import without_phc
from tests.infra import probes
from tests.infra.probes import InfraHost

SYNC_TIMEOUT_S = 60.0


def chronyd_argv(host: InfraHost) -> list[str]:
    found = [
        args.split()
        for _, args in probes.host_processes(host)
        if args.split()[0].rsplit("/", 1)[-1] == "chronyd"
    ]
    assert len(found) == 1, f"expected one chronyd on this host, found {found}"
    return found[0]


def test_chronyd_runs_the_rendered_config(host: InfraHost, role_vars: dict[str, Any]) -> None:
    argv = chronyd_argv(host)
    path = role_vars["chrony_conf_path"]
    args = " ".join(argv)
    assert (
        f"include {path}" in args
        or probes.flag(argv, "-f") == path
        or ("-f" not in argv and "include" not in args)
    ), f"chronyd does not read {path}: {args}"
    expected = role_vars["chrony_conf"]
    if not host.file(role_vars["phc_device"]).exists:
        # What the node's boot script does when the PTP device is missing.
        expected = without_phc(expected)
    assert host.file(path).content_string == expected


def _synchronised(host: InfraHost, chronyc: list[str]) -> str | None:
    base = "chronyc " + " ".join(["%s"] * len(chronyc)) + " -n "
    tracking = host.run(base + "tracking", *chronyc).stdout
    sources = host.run(base + "sources", *chronyc).stdout
    leap = re.search(r"^Leap status\s*:\s*(.+)$", tracking, re.M)
    selected = [line.split()[1] for line in sources.splitlines() if line[1:2] == "*"]
    return selected[0] if leap and leap[1].strip() == "Normal" and selected else None


def test_chronyd_is_synchronised_to_its_source(host: InfraHost, role_vars: dict[str, Any]) -> None:
    source = probes.wait_for(
        lambda: _synchronised(host, role_vars["chronyc"]), timeout=SYNC_TIMEOUT_S, interval=2
    )
    if source is None:
        pytest.fail(f"chronyd not synchronised within {SYNC_TIMEOUT_S:g} s")
    assert source in role_vars["time_sources"]


def test_node_exporter_exports_the_clock(host: InfraHost, role_vars: dict[str, Any]) -> None:
    port = role_vars["node_exporter_port"]
    assert probes.listening(host, port)
    metrics = host.check_output("curl -sf http://127.0.0.1:%s/metrics", str(port))
    assert re.search(r"^node_timex_offset_seconds ", metrics, re.M)
    assert re.search(r"^node_timex_sync_status ", metrics, re.M)

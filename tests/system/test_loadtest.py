"""scripts/loadtest.py: SSE timing, percentiles, reports, target refusal, the generated image, and one short real run through nginx to an engine stand-in on loopback.

This module: running processes: servers on loopback and in network namespaces. The other layers'
tests of the same code: tests/unit/test_loadtest.py.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from scripts import loadtest as lt
from tests.support.gateway_run import (
    CLIENT_KEYS,
    ENGINE_KEY,
    SID_NGINX_READY,
    StandIn,
    gateway_args,
    running_gateway,
    scratch_dir,
)
from tests.support.loadtest import outputs
from tests.support.local import free_port, stop

ROOT = Path(__file__).resolve().parents[2]


TOKEN_DELAY = 0.01  # the stand-in's seconds per token in the end-to-end run


def run_loadtest(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """scripts/loadtest.py as a user runs it: its own process, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "scripts.loadtest", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        check=False,
    )


def test_the_command_refuses_before_sending_anything(tmp_path: Path) -> None:
    (tmp_path / "outputs.json").write_text(json.dumps(outputs()))
    out = tmp_path / "out"
    done = run_loadtest(
        *("--stack", "prod", "--target", "cluster"),
        *("--outputs-file", str(tmp_path / "outputs.json")),
        *("--url", "http://example.org", "--out", str(out)),
    )
    assert done.returncode == 2
    assert "refusing to load http://example.org" in done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists()  # nothing started


@pytest.fixture
def stand_in() -> Iterator[StandIn]:
    """The real engine stand-in on loopback, serving model `m1` with the engine key."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "scripts.engine_standin",
            "--token-delay",
            str(TOKEN_DELAY),
            "serve",
            "Qwen/Qwen3-VL-2B-Instruct",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--served-model-name",
            "m1",
            "--api-key",
            ENGINE_KEY,
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, "the stand-in exited"
            assert time.monotonic() < deadline, "the stand-in did not start"
            time.sleep(0.05)
        yield StandIn("alpha-0", f"127.0.0.1:{port}", proc)
    finally:
        stop(proc, timeout=10)


@pytest.mark.skipif(not SID_NGINX_READY, reason="no nginx with njs: run make nginx-chroot")
def test_a_short_run_through_the_gateway(stand_in: StandIn, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with (
        scratch_dir() as directory,
        running_gateway(gateway_args(str(directory), {"alpha": [stand_in]}), directory) as gw,
    ):
        outputs_file = tmp_path / "outputs.json"
        outputs_file.write_text(
            json.dumps(
                {
                    "stack": "loopback",
                    "gateway_url": gw.url,
                    "gateway_api_keys": CLIENT_KEYS,
                    "engines": {"alpha": {"served_model_name": "m1"}},
                }
            )
        )
        done = run_loadtest(
            *("--stack", "loopback", "--target", "cluster"),
            *("--outputs-file", str(outputs_file), "--url", gw.url),
            *("--users", "3", "--duration", "3", "--stream-ratio", "0.5"),
            *("--image-size", "48x32", "--progress-interval", "1", "--out", str(out)),
            timeout=90,
        )
        access = [r for r in gw.log_records() if r["path"] == "/alpha/v1/chat/completions"]
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[   1.0s] load: users" in done.stdout  # progress while it runs
    summary = {r["mode"]: r for r in csv.DictReader((out / "summary.csv").open())}
    assert set(summary) == {"stream", "non-stream", "all"}
    stream, plain = summary["stream"], summary["non-stream"]
    for row in (stream, plain):
        assert row["model"] == "m1"
        assert int(row["requests"]) > 0
        assert (row["errors"], row["errors_by_status"]) == ("0", "")
        assert float(row["e2e_p50_s"]) > 0
        assert float(row["output_tokens_per_s"]) > 0
    # The stand-in sleeps TOKEN_DELAY before each token, so TTFT and ITL cannot be shorter.
    assert float(stream["ttft_p50_s"]) >= TOKEN_DELAY
    assert TOKEN_DELAY * 0.8 <= float(stream["itl_p50_s"]) <= TOKEN_DELAY * 5
    assert plain["ttft_p50_s"] == ""  # nothing to time without a stream

    # Every request the tool counted reached the engine through the gateway, with its key.
    records = lt.read_records(out / "requests.csv")
    assert {r.request_id for r in records} <= {str(a["request_id"]) for a in access}
    assert len(access) >= len(records)
    assert {a["key_id"] for a in access} == {"loadtest"}
    assert {a["status"] for a in access} == {200}
    assert all(r.output_tokens > 0 for r in records)
    with Image.open(out / "chart.png") as chart:
        assert chart.format == "PNG"
        assert chart.size[0] > 500

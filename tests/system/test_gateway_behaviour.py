"""The rendered gateway config, judged by the real nginx on loopback in front of stand-in engines.

nginx (sid's 1.30 with njs, through scripts/sid-nginx.sh; static upstream mode) runs
unprivileged, as in the gateway pod, as a foreground child with every path under a scratch directory, on free loopback ports. The
engines are small HTTP servers started by this module in subprocesses (so killing one is a
real kill): they demand the engine key like vLLM does on /v1, answer every other path too (as
vLLM's open endpoints would), stream SSE with a delay between events, and say who they are in
each reply. Every loop is bounded in count and time; every process is stopped and waited for.

Run as a script (`python test_gateway_behaviour.py serve NAME ENGINE_KEY [HOST PORT]`) this
file is the stand-in engine itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from components.render.nginx_conf import (
    CONF_FILE,
    HEALTH_PATH,
)
from tests.support.gateway_run import (
    BODY_LIMIT_MIB,
    CLIENT_KEYS,
    ENGINE_KEY,
    MIB,
    SID_NGINX,
    SID_NGINX_READY,
    SSE_DELAY,
    SSE_EVENTS,
    Gateway,
    StandIn,
    bearer,
    gateway_args,
    running_gateway,
    scratch_dir,
    stand_ins,
)

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    not SID_NGINX_READY, reason="no nginx with njs: run make nginx-chroot (needs root)"
)


# ----------------------------------------------------------------- the stand-in engine


# ----------------------------------------------------------------- nginx


def chat(client: httpx.Client, path: str = "/v1/chat/completions", **body: Any) -> httpx.Response:
    payload = {"model": "model-alpha", "messages": [{"role": "user", "content": "hi"}], **body}
    return client.post(path, json=payload, headers=bearer())


def assert_openai_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] is None
    assert error["code"] == code
    return error


# ----------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def engines() -> Iterator[dict[str, list[StandIn]]]:
    with stand_ins(["alpha-0", "alpha-1", "alpha-2", "beta-0"]) as started:
        yield {"alpha": started[:3], "beta": started[3:]}


@pytest.fixture(scope="module")
def gateway(engines: dict[str, list[StandIn]]) -> Iterator[Gateway]:
    with (
        scratch_dir() as directory,
        running_gateway(gateway_args(str(directory), engines), directory) as gw,
    ):
        yield gw


@pytest.fixture
def directory() -> Iterator[Path]:
    with scratch_dir() as path:
        yield path


@pytest.fixture
def client(gateway: Gateway) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, timeout=30) as c:
        yield c


# ----------------------------------------------------------------- streaming and bodies


def test_sse_reaches_the_client_event_by_event(gateway: Gateway) -> None:
    arrivals: list[tuple[float, bytes]] = []
    payload = {"model": "model-alpha", "messages": [], "stream": True}
    start = time.monotonic()
    with (
        httpx.Client(base_url=gateway.url, timeout=30) as c,
        c.stream(
            "POST",
            "/v1/chat/completions",
            json=payload,
            headers={**bearer(), "Accept-Encoding": "gzip"},
        ) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream"
        assert "content-encoding" not in response.headers  # never gzipped
        assert response.headers["x-accel-buffering"] == "no"
        for chunk in response.iter_raw():
            arrivals.append((time.monotonic() - start, chunk))
    events = [(t, c) for t, c in arrivals if b"data: {" in c]
    assert len(events) >= 2, arrivals
    # Event i left the engine at i * SSE_DELAY: with buffering, all would arrive together.
    first, last = events[0][0], events[-1][0]
    assert last - first >= (SSE_EVENTS - 1) * SSE_DELAY * 0.8, arrivals
    assert first < SSE_DELAY, arrivals
    body = b"".join(c for _, c in arrivals)
    assert body.count(b"data: {") == SSE_EVENTS
    assert body.endswith(b"data: [DONE]\n\n")


def test_a_10_mib_json_body_is_accepted(client: httpx.Client) -> None:
    image = "A" * (10 * MIB)
    body = json.dumps(
        {
            "model": "model-alpha",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "image_url",
                            "image_url": {"url": f"data:image/png;base64,{image}"},
                        }
                    ],
                }
            ],
        }
    )
    assert len(body) > 10 * MIB
    response = client.post(
        "/v1/chat/completions",
        content=body,
        headers={**bearer(), "Content-Type": "application/json"},
    )
    assert response.status_code == 200, response.text
    assert response.json()["body_bytes"] == len(body)  # the engine got all of it


def test_a_body_over_the_limit_gets_413_in_openai_format(client: httpx.Client) -> None:
    body = b"{" + b" " * (BODY_LIMIT_MIB * MIB) + b"}"  # one byte over the limit, as JSON
    response = client.post(
        "/v1/chat/completions",
        content=body,
        headers={**bearer(), "Content-Type": "application/json"},
    )
    error = assert_openai_error(response, 413, "request_too_large")
    assert f"{BODY_LIMIT_MIB} MiB" in error["message"]


# ----------------------------------------------------------------- keys


def test_api_keys_are_checked_and_never_logged(gateway: Gateway, client: httpx.Client) -> None:
    missing = client.get("/v1/models")
    wrong = client.get("/v1/models", headers={"Authorization": "Bearer not-a-key-0123456789"})
    good = client.get("/alpha/v1/models", headers=bearer("loadtest"))
    # nginx's map compares strings case-insensitively, as docs/gateway.md warns.
    other_case = client.get(
        "/alpha/v1/models", headers={"Authorization": f"Bearer {CLIENT_KEYS['default'].swapcase()}"}
    )
    assert other_case.status_code == 200
    for response in (missing, wrong):
        error = assert_openai_error(response, 401, "invalid_api_key")
        assert error["type"] == "invalid_request_error"
        assert "x-upstream" not in response.headers  # refused before any engine
    assert good.status_code == 200
    # The engine saw the engine key (it answers 401 otherwise), never the client's.
    assert good.json()["path"] == "/v1/models"
    request_ids = {good.headers["x-request-id"], missing.headers["x-request-id"]}
    assert good.json()["request_id"] == good.headers["x-request-id"]

    log = gateway.access_log.read_text()
    for secret in (*CLIENT_KEYS.values(), ENGINE_KEY, "Bearer"):
        assert secret not in log
    records = {r["request_id"]: r for r in gateway.log_records() if r["request_id"] in request_ids}
    good_record = records[good.headers["x-request-id"]]
    assert (good_record["key_id"], good_record["status"], good_record["deployment"]) == (
        "loadtest",
        200,
        "alpha",
    )
    assert good_record["upstream_addr"].startswith("127.0.0.1:")
    for field in (
        "request_time",
        "upstream_connect_time",
        "upstream_header_time",
        "upstream_response_time",
        "bytes_sent",
        "body_bytes_sent",
    ):
        assert field in good_record
    assert records[missing.headers["x-request-id"]]["key_id"] == ""


def test_a_burst_over_the_rate_gets_429_per_key(
    engines: dict[str, list[StandIn]], directory: Path
) -> None:
    # 1 request per minute and a burst of 3: the 5th request within a minute is refused.
    args = gateway_args(str(directory), engines, requests_per_second=1 / 60, burst=3)
    with running_gateway(args, directory) as gw, httpx.Client(base_url=gw.url, timeout=10) as c:
        statuses = [c.get("/v1/models", headers=bearer()).status_code for _ in range(8)]
        limited = c.get("/v1/models", headers=bearer())
        other_key = c.get("/v1/models", headers=bearer("loadtest"))
    assert statuses[:4] == [200] * 4
    assert set(statuses[4:]) == {429}
    error = assert_openai_error(limited, 429, "rate_limit_exceeded")
    assert "rate limit" in error["message"].lower()
    assert other_key.status_code == 200  # the limit is per key


# ----------------------------------------------------------------- routes


# vLLM 0.33 paths a client must not reach (docs/reference/vllm.md#open-paths): open even with --api-key,
# dev-mode and fault-tolerance routes, the LoRA admin routes the gateway's engine key would
# unlock, and the docs. Written out here, not taken from the renderer's list.
VLLM_PATHS_TO_REFUSE = [
    "/invocations", "/scale_elastic_ep", "/is_scaling_elastic_ep", "/tokenize", "/detokenize",
    "/load", "/metrics", "/ping", "/version", "/health", "/kv_event_sources",
    "/generative_scoring", "/docs", "/redoc", "/openapi.json", "/server_info",
    "/reset_prefix_cache", "/sleep", "/wake_up", "/collective_rpc", "/fault_tolerance/status",
    "/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/inference/v1/generate",
]  # fmt: skip


@pytest.mark.parametrize(
    "path",
    [
        *VLLM_PATHS_TO_REFUSE,
        *(f"/beta{p}" for p in VLLM_PATHS_TO_REFUSE),
        *(f"/alpha{p}" for p in VLLM_PATHS_TO_REFUSE),
        "/v2/anything",
    ],
)
def test_vllm_paths_outside_the_api_are_refused(client: httpx.Client, path: str) -> None:
    for method in ("GET", "POST"):
        response = client.request(method, path, headers=bearer(), json={})
        assert_openai_error(response, 404, "unknown_url")
        assert "x-upstream" not in response.headers


def test_routes_reach_the_right_deployment_with_the_prefix_stripped(client: httpx.Client) -> None:
    default = client.get("/v1/files?x=1", headers=bearer()).json()
    beta = client.get("/beta/v1/models", headers=bearer()).json()
    alpha = client.get("/alpha/v1/models", headers=bearer()).json()
    alias = chat(client, "/chat/completions").json()
    assert default["upstream"].startswith("alpha-")
    assert default["path"] == "/v1/files?x=1"
    assert (beta["upstream"], beta["path"]) == ("beta-0", "/v1/models")
    assert alpha["upstream"].startswith("alpha-")
    assert alpha["path"] == "/v1/models"
    assert alias["upstream"].startswith("alpha-")
    assert alias["path"] == "/v1/chat/completions"


def test_generate_names_its_replacement(client: httpx.Client) -> None:
    error = assert_openai_error(
        client.post("/generate", json={"prompt": "hi"}), 410, "endpoint_removed"
    )
    assert "/v1/chat/completions" in error["message"]


def test_healthz_is_answered_by_the_gateway_without_a_key(client: httpx.Client) -> None:
    response = client.get("/healthz")  # the path the pod's probes ask (docs/gateway.md)
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert "x-upstream" not in response.headers


def test_status_is_only_on_the_internal_port(gateway: Gateway, client: httpx.Client) -> None:
    assert_openai_error(client.get("/stub_status", headers=bearer()), 404, "unknown_url")
    status_port = _status_listen(gateway)
    text = httpx.get(f"http://{status_port}/stub_status", timeout=5).text
    assert text.startswith("Active connections:")
    assert "server accepts handled requests" in text


def _status_listen(gateway: Gateway) -> str:
    conf = (gateway.error_log.parent / CONF_FILE).read_text()
    listens = [
        line.split()[1].rstrip(";")
        for line in conf.splitlines()
        if line.strip().startswith("listen ")
    ]
    return listens[1]


# ----------------------------------------------------------------- upstream behaviour


def test_session_affinity_keeps_a_session_on_one_engine(
    engines: dict[str, list[StandIn]], directory: Path
) -> None:
    args = gateway_args(
        str(directory), engines, load_balancing="sessionAffinity", affinity_header="X-Session-Id"
    )
    with running_gateway(args, directory) as gw, httpx.Client(base_url=gw.url, timeout=10) as c:

        def upstream(session: str | None) -> str:
            headers = {**bearer(), **({"X-Session-Id": session} if session else {})}
            response = c.post(
                "/v1/chat/completions", json={"model": "model-alpha"}, headers=headers
            )
            assert response.status_code == 200, response.text
            return response.json()["upstream"]

        one_session = Counter(upstream("conversation-42") for _ in range(100))
        many_sessions = Counter(upstream(f"conversation-{i}") for i in range(50))
        no_session = Counter(upstream(None) for _ in range(60))
    assert len(one_session) == 1
    assert sum(one_session.values()) == 100
    # New sessions go to the engine with the fewest: 50 sessions (one already placed) as
    # 17/17/17 at most one apart, where a plain hash of these ids gave far less even shares.
    assert set(many_sessions) == {"alpha-0", "alpha-1", "alpha-2"}
    assert max(many_sessions.values()) - min(many_sessions.values()) <= 1
    # No header: round robin, not one hot engine.
    assert set(no_session) == {"alpha-0", "alpha-1", "alpha-2"}
    assert min(no_session.values()) >= 10


def test_least_conn_keeps_new_requests_off_a_busy_engine(
    engines: dict[str, list[StandIn]], client: httpx.Client
) -> None:
    del engines
    # One long generation occupies an engine; round robin would still send it every third
    # request, least_conn sends none while the others are idle.
    busy: list[str] = []

    def slow() -> None:
        with httpx.Client(base_url=client.base_url, timeout=30) as c:
            busy.append(chat(c, delay=2.0).json()["upstream"])

    thread = threading.Thread(target=slow)
    thread.start()
    time.sleep(0.3)
    fast = Counter(chat(client).json()["upstream"] for _ in range(9))
    thread.join(timeout=30)
    assert len(busy) == 1
    assert busy[0] not in fast
    assert set(fast) == {"alpha-0", "alpha-1", "alpha-2"} - {busy[0]}


def logged(gw: Gateway, request_ids: list[str], timeout: float = 5.0) -> dict[str, dict[str, Any]]:
    """Access-log records of these requests: nginx may write a line just after the reply."""
    deadline = time.monotonic() + timeout
    while True:
        records = {r["request_id"]: r for r in gw.log_records()}
        if all(i in records for i in request_ids) or time.monotonic() > deadline:
            return records
        time.sleep(0.05)


def test_a_post_is_not_replayed_once_sent_but_a_get_is(
    engines: dict[str, list[StandIn]], directory: Path
) -> None:
    # A gateway of its own: the failures below must not mark the shared one's engines down.
    with (
        running_gateway(gateway_args(str(directory), engines), directory) as gw,
        httpx.Client(base_url=gw.url, timeout=30) as c,
    ):
        # The engine reads the request and drops the connection without answering.
        post = chat(c, close=True)
        get = c.get("/alpha/v1/models?close=1", headers=bearer())
        records = logged(gw, [post.headers["x-request-id"], get.headers["x-request-id"]])
    # The POST reached an engine, so it is final: never sent to a second one.
    assert_openai_error(post, 502, "upstream_unavailable")
    assert len(records[post.headers["x-request-id"]]["upstream_addr"].split(", ")) == 1
    # A GET is retried on the next engine; all three drop it.
    assert_openai_error(get, 502, "upstream_unavailable")
    assert len(records[get.headers["x-request-id"]]["upstream_addr"].split(", ")) == 3


def test_killing_an_engine_fails_no_request_that_had_not_started(directory: Path) -> None:
    with stand_ins(["alpha-0", "alpha-1", "alpha-2"]) as alpha:
        args = gateway_args(str(directory), {"alpha": alpha})
        with running_gateway(args, directory) as gw:
            outcomes = _load_with_a_kill(gw.url, victim=alpha[1])
            records = gw.log_records()
    before = [o for o in outcomes.results if o.started < outcomes.kill_time]
    after = [o for o in outcomes.results if o.started > outcomes.kill_time]
    assert "alpha-1" in {o.upstream for o in before}  # the victim was serving
    assert len(after) >= 30, "too few requests after the kill to judge"
    assert [o for o in after if o.status != 200] == []
    assert {o.upstream for o in after} == {"alpha-0", "alpha-2"}
    # They succeeded because nginx moved them on, not because none was sent to the victim.
    victim = alpha[1].address
    retried = [r for r in records if r["upstream_addr"].startswith(f"{victim}, ")]
    assert retried
    assert {r["status"] for r in retried} == {200}


def test_the_pre_stop_hook_lets_a_running_stream_finish(
    engines: dict[str, list[StandIn]], directory: Path
) -> None:
    # Imported here: the stand-in engines run this file as a script, and pulumi's import
    # would add most of a second to every start.
    from components.render.gateway_pod import build_pre_stop_script

    args = gateway_args(str(directory), engines)
    chunks: list[bytes] = []
    streaming = threading.Event()

    with running_gateway(args, directory) as gw:

        def stream() -> None:
            payload = {"model": "model-alpha", "stream": True, "event_delay": 1.0}
            with (
                httpx.Client(base_url=gw.url, timeout=30) as c,
                c.stream("POST", "/v1/chat/completions", json=payload, headers=bearer()) as r,
            ):
                for chunk in r.iter_raw():
                    chunks.append(chunk)
                    streaming.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert streaming.wait(timeout=10)
        started = time.monotonic()
        # The hook's `nginx` is the one that runs the config (njs): sid's, through the wrapper.
        shim = directory / "bin" / "nginx"
        shim.parent.mkdir()
        shim.write_text(f'#!/bin/sh\nexec {SID_NGINX} /tmp -- nginx "$@"\n')
        shim.chmod(0o755)
        hook = subprocess.run(
            ["sh", "-c", build_pre_stop_script(args, str(directory / "run" / CONF_FILE), delay=0)],
            capture_output=True,
            text=True,
            env={**os.environ, "PATH": f"{shim.parent}:{os.environ['PATH']}"},
            timeout=60,
            check=False,
        )
        waited = time.monotonic() - started
        reader.join(timeout=30)
        assert hook.returncode == 0, hook.stderr
        assert gw.proc.wait(timeout=10) == 0  # nginx has exited, cleanly
        with pytest.raises(httpx.ConnectError):
            httpx.get(gw.url + HEALTH_PATH, timeout=2)
    body = b"".join(chunks)
    assert body.count(b"data: {") == SSE_EVENTS  # the running stream was not cut
    assert body.endswith(b"data: [DONE]\n\n")
    assert waited >= 1.0  # the hook waited for the stream's remaining events


@dataclass
class _Outcome:
    started: float
    status: int
    upstream: str


@dataclass
class _Load:
    kill_time: float
    results: list[_Outcome]


def _load_with_a_kill(url: str, victim: StandIn, workers: int = 4, per_worker: int = 25) -> _Load:
    """`workers` clients send `per_worker` short chat requests each; a third of the way in,
    all of them pause (nothing in flight), the victim is killed, and they carry on."""
    results: list[_Outcome] = []
    lock = threading.Lock()
    paused = threading.Barrier(workers + 1, timeout=60)
    killed = threading.Event()

    def worker() -> None:
        with httpx.Client(base_url=url, timeout=30) as c:
            for i in range(per_worker):
                if i == per_worker // 3:
                    paused.wait()
                    assert killed.wait(timeout=60)
                started = time.monotonic()
                try:
                    r = chat(c, delay=0.02)
                    outcome = _Outcome(started, r.status_code, r.headers.get("x-upstream", ""))
                except httpx.HTTPError:
                    outcome = _Outcome(started, 0, "")
                with lock:
                    results.append(outcome)

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for t in threads:
        t.start()
    paused.wait()
    victim.kill()
    kill_time = time.monotonic()
    killed.set()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert len(results) == workers * per_worker
    return _Load(kill_time, results)

"""The vLLM engine stand-in: its flags against vLLM 0.33's real option table, the group formation over TCP on loopback, and the HTTP surface with real counts in /metrics.

This module: running processes: servers on loopback and in network namespaces. The other layers'
tests of the same code: tests/unit/test_engine_standin.py.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from scripts.loadtest import make_png
from tests.support.local import free_port

ROOT = Path(__file__).resolve().parents[2]


# -S: without site-packages (and so without the venv's .pth), run from the repo root, so the
# stand-in is proven to need only the standard library and the repo's own modules.
STANDIN_STDLIB_ONLY = (sys.executable, "-S", "-m", "scripts.engine_standin")


KEY = "test-engine-key"


def test_rejection_exits_2_with_argparse_text_from_the_real_program() -> None:
    result = subprocess.run(
        [
            *STANDIN_STDLIB_ONLY,
            "serve",
            "M",
            "--worker-use-ray",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "usage: vllm serve [model_tag] [options]",
        "vllm serve: error: unrecognized arguments: --worker-use-ray",
    ]


@dataclass
class Running:
    proc: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)


class Fleet:
    """Stand-ins started as foreground children; `stop()` terminates and reaps them all."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[Running] = []

    def start(
        self,
        serve_args: Sequence[str],
        name: str,
        *,
        join_timeout: float = 20,
        token_delay: float = 0.01,
        env: Mapping[str, str] | None = None,
    ) -> Running:
        log = self.log_dir / f"{name}.log"
        base_env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")}
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [
                    *STANDIN_STDLIB_ONLY,
                    "--join-timeout",
                    str(join_timeout),
                    "--token-delay",
                    str(token_delay),
                    "serve",
                    *serve_args,
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**base_env, **(env or {})},
            )
        self.started.append(Running(proc, log))
        return self.started[-1]

    def stop(self) -> None:
        for running in self.started:
            if running.proc.poll() is None:
                running.proc.send_signal(signal.SIGTERM)
        for running in self.started:
            try:
                running.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                running.proc.kill()
                running.proc.wait(timeout=10)


Spawn = Callable[..., Running]


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    fleet = Fleet(tmp_path)
    yield fleet.start
    fleet.stop()


def is_listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except ConnectionRefusedError:
        return False


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def request(
    port: int,
    method: str,
    path: str,
    body: object = None,
    headers: Mapping[str, str] | None = None,
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        payload = None if body is None else json.dumps(body).encode()
        hdrs = dict(headers or {})
        if payload is not None:
            hdrs.setdefault("Content-Type", "application/json")
        conn.request(method, path, body=payload, headers=hdrs)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def group_args(
    http_port: int, master_port: int, rank: int, nnodes: int = 2, tp: int = 2
) -> list[str]:
    argv = (
        f"Qwen/Qwen3-VL-32B-Instruct --host 127.0.0.1 --port {http_port} -tp {tp} "
        f"--nnodes {nnodes} --node-rank {rank} --master-addr 127.0.0.1 --master-port {master_port}"
    ).split()
    return [*argv, "--headless"] if rank > 0 else argv


def test_leader_serves_http_only_after_every_rank_joined(spawn: Spawn) -> None:
    http_port, master, worker_port = free_port(), free_port(), free_port()
    leader = spawn(group_args(http_port, master, 0), "leader")
    wait_until(lambda: "waiting for 1 rank" in leader.text(), 15, "the leader to start")
    for _ in range(10):  # refused the whole time no worker is there
        assert not is_listening(http_port)
        time.sleep(0.1)
    worker = spawn(group_args(worker_port, master, 1), "worker")
    wait_until(lambda: is_listening(http_port), 15, "the leader's HTTP port")
    assert request(http_port, "GET", "/health")[0] == 200
    wait_until(lambda: "group formed" in worker.text(), 5, "the worker to see the group form")
    assert worker.proc.poll() is None
    assert not is_listening(worker_port)  # a headless rank has no HTTP endpoint
    assert "headless multiproc executor, with head node address 127.0.0.1" in worker.text()

    leader.proc.send_signal(signal.SIGTERM)
    assert leader.wait(10) == 0
    assert worker.wait(10) == 1  # the head node went away
    assert "the leader closed the group connection" in worker.text()


def test_a_three_node_group_forms_with_workers_joining_at_once(spawn: Spawn) -> None:
    http_port, master = free_port(), free_port()
    spawn(group_args(http_port, master, 0, nnodes=3, tp=3), "leader")
    workers = [
        spawn(group_args(free_port(), master, rank, nnodes=3, tp=3), f"worker{rank}")
        for rank in (1, 2)
    ]
    wait_until(lambda: is_listening(http_port), 15, "the leader's HTTP port")
    for worker in workers:
        wait_until(lambda w=worker: "group formed" in w.text(), 5, "each worker to see the group")
        assert worker.proc.poll() is None


def test_worker_with_the_wrong_master_port_fails_naming_the_flag(spawn: Spawn) -> None:
    http_port, master, wrong = free_port(), free_port(), free_port()
    leader = spawn(group_args(http_port, master, 0), "leader", join_timeout=3)
    worker = spawn(group_args(free_port(), wrong, 1), "worker", join_timeout=1.5)
    assert worker.wait(15) == 1
    assert (
        f"cannot reach --master-addr 127.0.0.1 --master-port {wrong} within 1.5 s" in worker.text()
    )
    assert not is_listening(http_port)
    assert leader.wait(15) == 1  # and the leader gives up, saying who is missing
    assert "the group did not form within 3 s: ranks joined [0], missing [1]" in leader.text()
    assert "HTTP API listening" not in leader.text()


def test_a_rank_taken_twice_is_rejected_and_the_group_never_forms(spawn: Spawn) -> None:
    http_port, master = free_port(), free_port()
    leader = spawn(group_args(http_port, master, 0, nnodes=3, tp=3), "leader")
    wait_until(lambda: "waiting for 2 rank" in leader.text(), 15, "the leader to start")
    first = spawn(group_args(free_port(), master, 1, nnodes=3, tp=3), "first")
    wait_until(lambda: "rank 1 joined" in leader.text(), 15, "rank 1 to join")
    second = spawn(group_args(free_port(), master, 1, nnodes=3, tp=3), "second")
    assert second.wait(15) == 1
    assert (
        "the leader rejected this node: --node-rank 1 already joined from 127.0.0.1"
        in second.text()
    )
    assert "rejected join from 127.0.0.1: --node-rank 1 already joined" in leader.text()
    assert first.proc.poll() is None
    assert not is_listening(http_port)


def test_a_worker_with_another_world_size_is_rejected(spawn: Spawn) -> None:
    http_port, master = free_port(), free_port()
    spawn(group_args(http_port, master, 0, nnodes=2, tp=4), "leader")
    worker = spawn(group_args(free_port(), master, 1, nnodes=4, tp=4), "worker")
    assert worker.wait(15) == 1
    assert "--nnodes 4 does not match the leader's --nnodes 2" in worker.text()
    assert not is_listening(http_port)


def test_a_rank_outside_the_group_exits_before_connecting(spawn: Spawn) -> None:
    worker = spawn(group_args(free_port(), free_port(), 2, nnodes=2), "worker")
    assert worker.wait(15) == 1
    assert "--node-rank 2 must satisfy 0 <= node_rank < --nnodes 2" in worker.text()


def image_part(data: bytes, mime: str = "image/png") -> dict[str, Any]:
    url = f"data:{mime};base64,{base64.b64encode(data).decode()}"
    return {"type": "image_url", "image_url": {"url": url}}


def chat(content: object, **extra: object) -> dict[str, Any]:
    return {"model": "qwen-a", "messages": [{"role": "user", "content": content}], **extra}


AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """One single-node engine for the surface tests (none of them depends on its counters)."""
    fleet = Fleet(tmp_path_factory.mktemp("engine"))
    port = free_port()
    args = (
        f"Qwen/Qwen3-VL-2B-Instruct --host 127.0.0.1 --port {port} "
        "--served-model-name qwen-a qwen-b --limit-mm-per-prompt.image 2"
    ).split()
    fleet.start(args, "engine", env={"VLLM_API_KEY": KEY}, token_delay=0.03)
    try:
        wait_until(lambda: is_listening(port), 15, "the engine's HTTP port")
        yield port
    finally:
        fleet.stop()


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/health", None),
        ("GET", "/metrics", None),
        ("GET", "/version", None),
        ("GET", "/ping", None),
        ("POST", "/ping", None),
        ("GET", "/load", None),
        ("POST", "/tokenize", {"prompt": "two words"}),
        ("POST", "/invocations", chat("hello", max_tokens=2)),
    ],
)
def test_paths_outside_v1_are_open_as_in_vllm(
    server: int, method: str, path: str, body: object
) -> None:
    assert request(server, method, path, body)[0] == 200


def test_v1_needs_the_bearer_key(server: int) -> None:
    assert request(server, "GET", "/v1/models") == (401, b'{"error": "Unauthorized"}')
    wrong = {"Authorization": "Bearer not-the-key"}
    assert request(server, "GET", "/v1/models", headers=wrong)[0] == 401
    assert request(server, "POST", "/v1/chat/completions", chat("hi"))[0] == 401
    assert request(server, "GET", "/v1/no-such-route")[0] == 401  # checked before routing
    assert request(server, "GET", "/v1/no-such-route", headers=AUTH)[0] == 404
    status, body = request(server, "GET", "/v1/models", headers=AUTH)
    assert status == 200
    models = json.loads(body)["data"]
    assert [m["id"] for m in models] == ["qwen-a", "qwen-b"]
    assert {m["root"] for m in models} == {"Qwen/Qwen3-VL-2B-Instruct"}


def test_version_and_tokenize(server: int) -> None:
    assert json.loads(request(server, "GET", "/version")[1]) == {"version": "0.33.0"}
    status, body = request(server, "POST", "/tokenize", {"prompt": "one two three"})
    assert status == 200
    assert json.loads(body)["count"] == 3


def test_chat_says_it_is_a_stand_in_and_honours_max_tokens(server: int) -> None:
    status, body = request(server, "POST", "/v1/chat/completions", chat("Describe it."), AUTH)
    assert status == 200
    reply = json.loads(body)
    text = reply["choices"][0]["message"]["content"]
    assert "STAND-IN on CPU" in text
    assert "no inference is run" in text
    assert reply["choices"][0]["finish_reason"] == "stop"
    assert reply["usage"]["prompt_tokens"] == 2
    assert reply["usage"]["completion_tokens"] == len(text.split(" "))

    status, body = request(server, "POST", "/v1/chat/completions", chat("x", max_tokens=3), AUTH)
    short = json.loads(body)["choices"][0]
    assert short["finish_reason"] == "length"
    assert short["message"]["content"] == " ".join(text.split(" ")[:3])


def test_a_model_name_it_does_not_serve_is_404(server: int) -> None:
    body = chat("hi") | {"model": "gpt-4"}
    status, raw = request(server, "POST", "/v1/chat/completions", body, AUTH)
    assert status == 404
    error = json.loads(raw)["error"]
    assert error["message"] == "The model `gpt-4` does not exist. Valid aliases: qwen-a, qwen-b."
    assert error["param"] == "model"


def test_streaming_arrives_as_several_sse_chunks_over_time(server: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server, timeout=20)
    body = json.dumps(chat("Stream please.", stream=True, max_tokens=6)).encode()
    conn.request("POST", "/v1/chat/completions", body, {**AUTH, "Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.getheader("Content-Type", "").startswith("text/event-stream")
    arrivals: list[tuple[float, bytes]] = []
    for _ in range(100):  # bounded: 1 role chunk + 6 tokens + [DONE] + terminator
        data = resp.read1()
        if not data:
            break
        arrivals.append((time.monotonic(), data))
    conn.close()
    events = [
        line.removeprefix(b"data: ") for _, d in arrivals for line in d.split(b"\n\n") if line
    ]
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    pieces = [c["choices"][0]["delta"]["content"] for c in chunks[1:]]
    assert len(pieces) == 6
    assert "".join(pieces).startswith("[vLLM engine STAND-IN")
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert len(arrivals) >= 7  # separate reads, not one buffered body
    assert arrivals[-1][0] - arrivals[0][0] >= 5 * 0.03 * 0.8  # tokens spaced by the delay


def test_images_are_decoded_and_checked(server: int) -> None:
    post = lambda body: request(server, "POST", "/v1/chat/completions", body, AUTH)  # noqa: E731
    ok = chat(
        [{"type": "text", "text": "What is this?"}, image_part(make_png(7, 5))], max_tokens=40
    )
    status, body = post(ok)
    assert status == 200
    assert "image 1: PNG 7x5, " in json.loads(body)["choices"][0]["message"]["content"]

    jpeg = image_part(b"\xff\xd8\xff\xe0" + b"\x00" * 64, "image/jpeg")
    assert post(chat([jpeg], max_tokens=1))[0] == 200

    bad_base64 = {"type": "image_url", "image_url": {"url": "data:image/png;base64,!!notbase64"}}
    status, body = post(chat([bad_base64]))
    assert (status, "invalid base64" in json.loads(body)["error"]["message"]) == (400, True)

    status, body = post(chat([image_part(b"GIF? no, plain text")]))
    assert (status, "bad magic bytes" in json.loads(body)["error"]["message"]) == (400, True)

    remote = {"type": "image_url", "image_url": {"url": "http://example.com/cat.png"}}
    assert post(chat([remote]))[0] == 400

    three = [image_part(make_png(1, 1)) for _ in range(3)]
    status, body = post(chat(three))
    assert status == 400
    assert (
        json.loads(body)["error"]["message"] == "At most 2 image(s) may be provided in one prompt."
    )


def test_a_multi_mib_image_is_accepted(server: int) -> None:
    big = make_png(1024, 1024)
    assert len(big) > 3 * 1024 * 1024
    body = chat([image_part(big)])
    status, raw = request(server, "POST", "/v1/chat/completions", body, AUTH)
    assert status == 200
    assert f"PNG 1024x1024, {len(big)} bytes" in json.loads(raw)["choices"][0]["message"]["content"]


def scrape(port: int) -> dict[str, float]:
    status, body = request(port, "GET", "/metrics")
    assert status == 200
    samples = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_metrics_count_exactly_what_was_served(spawn: Spawn) -> None:
    port = free_port()
    spawn(
        [
            "Qwen/Qwen3-VL-2B-Instruct",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--served-model-name",
            "qwen-a",
        ],
        "engine",
    )
    wait_until(lambda: is_listening(port), 15, "the engine's HTTP port")
    post = lambda body: request(port, "POST", "/v1/chat/completions", body)  # noqa: E731
    forty_words = " ".join(f"w{i}" for i in range(40))
    image = image_part(make_png(3, 3))

    assert post(chat("one two three", max_tokens=5))[0] == 200  # 3 prompt, 5 generated
    assert post(chat("one two three", max_tokens=5))[0] == 200  # 3 prompt, 5 generated
    assert post(chat("a b c d", max_tokens=3, stream=True))[0] == 200  # 4 prompt, 3 generated
    _, body = post(chat([{"type": "text", "text": "see"}, image]))  # 1 word + 1 image
    full_reply = len(json.loads(body)["choices"][0]["message"]["content"].split(" "))
    assert post(chat([image], max_tokens=2))[0] == 200  # the same image: an mm-cache hit
    assert post(chat(forty_words, max_tokens=1))[0] == 200  # 40 prompt tokens
    assert post(chat(forty_words, max_tokens=1))[0] == 200  # its 2 full 16-token blocks hit
    assert post(chat([{"type": "image_url", "image_url": {"url": "data:,x"}}]))[0] == 400

    m = scrape(port)
    labels = '{model_name="qwen-a",engine="0"}'
    assert m[f"vllm:prompt_tokens_total{labels}"] == 3 + 3 + 4 + 2 + 1 + 40 + 40
    assert m[f"vllm:generation_tokens_total{labels}"] == 5 + 5 + 3 + full_reply + 2 + 1 + 1
    success = 'vllm:request_success_total{model_name="qwen-a",engine="0",finished_reason="%s"}'
    assert m[success % "stop"] == 1
    assert m[success % "length"] == 6  # the refused request is not an engine request
    assert m[success % "abort"] == 0
    assert m[f"vllm:time_to_first_token_seconds_count{labels}"] == 7
    assert m[f"vllm:e2e_request_latency_seconds_count{labels}"] == 7
    gaps = 4 + 4 + 2 + (full_reply - 1) + 1 + 0 + 0
    assert m[f"vllm:inter_token_latency_seconds_count{labels}"] == gaps
    assert m[f"vllm:prefix_cache_queries_total{labels}"] == 3 + 3 + 4 + 2 + 1 + 40 + 40
    assert m[f"vllm:prefix_cache_hits_total{labels}"] == 32
    assert m[f"vllm:mm_cache_queries_total{labels}"] == 2
    assert m[f"vllm:mm_cache_hits_total{labels}"] == 1
    assert m[f"vllm:num_requests_running{labels}"] == 0
    assert m[f"vllm:num_requests_waiting{labels}"] == 0
    assert (
        m['vllm:time_to_first_token_seconds_bucket{model_name="qwen-a",engine="0",le="+Inf"}'] == 7
    )
    assert (
        'vllm:time_to_first_token_seconds_bucket{model_name="qwen-a",engine="0",le="2560.0"}' in m
    )


def test_requests_beyond_max_num_seqs_show_as_waiting(spawn: Spawn) -> None:
    port = free_port()
    spawn(
        ["M", "--host", "127.0.0.1", "--port", str(port), "--max-num-seqs", "1"],
        "engine",
        token_delay=0.05,
    )
    wait_until(lambda: is_listening(port), 15, "the engine's HTTP port")
    results: list[int] = []
    slow = chat("slow", max_tokens=20) | {"model": "M"}
    threads = [
        threading.Thread(
            target=lambda: results.append(request(port, "POST", "/v1/chat/completions", slow)[0])
        )
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    gauges = '{model_name="M",engine="0"}'
    wait_until(
        lambda: scrape(port)[f"vllm:num_requests_waiting{gauges}"] == 1, 5, "one waiting request"
    )
    assert scrape(port)[f"vllm:num_requests_running{gauges}"] == 1
    assert scrape(port)[f"vllm:kv_cache_usage_perc{gauges}"] == 1.0
    for thread in threads:
        thread.join(timeout=20)
    assert results == [200, 200]
    assert scrape(port)[f"vllm:num_requests_waiting{gauges}"] == 0

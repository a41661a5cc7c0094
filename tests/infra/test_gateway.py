"""Gateway hosts: nginx and its exporter listen, /healthz, the OpenAI API through the gateway.

The requests go to the gateway as a client would, so they cross nginx (key map, engine
auth, routing, streaming without buffering) to a real leader behind it.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

import httpx
import pytest

from scripts.loadtest import make_png, png_data_url
from tests.infra import probes
from tests.infra.probes import InfraHost

IMAGE_SIZE = (1200, 900)  # random RGB pixels: a ~3.2 MB PNG, ~4.3 MB in the JSON body
# A real engine turns the image into a grid of merged patches: many more prompt tokens than
# the few markers a chat template adds (the rehearsal's tiny Qwen3-VL caps images at 256x256
# px and spends 54 tokens on this one; Qwen3-VL-2B on a GPU spends over a thousand). A
# truncated or undecodable PNG is refused with 400 instead.
IMAGE_TOKENS_MIN = 16
# The stand-in paces its "tokens" (20 ms each); a real engine paces nothing, and the tiny
# model of the rehearsal makes a token in ~3 ms, so it streams more of them (ignore_eos:
# vLLM's sampling parameter, so a random model's early end cannot shorten the stream).
STREAM_TOKENS = {True: 16, False: 128}


def chat_body(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "Describe this."}], **extra}


@pytest.fixture(scope="module")
def key(secrets: dict[str, Any]) -> str:
    return str(secrets["gateway_api_key"])


@pytest.fixture(scope="module")
def http() -> httpx.Client:
    return probes.client()


def test_listens_on_its_ports(host: InfraHost, role_vars: dict[str, Any]) -> None:
    assert probes.listening(host, role_vars["port"])
    assert probes.listening(host, role_vars["exporter_port"])
    # stub_status is for the exporter sidecar only: loopback, not every address
    assert probes.listening(host, role_vars["status_port"], "127.0.0.1")
    assert not probes.listening(host, role_vars["status_port"])


def test_runs_nginx(host: InfraHost) -> None:
    programs = [args.split()[0].rsplit("/", 1)[-1] for _, args in probes.host_processes(host)]
    assert "nginx:" in programs or "nginx" in programs, programs  # "nginx: master process"


def test_the_exporter_reads_nginx(host: InfraHost, role_vars: dict[str, Any]) -> None:
    # In the pod the sidecar is another container (no shared process table): ask it.
    port = str(role_vars["exporter_port"])
    metrics = host.check_output("curl -sf http://127.0.0.1:%s/metrics", port)
    assert re.search(r"^nginx_up 1$", metrics, re.M), metrics[:500]
    assert re.search(r"^nginx_connections_accepted \d+", metrics, re.M)


def test_healthz(http: httpx.Client, role_vars: dict[str, Any]) -> None:
    response = http.get(role_vars["url"] + "/healthz")
    assert response.status_code == 200
    assert probes.json_of(response) == {"status": "ok"}


def test_chat_completion_with_the_key(
    http: httpx.Client, role_vars: dict[str, Any], key: str
) -> None:
    response = http.post(
        role_vars["url"] + "/v1/chat/completions",
        json=chat_body(role_vars["model"]),
        headers=probes.bearer(key),
    )
    assert response.status_code == 200, response.text
    reply = probes.json_of(response)
    assert reply["object"] == "chat.completion"
    assert reply["model"] == role_vars["model"]
    assert reply["choices"][0]["message"]["content"]
    assert response.headers["x-request-id"]


@pytest.mark.parametrize("header", [None, "Bearer not-a-key-of-this-stack-0000"])
def test_chat_completion_without_a_valid_key_is_401(
    http: httpx.Client, role_vars: dict[str, Any], header: str | None
) -> None:
    headers = {"Authorization": header} if header else {}
    response = http.post(
        role_vars["url"] + "/v1/chat/completions",
        json=chat_body(role_vars["model"]),
        headers=headers,
    )
    assert response.status_code == 401
    assert probes.json_of(response)["error"]["code"] == "invalid_api_key"


def test_every_deployment_is_routed(
    http: httpx.Client, role_vars: dict[str, Any], key: str
) -> None:
    for deployment, served in role_vars["deployments"].items():
        response = http.get(
            f"{role_vars['url']}/{deployment}/v1/models", headers=probes.bearer(key)
        )
        assert response.status_code == 200, (deployment, response.text)
        assert [m["id"] for m in probes.json_of(response)["data"]] == [served]


def test_streaming_arrives_in_chunks(
    http: httpx.Client, role_vars: dict[str, Any], key: str
) -> None:
    tokens = STREAM_TOKENS[bool(role_vars.get("stand_in"))]
    body = chat_body(role_vars["model"], stream=True, max_tokens=tokens, ignore_eos=True)
    arrivals: list[tuple[float, str]] = []
    with http.stream(
        "POST", role_vars["url"] + "/v1/chat/completions", json=body, headers=probes.bearer(key)
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                arrivals.append((time.monotonic(), line.removeprefix("data: ")))
    assert arrivals[-1][1] == "[DONE]"
    events = [json.loads(data) for _, data in arrivals[:-1]]
    assert len(events) >= 3
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    # Buffered by a proxy, every event would arrive at once at the end.
    spread = arrivals[-2][0] - arrivals[0][0]
    assert spread > 0.1, f"all {len(events)} events arrived within {spread:.3f} s"
    assert len({round(t, 2) for t, _ in arrivals}) >= 3


def test_a_multi_mib_image_request_is_accepted(
    http: httpx.Client, role_vars: dict[str, Any], key: str
) -> None:
    png = make_png(*IMAGE_SIZE)
    url = png_data_url(png)
    content = [
        {"type": "text", "text": "What is in this image?"},
        {"type": "image_url", "image_url": {"url": url}},
    ]
    body = {"model": role_vars["model"], "messages": [{"role": "user", "content": content}]}
    size = len(json.dumps(body))
    assert 3 * 2**20 < size < role_vars["max_body_mib"] * 2**20
    response = http.post(
        role_vars["url"] + "/v1/chat/completions", json=body, headers=probes.bearer(key)
    )
    assert response.status_code == 200, response.text[:500]
    reply = probes.json_of(response)
    if role_vars.get("stand_in"):
        # The stand-in decodes the image and reports what it got: all of it arrived.
        width, height = IMAGE_SIZE
        text = reply["choices"][0]["message"]["content"]
        assert f"{width}x{height}" in text, text
    else:
        # A real engine decoded it into image tokens: the prompt is longer than its text.
        text_only = {
            "model": role_vars["model"],
            "messages": [{"role": "user", "content": content[:1]}],
        }
        plain = http.post(
            role_vars["url"] + "/v1/chat/completions", json=text_only, headers=probes.bearer(key)
        )
        assert plain.status_code == 200, plain.text[:500]
        extra = reply["usage"]["prompt_tokens"] - probes.json_of(plain)["usage"]["prompt_tokens"]
        assert extra >= IMAGE_TOKENS_MIN, (reply["usage"], probes.json_of(plain)["usage"])


def test_blocked_vllm_paths_are_refused(
    http: httpx.Client, role_vars: dict[str, Any], key: str
) -> None:
    deployment = next(iter(role_vars["deployments"]))
    for path in role_vars["blocked_paths"]:
        for prefix in ("", f"/{deployment}"):
            response = http.get(role_vars["url"] + prefix + path, headers=probes.bearer(key))
            assert response.status_code == 404, (prefix + path, response.text)
            assert probes.json_of(response)["error"]["code"] == "unknown_url"

"""What a client observes of a vLLM server, reduced to what must not depend on the model:
status codes, error bodies, headers, JSON shapes, SSE framing, metric names.

tests/system/test_engine_contract.py runs `observe` against the stand-in and against the real
engine, both started from the same pod command line, and compares the two. Inference content
(which tokens, how many before a stop) is reduced to its type; everything else is compared
as is. A bounded number of requests, each with a timeout.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping
from typing import Any

import httpx

from scripts.loadtest import make_png

TIMEOUT_S = 60.0
MAX_TOKENS = 8
# Metric families a dashboard, alert or the autoscaler reads (the stand-in's list).
METRIC = re.compile(r"^(vllm:[a-z_:]+?)(?:_bucket|_count|_sum|_total|_created)?(?:\{| )", re.M)
SAMPLE = re.compile(r"^(vllm:[a-z_:]+)(?:\{[^}]*\})? ", re.M)


def shape(value: Any) -> Any:
    """A JSON value with every leaf replaced by its type name (lists by their first item)."""
    if isinstance(value, Mapping):
        return {str(k): shape(v) for k, v in sorted(value.items())}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    if value is None:
        return None
    return type(value).__name__


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text[:200]


def content_type(response: httpx.Response) -> str:
    return response.headers.get("content-type", "")


def sse_framing(raw: bytes) -> dict[str, Any]:
    """How an SSE body is framed: the event separator, what each event line starts with,
    the terminator, and the JSON shape of the first, a middle and the usage event."""
    text = raw.decode()
    events = text.split("\n\n")
    trailing = events.pop() if events else ""
    prefixes = sorted({e.split(" ", 1)[0] for e in events})
    payloads = [e.removeprefix("data: ") for e in events]
    chunks, unparseable = [], 0
    for payload in payloads:
        if payload != "[DONE]":
            try:
                chunks.append(json.loads(payload))
            except ValueError:
                unparseable += 1
    with_choices = [c for c in chunks if c["choices"]]
    return {
        "separator_blank_line": text.count("\n\n") == len(events),
        "unparseable_events": unparseable,
        "line_prefixes": prefixes,
        "multi_line_events": any("\n" in e for e in events),
        "last_event": payloads[-1] if payloads else None,
        "after_last_event": trailing,
        "first_chunk": shape(with_choices[0]) if with_choices else None,
        "first_delta_role": with_choices[0]["choices"][0]["delta"].get("role")
        if with_choices
        else None,
        "middle_chunk": shape(with_choices[len(with_choices) // 2]) if with_choices else None,
        "last_choice_chunk_finish": with_choices[-1]["choices"][0]["finish_reason"]
        if with_choices
        else None,
        "usage_chunk": shape(chunks[-1]) if chunks and not chunks[-1]["choices"] else None,
        "one_id": len({c["id"] for c in chunks}) == 1,
    }


def chat(model: str, content: Any = "Say hello.", **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": MAX_TOKENS,
        "ignore_eos": True,
        **extra,
    }


def image_part(data: bytes, kind: str = "png") -> dict[str, Any]:
    url = f"data:image/{kind};base64," + base64.b64encode(data).decode()
    return {"type": "image_url", "image_url": {"url": url}}


def observe(base_url: str, key: str, model: str) -> dict[str, Any]:
    """Every observation, by name (the contract test compares them name by name)."""
    auth = {"Authorization": f"Bearer {key}"}
    out: dict[str, Any] = {}
    with httpx.Client(base_url=base_url, timeout=TIMEOUT_S, trust_env=False) as http:
        for path in ("/health", "/ping", "/metrics", "/version"):
            r = http.get(path)
            out[f"GET {path} status"] = r.status_code
        out["GET /health body"] = http.get("/health").text
        version = http.get("/version")
        out["GET /version shape"] = shape(_json(version))
        out["GET /version value"] = _json(version)

        r = http.get("/v1/models")
        out["GET /v1/models without key"] = (r.status_code, _json(r), content_type(r))
        r = http.get("/v1/models", headers={"Authorization": "Bearer wrong"})
        out["GET /v1/models wrong key"] = (r.status_code, _json(r))
        r = http.get("/metrics", headers={"Authorization": "Bearer wrong"})
        out["GET /metrics wrong key (open)"] = r.status_code
        r = http.get("/v1/models", headers=auth)
        out["GET /v1/models"] = (r.status_code, content_type(r), shape(_json(r)))
        out["GET /v1/models ids"] = [m["id"] for m in _json(r)["data"]]
        r = http.get("/no/such/path", headers=auth)
        out["GET unknown path"] = (r.status_code, _json(r))

        r = http.post("/v1/chat/completions", json=chat(model), headers=auth)
        body = _json(r)
        out["chat status, content-type"] = (r.status_code, content_type(r))
        out["chat shape"] = shape(body)
        out["chat object, model, finish"] = (
            body["object"],
            body["model"],
            body["choices"][0]["finish_reason"],
            body["usage"]["completion_tokens"],
        )
        r = http.post(
            "/v1/chat/completions",
            json=chat(
                model, [{"type": "text", "text": "What is this?"}, image_part(make_png(64, 48))]
            ),
            headers=auth,
        )
        out["image chat status"] = r.status_code
        out["image chat shape"] = shape(_json(r))

        r = http.post("/v1/chat/completions", json=chat("no-such-model"), headers=auth)
        out["unknown model"] = (r.status_code, content_type(r), _json(r))
        r = http.post(
            "/v1/chat/completions",
            json=chat(model, [image_part(b"this is not an image")]),
            headers=auth,
        )
        out["undecodable image"] = (r.status_code, content_type(r), shape(_json(r)))
        r = http.post(
            "/v1/chat/completions",
            content=b"{not json",
            headers=auth | {"Content-Type": "application/json"},
        )
        out["invalid JSON body"] = (r.status_code, shape(_json(r)))

        body = chat(model, stream=True, stream_options={"include_usage": True})
        with http.stream("POST", "/v1/chat/completions", json=body, headers=auth) as r:
            raw = r.read()
            out["stream status, content-type"] = (r.status_code, content_type(r))
            out["stream transfer-encoding"] = r.headers.get("transfer-encoding")
        framing = sse_framing(raw)
        out["stream usage chunk"] = framing.pop("usage_chunk")
        out["stream framing"] = framing

        metrics = http.get("/metrics")
        out["metrics content-type"] = content_type(metrics).split(";")[0]
        out["metric samples"] = sorted(set(SAMPLE.findall(metrics.text)))
    return out

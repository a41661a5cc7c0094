"""The bench's small clients for figures Locust's one-key phases cannot express (run inside the
bench's client namespace by scripts/bench.py; prints one JSON document).

  bench_probe.py quota SPEC_JSON      requests alternating over gateway replicas, one key:
                                      each answer's status and latency
  bench_probe.py priority SPEC_JSON   streamed requests of two keys at once (a high and a
                                      batch class): each request's time to first token
  bench_probe.py body SPEC_JSON       one large image body at a time, alternating targets
                                      (gateway, engine): each request's latency

Bounded in count and time, as every request loop of the project.
"""

from __future__ import annotations

import base64
import json
import sys
import threading
import time
from typing import Any

import httpx

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _chat(model: str, max_tokens: int, stream: bool) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "Describe a quiet harbour at dawn."}],
        "max_tokens": max_tokens,
        "stream": stream,
        **({"ignore_eos": True} if stream else {}),
    }


def quota(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Sequential requests, round robin over `urls`, keys in turn: (url, key, status, ms)."""
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + float(spec["max_seconds"])
    body = _chat(spec["model"], 1, stream=False)
    with httpx.Client(timeout=30) as client:
        for i in range(int(spec["requests"])):
            if time.monotonic() > deadline:
                break
            url = spec["urls"][i % len(spec["urls"])]
            key = spec["keys"][(i // len(spec["urls"])) % len(spec["keys"])]
            started = time.perf_counter()
            reply = client.post(
                f"{url}/v1/chat/completions",
                json=body,
                headers={"Authorization": f"Bearer {key}"},
            )
            out.append(
                {
                    "url": url,
                    "key": key[:6],
                    "status": reply.status_code,
                    "ms": (time.perf_counter() - started) * 1000,
                }
            )
    return out


def _stream_once(client: httpx.Client, spec: dict[str, Any], user: dict[str, Any]) -> float | None:
    """Seconds to the first content token of one streamed request, None on failure."""
    started = time.perf_counter()
    body = _chat(spec["model"], int(user["max_tokens"]), stream=True)
    headers = {"Authorization": f"Bearer {user['key']}"}
    first = None
    with client.stream(
        "POST", f"{spec['url']}/v1/chat/completions", json=body, headers=headers
    ) as r:
        if r.status_code != httpx.codes.OK:
            return None
        for line in r.iter_lines():
            if first is None and line.startswith("data: {") and '"content"' in line:
                first = time.perf_counter() - started
    return first


def priority(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Closed-loop users of each class stream at once until the time is up."""
    out: list[dict[str, Any]] = []
    lock = threading.Lock()
    deadline = time.monotonic() + float(spec["seconds"])

    def run(user: dict[str, Any]) -> None:
        with httpx.Client(timeout=float(spec["timeout_s"])) as client:
            for _ in range(int(spec["max_requests_per_user"])):
                if time.monotonic() > deadline:
                    return
                sent = time.monotonic()
                try:
                    ttft = _stream_once(client, spec, user)
                except httpx.HTTPError:
                    ttft = None
                with lock:
                    out.append({"class": user["class"], "sent": sent, "ttft_s": ttft})

    threads = [
        threading.Thread(target=run, args=(user,))
        for user in spec["users"]
        for _ in range(int(user["count"]))
    ]
    for t in threads:
        t.start()
        time.sleep(float(spec.get("stagger_s", 0.0)))
    for t in threads:
        t.join(timeout=float(spec["seconds"]) + float(spec["timeout_s"]) + 5)
    return out


def body(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """A chat request carrying one image of `mib` MiB as a data URI, `model` after the
    messages (as the OpenAI SDK orders it): (target, status, ms) per request."""
    # PNG magic bytes first: engines (and the stand-in) refuse data that is no image.
    raw = PNG_MAGIC + b"\0" * int(float(spec["mib"]) * 2**20 * 3 / 4)
    image = base64.b64encode(raw).decode()
    content = [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}}]
    payload = json.dumps(
        {
            "messages": [{"role": "user", "content": content}],
            "model": spec["model"],
            "max_tokens": 1,
        }
    ).encode()
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + float(spec["max_seconds"])
    with httpx.Client(timeout=120) as client:
        for i in range(int(spec["requests"])):
            if time.monotonic() > deadline:
                break
            target = spec["targets"][i % len(spec["targets"])]
            started = time.perf_counter()
            reply = client.post(
                target["url"],
                content=payload,
                headers={
                    "Authorization": f"Bearer {target['key']}",
                    "Content-Type": "application/json",
                },
            )
            out.append(
                {
                    "target": target["name"],
                    "status": reply.status_code,
                    "ms": (time.perf_counter() - started) * 1000,
                }
            )
    return out


PROBES = {"quota": quota, "priority": priority, "body": body}


def main(argv: list[str]) -> int:
    try:
        kind, text = argv
        probe, spec = PROBES[kind], json.loads(text)
    except (ValueError, KeyError) as err:  # JSONDecodeError is a ValueError
        print(
            f"bench_probe: {err!s}\nusage: bench_probe.py {{{','.join(PROBES)}}} SPEC_JSON",
            file=sys.stderr,
        )
        return 2
    result = probe(spec)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

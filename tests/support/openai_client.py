"""The official OpenAI SDK against an OpenAI-compatible server: what a client observes, as JSON.

Run with an interpreter that has `openai` (the engine venv: .venv-engine/bin/python), from the
repo root, inside the rehearsal's client namespace:

    ip netns exec qvr-<run>-client .venv-engine/bin/python -m tests.support.openai_client \\
        --base-url http://gateway.qwen-vl.svc.cluster.local:8080/v1 --key-file secrets.json \\
        --key-field gateway_api_key --model qwen3-vl-2b

It makes a bounded number of requests (one per check, each with a timeout and no retries)
and prints one JSON object of observations; the tests assert on it. `openai` is imported only
in `run`: the project's venv does not have the SDK; the engine venv has it and also imports
the repo's scripts.loadtest, whose test image this sends.
"""

# pyright: reportMissingImports=false
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from scripts.loadtest import make_png, png_data_url

REQUEST_TIMEOUT_S = 120.0
MAX_TOKENS = 16
STREAM_TOKENS = 32
IMAGE_SIZE = 64  # a 64x64 PNG: 4 merged patches of the tiny model's 16 px grid


def _usage(usage: Any) -> dict[str, int] | None:
    if usage is None:
        return None
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def _error(err: Any) -> dict[str, Any]:
    body = getattr(err, "body", None)
    return {
        "type": type(err).__name__,
        "status_code": getattr(err, "status_code", None),
        "body": body,
    }


def run(base_url: str, key: str, model: str) -> dict[str, Any]:
    import openai

    # trust_env=False: no proxy variable may send a request off the machine. The SDK's own
    # client class: openai 3.x is built on httpx2, not httpx.
    http = openai.DefaultHttpxClient(trust_env=False, timeout=REQUEST_TIMEOUT_S)
    client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, http_client=http)
    out: dict[str, Any] = {"sdk": openai.__version__}

    out["models"] = [m.id for m in client.models.list().data]

    text = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=MAX_TOKENS,
        extra_body={"ignore_eos": True},
    )
    out["text"] = {
        "object": text.object,
        "model": text.model,
        "content": text.choices[0].message.content,
        "role": text.choices[0].message.role,
        "finish_reason": text.choices[0].finish_reason,
        "usage": _usage(text.usage),
    }

    prompt: list[Any] = [{"type": "text", "text": "What is in this image?"}]
    image_message: Any = {
        "role": "user",
        "content": [
            *prompt,
            {
                "type": "image_url",
                "image_url": {"url": png_data_url(make_png(IMAGE_SIZE, IMAGE_SIZE))},
            },
        ],
    }
    image = client.chat.completions.create(
        model=model, messages=[image_message], max_tokens=MAX_TOKENS
    )
    text_message: Any = {"role": "user", "content": prompt}
    same_text = client.chat.completions.create(model=model, messages=[text_message], max_tokens=1)
    out["image"] = {
        "object": image.object,
        "content": image.choices[0].message.content,
        "finish_reason": image.choices[0].finish_reason,
        "usage": _usage(image.usage),
        "text_only_usage": _usage(same_text.usage),
    }

    chunks: list[dict[str, Any]] = []
    started = time.monotonic()
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Count to ten."}],
        max_tokens=STREAM_TOKENS,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    for event in stream:
        chunks.append(
            {
                "t": round(time.monotonic() - started, 4),
                "object": event.object,
                "id": event.id,
                "delta": event.choices[0].delta.content if event.choices else None,
                "finish_reason": event.choices[0].finish_reason if event.choices else None,
                "usage": _usage(event.usage),
            }
        )
    out["stream"] = chunks

    for name, bad_key in (("no_key", ""), ("wrong_key", "not-a-key-of-this-stack-0000")):
        unauthorised = openai.OpenAI(
            base_url=base_url, api_key=bad_key or "unused", max_retries=0, http_client=http
        )
        # openai.omit removes the SDK's own Authorization header: no key at all.
        headers = {} if bad_key else {"Authorization": openai.omit}
        try:
            unauthorised.models.list(extra_headers=headers)
            out[name] = {"type": "no error"}
        except openai.APIStatusError as err:
            out[name] = _error(err)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.support.openai_client")
    p.add_argument("--base-url", required=True)
    p.add_argument("--key-file", type=Path, required=True, help="a JSON file holding the key")
    p.add_argument("--key-field", default="gateway_api_key")
    p.add_argument("--model", required=True)
    args = p.parse_args(argv)
    key = json.loads(args.key_file.read_text())[args.key_field]
    json.dump(run(args.base_url, key, args.model), sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Load test a stack's gateway: chat completions with a generated image, streamed and not.

Locust (library mode, headless) runs in a child process (scripts/loadtest_worker.py)
against the gateway of one stack and nothing else:

  loadtest.py --stack dev                      the running rehearsal of Pulumi.dev.yaml
  loadtest.py --stack prod --target cluster    the deployed stack (`pulumi stack output`)

The gateway's URL and API key come from the stack itself: the rehearsal's inventory
(the load generator runs inside the gateway's network namespace, the only place the
rehearsal's addresses are reachable from) or the stack outputs `gateway_url`,
`gateway_api_keys` and `engines`. A --url other than that gateway is refused.

Per model it reports requests/s, errors by status, time to first token and inter-token
latency (timed from the SSE stream), end-to-end latency and output tokens/s; it writes
requests.csv, summary.csv and chart.png to --out and prints a summary table.
docs/loadtest.md explains the figures.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import csv
import ipaddress
import itertools
import json
import math
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import urlsplit

from scripts.rehearsal.layout import DEFAULT_STATE_DIR, Layout
from scripts.rehearsal.netns import SUBNET as REHEARSAL_SUBNET
from stacks.naming import GATEWAY_NAME

REPO_ROOT: Final = Path(__file__).resolve().parent.parent

WORKER: Final = "scripts.loadtest_worker"
DEFAULT_OUT_ROOT: Final = REPO_ROOT / "build" / "loadtest"

# Hard caps: no option can make a run larger or longer than this.
MAX_USERS: Final = 1000
MAX_DURATION_S: Final = 1800.0
MAX_REQUESTS: Final = 1_000_000
MAX_IMAGE_SIDE: Final = 2048
# After the duration, requests in flight get this long to finish (streams are not cut).
STOP_GRACE_S: Final = 30.0
# The worker's startup (imports, image generation) and shutdown, on top of duration + grace.
WORKER_OVERHEAD_S: Final = 60.0
INTERRUPT_WAIT_S: Final = 15.0

PERCENTILES: Final = (50, 95, 99)
# Preferred gateway key id: the stacks give load tests a key of their own, so its rate
# limit and access-log id are separate from real clients'.
LOADTEST_KEY_ID: Final = "loadtest"
DEFAULT_SESSION_HEADER: Final = "X-Session-Id"
DEFAULT_PROMPT: Final = "Describe this image in one sentence."
CHAT_PATH: Final = "/v1/chat/completions"
DONE: Final = "[DONE]"

Outcome = Literal["ok", "http_error", "transport_error", "cut", "bad_body"]
Mode = Literal["stream", "non-stream", "all"]


class LoadtestError(Exception):
    """A user mistake or a refused target: printed as one message, exit 2."""


# --------------------------------------------------------------------------- the image


def parse_size(text: str) -> tuple[int, int]:
    """'256x192' -> (256, 192); each side 1..MAX_IMAGE_SIDE."""
    width, sep, height = text.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit():
        raise LoadtestError(f"--image-size {text!r}: expected WIDTHxHEIGHT, e.g. 256x256")
    size = int(width), int(height)
    if not all(1 <= side <= MAX_IMAGE_SIDE for side in size):
        raise LoadtestError(f"--image-size {text!r}: each side must be 1..{MAX_IMAGE_SIDE}")
    return size


def make_png(width: int, height: int, seed: int = 0) -> bytes:
    """An RGB PNG of random pixels: incompressible, so its size is that of a real photo
    of the same dimensions rather than a few bytes of solid colour."""
    pixels = random.Random(seed).randbytes(width * height * 3)
    stride = width * 3
    # Each scanline starts with its filter type (0: none).
    raw = b"".join(b"\x00" + pixels[y * stride : (y + 1) * stride] for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"".join(
        [
            b"\x89PNG\r\n\x1a\n",
            chunk(b"IHDR", header),
            chunk(b"IDAT", zlib.compress(raw, 6)),
            chunk(b"IEND", b""),
        ]
    )


def png_data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def chat_body(
    model: str, prompt: str, image_url: str | None, *, stream: bool, max_tokens: int | None
) -> dict[str, Any]:
    """An OpenAI chat completion request: one user message, text and optionally an image."""
    content: list[dict[str, Any]] = [{"type": "text", "text": prompt}]
    if image_url is not None:
        content.append({"type": "image_url", "image_url": {"url": image_url}})
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": content}]}
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return body


# --------------------------------------------------------------------------- SSE timing


@dataclass(frozen=True)
class SseEvent:
    t: float  # when the blank line that completes the event arrived
    data: str


@dataclass
class SseParser:
    """Splits a text/event-stream into events as the bytes arrive (any split, CRLF or LF)."""

    _buffer: bytes = b""
    _data: list[str] = field(default_factory=list)

    def feed(self, t: float, piece: bytes) -> list[SseEvent]:
        self._buffer += piece
        events: list[SseEvent] = []
        while b"\n" in self._buffer:
            raw, self._buffer = self._buffer.split(b"\n", 1)
            line = raw.rstrip(b"\r").decode("utf-8", errors="replace")
            if not line:
                if self._data:
                    events.append(SseEvent(t, "\n".join(self._data)))
                    self._data = []
            elif line.startswith("data:"):
                value = line[5:]
                self._data.append(value[1:] if value.startswith(" ") else value)
            # Comments (":...") and other fields (event:, id:, retry:) carry no tokens.
        return events


@dataclass(frozen=True)
class StreamTiming:
    """What one streamed completion looked like, times relative to the request's start."""

    first_chunk: float | None  # first `data:` event of any kind (the role chunk)
    first_token: float | None  # first event carrying generated text
    inter_token: tuple[float, ...]  # gaps between consecutive text events
    tokens: int  # usage.completion_tokens if sent, else the number of text events
    chunks: int  # data events, [DONE] excluded
    done: bool  # the stream ended with `data: [DONE]`
    malformed: int  # events that were not JSON


def stream_timing(events: Sequence[SseEvent]) -> StreamTiming:
    token_times: list[float] = []
    usage_tokens: int | None = None
    done = False
    malformed = 0
    chunks = 0
    for event in events:
        if event.data == DONE:
            done = True
            continue
        chunks += 1
        try:
            payload = json.loads(event.data)
        except json.JSONDecodeError:
            malformed += 1
            continue
        if not isinstance(payload, dict):
            malformed += 1
            continue
        usage = payload.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            usage_tokens = usage["completion_tokens"]
        if _delta_text(payload):
            token_times.append(event.t)
    return StreamTiming(
        first_chunk=events[0].t if events else None,
        first_token=token_times[0] if token_times else None,
        inter_token=tuple(b - a for a, b in itertools.pairwise(token_times)),
        tokens=usage_tokens if usage_tokens is not None else len(token_times),
        chunks=chunks,
        done=done,
        malformed=malformed,
    )


def _delta_text(payload: Mapping[str, Any]) -> bool:
    for choice in payload.get("choices") or []:
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if isinstance(delta, dict) and (delta.get("content") or delta.get("reasoning_content")):
            return True
    return False


def completion_tokens(body: bytes) -> int | None:
    """usage.completion_tokens of a non-streamed reply; None if it is not a completion."""
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(payload, dict) or not payload.get("choices"):
        return None
    usage = payload.get("usage")
    tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
    return tokens if isinstance(tokens, int) else 0


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class RequestRecord:
    """One request as the load generator saw it (one row of requests.csv)."""

    phase: str
    deployment: str
    model: str
    stream: bool
    session: str
    start: float  # epoch seconds
    status: int  # HTTP status; 0 when no response arrived
    outcome: Outcome
    error: str
    request_id: str  # the gateway's X-Request-Id: joins the row to its access-log line
    first_chunk_s: float | None
    ttft_s: float | None
    e2e_s: float  # until the reply was complete, or until it failed
    output_tokens: int
    chunks: int
    inter_token_s: tuple[float, ...] = ()

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"

    @property
    def end(self) -> float:
        return self.start + self.e2e_s

    @property
    def error_key(self) -> str:
        """How the failure is counted: the HTTP status, or what went wrong without one."""
        if self.outcome == "http_error":
            return str(self.status)
        return {"transport_error": "transport", "cut": "cut", "bad_body": "bad-body"}.get(
            self.outcome, ""
        )

    def to_row(self) -> dict[str, str]:
        row = {f.name: getattr(self, f.name) for f in fields(self)}
        row["stream"] = "1" if self.stream else "0"
        row["inter_token_s"] = " ".join(f"{gap:.6f}" for gap in self.inter_token_s)
        for name in ("first_chunk_s", "ttft_s"):
            row[name] = "" if row[name] is None else f"{row[name]:.6f}"
        row["start"] = f"{self.start:.6f}"
        row["e2e_s"] = f"{self.e2e_s:.6f}"
        return {k: str(v) for k, v in row.items()}

    @classmethod
    def from_row(cls, row: Mapping[str, str]) -> RequestRecord:
        def optional(name: str) -> float | None:
            return float(row[name]) if row[name] else None

        return cls(
            phase=row["phase"],
            deployment=row["deployment"],
            model=row["model"],
            stream=row["stream"] == "1",
            session=row["session"],
            start=float(row["start"]),
            status=int(row["status"]),
            outcome=_outcome(row["outcome"]),
            error=row["error"],
            request_id=row["request_id"],
            first_chunk_s=optional("first_chunk_s"),
            ttft_s=optional("ttft_s"),
            e2e_s=float(row["e2e_s"]),
            output_tokens=int(row["output_tokens"]),
            chunks=int(row["chunks"]),
            inter_token_s=tuple(float(v) for v in row["inter_token_s"].split()),
        )


RECORD_FIELDS: Final = tuple(f.name for f in fields(RequestRecord))
OUTCOMES: Final[tuple[Outcome, ...]] = ("ok", "http_error", "transport_error", "cut", "bad_body")


def _outcome(text: str) -> Outcome:
    for outcome in OUTCOMES:
        if outcome == text:
            return outcome
    raise ValueError(f"unknown outcome {text!r}")


def write_csv(path: Path, fieldnames: Sequence[str], rows: Iterable[Mapping[str, str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)


def write_records(path: Path, records: Iterable[RequestRecord]) -> None:
    write_csv(path, RECORD_FIELDS, (record.to_row() for record in records))


def read_records(path: Path) -> list[RequestRecord]:
    with path.open(newline="", encoding="utf-8") as f:
        return [RequestRecord.from_row(row) for row in csv.DictReader(f)]


# --------------------------------------------------------------------------- statistics


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile with linear interpolation between closest ranks (numpy's default)."""
    if not 0 <= q <= 100:  # noqa: PLR2004 (the range of a percentile)
        raise ValueError(f"percentile {q} is outside 0..100")
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def percentiles(values: Sequence[float]) -> tuple[float | None, ...]:
    return tuple(percentile(values, q) for q in PERCENTILES)


@dataclass(frozen=True)
class Summary:
    """One row of summary.csv: a model (deployment) in one mode over one phase's window."""

    phase: str
    deployment: str
    model: str
    mode: Mode
    window_s: float
    requests: int
    ok: int
    errors_by_status: Mapping[str, int]
    ttft_s: tuple[float | None, ...]
    itl_s: tuple[float | None, ...]
    e2e_s: tuple[float | None, ...]
    output_tokens: int

    @property
    def errors(self) -> int:
        return self.requests - self.ok

    @property
    def error_ratio(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.window_s if self.window_s > 0 else 0.0

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.window_s if self.window_s > 0 else 0.0


def window_of(records: Sequence[RequestRecord]) -> float:
    """From the first request's start to the last one's end."""
    if not records:
        return 0.0
    return max(r.end for r in records) - min(r.start for r in records)


def summarize(records: Sequence[RequestRecord], window_s: float) -> list[Summary]:
    """Per (phase, deployment): a row per mode present, and an `all` row; sorted by name."""
    groups: dict[tuple[str, str, str], list[RequestRecord]] = defaultdict(list)
    for r in records:
        groups[(r.phase, r.deployment, r.model)].append(r)
    out: list[Summary] = []
    for (phase, deployment, model), group in sorted(groups.items()):
        modes: list[tuple[Mode, list[RequestRecord]]] = [
            ("stream", [r for r in group if r.stream]),
            ("non-stream", [r for r in group if not r.stream]),
        ]
        modes = [(mode, rs) for mode, rs in modes if rs]
        if len(modes) > 1:
            modes.append(("all", group))
        out += [_summary((phase, deployment, model), mode, rs, window_s) for mode, rs in modes]
    return out


def _summary(
    key: tuple[str, str, str], mode: Mode, records: Sequence[RequestRecord], window_s: float
) -> Summary:
    phase, deployment, model = key
    ok = [r for r in records if r.ok]
    streamed = [r for r in ok if r.stream]
    return Summary(
        phase=phase,
        deployment=deployment,
        model=model,
        mode=mode,
        window_s=window_s,
        requests=len(records),
        ok=len(ok),
        errors_by_status=dict(sorted(Counter(r.error_key for r in records if not r.ok).items())),
        ttft_s=percentiles([r.ttft_s for r in streamed if r.ttft_s is not None]),
        itl_s=percentiles([gap for r in streamed for gap in r.inter_token_s]),
        e2e_s=percentiles([r.e2e_s for r in ok]),
        output_tokens=sum(r.output_tokens for r in ok),
    )


SUMMARY_FIELDS: Final = (
    "phase", "deployment", "model", "mode", "window_s", "requests", "ok", "errors",
    "error_ratio", "errors_by_status", "requests_per_s",
    *(f"{m}_p{q}_s" for m in ("ttft", "itl", "e2e") for q in PERCENTILES),
    "output_tokens", "output_tokens_per_s",
)  # fmt: skip


def summary_row(s: Summary) -> dict[str, str]:
    def number(value: float | None, digits: int = 6) -> str:
        return "" if value is None else f"{value:.{digits}f}"

    row = {
        "phase": s.phase,
        "deployment": s.deployment,
        "model": s.model,
        "mode": s.mode,
        "window_s": number(s.window_s, 3),
        "requests": str(s.requests),
        "ok": str(s.ok),
        "errors": str(s.errors),
        "error_ratio": number(s.error_ratio, 4),
        "errors_by_status": format_errors(s.errors_by_status),
        "requests_per_s": number(s.requests_per_s, 3),
        "output_tokens": str(s.output_tokens),
        "output_tokens_per_s": number(s.output_tokens_per_s, 3),
    }
    for name, values in (("ttft", s.ttft_s), ("itl", s.itl_s), ("e2e", s.e2e_s)):
        for q, value in zip(PERCENTILES, values, strict=True):
            row[f"{name}_p{q}_s"] = number(value)
    return row


def write_summary(path: Path, summaries: Iterable[Summary]) -> None:
    write_csv(path, SUMMARY_FIELDS, map(summary_row, summaries))


def format_errors(errors: Mapping[str, int]) -> str:
    """{'429': 3, 'cut': 1} -> '429=3 cut=1' (empty when there were none)."""
    return " ".join(f"{key}={count}" for key, count in errors.items())


def format_ms(values: Sequence[float | None]) -> str:
    """Seconds -> '12/40/95' milliseconds (p50/p95/p99); '-' when there is no sample."""
    if all(v is None for v in values):
        return "-"
    return "/".join("-" if v is None else f"{v * 1000:.0f}" for v in values)


TABLE_COLUMNS: Final = (
    ("model", "<"), ("mode", "<"), ("requests", ">"), ("req/s", ">"), ("errors", ">"),
    ("by status", "<"), ("TTFT ms p50/95/99", ">"), ("ITL ms p50/95/99", ">"),
    ("E2E ms p50/95/99", ">"), ("out tok/s", ">"),
)  # fmt: skip


def format_table(summaries: Sequence[Summary]) -> str:
    """The summary as aligned text columns (what the command prints at the end)."""
    rows = [
        (
            s.model,
            s.mode,
            str(s.requests),
            f"{s.requests_per_s:.1f}",
            f"{s.error_ratio:.1%}",
            format_errors(s.errors_by_status) or "-",
            format_ms(s.ttft_s),
            format_ms(s.itl_s),
            format_ms(s.e2e_s),
            f"{s.output_tokens_per_s:.1f}",
        )
        for s in summaries
    ]
    header = tuple(name for name, _ in TABLE_COLUMNS)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(
            f"{cell:{align}{width}}"
            for cell, (_, align), width in zip(row, TABLE_COLUMNS, widths, strict=True)
        ).rstrip()
        for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- over time


@dataclass(frozen=True)
class Bucket:
    start_s: float  # since the first request
    requests_per_s: float
    output_tokens_per_s: float
    e2e_s: tuple[float | None, ...]
    ttft_s: tuple[float | None, ...]


def bucket_width(window_s: float, target_buckets: int = 40) -> float:
    """A round width (1, 2, 5, 10, 15, 30, 60 s...) giving at most ~target_buckets buckets."""
    for width in (1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0):
        if window_s / width <= target_buckets:
            return width
    return 600.0


def timeline(records: Sequence[RequestRecord], origin: float, width: float) -> list[Bucket]:
    """Completions per bucket (by end time): throughput and latency percentiles over time."""
    if not records:
        return []
    last = max(r.end for r in records)
    count = max(1, math.ceil((last - origin) / width))
    grouped: list[list[RequestRecord]] = [[] for _ in range(count)]
    for r in records:
        grouped[min(count - 1, max(0, int((r.end - origin) // width)))].append(r)
    buckets = []
    for index, group in enumerate(grouped):
        ok = [r for r in group if r.ok]
        buckets.append(
            Bucket(
                start_s=index * width,
                requests_per_s=len(group) / width,
                output_tokens_per_s=sum(r.output_tokens for r in ok) / width,
                e2e_s=percentiles([r.e2e_s for r in ok]),
                ttft_s=percentiles([r.ttft_s for r in ok if r.ttft_s is not None]),
            )
        )
    return buckets


def render_chart(records: Sequence[RequestRecord], path: Path, title: str) -> None:
    """chart.png: latency percentiles (top) and throughput (bottom) over time, per model."""
    import matplotlib  # slow to import, and only the chart needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    origin = min(r.start for r in records)
    width = bucket_width(window_of(records))
    figure, (latency, throughput) = plt.subplots(2, 1, figsize=(11, 7.5), sharex=True)
    by_model: dict[str, list[RequestRecord]] = defaultdict(list)
    for r in records:
        by_model[r.model].append(r)
    tokens = throughput.twinx()
    styles = {50: "-", 95: "--", 99: ":"}
    for (model, group), colour in zip(sorted(by_model.items()), _colours(), strict=False):
        buckets = timeline(group, origin, width)
        x = [b.start_s + width / 2 for b in buckets]
        for i, q in enumerate(PERCENTILES):
            latency.plot(
                x,
                _ms([b.e2e_s[i] for b in buckets]),
                styles[q],
                color=colour,
                label=f"{model} E2E p{q}",
            )
        ttft = _ms([b.ttft_s[0] for b in buckets])
        if not all(math.isnan(v) for v in ttft):  # a model with streamed requests
            latency.plot(x, ttft, "-.", color=colour, alpha=0.6, label=f"{model} TTFT p50")
        throughput.plot(
            x, [b.requests_per_s for b in buckets], "-", color=colour, label=f"{model} requests/s"
        )
        tokens.plot(
            x,
            [b.output_tokens_per_s for b in buckets],
            "--",
            color=colour,
            label=f"{model} output tokens/s",
        )
    latency.set_ylabel("latency (ms)")
    latency.set_title(title)
    latency.grid(alpha=0.3)
    latency.legend(fontsize=7, ncol=2)
    throughput.set_ylabel(f"requests/s, solid ({width:g} s buckets)")
    tokens.set_ylabel("output tokens/s, dashed")
    throughput.set_xlabel("seconds since the first request (by completion time)")
    throughput.grid(alpha=0.3)
    lines = throughput.get_legend_handles_labels()
    token_lines = tokens.get_legend_handles_labels()
    throughput.legend(lines[0] + token_lines[0], lines[1] + token_lines[1], fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _ms(values: Iterable[float | None]) -> list[float]:
    return [math.nan if v is None else v * 1000 for v in values]


def _colours() -> Iterator[str]:
    while True:
        yield from ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")


# --------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    """A stack's gateway as the stack itself describes it."""

    stack: str
    kind: Literal["rehearsal", "cluster"]
    gateway_url: str
    api_key_id: str
    api_key: str
    deployments: Mapping[str, str]  # deployment name -> served model name
    netns: str | None = None  # where the load generator must run (rehearsal only)


def choose_key(keys: Mapping[str, str], wanted: str | None, where: str) -> tuple[str, str]:
    if not keys:
        raise LoadtestError(f"{where} lists no gateway API key")
    key_id = wanted or (LOADTEST_KEY_ID if LOADTEST_KEY_ID in keys else sorted(keys)[0])
    if key_id not in keys:
        raise LoadtestError(
            f"--api-key-id {key_id}: {where} has keys {', '.join(sorted(keys))} only"
        )
    return key_id, keys[key_id]


def rehearsal_target(state_dir: Path, stack: str, key_id: str | None) -> Target:
    """The gateway of the running rehearsal, from its inventory and secrets files."""
    inventory_path = Layout(state_dir).inventory
    if not inventory_path.exists():
        raise LoadtestError(
            f"no running rehearsal in {state_dir} ({inventory_path.name} is missing): start one "
            f"with `make rehearse STACK={stack}` in another terminal (or `python -m "
            f"scripts.rehearse --stack {stack} --detach --state-dir {state_dir}`), "
            "or use --target cluster"
        )
    inventory = _read_json(inventory_path)
    if inventory.get("stack") != stack:
        raise LoadtestError(
            f"the rehearsal in {state_dir} runs stack {inventory.get('stack')!r}, not {stack!r}"
        )
    gateways = sorted(
        (h for h in inventory.get("hosts", []) if GATEWAY_NAME in h.get("roles", {})),
        key=lambda h: str(h["name"]),
    )
    if not gateways:
        raise LoadtestError(f"{inventory_path} lists no gateway host")
    host = gateways[0]
    role = host["roles"][GATEWAY_NAME]
    secrets_ = _read_json(Path(inventory.get("secrets_file") or Layout(state_dir).secrets))
    key_id, key = choose_key(secrets_.get("client_api_keys", {}), key_id, "the rehearsal")
    return Target(
        stack=stack,
        kind="rehearsal",
        gateway_url=f"http://{host['address']}:{role['port']}",
        api_key_id=key_id,
        api_key=key,
        deployments=dict(role["deployments"]),
        netns=str(host["netns"]),
    )


def pulumi_outputs(stack: str) -> dict[str, Any]:
    """`pulumi stack output --json --show-secrets` of `stack` (the key is a secret output)."""
    if shutil.which("pulumi") is None:
        raise LoadtestError(
            "the pulumi CLI is not installed here; save the outputs where it is "
            f"(`pulumi stack output --stack {stack} --json --show-secrets > outputs.json`) and "
            "pass --outputs-file outputs.json"
        )
    argv = ["pulumi", "stack", "output", "--stack", stack, "--json", "--show-secrets"]
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=120, cwd=REPO_ROOT, check=False
        )
    except subprocess.TimeoutExpired as err:
        raise LoadtestError(f"`{' '.join(argv)}` did not answer within 120 s") from err
    if done.returncode != 0:
        raise LoadtestError(f"`{' '.join(argv)}` failed: {done.stderr.strip()}")
    try:
        outputs = json.loads(done.stdout)
    except json.JSONDecodeError as err:
        raise LoadtestError(f"`{' '.join(argv)}` printed no JSON: {err}") from None
    if not isinstance(outputs, dict):
        raise LoadtestError(f"`{' '.join(argv)}` printed no JSON object")
    return outputs


def cluster_target(stack: str, outputs: Mapping[str, Any], key_id: str | None) -> Target:
    """The deployed gateway, from the stack outputs gateway_url, gateway_api_keys, engines."""
    if outputs.get("stack") not in (None, stack):
        raise LoadtestError(f"the outputs are of stack {outputs.get('stack')!r}, not {stack!r}")
    url = outputs.get("gateway_url")
    if not url:
        raise LoadtestError(
            f"stack {stack} has no gateway_url output (the gateway's load balancer has no "
            "address yet, or the stack is not deployed)"
        )
    keys = outputs.get("gateway_api_keys")
    if not isinstance(keys, dict):
        raise LoadtestError(
            "the gateway_api_keys output is missing or hidden: read the outputs with --show-secrets"
        )
    engines = outputs.get("engines") or {}
    try:
        deployments = {name: str(e["served_model_name"]) for name, e in engines.items()}
    except (AttributeError, KeyError, TypeError):
        raise LoadtestError(
            "the engines output is not deployment -> {served_model_name, ...}: read it with "
            f"`pulumi stack output --stack {stack} --json --show-secrets`"
        ) from None
    key_id, key = choose_key(keys, key_id, f"stack {stack}")
    return Target(
        stack=stack,
        kind="cluster",
        gateway_url=str(url),
        api_key_id=key_id,
        api_key=str(key),
        deployments=deployments,
    )


def origin(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of a base URL; LoadtestError for anything but a bare origin."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise LoadtestError(f"{url!r} is not an http(s) URL")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise LoadtestError(f"{url!r}: give the gateway's base URL only")
    if parts.path not in ("", "/"):
        raise LoadtestError(f"{url!r}: give the gateway's base URL, without a path")
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError as err:
        raise LoadtestError(f"{url!r}: {err}") from None
    return scheme, parts.hostname.lower(), port


def check_url(target: Target, url: str | None) -> str:
    """The URL to load: the stack's gateway. Any other URL is refused, whatever it is."""
    own = origin(target.gateway_url)
    if url is not None and origin(url) != own:
        raise LoadtestError(
            f"refusing to load {url}: it is not the gateway of stack {target.stack} "
            f"({target.kind}: {target.gateway_url}). The load test sends traffic only to the "
            "stack's own gateway."
        )
    scheme, host, port = own
    return f"{scheme}://{host}:{port}"


def in_rehearsal_subnet(url: str) -> bool:
    """True for the rehearsal's private addresses, reachable only inside its namespaces."""
    try:
        address = ipaddress.ip_address(origin(url)[1])
    except ValueError:
        return False
    return address in REHEARSAL_SUBNET


def reaches_via_rehearsal(url: str) -> bool:
    """True when this process would reach `url` from an address on a rehearsal bridge,
    i.e. it runs inside a rehearsal namespace (the root namespace never gets one).
    A UDP connect only asks the kernel for the route: no packet is sent."""
    scheme, host, port = origin(url)
    del scheme
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((host, port))
        except OSError:  # no route at all
            return False
        source = ipaddress.ip_address(probe.getsockname()[0])
    return source in REHEARSAL_SUBNET


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LoadtestError(f"cannot read {path}: {err}") from None
    if not isinstance(data, dict):
        raise LoadtestError(f"cannot read {path}: not a JSON object")
    return data


def check_netns_exec() -> None:
    """`ip netns exec` (how the worker enters a rehearsal namespace) needs root and iproute2."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        raise LoadtestError(
            "the rehearsal's gateway is reachable only inside its network namespace, and "
            "entering it (`ip netns exec`) needs root and iproute2's `ip`: run as root "
            "(`make debs` installs iproute2)"
        )


# --------------------------------------------------------------------------- the worker's spec


@dataclass(frozen=True)
class Route:
    deployment: str
    model: str
    path: str  # /<deployment>/v1/chat/completions, or /v1/chat/completions on an engine


@dataclass(frozen=True)
class PhaseSpec:
    """One Locust run: the worker runs phases one after another, in one process."""

    name: str
    base_url: str
    api_key: str
    routes: tuple[Route, ...]
    users: int
    spawn_rate: float
    duration_s: float
    max_requests: int
    stream_ratio: float
    image_ratio: float
    image_size: tuple[int, int]
    image_variants: int
    prompt: str = DEFAULT_PROMPT
    max_tokens: int | None = None
    session_header: str = DEFAULT_SESSION_HEADER
    sessions_per_user: int = 0  # 0: no session header
    timeout_s: float = 120.0
    # A user pauses this long after a failed request, as a real client backs off: without
    # it, a closed-loop user answered 429 at once sends thousands of requests a second.
    error_backoff_s: float = 1.0
    seed: int = 1

    def __post_init__(self) -> None:
        problems = []
        if not 1 <= self.users <= MAX_USERS:
            problems.append(f"users {self.users} must be 1..{MAX_USERS}")
        if not 0 < self.duration_s <= MAX_DURATION_S:
            problems.append(f"duration {self.duration_s:g} s must be in (0, {MAX_DURATION_S:g}]")
        if not 1 <= self.max_requests <= MAX_REQUESTS:
            problems.append(f"max requests {self.max_requests} must be 1..{MAX_REQUESTS}")
        if self.spawn_rate <= 0:
            problems.append("the spawn rate must be positive")
        for name in ("stream_ratio", "image_ratio"):
            if not 0 <= getattr(self, name) <= 1:
                problems.append(f"{name.replace('_', ' ')} must be within 0..1")
        if not self.routes:
            problems.append("no route to send requests to")
        if self.timeout_s <= 0 or self.error_backoff_s < 0:
            problems.append("the timeout must be positive and the error backoff >= 0")
        if self.image_variants < 1 or self.sessions_per_user < 0:
            problems.append("image variants must be >= 1 and sessions per user >= 0")
        if problems:
            raise LoadtestError("; ".join(problems))

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PhaseSpec:
        values = dict(data)
        values["routes"] = tuple(Route(**r) for r in values["routes"])
        values["image_size"] = tuple(values["image_size"])
        return cls(**values)


@dataclass(frozen=True)
class WorkerSpec:
    phases: tuple[PhaseSpec, ...]
    records_csv: str
    meta_json: str
    progress_interval_s: float = 5.0

    def __post_init__(self) -> None:
        if not self.progress_interval_s > 0:
            raise LoadtestError(f"progress interval {self.progress_interval_s:g} s must be > 0")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> WorkerSpec:
        data = json.loads(text)
        return cls(
            phases=tuple(PhaseSpec.from_json(p) for p in data["phases"]),
            records_csv=data["records_csv"],
            meta_json=data["meta_json"],
            progress_interval_s=data["progress_interval_s"],
        )

    @property
    def time_limit_s(self) -> float:
        """How long the worker may take in all: past this, it is killed."""
        return sum(p.duration_s + min(p.timeout_s, STOP_GRACE_S) for p in self.phases) + (
            WORKER_OVERHEAD_S
        )


def gateway_routes(target: Target, wanted: Sequence[str]) -> tuple[Route, ...]:
    names = list(wanted) or sorted(target.deployments)
    unknown = [n for n in names if n not in target.deployments]
    if unknown:
        raise LoadtestError(
            f"--deployment {', '.join(unknown)}: stack {target.stack} has "
            f"{', '.join(sorted(target.deployments)) or 'no deployment'}"
        )
    return tuple(Route(n, target.deployments[n], f"/{n}{CHAT_PATH}") for n in names)


def worker_argv(spec_path: Path, netns: str | None) -> list[str]:
    argv = [sys.executable, "-m", WORKER, str(spec_path)]
    return ["ip", "netns", "exec", netns, *argv] if netns else argv


def write_spec(directory: Path, spec: WorkerSpec) -> Path:
    """The spec holds API keys: written owner-only, and removed by the caller after the run."""
    path = directory / "worker-spec.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(spec.to_json())
    return path


def run_worker(
    spec: WorkerSpec, directory: Path, netns: str | None, *, stdout: int | None = None
) -> subprocess.Popen[bytes]:
    """Start the worker (its own session, so Ctrl-C reaches only this process first)."""
    path = write_spec(directory, spec)
    return subprocess.Popen(
        worker_argv(path, netns), stdout=stdout, start_new_session=True, cwd=REPO_ROOT
    )


def wait_worker(proc: subprocess.Popen[bytes], spec: WorkerSpec, directory: Path) -> int:
    """Wait for the worker within its time limit; on Ctrl-C let it stop and report."""
    try:
        try:
            return proc.wait(timeout=spec.time_limit_s)
        except KeyboardInterrupt:
            print("\ninterrupted: stopping the load (requests in flight may finish)", flush=True)
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGINT)
            return proc.wait(timeout=INTERRUPT_WAIT_S + STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the session run_worker created for it
        proc.wait(timeout=30)
        raise LoadtestError(
            f"the load generator did not finish within {spec.time_limit_s:g} s; killed"
        ) from None
    finally:
        (directory / "worker-spec.json").unlink(missing_ok=True)


# --------------------------------------------------------------------------- the command


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m scripts.loadtest",
        description=(__doc__ or "").split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--stack", default="dev", help="the stack name (default dev)")
    p.add_argument(
        "--target",
        choices=("rehearsal", "cluster"),
        default="rehearsal",
        help="rehearsal (default): the running `make rehearse`; cluster: the deployed stack",
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        help=f"the rehearsal's state directory (default {DEFAULT_STATE_DIR})",
    )
    p.add_argument(
        "--outputs-file",
        type=Path,
        help="cluster: saved `pulumi stack output --json --show-secrets` instead of running pulumi",
    )
    p.add_argument("--url", help="assert the gateway URL: anything but the stack's is refused")
    p.add_argument("--api-key-id", help=f"gateway key id (default {LOADTEST_KEY_ID} if present)")
    p.add_argument(
        "--deployment",
        action="append",
        default=[],
        help="load this deployment's route /<deployment>/v1/... (repeatable; default all)",
    )
    p.add_argument("--users", type=int, default=20, help=f"concurrent users (max {MAX_USERS})")
    p.add_argument("--spawn-rate", type=float, default=10.0, help="users started per second")
    p.add_argument(
        "--duration", type=float, default=60.0, help=f"seconds of load (max {MAX_DURATION_S:g})"
    )
    p.add_argument(
        "--max-requests",
        type=int,
        default=100_000,
        help=f"stop after this many requests (max {MAX_REQUESTS})",
    )
    p.add_argument("--stream-ratio", type=float, default=0.5, help="share streamed (0..1)")
    p.add_argument("--image-ratio", type=float, default=1.0, help="share with an image (0..1)")
    p.add_argument("--image-size", default="256x256", help="generated PNG, WIDTHxHEIGHT")
    p.add_argument("--image-variants", type=int, default=4, help="distinct images to rotate")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="the text part of each message")
    p.add_argument("--max-tokens", type=int, help="max_tokens of each request (default unset)")
    p.add_argument(
        "--sessions-per-user",
        type=int,
        default=0,
        help="send a session header, rotating this many session ids per user (default 0: none)",
    )
    p.add_argument("--session-header", default=DEFAULT_SESSION_HEADER)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    p.add_argument(
        "--error-backoff",
        type=float,
        default=1.0,
        help="seconds a user waits after a failed request (default 1; 0: none)",
    )
    p.add_argument("--progress-interval", type=float, default=5.0, help="seconds between lines")
    p.add_argument(
        "--max-error-ratio",
        type=float,
        default=0.0,
        help="exit 1 when more than this share of requests failed (default 0: any failure)",
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, help=f"results directory (default {DEFAULT_OUT_ROOT}/...)")
    return p


def resolve_target(args: argparse.Namespace) -> Target:
    if args.target == "rehearsal":
        if args.outputs_file:
            raise LoadtestError("--outputs-file goes with --target cluster")
        return rehearsal_target(args.state_dir.resolve(), args.stack, args.api_key_id)
    outputs = _read_json(args.outputs_file) if args.outputs_file else pulumi_outputs(args.stack)
    return cluster_target(args.stack, outputs, args.api_key_id)


def build_spec(args: argparse.Namespace, target: Target, out: Path) -> WorkerSpec:
    base_url = check_url(target, args.url)
    if target.kind == "cluster" and in_rehearsal_subnet(base_url):
        raise LoadtestError(f"{base_url} is a rehearsal address; use --target rehearsal")
    phase = PhaseSpec(
        name="load",
        base_url=base_url,
        api_key=target.api_key,
        routes=gateway_routes(target, args.deployment),
        users=args.users,
        spawn_rate=args.spawn_rate,
        duration_s=args.duration,
        max_requests=args.max_requests,
        stream_ratio=args.stream_ratio,
        image_ratio=args.image_ratio,
        image_size=parse_size(args.image_size),
        image_variants=args.image_variants,
        prompt=args.prompt,
        max_tokens=args.max_tokens,
        session_header=args.session_header,
        sessions_per_user=args.sessions_per_user,
        timeout_s=args.timeout,
        error_backoff_s=args.error_backoff,
        seed=args.seed,
    )
    return WorkerSpec(
        phases=(phase,),
        records_csv=str(out / "requests.csv"),
        meta_json=str(out / "meta.json"),
        progress_interval_s=args.progress_interval,
    )


def report(out: Path, title: str) -> list[Summary]:
    """summary.csv, chart.png and the printed table, from the worker's requests.csv."""
    records = read_records(out / "requests.csv")
    if not records:
        raise LoadtestError(f"no request completed; see {out}")
    meta = _read_json(out / "meta.json")
    summaries: list[Summary] = []
    for phase in meta["phases"]:
        mine = [r for r in records if r.phase == phase["name"]]
        summaries += summarize(mine, phase["ended"] - phase["started"])
    write_summary(out / "summary.csv", summaries)
    render_chart(records, out / "chart.png", title)
    return summaries


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        target = resolve_target(args)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        out = (args.out or DEFAULT_OUT_ROOT / f"{args.stack}-{args.target}-{stamp}").resolve()
        spec = build_spec(args, target, out)
        if target.netns is None and in_rehearsal_subnet(spec.phases[0].base_url):
            raise LoadtestError("a rehearsal address is reachable only from its namespaces")
        if target.netns is not None:
            check_netns_exec()
        out.mkdir(parents=True, exist_ok=True)
        phase = spec.phases[0]
        print(
            f"==> load test of stack {target.stack} ({target.kind}) at {phase.base_url} "
            f"with key id {target.api_key_id}"
            + (f", from network namespace {target.netns}" if target.netns else "")
        )
        print(
            f"    {phase.users} users (+{phase.spawn_rate:g}/s) for {phase.duration_s:g} s, at "
            f"most {phase.max_requests} requests; {phase.stream_ratio:.0%} streamed, "
            f"{phase.image_ratio:.0%} with a {args.image_size} PNG; routes: "
            + ", ".join(r.path for r in phase.routes),
            flush=True,
        )
        code = wait_worker(run_worker(spec, out, target.netns), spec, out)
        if code != 0:
            raise LoadtestError(f"the load generator failed (exit {code}); see the lines above")
        title = f"{target.stack} ({target.kind}): {phase.users} users, {phase.duration_s:g} s"
        summaries = report(out, title)
    except LoadtestError as err:
        print(f"loadtest: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # --out where this user may not write, a directory for a file...
        print(f"loadtest: {err.filename}: {err.strerror}", file=sys.stderr)
        return 2
    print()
    print(format_table(summaries), end="")
    print(f"\nwritten: {out}/requests.csv, summary.csv, chart.png")
    rows = [s for s in summaries if s.mode != "all"]
    ratio = sum(s.errors for s in rows) / max(1, sum(s.requests for s in rows))
    if ratio > args.max_error_ratio:
        print(f"loadtest: {ratio:.2%} of requests failed (allowed: {args.max_error_ratio:.2%})")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

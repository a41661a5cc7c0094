"""The load generator behind scripts/loadtest.py and scripts/bench.py: Locust in library mode.

Run only as a child process, `loadtest_worker.py SPEC.json`: the commands write the spec
and, for a rehearsal, start this under `ip netns exec`. Importing locust monkey-patches
the whole process for gevent, which is why this is a process of its own rather than a
module the commands import.

Each phase of the spec is one headless Locust run (Environment + LocalRunner). Its users
are gevent greenlets with a geventhttpclient connection each: Locust's FastHttpUser uses
the same client, but here the response is read line by line, so every `data:` event is
timed when it arrives and a stream cut in the middle is told apart from one that never
started. Each request becomes a row of the records CSV as soon as it ends; a progress
line goes to stdout every few seconds.
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import random
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import gevent
from geventhttpclient import HTTPClient
from locust import User, constant, task
from locust.env import Environment
from locust.exception import StopUser

from scripts.loadtest import (
    RECORD_FIELDS,
    STOP_GRACE_S,
    LoadtestError,
    PhaseSpec,
    RequestRecord,
    Route,
    SseEvent,
    SseParser,
    WorkerSpec,
    chat_body,
    completion_tokens,
    format_ms,
    in_rehearsal_subnet,
    make_png,
    percentiles,
    png_data_url,
    reaches_via_rehearsal,
    stream_timing,
)

REPO_ROOT = Path(__file__).resolve().parent.parent

CONNECT_TIMEOUT_S = 10.0
ERROR_TEXT_LIMIT = 160
POLL_S = 0.1
HTTP_OK = 200
USER_AGENT = "qwen-vl-serving-loadtest (locust)"


# --------------------------------------------------------------------------- one request


@dataclass(frozen=True)
class Prepared:
    """A request body, serialised once: base64 images make json.dumps costly per request."""

    route: Route
    stream: bool
    body: bytes


def prepare_bodies(spec: PhaseSpec) -> dict[tuple[int, bool, int], Prepared]:
    """Every body a phase sends, by (route index, streamed, image variant or -1 for none)."""
    width, height = spec.image_size
    images = [
        png_data_url(make_png(width, height, seed=spec.seed + v))
        for v in range(spec.image_variants)
    ]
    bodies: dict[tuple[int, bool, int], Prepared] = {}
    for (index, route), stream in itertools.product(enumerate(spec.routes), (False, True)):
        for variant, image in [(-1, None), *enumerate(images)]:
            payload = chat_body(
                route.model, spec.prompt, image, stream=stream, max_tokens=spec.max_tokens
            )
            bodies[(index, stream, variant)] = Prepared(route, stream, json.dumps(payload).encode())
    return bodies


def send(
    client: HTTPClient, prepared: Prepared, headers: dict[str, str], *, phase: str, session: str
) -> RequestRecord:
    """POST one chat completion and time it from the wire."""
    start = time.time()
    t0 = time.perf_counter()

    def record(status: int, outcome: Any, error: str = "", **timing: Any) -> RequestRecord:
        return RequestRecord(
            phase=phase,
            deployment=prepared.route.deployment,
            model=prepared.route.model,
            stream=prepared.stream,
            session=session,
            start=start,
            status=status,
            outcome=outcome,
            error=error[:ERROR_TEXT_LIMIT],
            request_id=timing.pop("request_id", ""),
            first_chunk_s=timing.pop("first_chunk_s", None),
            ttft_s=timing.pop("ttft_s", None),
            e2e_s=time.perf_counter() - t0,
            output_tokens=timing.pop("output_tokens", 0),
            chunks=timing.pop("chunks", 0),
            inter_token_s=timing.pop("inter_token_s", ()),
        )

    # Broad catches below on purpose: every failure (refused, reset, timed out, cut, bad
    # TLS) is a result to count, never a reason to stop a simulated user.
    try:
        response = client.request("POST", prepared.route.path, body=prepared.body, headers=headers)
    except Exception as err:
        return record(0, "transport_error", _describe(err))
    status = response.status_code
    request_id = response.get("x-request-id") or ""
    events: list[SseEvent] = []
    try:
        if status != HTTP_OK:
            return record(status, "http_error", _error_text(response.read()), request_id=request_id)
        if not prepared.stream:
            tokens = completion_tokens(response.read())
            if tokens is None:
                return record(status, "bad_body", "not a chat completion", request_id=request_id)
            return record(status, "ok", request_id=request_id, output_tokens=tokens)
        parser = SseParser()
        while line := response.readline(b"\n"):
            events += parser.feed(time.perf_counter() - t0, line)
    except Exception as err:
        if status != HTTP_OK:
            return record(status, "http_error", _describe(err), request_id=request_id)
        timing = stream_timing(events)
        return record(
            status,
            "cut",
            _describe(err),
            request_id=request_id,
            first_chunk_s=timing.first_chunk,
            ttft_s=timing.first_token,
            chunks=timing.chunks,
        )
    finally:
        response.release()
    timing = stream_timing(events)
    outcome = "ok" if timing.done and not timing.malformed else "bad_body"
    return record(
        status,
        outcome,
        "" if outcome == "ok" else "stream without [DONE] or with non-JSON events",
        request_id=request_id,
        first_chunk_s=timing.first_chunk,
        ttft_s=timing.first_token,
        output_tokens=timing.tokens,
        chunks=timing.chunks,
        inter_token_s=timing.inter_token,
    )


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".strip().rstrip(":")


def _error_text(body: bytes) -> str:
    """The OpenAI error message if there is one, else the start of the body."""
    try:
        error = json.loads(body)["error"]
        return str(error["message"] if isinstance(error, dict) else error)
    except (ValueError, KeyError, TypeError):
        return body[:ERROR_TEXT_LIMIT].decode("utf-8", errors="replace")


# --------------------------------------------------------------------------- one phase


@dataclass
class PhaseState:
    """Admission and bookkeeping shared by a phase's users (one gevent thread: no locks)."""

    spec: PhaseSpec
    deadline: float
    writer: Callable[[RequestRecord], None]
    issued: int = 0
    in_flight: int = 0
    closed: bool = False
    recent: list[RequestRecord] = field(default_factory=list)
    done: int = 0
    failed: int = 0

    def admit(self) -> bool:
        if self.closed or self.issued >= self.spec.max_requests:
            return False
        if time.monotonic() >= self.deadline:
            return False
        self.issued += 1
        self.in_flight += 1
        return True

    def finish(self, record: RequestRecord) -> None:
        self.in_flight -= 1
        self.done += 1
        self.failed += not record.ok
        self.recent.append(record)
        self.writer(record)


def user_class(state: PhaseState, bodies: dict[tuple[int, bool, int], Prepared]) -> type[User]:
    spec = state.spec
    numbers = itertools.count()

    class ChatUser(User):
        wait_time = constant(0)  # closed loop: a user sends its next request at once
        host = spec.base_url

        def on_start(self) -> None:
            self.number = next(numbers)
            self.rng = random.Random(spec.seed * 1_000_003 + self.number)
            self.sent = 0
            self.http = HTTPClient.from_url(
                spec.base_url,
                concurrency=1,
                connection_timeout=CONNECT_TIMEOUT_S,
                network_timeout=spec.timeout_s,
                headers={"User-Agent": USER_AGENT},
            )

        def on_stop(self) -> None:
            self.http.close()

        @task
        def chat(self) -> None:
            if not state.admit():
                raise StopUser
            prepared = bodies[self._choose()]
            headers = {
                "Authorization": f"Bearer {spec.api_key}",
                "Content-Type": "application/json",
                "Accept": "text/event-stream" if prepared.stream else "application/json",
            }
            session = ""
            if spec.sessions_per_user:
                session = f"u{self.number}-s{self.sent % spec.sessions_per_user}"
                headers[spec.session_header] = session
            self.sent += 1
            record = send(self.http, prepared, headers, phase=spec.name, session=session)
            state.finish(record)
            # Locust's own statistics (and its event hooks) see every request too.
            self.environment.events.request.fire(
                request_type="POST-stream" if prepared.stream else "POST",
                name=prepared.route.path,
                response_time=record.e2e_s * 1000,
                response_length=0,
                exception=None if record.ok else RuntimeError(record.error_key),
                context={},
            )
            if not record.ok and spec.error_backoff_s:
                gevent.sleep(spec.error_backoff_s)

        def _choose(self) -> tuple[int, bool, int]:
            route = self.rng.randrange(len(spec.routes))
            stream = self.rng.random() < spec.stream_ratio
            with_image = self.rng.random() < spec.image_ratio
            variant = self.rng.randrange(spec.image_variants) if with_image else -1
            return route, stream, variant

    return ChatUser


@dataclass
class Stop:
    """Set by SIGINT/SIGTERM: the current phase winds down and no further phase starts."""

    requested: bool = False


def run_phase(
    spec: PhaseSpec, writer: Callable[[RequestRecord], None], interval: float, stop: Stop
) -> dict[str, Any]:
    bodies = prepare_bodies(spec)
    state = PhaseState(spec, time.monotonic() + spec.duration_s, writer)
    env = Environment(user_classes=[user_class(state, bodies)], host=spec.base_url)
    runner = env.create_local_runner()
    print(
        f"==> phase {spec.name}: {spec.users} users against {spec.base_url} "
        f"for {spec.duration_s:g} s",
        flush=True,
    )
    started = time.time()
    t0 = time.monotonic()
    runner.start(spec.users, spawn_rate=spec.spawn_rate)
    next_line = t0 + interval
    while not stop.requested and time.monotonic() < state.deadline:
        if state.issued >= spec.max_requests and not state.in_flight:
            break
        gevent.sleep(POLL_S)
        if time.monotonic() >= next_line:
            _progress(state, runner.user_count, time.monotonic() - t0, interval)
            next_line += interval
    state.closed = True
    grace = time.monotonic() + min(spec.timeout_s, STOP_GRACE_S)
    while state.in_flight and time.monotonic() < grace:
        gevent.sleep(POLL_S / 2)
    cancelled = state.in_flight
    ended = time.time()
    runner.quit()
    print(
        f"    phase {spec.name} done: {state.done} requests in {ended - started:.1f} s, "
        f"{state.failed} failed, {cancelled} still running at the end (not counted)",
        flush=True,
    )
    return {
        "name": spec.name,
        "started": started,
        "ended": ended,
        "issued": state.issued,
        "cancelled": cancelled,
    }


def _progress(state: PhaseState, users: int, elapsed: float, interval: float) -> None:
    recent, state.recent = state.recent, []
    ok = [r for r in recent if r.ok]
    e2e = percentiles([r.e2e_s for r in ok])[0]
    ttft = percentiles([r.ttft_s for r in ok if r.ttft_s is not None])[0]
    print(
        f"[{elapsed:6.1f}s] {state.spec.name}: users {users}/{state.spec.users}, "
        f"{state.done} done ({len(recent) / interval:.1f}/s now), {state.failed} failed, "
        f"in flight {state.in_flight}, E2E p50 {format_ms([e2e])} ms, "
        f"TTFT p50 {format_ms([ttft])} ms",
        flush=True,
    )


# --------------------------------------------------------------------------- main


def run(spec: WorkerSpec, out: TextIO) -> list[dict[str, Any]]:
    stop = Stop()

    def on_signal() -> None:
        print("    stop requested: winding down", flush=True)
        stop.requested = True

    gevent.signal_handler(signal.SIGINT, on_signal)
    gevent.signal_handler(signal.SIGTERM, on_signal)
    writer = csv.DictWriter(out, fieldnames=RECORD_FIELDS)
    writer.writeheader()

    def write(record: RequestRecord) -> None:
        writer.writerow(record.to_row())

    phases = []
    for phase in spec.phases:
        if stop.requested:
            break
        phases.append(run_phase(phase, write, spec.progress_interval_s, stop))
        out.flush()
    return phases


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: loadtest_worker.py SPEC.json (written by loadtest.py or bench.py)")
        return 2
    try:
        spec = WorkerSpec.from_json(Path(argv[0]).read_text(encoding="utf-8"))
        for phase in spec.phases:
            # The rehearsal's addresses exist only inside its namespaces: from the root
            # namespace the same address could be anything on this machine's network.
            if in_rehearsal_subnet(phase.base_url) and not reaches_via_rehearsal(phase.base_url):
                raise LoadtestError(
                    f"{phase.base_url} is a rehearsal address and this process does not run "
                    "inside a rehearsal namespace; run it under `ip netns exec`"
                )
    except (OSError, ValueError, KeyError, LoadtestError) as err:
        print(f"loadtest worker: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="locust: %(levelname)s %(message)s")
    with Path(spec.records_csv).open("w", newline="", encoding="utf-8") as out:
        phases = run(spec, out)
    Path(spec.meta_json).write_text(json.dumps({"phases": phases}, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

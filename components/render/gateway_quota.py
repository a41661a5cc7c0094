"""The gateway pod's quota sidecar: per-key requests-per-minute and session placements shared by
every gateway replica.

The router (gateway_router.js) asks `GET /check?key=<key id>` before it forwards a request of a
key with a quota. The count lives in Redis, one counter per key and minute (INCR + EXPIRE in one
script), so N replicas together admit the key's limit, not N times it. When Redis cannot be
reached the sidecar keeps answering from its own counters, each replica admitting
ceil(limit / replicas), says so once in its log, in every answer (`X-Quota-Mode: local`) and
in its metrics, and tries Redis again after a few seconds.

It also keeps each session's engine (`GET /placement`, docs/gateway.md#shared-placement) in
Redis under `session:<deployment>:<session id>`, asked only for sessions a replica has not seen
(or has not confirmed for half the TTL): one SET NX GET decides a race between replicas. When
Redis cannot be reached it answers 503 at once and the router places the session itself.

Why a sidecar and not nginx itself: njs has no TCP sockets and cannot speak Redis' protocol;
docs/gateway.md#quotas weighs the options. Standard library only, so the official Python image
runs this file straight from the ConfigMap (no image to build): Redis' protocol (RESP) needs
about twenty lines for the two commands used here (docs/reference/redis.md#resp).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

WINDOW_SECONDS = 60
# Move a session only if it is still where the mover saw it (or gone): two replicas that saw one
# engine fail then agree on the first one's choice instead of each writing its own.
_MOVE_SCRIPT = (
    "local v = redis.call('GET', KEYS[1]) "
    "if v and v ~= ARGV[1] then redis.call('EXPIRE', KEYS[1], ARGV[3]) return v end "
    "redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3]) return ARGV[2]"
)
# One round trip: count the request and make the window's key expire with the window.
_INCR_SCRIPT = "local n = redis.call('INCR', KEYS[1]) if n == 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end return n"
REDIS_TIMEOUT_SECONDS = 0.25
RETRY_REDIS_AFTER_SECONDS = 5.0
PASSWORD_ENV = "QUOTA_REDIS_PASSWORD"
SESSION_PREFIX = "session:"  # the seed's key scheme (docs/data.md#the-key-scheme)
PLACEMENT_OPS = ("claim", "touch", "move")
USER_ENV = "QUOTA_REDIS_USER"

log = logging.getLogger("gateway-quota")


class RedisError(RuntimeError):
    pass


def encode_command(*words: str) -> bytes:
    """A RESP array of bulk strings: how every client sends a command."""
    out = [b"*%d\r\n" % len(words)]
    for word in words:
        data = word.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def read_reply(stream: socket.SocketIO | object) -> int | str | None:
    """One RESP reply of the kinds these commands return: +simple, -error, :integer, $bulk."""
    line = stream.readline()  # type: ignore[attr-defined]
    if not line.endswith(b"\r\n"):
        raise RedisError("connection closed")
    kind, rest = line[:1], line[1:-2].decode()
    if kind == b"+":
        return rest
    if kind == b"-":
        raise RedisError(rest)
    if kind == b":":
        return int(rest)
    if kind == b"$":
        size = int(rest)
        return None if size < 0 else stream.read(size + 2)[:-2].decode()  # type: ignore[attr-defined]
    raise RedisError(f"unexpected reply {line[:40]!r}")


@dataclass
class RedisClient:
    """One connection per sidecar thread (the HTTP server runs one thread per nginx connection)."""

    host: str
    port: int
    user: str | None
    password: str | None
    _local: threading.local = field(default_factory=threading.local)

    def call(self, *words: str) -> int | str | None:
        conn = getattr(self._local, "conn", None)
        try:
            if conn is None:
                conn = self._connect()
            conn[0].sendall(encode_command(*words))
            return read_reply(conn[1])
        except (OSError, RedisError):
            self._local.conn = None
            if conn is not None:
                conn[0].close()
            raise

    def _connect(self) -> tuple[socket.socket, object]:
        sock = socket.create_connection((self.host, self.port), timeout=REDIS_TIMEOUT_SECONDS)
        stream = sock.makefile("rb")
        conn = (sock, stream)
        if self.password:
            sock.sendall(encode_command("AUTH", *([self.user] if self.user else []), self.password))
            read_reply(stream)
        self._local.conn = conn
        return conn


@dataclass
class Placement:
    """Which engine a session lives on, in Redis; every answer is the engine Redis holds now."""

    redis: RedisClient | None
    clock: Callable[[], float] = time.time
    _down_until: float = 0.0

    def decide(self, op: str, key: str, engine: str, ttl: int, old: str = "") -> str | None:
        """claim: the stored engine, else store `engine` (SET NX GET: one winner per race);
        touch: the stored engine with its TTL renewed (claim when it expired);
        move: store `engine` if the stored one is still `old` (or none), else keep that one.
        None when Redis cannot be reached."""
        now = self.clock()
        if self.redis is None or now < self._down_until:
            return None
        name = f"{SESSION_PREFIX}{key}"
        try:
            if op == "touch":
                held = self.redis.call("GETEX", name, "EX", str(ttl))
            elif op == "move":
                held = self.redis.call("EVAL", _MOVE_SCRIPT, "1", name, old, engine, str(ttl))
            else:
                held = None
            if held is None:
                held = self.redis.call("SET", name, engine, "NX", "GET", "EX", str(ttl)) or engine
        except (OSError, RedisError) as e:
            log.warning("Redis unreachable (%s): sessions placed per replica for a while", e)
            self._down_until = now + RETRY_REDIS_AFTER_SECONDS
            return None
        self._down_until = 0.0
        return str(held)


@dataclass
class Quota:
    limits: Mapping[str, int]  # key id -> requests per minute
    replicas: int
    redis: RedisClient | None
    clock: Callable[[], float] = time.time
    _local_counts: dict[tuple[str, int], int] = field(default_factory=dict)
    _redis_down_until: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    stats: dict[str, int] = field(default_factory=dict)

    def check(self, key: str) -> tuple[bool, int, str]:
        """(allowed, seconds until the window ends, mode)."""
        now = self.clock()
        window = int(now // WINDOW_SECONDS)
        retry_after = max(1, math.ceil((window + 1) * WINDOW_SECONDS - now))
        limit = self.limits.get(key)
        if limit is None:
            return True, retry_after, "none"
        count, mode = self._count(key, window, now)
        allowed = count <= (limit if mode == "redis" else math.ceil(limit / self.replicas))
        self.bump(
            f'gateway_quota_decisions_total{{mode="{mode}",allowed="{str(allowed).lower()}"}}'
        )
        return allowed, retry_after, mode

    def _count(self, key: str, window: int, now: float) -> tuple[int, str]:
        if self.redis is not None and now >= self._redis_down_until:
            try:
                reply = self.redis.call(
                    "EVAL", _INCR_SCRIPT, "1", f"quota:{key}:{window}", str(2 * WINDOW_SECONDS)
                )
                if self._redis_down_until:
                    log.warning("Redis reachable again: quotas are shared by all replicas")
                    self._redis_down_until = 0.0
                return int(reply or 0), "redis"
            except (OSError, RedisError, ValueError) as e:
                if not self._redis_down_until:
                    log.warning(
                        "Redis unreachable (%s): per-replica quotas (limit / %d) until it is back",
                        e,
                        self.replicas,
                    )
                self.bump("gateway_quota_redis_errors_total")
                self._redis_down_until = now + RETRY_REDIS_AFTER_SECONDS
        with self._lock:
            slot = (key, window)
            for old in [s for s in self._local_counts if s[1] < window]:
                del self._local_counts[old]
            self._local_counts[slot] = self._local_counts.get(slot, 0) + 1
            return self._local_counts[slot], "local"

    def bump(self, name: str) -> None:
        with self._lock:
            self.stats[name] = self.stats.get(name, 0) + 1

    def metrics(self) -> str:
        with self._lock:
            lines = [f"{name} {value}" for name, value in sorted(self.stats.items())]
        shared = 0 if self._redis_down_until else 1
        return "\n".join(
            [
                "# HELP gateway_quota_shared 1 while quotas are counted in Redis for all replicas.",
                "# TYPE gateway_quota_shared gauge",
                f"gateway_quota_shared {shared}",
                *lines,
                "",
            ]
        )


def make_handler(quota: Quota, placement: Placement) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # nginx keeps its connections to us alive

        def log_message(self, format: str, *args: object) -> None:
            del format, args

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            if url.path == "/metrics":
                self._reply(200, {"Content-Type": "text/plain; version=0.0.4"}, quota.metrics())
                return
            if url.path == "/placement":
                self._placement(parse_qs(url.query))
                return
            if url.path != "/check":
                self._reply(404, {}, "")
                return
            key = parse_qs(url.query).get("key", [""])[0]
            allowed, retry_after, mode = quota.check(key)
            headers = {"X-Quota-Mode": mode}
            if not allowed:
                headers["Retry-After"] = str(retry_after)
            self._reply(204 if allowed else 429, headers, "")

        def _placement(self, query: Mapping[str, list[str]]) -> None:
            words = {k: query.get(k, [""])[0] for k in ("op", "key", "engine", "ttl", "from")}
            if words["op"] not in PLACEMENT_OPS or not words["key"] or not words["ttl"].isdigit():
                self._reply(400, {}, "")
                return
            held = placement.decide(
                words["op"], words["key"], words["engine"], int(words["ttl"]), words["from"]
            )
            if held is None:
                quota.bump("gateway_placement_redis_errors_total")
                self._reply(503, {}, "")
                return
            self._reply(204, {"X-Placement": held}, "")

        def _reply(self, status: int, headers: Mapping[str, str], body: str) -> None:
            data = body.encode()
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            if status != HTTPStatus.NO_CONTENT:
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler


def parse_limits(items: Sequence[str]) -> dict[str, int]:
    limits = {}
    for item in items:
        key, _, rpm = item.partition("=")
        if not key or not rpm.isdigit() or int(rpm) < 1:
            raise SystemExit(f"gateway-quota: --limit wants KEY=REQUESTS_PER_MINUTE, got {item!r}")
        limits[key] = int(rpm)
    return limits


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--listen", default="127.0.0.1:8082", help="host:port")
    p.add_argument("--redis", default="", help="host:port (empty: per-replica counting only)")
    p.add_argument("--replicas", type=int, default=1, help="gateway replicas (local fallback)")
    p.add_argument("--limit", action="append", default=[], help="KEY=REQUESTS_PER_MINUTE")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    redis = None
    if args.redis:
        host, _, port = args.redis.rpartition(":")
        redis = RedisClient(host, int(port), os.environ.get(USER_ENV), os.environ.get(PASSWORD_ENV))
    quota = Quota(limits=parse_limits(args.limit), replicas=max(1, args.replicas), redis=redis)
    placement = Placement(redis=redis)
    host, _, port = args.listen.rpartition(":")
    server = ThreadingHTTPServer((host, int(port)), make_handler(quota, placement))
    server.daemon_threads = True
    log.info("listening on %s, redis %s, limits %s", args.listen, args.redis or "-", quota.limits)
    server.serve_forever()


if __name__ == "__main__":
    main()

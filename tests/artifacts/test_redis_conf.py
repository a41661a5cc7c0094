"""The rendered redis.conf, judged by the real redis-server on loopback, with the pod's readiness probe (real redis-cli) and exporter sidecar (Debian's redis_exporter) run against it; the LMCache env.

This module: rendered files checked by the real programs that read them. The other layers' tests
of the same code: tests/unit/test_redis_conf.py.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from components.render.redis_conf import (
    RedisConf,
    render_redis_conf,
)
from components.render.redis_pod import RedisPod, build_pod_spec
from stacks.naming import REDIS_PORT
from tests.support.local import free_port
from tests.support.metric_names import process, scrape
from tests.support.redis_conf import ADMIN, APP, EXPORTER, MAXMEMORY_MIB, conf_for


class Error(str):
    """A RESP error reply (returned, not raised, so tests assert on its text)."""


class Client:
    """Just enough RESP2 to send commands and read every reply type."""

    def __init__(self, port: int, user: str | None = None, password: str | None = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.reader = self.sock.makefile("rb")
        if user is not None and password is not None:
            reply = self.call("AUTH", user, password)
            assert reply == "OK", reply

    def call(self, *args: str | int | bytes) -> Any:
        parts = [b"*%d\r\n" % len(args)]
        for arg in args:
            data = arg if isinstance(arg, bytes) else str(arg).encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
        self.sock.sendall(b"".join(parts))
        return self._read()

    def _read(self) -> Any:
        line = self.reader.readline()
        if not line:
            raise ConnectionError("the server closed the connection")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            return Error(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            size = int(rest)
            return None if size < 0 else self.reader.read(size + 2)[:-2].decode(errors="replace")
        if kind == b"*":
            return [self._read() for _ in range(int(rest))]
        raise AssertionError(f"unexpected RESP line {line!r}")

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


@contextlib.contextmanager
def redis_server(conf: RedisConf, workdir: Path, stop: int = signal.SIGTERM) -> Iterator[int]:
    """Run redis-server on `conf` until the block ends; yield its port."""
    path = workdir / "redis.conf"
    path.write_text(render_redis_conf(conf))
    log = (workdir / "redis.log").open("ab")
    proc = subprocess.Popen(["redis-server", str(path)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while True:
            assert proc.poll() is None, (
                f"redis-server exited: {(workdir / 'redis.log').read_text()}"
            )
            try:
                socket.create_connection(("127.0.0.1", conf.port), timeout=0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "redis-server did not listen within 10 s"
                time.sleep(0.02)
        # Redis listens while it replays the AOF and answers LOADING to data commands until done.
        admin = Client(conf.port, "admin", conf.admin_password)
        while info(admin, "persistence")["loading"] != "0":
            assert time.monotonic() < deadline, "redis-server did not load its AOF within 10 s"
            time.sleep(0.02)
        admin.close()
        yield conf.port
    finally:
        if proc.poll() is None:
            proc.send_signal(stop)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    workdir = tmp_path_factory.mktemp("redis")
    with redis_server(conf_for(workdir), workdir) as port:
        yield port


def info(client: Client, section: str) -> dict[str, str]:
    text = client.call("INFO", section)
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


def test_a_client_without_the_password_gets_noauth(server: int) -> None:
    client = Client(server)
    assert client.call("PING").startswith("NOAUTH")
    assert client.call("GET", "vision:x").startswith("NOAUTH")
    # the default user is switched off, so no password at all opens it
    assert client.call("AUTH", "default", "").startswith("WRONGPASS")
    assert client.call("AUTH", "app", "not-the-password").startswith("WRONGPASS")
    client.close()


def test_the_app_user_reads_writes_expires_and_publishes(server: int) -> None:
    client = Client(server, "app", APP)
    assert client.call("SET", "session:abc", "state", "EX", 3600) == "OK"
    assert client.call("GET", "session:abc") == "state"
    assert 3590 < client.call("TTL", "session:abc") <= 3600
    assert client.call("HSET", "open-webui:usage", "sid", "1") == 1  # Open WebUI's hashes
    assert client.call("PUBLISH", "socketio", "hello") == 0  # websocket manager channel
    assert client.call("SCAN", 0, "MATCH", "session:*")[1] == ["session:abc"]
    client.close()


@pytest.mark.parametrize(
    "command",
    [
        ("FLUSHALL",),
        ("FLUSHDB",),
        ("CONFIG", "SET", "maxmemory", "0"),
        ("CONFIG", "GET", "maxmemory"),
        ("KEYS", "*"),
        ("SHUTDOWN", "NOSAVE"),
        ("MONITOR",),
        ("ACL", "LIST"),
        ("BGREWRITEAOF",),
        ("REPLICAOF", "127.0.0.1", "1"),
        ("CLIENT", "KILL", "ID", "1"),
        ("SWAPDB", "0", "1"),
    ],
)
def test_the_app_user_cannot_run_dangerous_commands(server: int, command: tuple[str, ...]) -> None:
    client = Client(server, "app", APP)
    client.call("SET", "guard", "1")
    reply = client.call(*command)
    assert isinstance(reply, Error), reply
    assert reply.startswith("NOPERM"), reply
    assert client.call("GET", "guard") == "1"  # the server is alive and nothing was wiped
    client.close()


def test_the_app_user_cannot_smuggle_flushall_through_a_script(server: int) -> None:
    client = Client(server, "app", APP)
    client.call("SET", "guard", "1")
    reply = client.call("EVAL", "return redis.call('flushall')", 0)
    assert isinstance(reply, Error), reply
    assert "can't run this command" in reply, reply
    assert client.call("GET", "guard") == "1"
    client.close()


def test_debug_is_refused_twice(server: int) -> None:
    # enable-debug-command no refuses DEBUG before the ACL is consulted; the ACL refuses too
    client = Client(server, "app", APP)
    assert client.call("DEBUG", "SLEEP", "0").startswith("ERR DEBUG command not allowed")
    client.close()
    admin = Client(server, "admin", ADMIN)
    assert "no permissions to run the 'debug' command" in admin.call(
        "ACL", "DRYRUN", "app", "DEBUG", "SLEEP", "0"
    )
    admin.close()


def test_the_exporter_runs_what_a_scrape_needs_and_reads_no_keys(server: int) -> None:
    client = Client(server, "exporter", EXPORTER)
    assert client.call("CLIENT", "SETNAME", "redis_exporter") == "OK"
    assert client.call("CONFIG", "GET", "maxmemory") == ["maxmemory", str(8 * 1024 * 1024)]
    assert "redis_version" in info(client, "ALL")
    assert isinstance(client.call("SLOWLOG", "LEN"), int)
    assert isinstance(client.call("LATENCY", "LATEST"), list)
    assert client.call("PING") == "PONG"
    for command in (
        ("GET", "session:abc"),
        ("SET", "x", "1"),
        ("SCAN", "0"),
        ("FLUSHALL",),
        ("CONFIG", "SET", "maxmemory", "0"),
        ("SLOWLOG", "RESET"),
    ):
        reply = client.call(*command)
        assert isinstance(reply, Error), (command, reply)
        assert reply.startswith("NOPERM"), (command, reply)
    client.close()


def test_the_server_runs_with_the_rendered_settings(server: int) -> None:
    admin = Client(server, "admin", ADMIN)
    expected = {
        "protected-mode": "yes",
        "appendonly": "yes",
        "appendfsync": "everysec",
        "save": "",
        "maxmemory-policy": "allkeys-lfu",
        "maxmemory": "8388608",
        "daemonize": "no",
        "enable-debug-command": "no",
    }
    for key, value in expected.items():
        assert admin.call("CONFIG", "GET", key) == [key, value]
    users = {line.split()[1]: line for line in admin.call("ACL", "LIST")}
    assert set(users) == {"default", "app", "exporter", "admin"}
    assert " off " in users["default"]
    assert "nopass" not in users["default"]
    admin.close()


def pod_containers() -> dict[str, Any]:
    """The Redis pod's containers as components/render/redis_pod.py builds them."""
    pod = RedisPod(
        image="redis:7.4.2",
        exporter_image="oliver006/redis_exporter:v1.67.0",
        maxmemory_mib=MAXMEMORY_MIB,
    )
    spec = build_pod_spec(pod)
    return {c["name"]: c for c in spec["containers"]}


def test_the_readiness_probe_needs_the_exporter_password_and_a_pong(server: int) -> None:
    """The probe's own shell command (its port moved to this server), with REDISCLI_AUTH set as
    the pod's env sets it from the Secret."""
    shell, flag, script = pod_containers()["redis"]["readiness_probe"]["exec_"]["command"]
    script = script.replace(f"-p {REDIS_PORT} ", f"-p {server} ")
    assert f"-p {server} " in script

    def probe(command: str, password: str | None) -> subprocess.CompletedProcess[str]:
        env = {"PATH": os.environ["PATH"]} | ({"REDISCLI_AUTH": password} if password else {})
        return subprocess.run(
            [shell, flag, command], env=env, check=False, capture_output=True, text=True, timeout=10
        )

    assert probe(script, EXPORTER).returncode == 0
    assert probe(script, "not-the-password").returncode != 0
    assert probe(script, None).returncode != 0
    # why the probe compares the reply: redis-cli alone exits 0 on a refused AUTH
    bare = probe(f"redis-cli -p {server} --user exporter --no-auth-warning ping", "wrong")
    assert bare.returncode == 0
    assert "NOAUTH" in bare.stdout


def test_the_real_exporter_scrapes_as_the_exporter_user(server: int, tmp_path: Path) -> None:
    """Debian's redis_exporter (1.45; the pod runs 1.67), configured by the sidecar's own
    environment, logs in as `exporter`, exports the server's metrics, and no command it runs is
    refused (Redis's ACL LOG records every refusal)."""
    listen = free_port()
    env = {e["name"]: e.get("value", "") for e in pod_containers()["exporter"]["env"]}
    env |= {
        "PATH": os.environ["PATH"],
        "REDIS_PASSWORD": EXPORTER,  # the Secret's entry, in the pod
        "REDIS_ADDR": env["REDIS_ADDR"].replace(f":{REDIS_PORT}", f":{server}"),
        "REDIS_EXPORTER_WEB_LISTEN_ADDRESS": f"127.0.0.1:{listen}",
    }
    assert env["REDIS_USER"] == "exporter"
    admin = Client(server, "admin", ADMIN)
    assert admin.call("ACL", "LOG", "RESET") == "OK"  # earlier tests were refused on purpose
    with process(["prometheus-redis-exporter"], tmp_path / "exporter.log", env=env):
        text = scrape(listen)
    samples = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert samples["redis_up"] == 1
    assert samples['redis_exporter_last_scrape_error{err=""}'] == 0
    assert samples["redis_memory_max_bytes"] == 8 * 1024 * 1024
    assert admin.call("ACL", "LOG") == []
    admin.close()


def test_keys_survive_a_crash_through_the_append_only_file(tmp_path: Path) -> None:
    # SIGKILL skips every shutdown path and `save ""` disables snapshots: only the AOF
    # (fsynced on every write with `always`) can bring the keys back.
    conf = conf_for(tmp_path, appendfsync="always")
    written = {f"vision:{i:03d}": f"embedding-{i}" for i in range(50)}
    with redis_server(conf, tmp_path, stop=signal.SIGKILL) as port:
        client = Client(port, "app", APP)
        for key, value in written.items():
            assert client.call("SET", key, value) == "OK"
        client.close()
    assert list((tmp_path / "appendonlydir").glob("*.incr.aof"))
    assert not list(tmp_path.glob("*.rdb"))
    with redis_server(conf, tmp_path) as port:
        client = Client(port, "app", APP)
        assert {key: client.call("GET", key) for key in written} == written
        client.close()


def test_writes_past_maxmemory_evict_instead_of_failing(tmp_path: Path) -> None:
    limit = MAXMEMORY_MIB * 1024 * 1024
    value = "x" * (64 * 1024)
    written = 400  # 25 MiB of values against an 8 MiB cache
    with redis_server(conf_for(tmp_path), tmp_path) as port:
        client = Client(port, "app", APP)
        for i in range(written):
            assert client.call("SET", f"vision:{i:04d}", value) == "OK", i
        admin = Client(port, "admin", ADMIN)
        # lazy eviction may finish in the server's timer after the last write: let it settle
        deadline = time.monotonic() + 5
        while True:
            kept = admin.call("DBSIZE")
            evicted = int(info(admin, "stats")["evicted_keys"])
            used = int(info(admin, "memory")["used_memory"])
            if kept + evicted == written or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        admin.close()
        client.close()
    assert evicted > 0
    assert kept + evicted == written
    assert kept * len(value) < limit
    # near the limit: well filled, and over it by no more than one value and the buffers
    assert limit // 2 < used < limit + 1024 * 1024

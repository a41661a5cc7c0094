"""The rendered redis.conf, judged by the real redis-server on loopback, with the pod's readiness
probe (real redis-cli) and exporter sidecar (Debian's redis_exporter) run against it; the
LMCache env.

Each server is a foreground child (`daemonize no`) on 127.0.0.1 and a free port, with its
`dir` under pytest's tmp_path, and is always stopped and waited for (PID 1 here reaps no
orphans, toolchain.md §9). Clients speak RESP over a socket: no Python Redis package.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest

from components.naming import REDIS_PORT, REDIS_SECRET
from components.redis import RedisArgs, build_pod_spec
from components.redis_conf import (
    LMCACHE_KV_TRANSFER_CONFIG,
    LMCACHE_PASSWORD_ENV,
    RedisConf,
    acl_hash,
    build_key_scheme,
    build_lmcache_env,
    redis_memory_mib,
    redis_url,
    render_redis_conf,
    session_key,
    vision_key,
)
from tests.local import free_port
from tests.metric_names import process, scrape

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="redis-server is not installed (make debs)"
)

APP, EXPORTER, ADMIN = "app-pw-7f3a", "exporter-pw-91c2", "admin-pw-5d0e"
MAXMEMORY_MIB = 8


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


def conf_for(workdir: Path, **overrides: Any) -> RedisConf:
    base = RedisConf(
        app_password=APP,
        exporter_password=EXPORTER,
        admin_password=ADMIN,
        maxmemory_mib=MAXMEMORY_MIB,
        maxmemory_policy="allkeys-lfu",
        appendfsync="everysec",
        bind="127.0.0.1",
        port=free_port(),
        data_dir=str(workdir),
    )
    return replace(base, **overrides)


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
    """The Redis pod's containers as components/redis.py builds them."""
    args = RedisArgs(
        namespace="qwen-vl",
        image="redis:7.4.2",
        exporter_image="oliver006/redis_exporter:v1.67.0",
        maxmemory_mib=MAXMEMORY_MIB,
        maxmemory_policy="allkeys-lfu",
        appendfsync="everysec",
        volume_gib=1,
        app_password=APP,
        exporter_password=EXPORTER,
        admin_password=ADMIN,
        webui_clients=False,
        engine_clients=(),
        protect=False,
    )
    spec: dict[str, Any] = dict(build_pod_spec(args))
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


def test_the_rendered_file_holds_hashes_not_passwords(tmp_path: Path) -> None:
    text = render_redis_conf(conf_for(tmp_path))
    for password in (APP, EXPORTER, ADMIN):
        assert password not in text
        assert "#" + hashlib.sha256(password.encode()).hexdigest() in text
    assert acl_hash("abc") == "#ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("bind", "0.0.0.0\nuser evil on nopass ~* +@all", "bind"),
        ("maxmemory_policy", "allkeys-lru\nuser evil on nopass", "maxmemory_policy"),
        ("appendfsync", "always save", "appendfsync"),
        ("data_dir", "/data\nappendonly no", "data_dir"),
        ("maxmemory_mib", 0, "maxmemory_mib"),
        ("app_password", "", "password"),
        ("port", 70000, "port"),
    ],
)
def test_values_that_would_break_the_file_are_refused(
    tmp_path: Path, field: str, value: Any, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        render_redis_conf(conf_for(tmp_path, **{field: value}))


def test_pod_memory_leaves_room_for_the_rewrite_fork() -> None:
    assert redis_memory_mib(512) == 1024  # 512 * 1.5 + 256
    assert redis_memory_mib(4096) == 6400  # 4096 * 1.5 + 256


def test_the_key_scheme() -> None:
    assert vision_key(b"abc") == (
        "vision:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )
    assert session_key("c0ffee") == "session:c0ffee"
    with pytest.raises(ValueError, match="whitespace"):
        session_key("a b")
    scheme = build_key_scheme(86400, 3600)
    assert scheme["vision"]["ttlSeconds"] == 86400
    assert scheme["session"]["ttlSeconds"] == 3600
    assert scheme["vision"]["key"].startswith("vision:")


def test_redis_url_carries_the_app_user() -> None:
    url = urlsplit(redis_url("redis.qwen-vl.svc.cluster.local", 6379, "Abc123"))
    assert (url.scheme, url.username, url.password) == ("redis", "app", "Abc123")
    assert (url.hostname, url.port, url.path) == ("redis.qwen-vl.svc.cluster.local", 6379, "/0")
    with pytest.raises(ValueError, match="alphanumeric"):
        redis_url("h", 1, "p@ss/word")


def test_lmcache_env_reaches_redis_as_the_app_user() -> None:
    env = build_lmcache_env("redis.qwen-vl.svc.cluster.local", REDIS_PORT, REDIS_SECRET)
    names = [e["name"] for e in env]
    # $(VAR) expands only variables defined earlier in the container's env list
    assert names.index(LMCACHE_PASSWORD_ENV) < names.index("LMCACHE_REMOTE_URL")
    by_name = {e["name"]: e for e in env}
    assert by_name[LMCACHE_PASSWORD_ENV]["valueFrom"] == {
        "secretKeyRef": {"name": "redis-auth", "key": "password"}
    }
    url = by_name["LMCACHE_REMOTE_URL"]["value"].replace(f"$({LMCACHE_PASSWORD_ENV})", "Pw1")
    parts = urlsplit(url)
    assert (parts.scheme, parts.username, parts.password) == ("redis", "app", "Pw1")
    assert (parts.hostname, parts.port) == ("redis.qwen-vl.svc.cluster.local", 6379)
    assert by_name["LMCACHE_MAX_LOCAL_CPU_SIZE"]["value"] == "5"
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "engine"},
        "spec": {"containers": [{"name": "vllm", "image": "vllm", "env": env}]},
    }
    kubernetes_validate.validate(pod, "1.33.0", strict=True)


def test_lmcache_kv_transfer_config() -> None:
    assert json.loads(LMCACHE_KV_TRANSFER_CONFIG) == {
        "kv_connector": "LMCacheConnectorV1",
        "kv_role": "kv_both",
    }

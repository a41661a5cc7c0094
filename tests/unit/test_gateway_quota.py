"""The quota sidecar's logic (components/render/gateway_quota.py) without sockets, and the gateway
pod once a key has a quota. The sidecar against a real Redis and two real nginx replicas:
tests/system/test_gateway_routing.py."""

from __future__ import annotations

import io
from dataclasses import dataclass, field, replace

import pytest

from components.render.gateway_pod import GatewayPod, build_pod_spec, pod_labels
from components.render.gateway_quota import (
    Placement,
    Quota,
    RedisError,
    encode_command,
    parse_limits,
    read_reply,
)
from components.render.nginx_conf import (
    KeyPolicy,
    NginxConfArgs,
    build_nginx_conf_args,
    render_routes_js,
)
from stacks.settings import load_stack_file, stack_file


def test_commands_are_resp_arrays_of_bulk_strings() -> None:
    # docs/reference/redis.md#resp, byte for byte.
    assert encode_command("INCR", "quota:k:1") == b"*2\r\n$4\r\nINCR\r\n$9\r\nquota:k:1\r\n"


@pytest.mark.parametrize(
    ("wire", "value"),
    [(b"+OK\r\n", "OK"), (b":42\r\n", 42), (b"$3\r\nabc\r\n", "abc"), (b"$-1\r\n", None)],
)
def test_replies_are_read_by_their_type_byte(wire: bytes, value: object) -> None:
    assert read_reply(io.BytesIO(wire)) == value


def test_an_error_reply_or_a_closed_connection_raises() -> None:
    with pytest.raises(RedisError, match="NOAUTH"):
        read_reply(io.BytesIO(b"-NOAUTH Authentication required.\r\n"))
    with pytest.raises(RedisError, match="closed"):
        read_reply(io.BytesIO(b""))


@dataclass
class FakeRedis:
    """Counts like the EVAL script does; `down` makes every call fail like a dead server."""

    counts: dict[str, int] = field(default_factory=dict)
    down: bool = False

    def call(self, *words: str) -> int:
        if self.down:
            raise OSError("connection refused")
        key = words[3]
        self.counts[key] = self.counts.get(key, 0) + 1
        return self.counts[key]


def quota(redis: FakeRedis, now: list[float]) -> Quota:
    return Quota(limits={"k": 4}, replicas=2, redis=redis, clock=lambda: now[0])  # type: ignore[arg-type]  # a stand-in for RedisClient


def test_redis_counts_the_limit_once_for_all_replicas() -> None:
    redis, now = FakeRedis(), [600.0 + 45]  # 45 s into a minute window
    a, b = quota(redis, now), quota(redis, now)  # two replicas, one Redis
    answers = [(a, b)[i % 2].check("k") for i in range(6)]
    assert [allowed for allowed, _, _ in answers] == [True] * 4 + [False] * 2
    assert {mode for _, _, mode in answers} == {"redis"}
    assert answers[-1][1] == 15  # Retry-After: the seconds left in the window
    now[0] = 660.0  # the next window
    assert a.check("k")[0]
    assert a.check("other") == (True, 60, "none")  # a key without a quota


def test_without_redis_each_replica_admits_its_share_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    redis, now = FakeRedis(down=True), [600.0]
    a = quota(redis, now)
    answers = [a.check("k") for _ in range(4)]
    assert [allowed for allowed, _, _ in answers] == [True, True, False, False]  # ceil(4 / 2)
    assert {mode for _, _, mode in answers} == {"local"}
    assert "gateway_quota_shared 0" in a.metrics()
    assert sum("Redis unreachable" in r.message for r in caplog.records) == 1
    redis.down = False
    now[0] = 606.0  # past the retry pause: back to shared counting
    assert a.check("k")[2] == "redis"
    assert "gateway_quota_shared 1" in a.metrics()


def test_limits_on_the_command_line_are_checked() -> None:
    assert parse_limits(["a=60", "b-2=1"]) == {"a": 60, "b-2": 1}
    with pytest.raises(SystemExit, match="KEY=REQUESTS_PER_MINUTE"):
        parse_limits(["a=0"])


def sidecar_pod(conf: NginxConfArgs) -> GatewayPod:
    return GatewayPod(
        conf=conf,
        image="nginx:1.28.0",
        exporter_image="exporter",
        replicas=2,
        quota_image="python:3.12-slim",
        redis_address="redis.qwen-vl.svc.cluster.local:6379",
    )


def test_a_key_with_a_quota_adds_the_sidecar_to_the_pod() -> None:
    settings = load_stack_file(stack_file("staging"))
    conf = build_nginx_conf_args(settings)
    conf = replace(
        conf, keys={"default": KeyPolicy(priority_class="batch", requests_per_minute=90)}
    )
    pod = sidecar_pod(conf)
    sidecar = build_pod_spec(pod, {})["containers"][-1]
    assert sidecar["name"] == "quota"
    assert sidecar["command"][:2] == ["python3", "/etc/nginx/gateway/quota.py"]
    assert "--limit=default=90" in sidecar["command"]
    assert "--replicas=2" in sidecar["command"]
    password = next(e for e in sidecar["env"] if e["name"] == "QUOTA_REDIS_PASSWORD")
    assert password["value_from"]["secret_key_ref"] == {"name": "redis-auth", "key": "password"}
    assert pod_labels(pod) == {"qwen-vl-serving/redis-client": "true"}
    assert '"quota": true' in render_routes_js(conf)
    with pytest.raises(ValueError, match="quota sidecar needs an image"):
        build_pod_spec(replace(pod, quota_image=None), {})


@dataclass
class FakeSessions:
    """SET (NX / XX / GET / EX) and GETEX as Redis 7 documents them (docs/reference/redis.md)."""

    values: dict[str, str] = field(default_factory=dict)
    ttls: dict[str, int] = field(default_factory=dict)
    down: bool = False

    def call(self, *words: str) -> str | None:
        if self.down:
            raise OSError("connection refused")
        if words[0] == "GETEX":
            if words[1] in self.values:
                self.ttls[words[1]] = int(words[3])
            return self.values.get(words[1])
        key, value, flags = words[1], words[2], words[3:]
        old = self.values.get(key)
        if ("NX" in flags and old is not None) or ("XX" in flags and old is None):
            return old if "GET" in flags else None
        self.values[key] = value
        self.ttls[key] = int(flags[flags.index("EX") + 1])
        return old if "GET" in flags else "OK"


def test_the_first_replica_to_claim_a_session_wins_and_the_other_gets_its_engine() -> None:
    redis = FakeSessions()
    a, b = Placement(redis=redis), Placement(redis=redis)  # type: ignore[arg-type]  # a stand-in
    assert a.decide("claim", "alpha:s-1", "engine-alpha.0", 1800) == "engine-alpha.0"
    assert b.decide("claim", "alpha:s-1", "engine-alpha.2", 1800) == "engine-alpha.0"
    assert redis.values == {"session:alpha:s-1": "engine-alpha.0"}
    assert redis.ttls == {"session:alpha:s-1": 1800}


def test_a_touch_renews_or_claims_an_expired_session() -> None:
    redis = FakeSessions({"session:alpha:s-1": "engine-alpha.1"}, {"session:alpha:s-1": 5})
    placement = Placement(redis=redis)  # type: ignore[arg-type]  # a stand-in
    assert placement.decide("touch", "alpha:s-1", "engine-alpha.2", 900) == "engine-alpha.1"
    assert redis.ttls["session:alpha:s-1"] == 900
    assert placement.decide("touch", "alpha:gone", "engine-alpha.2", 900) == "engine-alpha.2"
    assert redis.values["session:alpha:gone"] == "engine-alpha.2"


def test_without_redis_placement_answers_none_at_once_for_a_while() -> None:
    redis, now = FakeSessions(down=True), [100.0]
    placement = Placement(redis=redis, clock=lambda: now[0])  # type: ignore[arg-type]
    assert placement.decide("claim", "alpha:s-1", "engine-alpha.0", 1800) is None
    redis.down = False
    assert placement.decide("claim", "alpha:s-1", "engine-alpha.0", 1800) is None  # backing off
    now[0] += 6
    assert placement.decide("claim", "alpha:s-1", "engine-alpha.0", 1800) == "engine-alpha.0"


def test_staging_shares_placements_and_runs_the_sidecar_without_any_quota() -> None:
    settings = load_stack_file(stack_file("staging"))
    conf = build_nginx_conf_args(settings)
    assert conf.shared_placement
    assert not any(k.requests_per_minute for k in conf.keys.values())
    pod = sidecar_pod(conf)
    assert build_pod_spec(pod, {})["containers"][-1]["name"] == "quota"
    assert '"sharedPlacement": true' in render_routes_js(conf)
    one = replace(settings, gateway=replace(settings.gateway, replicas=1))
    assert not build_nginx_conf_args(one).shared_placement

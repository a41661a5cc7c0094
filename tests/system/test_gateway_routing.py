"""The gateway as one OpenAI endpoint (issue 16), judged on the real nginx with njs.

sid's nginx 1.30 with njs 1.0 (scripts/sid-nginx.sh) runs the rendered config and the routing
tier (components/render/gateway_router.js) on loopback, in front of stand-in engines that
echo what reached them; the quota sidecar (components/render/gateway_quota.py) runs as a
child, counting in a real redis-server on loopback. The acceptance test at the end drives it
all with the official OpenAI Python SDK, pointed at one base URL.
"""

from __future__ import annotations

import base64
import contextlib
import json
import random
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from components.render.gateway_quota import Placement, RedisClient
from components.render.nginx_conf import KeyPolicy
from tests.support.gateway_run import (
    CLIENT_KEYS,
    SID_NGINX_READY,
    Gateway,
    StandIn,
    bearer,
    gateway_args,
    quota_sidecar,
    running_gateway,
    schema_defaults,
    scratch_dir,
    stand_ins,
)
from tests.support.local import free_port
from tests.support.metric_names import declared_names, reference_names

pytestmark = pytest.mark.skipif(
    not SID_NGINX_READY, reason="no nginx with njs: run make nginx-chroot (needs root)"
)

MIB = 2**20
needs_redis = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="make debs: redis-server"
)
QUOTA_RPM = 12
# Two images per request on beta; priorities as the schema's default classes.
BETA_MAX_IMAGES = 2
CLASSES = {"agent": 0, "interactive": 10, "batch": 20}


@pytest.fixture(scope="module")
def engines() -> Iterator[dict[str, list[StandIn]]]:
    with stand_ins(["alpha-0", "alpha-1", "alpha-2", "beta-0"]) as started:
        yield {"alpha": started[:3], "beta": started[3:]}


def routed_args(directory: Path, engines: dict[str, list[StandIn]], **changes: Any) -> Any:
    """Two deployments: alpha (three engines, an alias), beta (one engine, priority
    scheduling, two images per request at most); key `loadtest` is of the batch class."""
    settings = {
        "client_max_body_size_mib": 64,  # the schema's default, not the 12 of the other tests
        "load_balancing": "sessionAffinity",
        "keys": {"loadtest": KeyPolicy(priority_class="batch")},
        **changes,
    }
    args = gateway_args(str(directory), engines, **settings)
    alpha, beta = args.deployments
    return replace(
        args,
        deployments=(
            replace(alpha, models=("model-alpha", "alpha-alias")),
            replace(beta, priority=True, max_images=BETA_MAX_IMAGES),
        ),
    )


@pytest.fixture(scope="module")
def gateway(engines: dict[str, list[StandIn]]) -> Iterator[Gateway]:
    with (
        scratch_dir() as directory,
        running_gateway(routed_args(directory, engines), directory) as gw,
    ):
        yield gw


@pytest.fixture
def client(gateway: Gateway) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, timeout=30, headers=bearer()) as c:
        yield c


def image_part(size: int = 64) -> dict[str, Any]:
    data = base64.b64encode(b"\x89PNG" + b"\0" * size).decode()
    return {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}}


def chat_body(model: str | None, images: int = 0, **more: Any) -> dict[str, Any]:
    content = [{"type": "text", "text": "hi"}, *(image_part() for _ in range(images))]
    body = {"messages": [{"role": "user", "content": content}], **more}
    return body if model is None else {"model": model, **body}


# ------------------------------------------------------------------------ routing


@pytest.mark.parametrize(
    ("model", "engines_of"),
    [("model-alpha", "alpha-"), ("alpha-alias", "alpha-"), ("model-beta", "beta-0")],
)
def test_the_model_field_picks_the_deployment(
    client: httpx.Client, model: str, engines_of: str
) -> None:
    reply = client.post("/v1/chat/completions", json=chat_body(model))
    assert reply.status_code == 200, reply.text
    assert reply.json()["upstream"].startswith(engines_of)
    # The name goes to the engine unchanged: vLLM serves the alias too (--served-model-name).
    assert reply.json()["model"] == model
    completions = client.post("/v1/completions", json={"model": model, "prompt": "hi"})
    assert completions.json()["upstream"].startswith(engines_of)


def test_path_routes_still_win_and_no_model_means_the_default(client: httpx.Client) -> None:
    by_path = client.post("/beta/v1/chat/completions", json=chat_body("model-alpha"))
    assert by_path.json()["upstream"] == "beta-0"
    no_model = client.post("/v1/chat/completions", json=chat_body(None))
    assert no_model.json()["upstream"].startswith("alpha-")


def test_an_unknown_model_gets_an_openai_404_naming_nothing_else(client: httpx.Client) -> None:
    reply = client.post("/v1/chat/completions", json=chat_body("gpt-4o"))
    assert reply.status_code == 404
    error = reply.json()["error"]
    assert (error["code"], error["type"], error["param"]) == (
        "model_not_found",
        "invalid_request_error",
        "model",
    )
    for other in ("model-alpha", "alpha-alias", "model-beta", "alpha-0", "beta-0"):
        assert other not in error["message"]
    assert "x-upstream" not in reply.headers
    assert client.post("/v1/chat/completions", content=b"{not json").status_code == 400


@pytest.mark.parametrize(
    "body",
    [
        # A nested `model` and one inside a string come before the real one.
        '{"metadata": {"model": "gpt-4o"}, "messages": [{"role": "user", "content":'
        ' "say \\"model\\": \\"gpt-4o\\" \\\\"}], "model" : "model-beta" }\n',
        '\n {"model":"model-beta","messages":[]}  ',
        '{"messages": [], "model": "model\\u002dbeta", "priority": -5}',
    ],
)
def test_the_top_level_model_is_found_whatever_surrounds_it(
    client: httpx.Client, body: str
) -> None:
    json.loads(body)  # the cases are valid JSON
    reply = client.post(
        "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"}
    )
    assert reply.status_code == 200, reply.text
    echoed = reply.json()
    assert echoed["upstream"] == "beta-0"
    # beta schedules by priority: the interactive class's, exactly one field, valid JSON.
    assert (echoed["priority"], echoed["body_priorities"]) == (CLASSES["interactive"], 1)


def test_models_is_the_union_of_every_deployments_names(
    gateway: Gateway, client: httpx.Client
) -> None:
    listing = client.get("/v1/models").json()
    assert listing["object"] == "list"
    assert [m["id"] for m in listing["data"]] == ["model-alpha", "alpha-alias", "model-beta"]
    assert {m["root"] for m in listing["data"]} == {"org/alpha", "org/beta"}
    assert client.get("/v1/models/alpha-alias").json()["id"] == "alpha-alias"
    assert client.get("/v1/models/nope").json()["error"]["code"] == "model_not_found"
    assert httpx.get(f"{gateway.url}/v1/models").status_code == 401


def test_a_64_mib_image_body_is_routed_by_a_model_field_at_its_end(
    client: httpx.Client,
) -> None:
    # The OpenAI SDK puts `model` after `messages`: the router must read past 64 MiB of image.
    image = base64.b64encode(b"\0" * (47 * MIB)).decode()  # 62.7 MiB as base64
    content = [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}}]
    body = json.dumps({"messages": [{"role": "user", "content": content}], "model": "model-beta"})
    assert 62 * MIB < len(body) < 64 * MIB
    started = time.monotonic()
    reply = client.post(
        "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"}
    )
    elapsed = time.monotonic() - started
    assert reply.status_code == 200, reply.text
    assert reply.json()["upstream"] == "beta-0"
    assert reply.json()["body_bytes"] > len(body)  # the priority was added, nothing was lost
    assert elapsed < 30


# ------------------------------------------------------------------------ affinity


def test_the_user_field_is_a_session_too(client: httpx.Client) -> None:
    engines = {
        client.post("/v1/chat/completions", json=chat_body("model-alpha", user="u-7")).json()[
            "upstream"
        ]
        for _ in range(20)
    }
    assert len(engines) == 1
    users = Counter(
        client.post("/v1/chat/completions", json=chat_body("model-alpha", user=f"v-{i}")).json()[
            "upstream"
        ]
        for i in range(30)
    )
    assert max(users.values()) - min(users.values()) <= 1


def test_a_session_leaves_an_engine_that_fails(
    engines: dict[str, list[StandIn]],
) -> None:
    with stand_ins(["gamma-0", "gamma-1"]) as gamma, scratch_dir() as directory:
        args = gateway_args(str(directory), {"gamma": gamma}, load_balancing="sessionAffinity")
        with running_gateway(args, directory) as gw, httpx.Client(base_url=gw.url) as c:

            def engine() -> str:
                headers = {**bearer(), "X-Session-Id": "s-1"}
                reply = c.post("/v1/chat/completions", json=chat_body(None), headers=headers)
                assert reply.status_code == 200, reply.text
                return str(reply.json()["upstream"])

            first = engine()
            next(s for s in gamma if s.name == first).kill()
            # The backup answers at once; from then on the session lives on the other engine.
            after = [engine() for _ in range(5)]
    assert set(after) == {next(s.name for s in gamma if s.name != first)}


def test_an_engine_that_fails_its_health_probe_gets_no_session() -> None:
    # A group slot with nothing behind it (KEDA below maxReplicas, a group not ready yet).
    with stand_ins(["gamma-0", "gamma-1"]) as gamma, scratch_dir() as directory:
        args = gateway_args(str(directory), {"gamma": gamma}, load_balancing="sessionAffinity")
        (backend,) = args.deployments
        dead = f"127.0.0.1:{free_port()}"
        addresses = (*backend.engine_addresses, dead)
        args = replace(
            args, deployments=(replace(backend, addresses=addresses, engine_addresses=addresses),)
        )
        with running_gateway(args, directory) as gw, httpx.Client(base_url=gw.url) as c:
            time.sleep(3)  # one probe round (every 2 s) has run

            def engine(session: str) -> str:
                headers = {**bearer(), "X-Session-Id": session}
                reply = c.post("/v1/chat/completions", json=chat_body(None), headers=headers)
                return str(reply.json()["upstream"])

            placed = {f"s-{i}": engine(f"s-{i}") for i in range(20)}
            again = {s: engine(s) for s in placed}
    assert Counter(placed.values()) == {"gamma-0": 10, "gamma-1": 10}
    assert again == placed


# ------------------------------------------------------------------------ priority and images


def test_the_class_sets_the_priority_and_a_client_cannot_raise_its_own(
    client: httpx.Client,
) -> None:
    batch = bearer("loadtest")
    mine = client.post(
        "/v1/chat/completions", json=chat_body("model-beta", priority=-100), headers=batch
    ).json()
    assert (mine["priority"], mine["body_priorities"]) == (CLASSES["batch"], 1)
    default = client.post("/v1/chat/completions", json=chat_body("model-beta")).json()
    assert default["priority"] == CLASSES["interactive"]
    # alpha runs first-come-first-served: its requests go through untouched.
    alpha = client.post("/v1/chat/completions", json=chat_body("model-alpha")).json()
    assert alpha["priority"] is None


def test_too_many_images_get_a_400_before_any_engine(client: httpx.Client) -> None:
    ok = client.post("/v1/chat/completions", json=chat_body("model-beta", images=BETA_MAX_IMAGES))
    assert ok.status_code == 200
    reply = client.post(
        "/v1/chat/completions", json=chat_body("model-beta", images=BETA_MAX_IMAGES + 1)
    )
    assert reply.status_code == 400
    assert reply.json()["error"]["code"] == "too_many_images"
    assert "x-upstream" not in reply.headers


# ------------------------------------------------------------------------ quotas


@contextlib.contextmanager
def redis_server() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    proc = subprocess.Popen([*argv, "--appendonly", "no"], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while (
            subprocess.run(
                ["redis-cli", "-p", str(port), "ping"], capture_output=True, check=False
            ).stdout.strip()
            != b"PONG"
        ):
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
        yield f"127.0.0.1:{port}", proc
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(timeout=10)


@contextlib.contextmanager
def two_replicas(
    engines: dict[str, list[StandIn]], redis: str
) -> Iterator[tuple[Gateway, Gateway]]:
    """Two gateway replicas with a quota sidecar each, sharing one Redis."""
    keys = {"loadtest": KeyPolicy(priority_class="batch", requests_per_minute=QUOTA_RPM)}
    with contextlib.ExitStack() as stack:
        gateways = []
        for _ in range(2):
            directory = stack.enter_context(scratch_dir())
            quota = f"127.0.0.1:{free_port()}"
            stack.enter_context(quota_sidecar(quota, {"loadtest": QUOTA_RPM}, redis, replicas=2))
            args = routed_args(directory, engines, keys=keys, quota_address=quota)
            gateways.append(stack.enter_context(running_gateway(args, directory)))
        yield gateways[0], gateways[1]


@needs_redis
def test_a_quota_holds_across_replicas_and_falls_back_per_replica(
    engines: dict[str, list[StandIn]],
) -> None:
    with redis_server() as (redis, proc), two_replicas(engines, redis) as (one, other):

        def send(gw: Gateway) -> httpx.Response:
            return httpx.post(
                f"{gw.url}/v1/chat/completions",
                json=chat_body("model-alpha"),
                headers=bearer("loadtest"),
            )

        shared = [send((one, other)[i % 2]) for i in range(3 * QUOTA_RPM)]
        other_key = httpx.post(
            f"{one.url}/v1/chat/completions", json=chat_body("model-alpha"), headers=bearer()
        )
        proc.terminate()
        proc.wait(timeout=10)
        alone = [send(one) for _ in range(2 * QUOTA_RPM)]
        metrics = httpx.get(f"http://{one_metrics(one)}/metrics").text
    # Both replicas together admitted the key's limit once, not twice (a minute boundary
    # between the requests may start a fresh window: then up to twice).
    admitted = Counter(r.status_code for r in shared)
    assert admitted[200] in (QUOTA_RPM, 2 * QUOTA_RPM), admitted
    refused = next(r for r in shared if r.status_code == 429)
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert other_key.status_code == 200  # another key has no quota
    # Redis gone: this replica keeps serving its share, limit / replicas per minute.
    fallback = Counter(r.status_code for r in alone)
    assert fallback[200] in (QUOTA_RPM // 2, QUOTA_RPM), fallback
    assert 'gateway_quota_checks_total{key_id="loadtest",mode="local",outcome="allowed"}' in metrics
    # The sidecar's own series come with the same scrape: Redis is gone, counting is local.
    assert "\ngateway_quota_shared 0\n" in metrics
    # Every gateway name the dashboards and alerts may use is what the real gateway exposes.
    assert reference_names("gateway_metrics.txt") <= declared_names(metrics)


# ------------------------------------------------------------------------ shared placement

SESSIONS = 30
ROUNDS = 6


@contextlib.contextmanager
def placing_replicas(
    engines: dict[str, list[StandIn]], redis: str, *, shared: bool
) -> Iterator[list[Gateway]]:
    """Two session-affinity replicas, each with its sidecar, sharing one Redis (or not)."""
    with contextlib.ExitStack() as stack:
        gateways = []
        for _ in range(2):
            directory = stack.enter_context(scratch_dir())
            sidecar = f"127.0.0.1:{free_port()}"
            stack.enter_context(quota_sidecar(sidecar, {}, redis, replicas=2))
            args = routed_args(directory, engines, shared_placement=shared, quota_address=sidecar)
            gateways.append(stack.enter_context(running_gateway(args, directory)))
        yield gateways


def spread_sessions(gateways: list[Gateway]) -> dict[str, Counter[str]]:
    """Every session's requests alternate over the replicas, its first on a replica drawn at
    random (as a load balancer spreads connections); session -> engines that answered."""
    # 14 sessions start on one replica, 16 on the other: replicas placing alone by the same
    # least-loaded rule then disagree (with a multiple of 3 engines' worth, they happen to agree).
    first = random.Random(17)
    starts = {f"s-{i}": first.randrange(2) for i in range(SESSIONS)}
    answered: dict[str, Counter[str]] = {s: Counter() for s in starts}
    with contextlib.ExitStack() as stack:
        clients = [
            stack.enter_context(httpx.Client(base_url=gw.url, timeout=10, headers=bearer()))
            for gw in gateways
        ]
        for round_ in range(ROUNDS):
            for session, start in starts.items():
                reply = clients[(start + round_) % 2].post(
                    "/v1/chat/completions",
                    json=chat_body("model-alpha"),
                    headers={"X-Session-Id": session},
                )
                assert reply.status_code == 200, reply.text
                answered[session][reply.json()["upstream"]] += 1
    return answered


def redis_cli(redis: str, *words: str) -> str:
    argv = ["redis-cli", "-p", redis.rsplit(":", 1)[1], *words]
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip()


def stickiness(answered: dict[str, Counter[str]]) -> float:
    on_home = sum(c.most_common(1)[0][1] for c in answered.values())
    return on_home / sum(sum(c.values()) for c in answered.values())


@needs_redis
def test_two_replicas_send_a_session_to_one_engine_and_spread_sessions_evenly(
    engines: dict[str, list[StandIn]],
) -> None:
    with redis_server() as (redis, proc), placing_replicas(engines, redis, shared=True) as gws:
        answered = spread_sessions(gws)
        stored, ttl = (redis_cli(redis, word, "session:alpha:s-0") for word in ("get", "ttl"))
        proc.terminate()
        proc.wait(timeout=10)
        # Redis gone: a new session is still placed (by the replica alone) and counted.
        reply = httpx.post(
            f"{gws[0].url}/v1/chat/completions",
            json=chat_body("model-alpha"),
            headers={**bearer(), "X-Session-Id": "after-redis"},
        )
        metrics = httpx.get(f"http://{one_metrics(gws[0])}/metrics").text
    assert stickiness(answered) == 1.0
    home = Counter(c.most_common(1)[0][0] for c in answered.values())
    mean = SESSIONS / len(engines["alpha"])
    assert max(abs(home[s.name] - mean) for s in engines["alpha"]) <= 0.15 * mean, home
    # The key of docs/data.md, holding the engine's upstream name, with the schema's TTL.
    assert stored == "engine-alpha." + answered["s-0"].most_common(1)[0][0].split("-")[1]
    assert 0 < int(ttl) <= schema_defaults()["session_ttl_seconds"]
    assert reply.status_code == 200
    assert 'gateway_placement_fallbacks_total{deployment="alpha",op="claim"} 1' in metrics


@needs_redis
def test_a_move_replaces_only_the_engine_the_mover_saw() -> None:
    """The sidecar's commands on a real Redis: two replicas that both saw engine .0 fail move
    the session once; a claim after that gets the moved engine; the TTL is renewed."""
    with redis_server() as (redis, _):
        host, port = redis.rsplit(":", 1)
        placement = Placement(redis=RedisClient(host, int(port), None, None))
        key, old = "alpha:s-1", "engine-alpha.0"
        assert placement.decide("claim", key, old, 600) == old
        assert placement.decide("move", key, "engine-alpha.1", 900, old) == "engine-alpha.1"
        assert placement.decide("move", key, "engine-alpha.2", 900, old) == "engine-alpha.1"
        assert placement.decide("claim", key, "engine-alpha.2", 900) == "engine-alpha.1"
        assert placement.decide("move", "alpha:expired", "engine-alpha.2", 900, old) == (
            "engine-alpha.2"
        )
        assert 600 < int(redis_cli(redis, "ttl", "session:" + key)) <= 900


@needs_redis
def test_without_shared_placement_replicas_split_sessions(
    engines: dict[str, list[StandIn]],
) -> None:
    # The gap this closes: each replica remembers only the sessions it placed itself.
    assert stickiness(answers_alone(engines)) < 1.0


def answers_alone(engines: dict[str, list[StandIn]]) -> dict[str, Counter[str]]:
    with redis_server() as (redis, _), placing_replicas(engines, redis, shared=False) as gws:
        return spread_sessions(gws)


def one_metrics(gw: Gateway) -> str:
    """The metrics address of a running gateway, from its rendered config."""
    conf = (gw.error_log.parent / "nginx.conf").read_text()
    server = conf.split("location = /metrics")[0].rsplit("listen ", 1)[1]
    return server.split(";", 1)[0]


def test_routing_metrics_count_per_model_class_key_and_decision(
    gateway: Gateway, client: httpx.Client
) -> None:
    client.post("/v1/chat/completions", json=chat_body("alpha-alias"), headers=bearer("loadtest"))
    client.post("/v1/chat/completions", json=chat_body("no-such-model"))
    text = httpx.get(f"http://{one_metrics(gateway)}/metrics").text
    assert (
        'gateway_routed_requests_total{class="batch",decision="least_conn",deployment="alpha",'
        'key_id="loadtest",model="alpha-alias",route="model"}'
    ) in text
    assert (
        'gateway_rejected_requests_total{key_id="default",reason="model_not_found",status="404"}'
    ) in text
    for secret in CLIENT_KEYS.values():
        assert secret not in text


# ------------------------------------------------------------------------ the OpenAI SDK


@needs_redis
def test_the_openai_sdk_sees_one_endpoint_with_every_model_and_openai_errors(
    engines: dict[str, list[StandIn]],
) -> None:
    with redis_server() as (redis, _), two_replicas(engines, redis) as (gw, _other):
        sdk = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=CLIENT_KEYS["default"], max_retries=0)
        limited = openai.OpenAI(
            base_url=f"{gw.url}/v1", api_key=CLIENT_KEYS["loadtest"], max_retries=0
        )
        listed = [m.id for m in sdk.models.list()]
        assert listed == ["model-alpha", "alpha-alias", "model-beta"]
        assert sdk.models.retrieve("model-beta").id == "model-beta"
        messages: Any = [{"role": "user", "content": "hi"}]
        # Switching deployments is switching `model`; the stand-ins name themselves.
        for model, engine in (("model-alpha", "alpha-"), ("model-beta", "beta-0")):
            raw = sdk.chat.completions.with_raw_response.create(model=model, messages=messages)
            assert raw.headers["x-upstream"].startswith(engine)
        stream = sdk.chat.completions.with_raw_response.create(
            model="model-beta", messages=messages, stream=True
        )
        assert stream.headers["x-upstream"] == "beta-0"
        events = [line for line in stream.http_response.iter_lines() if line.startswith("data:")]
        assert events[-1] == "data: [DONE]"
        assert len(events) > 1
        with pytest.raises(openai.NotFoundError) as missing:
            sdk.chat.completions.create(model="gpt-4o", messages=messages)
        assert missing.value.code == "model_not_found"
        images: Any = [
            {"role": "user", "content": [image_part() for _ in range(BETA_MAX_IMAGES + 1)]}
        ]
        with pytest.raises(openai.BadRequestError) as too_many:
            sdk.chat.completions.create(model="model-beta", messages=images)
        assert too_many.value.code == "too_many_images"
        # Two replicas, one key: the quota is shared, so the first gateway alone refuses
        # once the key's minute is used up (twice the limit at most across a window boundary).
        refused = None
        for _ in range(2 * QUOTA_RPM + 1):
            try:
                limited.chat.completions.create(model="model-alpha", messages=messages)
            except openai.RateLimitError as err:
                refused = err
                break
        assert refused is not None
        assert refused.code == "rate_limit_exceeded"
        assert int(refused.response.headers["retry-after"]) >= 1

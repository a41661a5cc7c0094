"""The rendered nginx.conf of every stack, judged by real nginx binaries.

- static mode: bookworm's nginx 1.22 (`nginx -t`);
- cluster mode (`server ... resolve`, nginx >= 1.27.3): sid's nginx in the debootstrap chroot
  of scripts/nginx-chroot.sh, built by a session fixture when missing. The pod's start script
  runs there and its `nginx` is `nginx -t`, on the exact ConfigMap text, Secret includes and
  the resolver include the script writes, at the pod's exact paths (a private mount namespace
  lays them over the shared chroot); a live run shows `resolve` following DNS changes,
  answered by a tiny DNS server on loopback.

Every nginx config file is written with its includes, so the includes are judged too. The
chroot script's user mistakes are checked at the end.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import replace

import pytest

from components.render.nginx_conf import (
    build_nginx_conf_args,
    rate_directive,
    render_api_keys_map,
    render_engine_auth,
    render_nginx_conf,
    render_resolver_conf,
    render_routes_js,
)
from stacks.schema import Settings
from stacks.settings import load_stack_file, stack_file
from stacks.versions import NGINX_RESOLVE_MIN_VERSION
from tests.support.nginx_conf import CHROOT_SCRIPT, RESOLVE_OPEN_SOURCE_SINCE, STACKS


@pytest.fixture(scope="module", params=STACKS)
def settings(request: pytest.FixtureRequest) -> Settings:
    return load_stack_file(stack_file(request.param))


def cluster_conf(settings: Settings) -> str:
    return render_nginx_conf(build_nginx_conf_args(settings))


def test_every_deployment_gets_a_resolving_upstream_over_its_leader_service(
    settings: Settings,
) -> None:
    conf = cluster_conf(settings)
    for d in settings.serving.deployments:
        # The headless leader Service the engines stage creates: "<name>-leader" on port 8000.
        host = f"{d.name}-leader.qwen-vl.svc.cluster.local:8000"
        assert f"    upstream engine-{d.name} {{\n        zone engine-{d.name} 256k;\n" in conf
        assert f"        server {host} resolve max_fails=2 fail_timeout=10s;\n" in conf
        assert f"    location /{d.name}/v1/ {{\n" in conf
    assert conf.count("keepalive 32;") == len(settings.serving.deployments)
    assert "include /run/gateway/resolver.conf;" in conf


def test_every_openai_path_goes_through_the_router_after_auth_and_limit(
    settings: Settings,
) -> None:
    conf = cluster_conf(settings)
    paths = [
        "/v1/",
        "= /chat/completions",
        *(f"/{d.name}/v1/" for d in settings.serving.deployments),
    ]
    for path in paths:
        block = conf.split(f"    location {path} {{")[1].split("\n        }")[0]
        lines = [line.strip() for line in block.splitlines() if line.strip()]
        assert lines[0] == 'if ($api_key_id = "") {', path
        assert lines[-2:] == [
            f"limit_req zone=per_key burst={settings.gateway.rate_limit.burst} nodelay;",
            "js_content router.dispatch;",
        ], path
    models = conf.split("    location = /v1/models {")[1].split("\n    }")[0]
    assert "js_content router.models;" in models
    # The router hands requests back to nginx here, and only here, is the engine reached.
    assert conf.count("proxy_pass http://$route_upstream$route_uri;") == 2
    assert "load_module /usr/lib/nginx/modules/ngx_http_js_module.so;" in conf


def test_routes_name_every_model_and_alias_once(settings: Settings) -> None:
    text = render_routes_js(build_nginx_conf_args(settings))
    assert text.splitlines()[1] == "export default {"
    routes = json.loads(text.split("export default ", 1)[1].rstrip().rstrip(";"))
    expected = {(d.served_model_name or d.name): d.name for d in settings.serving.deployments}
    assert routes["models"] == expected
    assert routes["defaultDeployment"] == settings.default_deployment.name
    assert routes["classes"] == {"agent": 0, "interactive": 10, "batch": 20}


def test_limits_and_timeouts_follow_the_settings(settings: Settings) -> None:
    conf = cluster_conf(settings)
    # Defaults (64 MiB, 600 s) in every stack file; prod raises the rate limit to 50/s, burst 100.
    rate, burst = {"dev": ("20r/s", 40), "staging": ("20r/s", 40), "prod": ("50r/s", 100)}[
        settings.stack
    ]
    for line in (
        "client_max_body_size 64m;",
        "proxy_read_timeout 600s;",
        "send_timeout 600s;",
        f"limit_req_zone $api_key_id zone=per_key:10m rate={rate};",
        f"limit_req zone=per_key burst={burst} nodelay;",
    ):
        assert line in conf


def test_load_balancing_follows_the_settings(settings: Settings) -> None:
    conf = cluster_conf(settings)
    deployments = settings.serving.deployments
    # one per deployment, and one per vision tier's encoders (docs/vision.md#proxy-step)
    encoders = sum(d.vision.mode == "disaggregated" for d in deployments)
    assert conf.count("least_conn;") == len(deployments) + encoders
    assert "hash " not in conf
    engines = re.findall(r"\n    upstream (engine-[^ ]+\.\d+) \{", conf)
    if settings.gateway.load_balancing == "leastConn":
        assert engines == []
    else:  # one upstream per group's leader pod, the others as its backups
        groups = {d.name: max(d.replicas, d.autoscaling.max_replicas) for d in deployments}
        assert engines == [f"engine-{n}.{i}" for n, g in groups.items() for i in range(g)]
        d = deployments[0]
        first = conf.split(f"    upstream engine-{d.name}.0 {{")[1].split("\n    }")[0]
        pod = f"{d.name}-0.{d.name}.qwen-vl.svc.cluster.local:8000"
        assert f"server {pod} resolve max_fails=2 fail_timeout=10s;" in first


def test_streaming_retry_and_keepalive_choices_are_in_the_text(settings: Settings) -> None:
    conf = cluster_conf(settings)
    for line in (
        "proxy_buffering off;",
        "gzip off;",
        "proxy_http_version 1.1;",
        'proxy_set_header Connection "";',
        "proxy_next_upstream error timeout http_502 http_503;",
        "proxy_next_upstream_tries 3;",
        "add_header X-Accel-Buffering no always;",
    ):
        assert line in conf
    directives = [line.strip() for line in conf.splitlines() if not line.strip().startswith("#")]
    # An engine request is never resent once sent (it would generate twice); the vision tier's
    # encoder step may be (docs/vision.md#proxy-step: it only writes a cache file).
    encoder_steps = re.findall(r"location /_encoder/[^{]*\{[^}]*\}", conf)
    retried = [line for line in directives if "non_idempotent" in line]
    assert len(retried) == len(encoder_steps)
    # Every upstream drops idle engine connections before vLLM's uvicorn does, after 5 s
    # (docs/reference/vllm.md#env-vars, VLLM_HTTP_TIMEOUT_KEEP_ALIVE).
    upstreams = re.findall(r"\n    upstream [^{]*\{\n(.*?)\n    \}", conf, re.S)
    assert len(upstreams) >= len(settings.serving.deployments)
    for block in upstreams:
        timeouts = re.findall(r"^ *keepalive_timeout (\d+)s;$", block, re.M)
        assert len(timeouts) == 1, block
        assert int(timeouts[0]) < 5


def test_the_config_holds_no_secret_and_logs_no_header(settings: Settings) -> None:
    conf = cluster_conf(settings)
    assert "include /etc/nginx/gateway-secrets/api-keys.map;" in conf
    assert "include /etc/nginx/gateway-secrets/engine-auth.conf;" in conf
    assert "Bearer " not in conf.replace("Bearer <your gateway key>", "")
    log_format = conf.split("log_format")[1].split(";")[0]
    assert "$http_authorization" not in log_format
    assert "$request_uri" not in log_format
    assert '"key_id":"$api_key_id"' in log_format


def test_status_listens_on_loopback_only(settings: Settings) -> None:
    conf = cluster_conf(settings)
    status = conf.split("location = /stub_status")[0].rsplit("server {", 1)[1]
    assert "listen 127.0.0.1:8081;" in status
    assert conf.count("stub_status;") == 1


def test_cluster_and_static_differ_only_by_the_substitution_table(settings: Settings) -> None:
    cluster = build_nginx_conf_args(settings)
    # The same addresses in static mode: every remaining difference must be the table's.
    static = replace(cluster, mode="static")
    diff = [
        line
        for line in difflib.ndiff(
            render_nginx_conf(cluster).splitlines(), render_nginx_conf(static).splitlines()
        )
        if line[:2] in ("- ", "+ ")
    ]
    removed = [line[2:].strip() for line in diff if line.startswith("- ")]
    added = [line[2:].strip() for line in diff if line.startswith("+ ")]
    resolver_line = "include /run/gateway/resolver.conf;"
    assert resolver_line in removed
    servers = [line for line in removed if line != resolver_line]
    assert len(servers) >= len(settings.serving.deployments)
    assert [line.replace(" resolve ", " ") for line in servers] == added


@pytest.mark.parametrize(
    ("rps", "directive"),
    [(20.0, "20r/s"), (50, "50r/s"), (0.5, "30r/m"), (1 / 60, "1r/m"), (2.5, "150r/m")],
)
def test_rate_directive(rps: float, directive: str) -> None:
    assert rate_directive(rps) == directive


def test_api_key_map_and_engine_auth() -> None:
    text = render_api_keys_map({"webui": "KeyOfWebui0123456789", "default": "KeyOfDefault01234567"})
    assert text.splitlines()[1:] == [
        "map $http_authorization $api_key_id {",
        '    default "";',
        '    "Bearer KeyOfDefault01234567" "default";',
        '    "Bearer KeyOfWebui0123456789" "webui";',
        "}",
    ]
    assert render_engine_auth("EngineKey0123456789") == (
        'proxy_set_header Authorization "Bearer EngineKey0123456789";\n'
    )
    with pytest.raises(ValueError, match="DNS label") as bad_id:
        render_api_keys_map({"Bad_Id": "KeyOfDefault01234567"})
    assert "KeyOfDefault" not in str(bad_id.value)
    with pytest.raises(ValueError, match="API key must be") as bad_key:
        render_api_keys_map({"default": 'quote"in-the-key-0123'})
    assert "quote" not in str(bad_key.value)  # never echo a key
    with pytest.raises(ValueError, match="at least one"):
        render_api_keys_map({})


def test_resolver_conf() -> None:
    assert render_resolver_conf("172.20.0.10") == "resolver 172.20.0.10 valid=5s ipv6=off;\n"
    assert render_resolver_conf("fd00::a") == "resolver [fd00::a] valid=5s ipv6=off;\n"
    assert render_resolver_conf("127.0.0.1", 5353) == "resolver 127.0.0.1:5353 valid=5s ipv6=off;\n"


def test_the_minimum_nginx_version_is_the_one_resolve_needs() -> None:
    found = re.search(r"^MIN_VERSION=(\d+)\.(\d+)\.(\d+)$", CHROOT_SCRIPT.read_text(), re.M)
    assert found
    assert tuple(int(p) for p in found.groups()) == RESOLVE_OPEN_SOURCE_SINCE
    assert NGINX_RESOLVE_MIN_VERSION == RESOLVE_OPEN_SOURCE_SINCE  # what the settings rules ask


def test_stack_images_have_resolve(settings: Settings) -> None:
    tag = settings.gateway.image.split("@")[0].rsplit(":", 1)[1]
    assert tuple(int(p) for p in tag.split(".")) >= RESOLVE_OPEN_SOURCE_SINCE

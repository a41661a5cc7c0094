"""The vision tier rehearsed with real engines: an encoder-only vLLM and two consumer engines
sharing one cache directory, behind the gateway's routing tier (its encoder step), on loopback.

    python -m scripts.rehearsal.epd [--stack staging] [--deployment NAME]  # up, one request, down

Every engine runs the command line the cluster gets (components/render/vision_tier.py for the
encoder, components/render/vllm_command.py for the consumers) with the real-engine substitutions
of real_engine.py, plus what loopback needs instead of the pod network: `--host 127.0.0.1`, a
port of its own, and the cache directory in place of the EFS mount (docs/rehearsal.md#vision-tier).
The connector reaches the engines the way the ConfigMap does: its file in a directory on
PYTHONPATH. The gateway is nginx with njs from the sid chroot (scripts/sid-nginx.sh), with the
stack's rendered config in static mode. Used by tests/system/test_vision_tier.py and the bench.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any, Final

from components.render.nginx_conf import (
    CONF_FILE,
    HEALTH_PATH,
    NginxPaths,
    build_nginx_conf_args,
    gateway_includes,
    render_nginx_conf,
)
from components.render.vision_flags import CONNECTOR_MODULE
from components.render.vision_tier import build_connector_configmap, encoder_command
from components.render.vllm_command import build_vllm_command
from scripts.engine.launch import (
    Engine,
    engine_env,
    free_port,
    start_engine,
    stop_engine,
    wait_ready,
)
from scripts.loadtest import make_png
from scripts.rehearsal.plan import NGINX_USER, sid_nginx, stack_path
from scripts.rehearsal.real_engine import EC_TRANSFER_FLAG, RealEngine, real_argv
from stacks.naming import encoder_name
from stacks.schema import DeploymentSettings, Settings
from stacks.settings import SettingsError, load_stack_file

LOOPBACK: Final = "127.0.0.1"
CLIENT_KEY_ID: Final = "default"
READY_TIMEOUT_S: Final = 600.0  # three engines importing vLLM at once on 2 cores
REQUEST_TIMEOUT_S: Final = 120.0
CONSUMERS: Final = ("engine-0", "engine-1")
ENCODER: Final = "encoder"
KEEP: Final = frozenset({EC_TRANSFER_FLAG})  # the tier is what this rehearses
LOOKUPS: Final = "vllm:ec_cache_lookups_total"  # our connector's counter


@dataclass
class Topology:
    """What runs: engines by name (the encoder under ENCODER), their URLs, the gateway."""

    deployment: DeploymentSettings
    work: Path
    cache_dir: Path
    engines: dict[str, Engine] = field(default_factory=dict)
    urls: dict[str, str] = field(default_factory=dict)
    gateway_url: str = ""
    metrics_url: str = ""
    client_key: str = field(default_factory=lambda: secrets.token_hex(16))
    engine_key: str = field(default_factory=lambda: secrets.token_hex(16))
    gateway: subprocess.Popen[bytes] | None = None
    gateway_dir: Path | None = None  # nginx's files, readable by its user

    @property
    def model(self) -> str:
        return self.deployment.served_model_name or self.deployment.name

    def chat(self, content: Sequence[dict[str, Any]], *, max_tokens: int = 4) -> dict[str, Any]:
        """POST a chat completion through the gateway; the parsed answer (raises on non-200)."""
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": list(content)}],
            "max_tokens": max_tokens,
            "temperature": 0,
        }
        return post_json(f"{self.gateway_url}/v1/chat/completions", body, self.client_key)

    def metric(self, name: str, metric: str, **labels: str) -> float:
        """Sum of `metric` series of engine `name` whose labels include `labels`."""
        return metric_sum(fetch(f"{self.urls[name]}/metrics"), metric, labels)

    def gateway_metric(self, metric: str, **labels: str) -> float:
        return metric_sum(fetch(self.metrics_url), metric, labels)


def vision_deployment(settings: Settings, name: str | None = None) -> DeploymentSettings:
    """The stack's (first, or named) disaggregated deployment."""
    found = [
        d
        for d in settings.serving.deployments
        if d.vision.mode == "disaggregated" and name in (None, d.name)
    ]
    if not found:
        raise SystemExit(f"{settings.stack}: no disaggregated deployment {name or ''}".strip())
    return found[0]


def loopback_argv(argv: list[str], port: int, cache_dir: Path) -> list[str]:
    """The real-engine line with loopback's port and host and the cache dir for the EFS mount."""
    out = list(argv)
    out[out.index("--port") + 1] = str(port)
    i = out.index("--ec-transfer-config") + 1
    config = json.loads(out[i])
    config["ec_connector_extra_config"]["shared_storage_path"] = str(cache_dir)
    out[i] = json.dumps(config, separators=(",", ":"))
    return [*out, "--host", LOOPBACK]


def engine_argvs(
    d: DeploymentSettings, cache_dir: Path, ports: dict[str, int], real: RealEngine
) -> dict[str, list[str]]:
    commands = {ENCODER: encoder_command(d)} | {c: build_vllm_command(d) for c in CONSUMERS}
    return {
        name: loopback_argv(real_argv(argv, real, keep=KEEP), ports[name], cache_dir)
        for name, argv in commands.items()
        if name in ports
    }


def install_connector(directory: Path) -> Path:
    """What the ConfigMap mount gives a pod: the connector module in a directory."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in build_connector_configmap()["data"].items():
        (directory / name).write_text(text)
    assert (directory / f"{CONNECTOR_MODULE}.py").exists()
    return directory


@contextlib.contextmanager
def epd(
    settings: Settings,
    work: Path,
    *,
    deployment: str | None = None,
    with_encoder: bool = True,
    real: RealEngine | None = None,
) -> Iterator[Topology]:
    """The encoder (unless `with_encoder` is False: the tier off) and two consumers, then the
    gateway; all stopped on exit, whatever happens."""
    real = real or RealEngine()
    d = vision_deployment(settings, deployment)
    if not with_encoder:
        d = dataclasses.replace(d, vision=dataclasses.replace(d.vision, mode="aggregated"))
    topo = Topology(deployment=d, work=work, cache_dir=work / "vision-cache")
    topo.cache_dir.mkdir(parents=True, exist_ok=True)
    names = [*([ENCODER] if with_encoder else []), *CONSUMERS]
    ports = {name: free_port() for name in names}
    env = engine_env(
        api_key=topo.engine_key,
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
        PYTHONPATH=str(install_connector(work / "ec-connector")),
    )
    try:
        for name, argv in _argvs(d, topo.cache_dir, ports, real, with_encoder).items():
            topo.engines[name] = start_engine(
                argv, log_path=work / f"{name}.log", env=env, name=name
            )
            topo.urls[name] = f"http://{LOOPBACK}:{ports[name]}"
        for name, engine in topo.engines.items():
            wait_ready(engine, topo.urls[name], timeout_s=READY_TIMEOUT_S)
        _start_gateway(settings, topo, with_encoder)
        yield topo
    finally:
        if topo.gateway is not None:
            _stop(topo.gateway)
        if topo.gateway_dir is not None:
            shutil.rmtree(topo.gateway_dir, ignore_errors=True)
        for engine in topo.engines.values():
            stop_engine(engine)


def _argvs(
    d: DeploymentSettings,
    cache_dir: Path,
    ports: dict[str, int],
    real: RealEngine,
    with_encoder: bool,
) -> dict[str, list[str]]:
    if with_encoder:
        return engine_argvs(d, cache_dir, ports, real)
    # the tier off: the consumers' own line, no EC transfer config
    lines = {c: real_argv(build_vllm_command(d), real) for c in CONSUMERS}
    for name, argv in lines.items():
        argv[argv.index("--port") + 1] = str(ports[name])
    return {name: [*argv, "--host", LOOPBACK] for name, argv in lines.items()}


def stop_encoder(topo: Topology) -> None:
    """The encoder tier down (the gateway still lists it: it must fall back by itself)."""
    stop_engine(topo.engines[ENCODER])


def _start_gateway(settings: Settings, topo: Topology, with_encoder: bool) -> None:
    d = topo.deployment
    only = dataclasses.replace(
        settings,
        serving=dataclasses.replace(settings.serving, deployments=(d,), default_deployment=None),
    )
    root = topo.gateway_dir = Path(tempfile.mkdtemp(prefix="qwen-vl-epd-gateway-", dir="/tmp"))
    paths = NginxPaths(
        secrets_dir=f"{root}/secrets",
        conf_dir=f"{root}/run",
        runtime_dir=f"{root}/run",
        access_log=f"{root}/access.log",
    )
    static = {d.name: [topo.urls[c].removeprefix("http://") for c in CONSUMERS]}
    if with_encoder:
        static[encoder_name(d.name)] = [topo.urls[ENCODER].removeprefix("http://")]
    args = dataclasses.replace(
        build_nginx_conf_args(only, mode="static", static_addresses=static, paths=paths),
        keys={},
        listen=f"{LOOPBACK}:{free_port()}",
        status_listen=f"{LOOPBACK}:{free_port()}",
        metrics_listen=f"{LOOPBACK}:{free_port()}",
        requests_per_second=1000,
        burst=1000,
    )
    for directory in (paths.secrets_dir, paths.runtime_dir):
        Path(directory).mkdir(parents=True, exist_ok=True)
    Path(paths.runtime_dir, CONF_FILE).write_text(render_nginx_conf(args))
    for file in gateway_includes(args, {CLIENT_KEY_ID: topo.client_key}, topo.engine_key):
        file.path.write_text(file.text)
    shutil.chown(root, NGINX_USER)
    for path in root.rglob("*"):
        shutil.chown(path, NGINX_USER)
    with (topo.work / "gateway.log").open("wb") as log:
        topo.gateway = subprocess.Popen(
            [*sid_nginx(Path("/tmp")), "nginx", "-c",
             f"{paths.runtime_dir}/{CONF_FILE}", "-p", f"{paths.runtime_dir}/"],
            stdout=log, stderr=log, start_new_session=True,
        )  # fmt: skip
    topo.gateway_url = f"http://{args.listen}"
    topo.metrics_url = f"http://{args.metrics_listen}/metrics"
    deadline = time.monotonic() + 15
    while fetch_status(topo.gateway_url + HEALTH_PATH) != HTTPStatus.OK:
        if topo.gateway.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("gateway not up: " + (topo.work / "gateway.log").read_text())
        time.sleep(0.1)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)  # the group this module started for nginx
        proc.wait(timeout=10)


# --- HTTP and metrics -----------------------------------------------------------------------------


def post_json(url: str, body: dict[str, Any], key: str) -> dict[str, Any]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
    )
    with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as reply:
        return json.loads(reply.read())


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return reply.read().decode()


def fetch_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            return reply.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return None


def metric_sum(text: str, metric: str, labels: dict[str, str]) -> float:
    """Sum of the samples of `metric` (exact name) whose label set includes `labels`."""
    total = 0.0
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    for line in text.splitlines():
        name, _, rest = line.partition("{")
        if line.startswith("#") or name.split(" ")[0] != metric:
            continue
        if all(w in rest for w in wanted):
            total += float(line.rsplit(" ", 1)[1])
    return total


def image_part(data_url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": data_url}}


def text_part(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def png_data_url(seed: int, size: int = 64) -> str:
    """A distinct small PNG per seed, as a data URL."""
    return "data:image/png;base64," + base64.b64encode(make_png(size, size, seed)).decode()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.rehearsal.epd", description=__doc__)
    parser.add_argument("--stack", default="staging", help="a stack name or a stack file path")
    parser.add_argument("--deployment", default=None)
    args = parser.parse_args(argv)
    try:
        settings = load_stack_file(stack_path(args.stack))
    except SettingsError as err:
        parser.error(f"--stack {args.stack}: {err}")
    work = Path(tempfile.mkdtemp(prefix="qwen-vl-epd-"))
    with epd(settings, work, deployment=args.deployment) as topo:
        answer = topo.chat([image_part(png_data_url(1)), text_part("what is this?")])
        print(json.dumps(answer["choices"][0]["message"]))
        for name in topo.urls:
            lookups = {
                outcome: topo.metric(name, LOOKUPS, outcome=outcome)
                for outcome in ("encoded", "reused", "loaded", "local", "rejected")
            }
            print(name, json.dumps(lookups))
    print(f"logs in {work}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

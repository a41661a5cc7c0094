"""The rehearsal on real vLLM engines: the testinfra suite and the official OpenAI SDK.

Two rehearsals, one after the other (a module fixture per stack, so only one is up at a
time): dev (one single-node engine) and a two-rank stack (staging trimmed to its multi-node
deployment: the leader and the worker in separate namespaces forming ONE server). Each is
brought up once, detached, exactly as `make rehearse` does (real engines are the default),
then:

* every engine's time to ready and RSS are recorded, and together they fit in 8 GB;
* `python -m scripts.verify` (tests/infra) passes against it;
* the `openai` SDK, run INSIDE the rehearsal's client namespace (tests/support/openai_client.py,
  with the engine venv's interpreter, which has the SDK), reaches the real gateway by its
  Service name: /v1/models, a text chat, an image chat (a PNG as a base64 data URL), SSE
  streaming, and 401 without a key or with a wrong one;
* the firewall (the stack's NetworkPolicies as nftables, on by default) holds: from the client
  namespace an engine's HTTP port and a group's rendezvous port are unreachable, and the
  gateway and the services host reach only what their policies give them, while the group's
  ranks formed one server through it and a chat completion through the gateway works;
* `down` leaves nothing behind, /dev/shm included.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from components.render.vllm_command import served_model_name
from scripts.rehearsal import netns, runner
from scripts.rehearsal.real_engine import DEFAULT_VLLM
from stacks.naming import GATEWAY_NAME, GATEWAY_PORT, MASTER_PORT, VLLM_PORT, service_host
from stacks.schema import Settings
from stacks.settings import load_stack_file
from tests.support.rehearsal_run import (
    MISSING_ENGINE,
    REHEARSAL_MARKS,
    ROOT,
    Run,
    assert_nothing_left,
    assert_verified,
    http_outcome,
    rehearse,
    shm_files,
    subreaper,
    tcp_outcome,
    verify,
)

UP_TIMEOUT_S = 600.0
CLIENT_TIMEOUT_S = 300.0
CHAT_TIMEOUT_S = 120.0
ENGINE_RSS_BUDGET = 8 * 10**9
ENGINE_PYTHON = DEFAULT_VLLM.parent / "python"  # the engine venv: it has `openai`

pytestmark = [
    *REHEARSAL_MARKS,
    pytest.mark.skipif(
        bool(MISSING_ENGINE), reason=f"no real engine (make engine): {MISSING_ENGINE}"
    ),
]


@pytest.fixture(scope="module", autouse=True)
def _subreaper() -> Iterator[None]:
    with subreaper():
        yield


def multi_node_only(stack: str, out: Path) -> Path:
    """The stack file with only its multi-node deployments (and their node groups)."""
    doc = yaml.safe_load((ROOT / f"Pulumi.{stack}.yaml").read_text())
    config = doc["config"]
    serving = config["qwen-vl-serving:serving"]
    serving["deployments"] = [d for d in serving["deployments"] if d.get("nodesPerGroup", 1) > 1]
    assert serving["deployments"], f"{stack} has no multi-node deployment"
    serving["defaultDeployment"] = serving["deployments"][0]["name"]
    groups = {d["nodeGroup"] for d in serving["deployments"]}
    key = "qwen-vl-serving:gpuNodeGroups"
    config[key] = [g for g in config[key] if g["name"] in groups]
    out.write_text(yaml.safe_dump(doc))
    return out


class Rehearsal:
    """A detached rehearsal on real engines, brought up once for the module's checks."""

    def __init__(self, run: Run, up: subprocess.CompletedProcess[str], pids: list[int]) -> None:
        self.run = run
        self.up = up
        self.pids = pids

    @property
    def inventory(self) -> dict[str, Any]:
        return json.loads((self.run.state_dir / "inventory.json").read_text())

    @property
    def settings(self) -> Settings:
        stack = self.run.stack
        return load_stack_file(ROOT / f"Pulumi.{stack}.yaml" if stack == "dev" else Path(stack))

    @property
    def engines(self) -> dict[str, Any]:
        return json.loads((self.run.state_dir / "engines.json").read_text())


@pytest.fixture(scope="module", params=["dev", "staging-multi-node"])
def rehearsal(request: pytest.FixtureRequest) -> Iterator[Rehearsal]:
    parent = Path(tempfile.mkdtemp(prefix="qvr-ci-"))
    parent.chmod(0o755)  # nginx's unprivileged user must reach the state directory
    name = str(request.param)
    stack = (
        "dev"
        if name == "dev"
        else str(multi_node_only("staging", parent / "Pulumi.staging-mn.yaml"))
    )
    run = Run(stack, parent / "state", name="real-" + name.split("-")[0])
    shm_before = shm_files()
    up = rehearse("--stack", stack, "--detach", *run.args(), timeout=UP_TIMEOUT_S)
    pids = run.recorded_pids()
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield Rehearsal(run, up, pids)
    finally:
        down = rehearse("down", *run.args(), timeout=180)
        try:
            assert down.returncode == 0, down.stdout + down.stderr
            assert_nothing_left(run, pids, shm_before)
        finally:
            shutil.rmtree(parent, ignore_errors=True)


def test_engines_report_time_to_ready_and_fit_in_8_gb(rehearsal: Rehearsal) -> None:
    engines = rehearsal.engines
    settings = rehearsal.settings
    pods = sum(d.nodes_per_group for d in settings.serving.deployments)
    assert len(engines["engines"]) == pods
    for pod, stats in engines["engines"].items():
        assert 0 < stats["ready_s"] < UP_TIMEOUT_S, pod
        assert stats["rss_bytes"] > 500 * 2**20, (pod, stats)  # a real engine, not the stand-in
        assert f"time to ready {stats['ready_s']:.1f} s" in rehearsal.up.stdout
    assert 0 < engines["total_rss_bytes"] < ENGINE_RSS_BUDGET
    assert "within the 8 GB budget" in rehearsal.up.stdout


def test_the_engines_run_the_real_vllm(rehearsal: Rehearsal) -> None:
    state = json.loads((rehearsal.run.state_dir / "state.json").read_text())
    engines = [p for p in state["processes"] if p["name"].endswith("-engine")]
    assert engines
    for record in engines:
        assert record["argv"][:2] == [str(DEFAULT_VLLM), "serve"], record["argv"][:3]
        cmdline = Path(f"/proc/{record['pid']}/cmdline").read_bytes().split(b"\0")
        assert str(DEFAULT_VLLM).encode() in cmdline


def test_verify_passes_on_real_engines(rehearsal: Rehearsal, tmp_path: Path) -> None:
    result = verify(rehearsal.run, tmp_path)
    assert_verified(result, tmp_path)
    assert rehearsal.inventory["engine"] == "real"
    for host in rehearsal.inventory["hosts"]:
        if "engine-leader" in host["roles"] or "engine-worker" in host["roles"]:
            assert host["name"] in result.stdout


@pytest.fixture(scope="module")
def sdk(rehearsal: Rehearsal) -> dict[str, Any]:
    """What the OpenAI SDK observes through the gateway, from the client namespace."""
    inventory = rehearsal.inventory
    settings = rehearsal.settings
    base_url = f"http://{service_host(GATEWAY_NAME, settings.serving.namespace)}:{GATEWAY_PORT}/v1"
    model = served_model_name(settings.default_deployment)
    result = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            inventory["client_netns"],
            str(ENGINE_PYTHON),
            "-m",
            "tests.support.openai_client",
            "--base-url",
            base_url,
            "--key-file",
            inventory["secrets_file"],
            "--model",
            model,
        ],
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT_S,
        check=False,
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/root"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return {"model": model} | json.loads(result.stdout)


def test_sdk_lists_the_model(sdk: dict[str, Any]) -> None:
    assert sdk["models"] == [sdk["model"]]


def test_sdk_text_chat(sdk: dict[str, Any]) -> None:
    text = sdk["text"]
    assert text["object"] == "chat.completion"
    assert text["model"] == sdk["model"]
    assert text["role"] == "assistant"
    # ignore_eos with max_tokens 16: the engine generated exactly 16 tokens
    assert text["finish_reason"] == "length"
    assert text["usage"]["completion_tokens"] == 16
    assert text["usage"]["prompt_tokens"] > 0
    assert text["content"]


def test_sdk_image_chat(sdk: dict[str, Any]) -> None:
    image = sdk["image"]
    assert image["object"] == "chat.completion"
    assert image["usage"]["completion_tokens"] > 0
    # The same text without the image is shorter by the image's tokens: the engine decoded
    # the 64x64 PNG (4 merged patches) and the chat template put them in the prompt.
    extra = image["usage"]["prompt_tokens"] - image["text_only_usage"]["prompt_tokens"]
    assert extra >= 4, image


def test_sdk_streams_sse(sdk: dict[str, Any]) -> None:
    chunks = sdk["stream"]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    deltas = [c for c in chunks if c["delta"] is not None and c["usage"] is None]
    # max_tokens 32 with ignore_eos: an event per token plus the role's, except that vLLM holds
    # back a token ending inside a UTF-8 character (random byte tokens) until one completes it.
    assert 16 <= len(deltas) <= 33
    assert [c["finish_reason"] for c in chunks if c["finish_reason"]] == ["length"]
    # include_usage: the last event carries the usage and no choices
    assert chunks[-1]["usage"]["completion_tokens"] == 32
    assert chunks[-1]["delta"] is None
    assert chunks[-1]["t"] > chunks[0]["t"]


@pytest.mark.parametrize("case", ["no_key", "wrong_key"])
def test_sdk_without_a_valid_key_is_401(sdk: dict[str, Any], case: str) -> None:
    error = sdk[case]
    assert error["type"] == "AuthenticationError"
    assert error["status_code"] == 401
    assert error["body"]["code"] == "invalid_api_key"


def test_only_the_gateway_reaches_the_engines(rehearsal: Rehearsal) -> None:
    """From a namespace that is not the gateway, an engine's HTTP port and a group's rendezvous
    (master) port are unreachable; the gateway reaches the HTTP port and nothing else.

    Each probe waits at most 3 s. Without the firewall every probe would connect: the leaders
    listen on every address, and the rendezvous port is the group's TCP store."""
    inventory = rehearsal.inventory
    assert inventory["firewall"] is True
    hosts = {h["name"]: h for h in inventory["hosts"]}
    where = {name: h["netns"] for name, h in hosts.items()} | {"client": inventory["client_netns"]}
    leaders = {n: h for n, h in hosts.items() if "engine-leader" in h["roles"]}
    groups = [n for n, h in leaders.items() if h["roles"]["engine-leader"]["nnodes"] > 1]
    assert leaders
    assert bool(groups) == (rehearsal.run.name == "real-staging")
    for name in leaders:
        listed = netns.run_in(
            where[name], ["nft", "list", "table", "inet", "qvr_policy"], timeout=10
        )
        assert "policy drop;" in listed.stdout, listed.stderr
    found: dict[tuple[str, str, str], str] = {}
    expected: dict[tuple[str, str, str], str] = {}
    for name, leader in leaders.items():
        health = f"http://{leader['address']}:{VLLM_PORT}/health"
        for src, outcome in (("client", "timeout"), ("gateway-0", "200"), ("services", "200")):
            found[src, name, "GET /health"] = http_outcome(where[src], health)
            expected[src, name, "GET /health"] = outcome  # services: Prometheus scrapes it
        if name in groups:
            for src in ("client", "gateway-0", "services"):
                found[src, name, "rendezvous"] = tcp_outcome(
                    where[src], leader["address"], MASTER_PORT
                )
                expected[src, name, "rendezvous"] = "timeout"
    assert found == expected


def test_through_the_firewall_the_group_formed_and_the_gateway_serves(
    rehearsal: Rehearsal,
) -> None:
    """Each worker holds its connection to its leader's rendezvous port (the group formed one
    server, whose leader answers /health above), and a chat completion from the client
    namespace through the gateway is served by a real engine."""
    state = json.loads((rehearsal.run.state_dir / "state.json").read_text())
    pids = {p["name"]: p["pid"] for p in state["processes"]}
    for host in rehearsal.inventory["hosts"]:
        if "engine-worker" in host["roles"]:
            established = runner.remote_ports(
                pids[f"{host['name']}-engine"], runner.TCP_ESTABLISHED
            )
            assert MASTER_PORT in established, host["name"]
    settings = rehearsal.settings
    secrets_ = json.loads((rehearsal.run.state_dir / "secrets.json").read_text())
    body = {
        "model": served_model_name(settings.default_deployment),
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
    }
    gateway = service_host(GATEWAY_NAME, settings.serving.namespace)
    status = http_outcome(
        rehearsal.inventory["client_netns"],
        f"http://{gateway}:{GATEWAY_PORT}/v1/chat/completions",
        "-H", f"Authorization: Bearer {secrets_['gateway_api_key']}",
        "-H", "Content-Type: application/json",
        "-d", json.dumps(body),
        wait_s=CHAT_TIMEOUT_S,
    )  # fmt: skip
    assert status == "200"

"""CPU stand-in for `vllm serve` (vLLM 0.33.0) used by the offline rehearsal. It runs NO inference.

Invoked exactly like the real binary: `engine_standin.py serve MODEL <vllm serve flags>`.
It parses the command line against vLLM 0.33's real option table, forms the multi-node
group over TCP the way the mp backend does (headless ranks join the leader at
--master-addr:--master-port; the leader listens on its HTTP port only once every rank
has joined), and serves vLLM's HTTP surface (/health, /v1/models, /v1/chat/completions,
/metrics, ...) with replies that say they come from a stand-in.

Standard library and the repository's components/render/vllm_command.py only (whose imports are
standard library too), so the rehearsal can run it with the machine's python3 inside
network namespaces. See docs/rehearsal.md for what it models and what it does not.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import hashlib
import hmac
import ipaddress
import itertools
import json
import logging
import os
import re
import signal
import socket
import socketserver
import sys
import threading
import time
import uuid
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any, cast

from stacks.catalog import model_spec
from stacks.vllm_flags import FlagSpec, flag_table

VLLM_VERSION = "0.33.0"
PROTOCOL = "qvr-standin-rendezvous/1"
STANDIN_NOTICE = "vLLM engine STAND-IN on CPU: no model is loaded and no inference is run"

# vLLM's AuthenticationMiddleware checks the key only under these path prefixes.
AUTH_PREFIXES = ("/v1", "/v2", "/inference", "/cohere")
# Defaults vLLM applies when the flag or variable is absent (docs/reference/vllm.md, sections
# env-vars and serve-flags).
DEFAULT_ENGINE_READY_TIMEOUT_S = 600.0
DEFAULT_KEEP_ALIVE_S = 5.0
DEFAULT_MAX_NUM_SEQS = 256
DEFAULT_MM_LIMIT = 999
FINISHED_REASONS = ("stop", "length", "abort", "error", "repetition")
QWEN_VOCAB_SIZE = 151_643  # /tokenize ids are word hashes folded into this range

# vLLM v1 histogram buckets. docs/reference/vllm.md#metrics confirms the ends (0.001…2560, 0.01…80,
# 0.3…7680 s); the bounds between are not checked against vLLM here.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip

# The option table has no nargs/type column. These dests take one or more values in vLLM (list-typed
# config fields, docs/reference/vllm.md#serve-flags); options whose table default is a list or set
# literal are multi-valued too, except the JSON-typed and append ones below.
MULTI_VALUE_DESTS = frozenset({
    "served_model_name", "api_key", "lora_modules", "allowed_media_domains",
    "cudagraph_capture_sizes", "logits_processors", "lora_target_modules",
})  # fmt: skip
JSON_DESTS = frozenset({
    "allowed_origins", "allowed_methods", "allowed_headers", "mm_processor_kwargs",
    "default_chat_template_kwargs", "reasoning_effort_map", "default_mm_loras",
})  # fmt: skip
APPEND_DESTS = frozenset({"middleware"})
AUTO_MAX_MODEL_LEN = -1
_HUMAN_INT = re.compile(r"(\d+(?:\.\d+)?)([kmgtKMGT])")


def human_readable_int_or_auto(value: str) -> int:
    """--max-model-len as vLLM parses it (docs/reference/vllm.md#serve-flags): `32k` is 32000,
    `32K` is 32768 (no decimals with K), `-1` or `auto` mean the largest that fits."""
    value = value.strip()
    if value == "-1" or value.lower() == "auto":
        return AUTO_MAX_MODEL_LEN
    match = _HUMAN_INT.fullmatch(value)
    if not match:
        return int(value)
    number, suffix = match.groups()
    power = "kmgt".index(suffix.lower()) + 1
    if suffix.islower():
        return int(float(number) * 1000**power)
    return int(number) * 1024**power


# Values the stand-in acts on, with the type vLLM's parser gives them.
TYPED_DESTS: Mapping[str, Callable[[str], Any]] = {
    "port": int, "master_port": int, "nnodes": int, "node_rank": int,
    "tensor_parallel_size": int, "pipeline_parallel_size": int, "data_parallel_size": int,
    "prefill_context_parallel_size": int, "api_server_count": int, "max_num_seqs": int,
    "max_model_len": human_readable_int_or_auto,
}  # fmt: skip
# Set to anything but their default, these change what vLLM does in ways the stand-in
# does not imitate, so it refuses them instead of silently serving something else.
NOT_MODELED = {
    "config": "it does not read --config YAML files; pass the flags on the command line",
    "uds": "it serves TCP only, not a unix socket",
    "ssl_keyfile": "it serves plain HTTP only",
    "ssl_certfile": "it serves plain HTTP only",
    "grpc": "it serves HTTP only",
}
# Table defaults that mark a JSON-typed option: a config dataclass or a dict literal.
JSON_DEFAULT_MARKERS = ("Config(", "{")

log = logging.getLogger("standin")


class StandinError(Exception):
    """A configuration or group-formation failure reported as one line, exit 1."""


# --------------------------------------------------------------------------- flag table


@dataclass(frozen=True)
class OptionSpec:
    """One row of vLLM's `vllm serve` option table."""

    strings: tuple[str, ...]
    dest: str
    default: str
    choices: tuple[str, ...]

    @property
    def is_positional(self) -> bool:
        return not self.strings[0].startswith("-")

    def negative_strings(self) -> tuple[str, ...]:
        """The --no-X / --disable-X (or --enable-X) forms that store False."""
        positive = f"--{self.dest.replace('_', '-')}"
        return tuple(
            s
            for s in self.strings
            if s != positive and s.startswith(("--no-", "--disable-", "--enable-"))
        )

    @property
    def is_boolean(self) -> bool:
        if self.negative_strings():
            return True
        single_long = [s for s in self.strings if s.startswith("--")]
        return self.default in ("True", "False") and len(single_long) == 1

    @property
    def is_json(self) -> bool:
        if self.dest in JSON_DESTS:
            return True
        if self.default == "==SUPPRESS==":
            return False
        return self.dest.endswith("_config") or self.default.startswith(JSON_DEFAULT_MARKERS)

    def scalar_default(self) -> str | None:
        """The table default as argparse's string default (typed options convert it), or
        None where the table shows a Python repr (None, lists, enums, config objects)."""
        if self.is_json or self.nargs or self.dest in APPEND_DESTS:
            return None
        if self.default in ("None", "==SUPPRESS==") or self.default.startswith("<"):
            return None
        return self.default

    @property
    def nargs(self) -> str | None:
        if self.dest in MULTI_VALUE_DESTS:
            return "+"
        listish = self.default.startswith("[") or self.default == "set()"
        return "+" if listish and not self.is_json and self.dest not in APPEND_DESTS else None


# The positional of `vllm serve`: flag_table() keys options by their `-`/`--` strings only.
MODEL_TAG = OptionSpec(strings=("model_tag",), dest="model_tag", default="None", choices=())


def serve_options() -> list[OptionSpec]:
    """`vllm serve`'s positional, then every option of components/render/vllm_command.py's table
    (one row each, in the table's order; flag_table() maps every option string to its row)."""
    rows: dict[FlagSpec, None] = dict.fromkeys(flag_table().values())
    return [MODEL_TAG, *(OptionSpec(f.options, f.dest, f.default, f.choices) for f in rows)]


def build_parser(specs: Sequence[OptionSpec]) -> argparse.ArgumentParser:
    """An argparse parser accepting exactly vLLM's options, erroring like vLLM's (exit 2)."""
    parser = argparse.ArgumentParser(
        prog="vllm serve", usage="vllm serve [model_tag] [options]", allow_abbrev=False
    )
    for spec in specs:
        if spec.is_positional:
            parser.add_argument(spec.dest, nargs="?")
        elif spec.is_boolean:
            _add_boolean(parser, spec)
        else:
            _add_valued(parser, spec)
    return parser


def _add_boolean(parser: argparse.ArgumentParser, spec: OptionSpec) -> None:
    negative = spec.negative_strings()
    positive = [s for s in spec.strings if s not in negative]
    default = {"True": True, "False": False}.get(spec.default)
    parser.add_argument(
        *positive, dest=spec.dest, action="store_const", const=True, default=default
    )
    if negative:
        parser.add_argument(*negative, dest=spec.dest, action="store_const", const=False)


def _add_valued(parser: argparse.ArgumentParser, spec: OptionSpec) -> None:
    kwargs: dict[str, Any] = {"dest": spec.dest, "default": spec.scalar_default()}
    if spec.dest in TYPED_DESTS:
        kwargs["type"] = TYPED_DESTS[spec.dest]
    elif spec.is_json:
        kwargs["type"] = json.loads
    if spec.choices:
        kwargs["choices"] = spec.choices
    if spec.dest in APPEND_DESTS:
        kwargs["action"] = "append"
    elif spec.nargs:
        kwargs["nargs"] = spec.nargs
    parser.add_argument(*spec.strings, **kwargs)


_OPT_LEVEL = re.compile(r"^-O(\d)$")


def normalize_argv(argv: Sequence[str], specs: Sequence[OptionSpec]) -> list[str]:
    """What vLLM's FlexibleArgumentParser does before argparse sees the arguments.

    `--a_b` means `--a-b`; `--x=v` is split; `--json-opt.key v` (dotted sub-keys of JSON
    options) become one `--json-opt '{"key": v}'`; `-O3` is `--optimization-level 3`.
    """
    json_options = {s for spec in specs if spec.is_json for s in spec.strings}
    out: list[str] = []
    dotted: dict[str, dict[str, Any]] = {}
    tokens = list(argv)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        i += 1
        level = _OPT_LEVEL.match(token)
        if level:
            out += ["--optimization-level", level.group(1)]
            continue
        if not token.startswith("--") or token == "--":
            out.append(token)
            continue
        key, has_value, value = token.partition("=")
        base, _, sub = key.partition(".")
        base = base.replace("_", "-")
        if sub and base in json_options:
            if not has_value:
                if i >= len(tokens):
                    out.append(f"{base}.{sub}")  # argparse reports the missing value
                    continue
                value = tokens[i]
                i += 1
            target = dotted.get(base)
            if target is None:
                target = dotted[base] = {}
                out += [base, ""]  # placeholder, filled once all sub-keys are known
            _set_dotted(target, sub.split("."), value)
            continue
        name = f"{base}.{sub}" if sub else base
        out += [name, value] if has_value else [name]
    return _fill_dotted(out, dotted)


def _set_dotted(target: dict[str, Any], path: list[str], raw: str) -> None:
    for part in path[:-1]:
        target = target.setdefault(part, {})
    try:
        target[path[-1]] = json.loads(raw)
    except json.JSONDecodeError:
        target[path[-1]] = raw


def _fill_dotted(out: list[str], dotted: Mapping[str, dict[str, Any]]) -> list[str]:
    filled = list(out)
    for base, value in dotted.items():
        index = next(j for j in range(len(filled) - 1) if filled[j] == base and filled[j + 1] == "")
        filled[index + 1] = json.dumps(value)
    return filled


def parse_serve_args(argv: Sequence[str], specs: Sequence[OptionSpec]) -> argparse.Namespace:
    """Parse `vllm serve` arguments; exits 2 with argparse's message on unknown/bad ones."""
    return build_parser(specs).parse_args(normalize_argv(argv, specs))


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class EngineConfig:
    """What the stand-in acts on, resolved from the flags and the environment."""

    model: str
    served_names: tuple[str, ...]
    host: str | None
    port: int
    api_keys: tuple[str, ...]
    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int
    headless: bool
    tensor_parallel: int
    pipeline_parallel: int
    max_num_seqs: int
    image_limit: int
    host_ip: str | None
    max_model_len: int | None  # None: no --max-model-len and a model the catalog lacks
    system_fingerprint: str | None
    quiet_paths: frozenset[str] = field(default_factory=frozenset)
    access_log: bool = True

    @property
    def world_size(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel

    @property
    def is_leader(self) -> bool:
        return self.node_rank == 0

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "served_model_names": list(self.served_names),
            "host": self.host,
            "port": self.port,
            "api_key_set": bool(self.api_keys),
            "nnodes": self.nnodes,
            "node_rank": self.node_rank,
            "master_addr": self.master_addr,
            "master_port": self.master_port,
            "headless": self.headless,
            "tensor_parallel_size": self.tensor_parallel,
            "pipeline_parallel_size": self.pipeline_parallel,
            "world_size": self.world_size,
            "max_num_seqs": self.max_num_seqs,
            "image_limit": self.image_limit,
            "max_model_len": self.max_model_len,
            "system_fingerprint": self.system_fingerprint,
        }


def build_config(ns: argparse.Namespace, env: Mapping[str, str]) -> EngineConfig:
    """Validate parsed flags as vLLM does for the modes the stand-in models."""
    _refuse_not_modeled(ns)
    _check_env(env)
    _check_parallel(ns)
    model = ns.model_tag or ns.model
    keys = ns.api_key or ([env["VLLM_API_KEY"]] if env.get("VLLM_API_KEY") else [])
    quiet = ns.disable_access_log_for_endpoints or ""
    return EngineConfig(
        model=model,
        served_names=tuple(ns.served_model_name or [model]),
        host=ns.host,
        port=ns.port,
        api_keys=tuple(keys),
        nnodes=ns.nnodes,
        node_rank=ns.node_rank,
        master_addr=ns.master_addr,
        master_port=ns.master_port,
        headless=bool(ns.headless),
        tensor_parallel=ns.tensor_parallel_size,
        pipeline_parallel=ns.pipeline_parallel_size,
        max_num_seqs=ns.max_num_seqs or DEFAULT_MAX_NUM_SEQS,
        image_limit=_image_limit(ns.limit_mm_per_prompt),
        host_ip=env.get("VLLM_HOST_IP") or None,
        max_model_len=_max_model_len(ns.max_model_len, model),
        system_fingerprint=_system_fingerprint(ns, model),
        quiet_paths=frozenset(p.strip() for p in quiet.split(",") if p.strip()),
        access_log=not ns.disable_uvicorn_access_log,
    )


def _refuse_not_modeled(ns: argparse.Namespace) -> None:
    for dest, why in NOT_MODELED.items():
        if getattr(ns, dest, None):
            flag = "--" + dest.replace("_", "-")
            raise StandinError(f"{flag} is set, but the stand-in cannot imitate it: {why}")
    if (ns.data_parallel_size or 1) > 1:
        raise StandinError(
            f"--data-parallel-size {ns.data_parallel_size}: data parallelism is not modeled "
            "by the stand-in (it models one engine per group, multi-node only via TP/PP)"
        )
    if ns.distributed_executor_backend == "ray":
        raise StandinError(
            "--distributed-executor-backend ray: vLLM 0.33 needs `pip install ray` for it "
            "and the stand-in models only the mp backend"
        )


def _check_env(env: Mapping[str, str]) -> None:
    port = env.get("VLLM_PORT")
    if port is not None and not port.isdigit():
        # vllm/envs.py refuses a URI here: Kubernetes injects VLLM_PORT=tcp://... for a
        # Service named `vllm` when service links are on.
        raise StandinError(
            f"VLLM_PORT '{port}' appears to be a URI. This may be caused by a Kubernetes "
            "service discovery issue, check the warning in: https://docs.vllm.ai/en/stable/"
            "serving/env_vars.html"
        )
    host_ip = env.get("VLLM_HOST_IP")
    if host_ip:
        try:
            ipaddress.ip_address(host_ip)
        except ValueError as err:
            raise StandinError(f"VLLM_HOST_IP={host_ip!r} is not an IP address") from err


def _check_parallel(ns: argparse.Namespace) -> None:
    nnodes, rank = ns.nnodes, ns.node_rank
    world = ns.tensor_parallel_size * ns.pipeline_parallel_size * ns.prefill_context_parallel_size
    problems = []
    if nnodes < 1:
        problems.append(f"--nnodes {nnodes} must be at least 1")
    elif not 0 <= rank < nnodes:
        problems.append(f"--node-rank {rank} must satisfy 0 <= node_rank < --nnodes {nnodes}")
    elif world % nnodes:
        problems.append(
            f"world size {world} (--tensor-parallel-size {ns.tensor_parallel_size} x "
            f"--pipeline-parallel-size {ns.pipeline_parallel_size} x "
            f"--prefill-context-parallel-size {ns.prefill_context_parallel_size}) "
            f"must be divisible by --nnodes {nnodes}"
        )
    problems += _headless_problems(ns)
    if nnodes > 1 and ns.data_parallel_backend != "mp":
        problems.append("--nnodes > 1 requires --data-parallel-backend mp")
    if problems:
        raise StandinError("; ".join(problems))


def _headless_problems(ns: argparse.Namespace) -> list[str]:
    rank, headless = ns.node_rank, bool(ns.headless)
    if headless and (ns.api_server_count or 0) > 0:
        return ["--api-server-count cannot be used with --headless"]
    if ns.nnodes == 1 and headless:
        return ["--headless with --nnodes 1 is multi-node data parallel, not modeled"]
    if ns.nnodes > 1 and rank > 0 and not headless:
        return [f"--node-rank {rank} > 0 must run with --headless (only rank 0 serves the API)"]
    if ns.nnodes > 1 and rank == 0 and headless:
        return ["--headless with --node-rank 0: rank 0 is the leader and serves the API"]
    return []


def _max_model_len(flag: int | None, model: str) -> int | None:
    """The flag, else the model's own context length (what vLLM reads from its config). For
    `auto` vLLM takes the largest length the KV cache holds; the stand-in has no memory limit."""
    if flag is not None and flag != AUTO_MAX_MODEL_LEN:
        return flag
    spec = model_spec(model)
    return spec.max_context if spec else None


def _system_fingerprint(ns: argparse.Namespace, model: str) -> str | None:
    """vLLM's `system_fingerprint` for --fingerprint-mode (docs/reference/vllm.md#openai-responses).
    The hash is of the settings the stand-in models, in place of vLLM's config hash."""
    mode = ns.fingerprint_mode
    if mode == "none":
        return None
    if mode == "custom":
        return ns.fingerprint_value
    settings = [model, ns.tensor_parallel_size, ns.pipeline_parallel_size, ns.max_model_len]
    parts = [f"vllm-{VLLM_VERSION}"]
    if mode == "full":
        parts += [
            f"{name}{size}"
            for name, size in (("tp", ns.tensor_parallel_size), ("pp", ns.pipeline_parallel_size))
            if size > 1
        ]
        parts += ["ep"] if ns.enable_expert_parallel else []
    return "-".join([*parts, _digest(json.dumps(settings).encode())[:8]])


def _image_limit(limits: object) -> int:
    """Images allowed per prompt by --limit-mm-per-prompt ({"image": N} or {"image": {"count": N}})."""
    if limits is None:
        return DEFAULT_MM_LIMIT
    if not isinstance(limits, dict):
        raise StandinError(f"--limit-mm-per-prompt must be a JSON object, got {limits!r}")
    value = cast(dict[str, Any], limits).get("image", DEFAULT_MM_LIMIT)
    if isinstance(value, dict):
        value = cast(dict[str, Any], value).get("count", DEFAULT_MM_LIMIT)
    if not isinstance(value, int) or value < 0:
        raise StandinError(
            f"--limit-mm-per-prompt image count must be an integer >= 0, got {value!r}"
        )
    return value


# --------------------------------------------------------------------------- rendezvous
#
# Protocol (one JSON object per line over TCP to --master-addr:--master-port):
#   worker -> leader  {"proto", "rank", "nnodes", "tensor_parallel_size",
#                      "pipeline_parallel_size", "world_size", "model", "master_port", "host_ip"}
#   leader -> worker  {"ok": true, "rank", "waiting_for": [...]}  or  {"ok": false, "error"}
#   leader -> all     {"event": "formed", "members": {"0": ip, "1": ip, ...}} once every rank joined
# The connection then stays open: EOF on either side means the other process is gone.

LINE_LIMIT = 65536
POLL_S = 0.2  # how often blocking waits look at the stop flag and deadlines


def _send_json(sock: socket.socket, payload: Mapping[str, Any]) -> None:
    sock.sendall(json.dumps(payload).encode() + b"\n")


class LineReader:
    """JSON lines from a socket, keeping what arrived beyond the current line."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buffer = b""

    def read(self, deadline: float, stop: threading.Event) -> dict[str, Any] | None:
        """The next JSON line; None at EOF. TimeoutError past the deadline or on stop."""
        self.sock.settimeout(POLL_S)
        while b"\n" not in self._buffer:
            if stop.is_set() or time.monotonic() >= deadline:
                raise TimeoutError("no message before the deadline")
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            if not data:
                return None
            self._buffer += data
            if len(self._buffer) > LINE_LIMIT:
                raise ValueError("rendezvous message too long")
        line, self._buffer = self._buffer.split(b"\n", 1)
        return cast(dict[str, Any], json.loads(line))


def wait_for_eof(sock: socket.socket, stop: threading.Event) -> bool:
    """Block until the peer closes the connection (True) or `stop` is set (False)."""
    sock.settimeout(POLL_S)
    while not stop.is_set():
        try:
            if sock.recv(1) == b"":
                return True
        except TimeoutError:
            continue
        except OSError:
            return True
    return False


def join_request(cfg: EngineConfig) -> dict[str, Any]:
    return {
        "proto": PROTOCOL,
        "rank": cfg.node_rank,
        "nnodes": cfg.nnodes,
        "tensor_parallel_size": cfg.tensor_parallel,
        "pipeline_parallel_size": cfg.pipeline_parallel,
        "world_size": cfg.world_size,
        "model": cfg.model,
        "master_port": cfg.master_port,
        "host_ip": cfg.host_ip,
    }


def join_problem(leader: EngineConfig, join: Mapping[str, Any], taken: Mapping[int, str]) -> str:
    """Why the leader refuses a join request ('' when it accepts it)."""
    if join.get("proto") != PROTOCOL:
        return f"unknown protocol {join.get('proto')!r} (expected {PROTOCOL})"
    mine = join_request(leader)
    for key in ("nnodes", "tensor_parallel_size", "pipeline_parallel_size", "model"):
        if join.get(key) != mine[key]:
            flag = "--" + key.replace("_", "-")
            return f"{flag} {join.get(key)} does not match the leader's {flag} {mine[key]}"
    rank = join.get("rank")
    if not isinstance(rank, int) or not 0 < rank < leader.nnodes:
        workers = f"1..{leader.nnodes - 1}"
        return (
            f"--node-rank {rank} is not a worker rank of a {leader.nnodes}-node group ({workers})"
        )
    if rank in taken:
        return f"--node-rank {rank} already joined from {taken[rank]}"
    return ""


class Leader:
    """Rank 0's side of the group: accepts workers until all `nnodes` ranks have joined."""

    JOIN_READ_S = 10.0

    def __init__(self, cfg: EngineConfig, stop: threading.Event) -> None:
        self.cfg = cfg
        self.stop = stop
        self.formed = threading.Event()
        self.lost: list[str] = []
        self._lock = threading.Lock()
        self._members: dict[int, tuple[socket.socket, str]] = {}
        self._rejections: list[str] = []
        self._listener = _bind_master(cfg)

    def start(self) -> None:
        threading.Thread(target=self._accept_loop, name="rendezvous", daemon=True).start()

    def summary(self) -> str:
        with self._lock:
            joined = sorted([0, *self._members])
            rejected = "; ".join(self._rejections[-5:]) or "none"
        missing = sorted(set(range(self.cfg.nnodes)) - set(joined))
        return (
            f"ranks joined {joined}, missing {missing} on --master-addr {self.cfg.master_addr} "
            f"--master-port {self.cfg.master_port}; rejected joins: {rejected}"
        )

    def close(self) -> None:
        with self._lock:
            members = list(self._members.values())
        self._listener.close()
        for sock, _ in members:
            _close_quietly(sock)

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, (peer, _port) = self._listener.accept()
            except OSError:
                return  # listener closed
            threading.Thread(target=self._handle, args=(conn, peer), daemon=True).start()

    def _handle(self, conn: socket.socket, peer: str) -> None:
        try:
            join = LineReader(conn).read(time.monotonic() + self.JOIN_READ_S, self.stop)
        except (OSError, ValueError) as err:
            log.warning("rendezvous: unreadable join from %s: %s", peer, err)
            join = None
        if join is None:
            _close_quietly(conn)
            return
        problem, waiting = self._admit(conn, peer, join)
        if problem:
            log.error("rendezvous: rejected join from %s: %s", peer, problem)
            _send_quietly(conn, {"ok": False, "error": problem})
            _close_quietly(conn)
            return
        rank = int(join["rank"])
        log.info("rendezvous: rank %d joined from %s; still waiting for %s", rank, peer, waiting)
        if not waiting:
            self._form()
        if wait_for_eof(conn, self.stop):
            self._drop(rank)

    def _admit(
        self, conn: socket.socket, peer: str, join: Mapping[str, Any]
    ) -> tuple[str, list[int]]:
        """(why the join is refused or '', ranks still missing after it)."""
        with self._lock:
            taken = {rank: addr for rank, (_, addr) in self._members.items()}
            problem = "the group is already formed" if len(taken) == self.cfg.nnodes - 1 else ""
            problem = problem or join_problem(self.cfg, join, taken)
            if problem:
                self._rejections.append(f"{peer}: {problem}")
                return problem, []
            rank = int(join["rank"])
            self._members[rank] = (conn, peer)
            # Under the lock: exactly one join sees the group complete, and every "ok"
            # reaches its worker before the "formed" event that the last join triggers.
            waiting = sorted(set(range(1, self.cfg.nnodes)) - set(self._members))
            _send_quietly(conn, {"ok": True, "rank": rank, "waiting_for": waiting})
            return "", waiting

    def _form(self) -> None:
        with self._lock:
            members = {0: self.cfg.host_ip or self.cfg.master_addr}
            members |= {rank: addr for rank, (_, addr) in self._members.items()}
            socks = [sock for sock, _ in self._members.values()]
        event = {"event": "formed", "members": {str(r): a for r, a in sorted(members.items())}}
        for sock in socks:
            _send_quietly(sock, event)
        log.info("rendezvous: group formed with all %d ranks: %s", self.cfg.nnodes, members)
        self.formed.set()

    def _drop(self, rank: int) -> None:
        with self._lock:
            self._members.pop(rank, None)
        if self.stop.is_set():
            return
        if self.formed.is_set():
            # vLLM's API server exits when the engine dies (VLLM_KEEP_ALIVE_ON_ENGINE_DEATH=0).
            self.lost.append(f"rank {rank} left the formed group (its connection closed)")
            log.error("rendezvous: %s", self.lost[-1])
            self.stop.set()
        else:
            log.warning("rendezvous: rank %d left before the group formed", rank)


def _bind_master(cfg: EngineConfig) -> socket.socket:
    """Listen on --master-addr:--master-port, which must name an address of this host.

    torch's store listens on every interface; binding the resolved --master-addr is
    stricter on purpose, so a leader rendered with another pod's address fails here.
    """
    address = _resolve(cfg.master_addr)
    if address is None:
        raise StandinError(f"cannot resolve --master-addr {cfg.master_addr}")
    try:
        return socket.create_server((address, cfg.master_port), backlog=cfg.nnodes + 4)
    except OSError as err:
        raise StandinError(
            f"rank 0 cannot listen on --master-addr {cfg.master_addr} ({address}) "
            f"--master-port {cfg.master_port}: {err.strerror or err}"
        ) from err


def _resolve(host: str) -> str | None:
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
    except OSError:
        return None
    return str(infos[0][4][0]) if infos else None


def _send_quietly(sock: socket.socket, payload: Mapping[str, Any]) -> None:
    with contextlib.suppress(OSError):  # the peer is gone; its reader notices the EOF
        _send_json(sock, payload)


def _close_quietly(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def run_worker(cfg: EngineConfig, timeout: float, stop: threading.Event) -> int:
    """A headless rank: join the leader, then stay connected until it goes away."""
    log.info(
        "Launching vLLM (v%s) headless multiproc executor, with head node address %s:%d",
        VLLM_VERSION,
        cfg.master_addr,
        cfg.master_port,
    )
    deadline = time.monotonic() + timeout
    sock = _connect_to_leader(cfg, deadline, timeout, stop)
    if sock is None:
        return 0  # stopped by a signal while connecting
    try:
        return _serve_as_worker(cfg, sock, deadline, stop)
    except TimeoutError:
        if stop.is_set():
            return 0
        raise StandinError(
            f"the group did not form within {timeout:g} s of starting (leader at "
            f"--master-addr {cfg.master_addr} --master-port {cfg.master_port})"
        ) from None
    finally:
        _close_quietly(sock)


def _serve_as_worker(
    cfg: EngineConfig, sock: socket.socket, deadline: float, stop: threading.Event
) -> int:
    _send_json(sock, join_request(cfg))
    reader = LineReader(sock)
    reply = reader.read(deadline, stop)
    if reply is None:
        raise StandinError("the leader closed the connection without answering the join")
    if not reply.get("ok"):
        raise StandinError(f"the leader rejected this node: {reply.get('error')}")
    log.info("rank %d joined; leader waits for ranks %s", cfg.node_rank, reply["waiting_for"])
    formed = reader.read(deadline, stop)
    if formed is None:
        raise StandinError("the leader went away before the group formed")
    log.info("group formed: %s; serving as headless rank %d", formed["members"], cfg.node_rank)
    if wait_for_eof(sock, stop):
        raise StandinError("the leader closed the group connection (head node gone); exiting")
    return 0


def _connect_to_leader(
    cfg: EngineConfig, deadline: float, timeout: float, stop: threading.Event
) -> socket.socket | None:
    last_error = "no attempt made"
    source = (cfg.host_ip, 0) if cfg.host_ip else None
    for attempt in itertools.count(1):
        if stop.is_set():
            return None
        address = _resolve(cfg.master_addr)
        if address is None:
            last_error = "the name does not resolve"
        else:
            try:
                return socket.create_connection(
                    (address, cfg.master_port), timeout=2, source_address=source
                )
            except OSError as err:
                last_error = f"{address}: {err.strerror or err}"
        if time.monotonic() >= deadline:
            break
        if attempt == 1:
            log.info("waiting for the leader at %s:%d", cfg.master_addr, cfg.master_port)
        stop.wait(POLL_S)
    raise StandinError(
        f"cannot reach --master-addr {cfg.master_addr} --master-port {cfg.master_port} "
        f"within {timeout:g} s ({last_error})"
    )


def check_local_address(ip: str) -> None:
    """VLLM_HOST_IP must be an address of this host (vLLM binds its queues to it)."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        probe.bind((ip, 0))
    except OSError as err:
        raise StandinError(f"VLLM_HOST_IP={ip} is not an address of this host") from err
    finally:
        probe.close()


# --------------------------------------------------------------------------- metrics


class Histogram:
    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.total += value
        self.count += 1


@dataclass
class RequestRecord:
    prompt_tokens: int
    generation_tokens: int
    finished_reason: str
    ttft: float | None
    e2e: float
    inter_token: list[float]
    prefix_queries: int
    prefix_hits: int
    mm_queries: int
    mm_hits: int


class Metrics:
    """vLLM's engine metrics with real counts of what this process served."""

    BLOCK = 16  # tokens per prefix-cache block, vLLM's default block size
    CACHE_CAP = 100_000  # bounded memory: the caches restart empty past this many entries

    def __init__(self, model_name: str, max_num_seqs: int) -> None:
        self.labels = {"model_name": model_name, "engine": "0"}
        self.max_num_seqs = max_num_seqs
        self.created = time.time()
        self._lock = threading.Lock()
        self.running = 0
        self.waiting = 0
        self.counters = dict.fromkeys(
            (
                "prompt_tokens",
                "generation_tokens",
                "prefix_cache_queries",
                "prefix_cache_hits",
                "mm_cache_queries",
                "mm_cache_hits",
                "num_preemptions",
            ),
            0,
        )
        self.success: dict[str, int] = dict.fromkeys(FINISHED_REASONS, 0)
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)
        self._blocks: set[str] = set()
        self._images: set[str] = set()

    def queued(self, delta: int) -> None:
        with self._lock:
            self.waiting += delta

    def started(self, delta: int) -> None:
        with self._lock:
            self.running += delta

    def cache_lookup(self, tokens: Sequence[str], image_hashes: Sequence[str]) -> tuple[int, int]:
        """(prefix-cache hit tokens, mm-cache hit items), then remember this prompt."""
        with self._lock:
            hits, chain = 0, ""
            counting = True
            for start in range(0, len(tokens) - self.BLOCK + 1, self.BLOCK):
                chain = _digest(chain + "\x00".join(tokens[start : start + self.BLOCK]))
                counting = counting and chain in self._blocks
                hits += self.BLOCK if counting else 0
                self._remember(self._blocks, chain)
            mm_hits = 0
            for digest in image_hashes:
                mm_hits += digest in self._images
                self._remember(self._images, digest)
            return hits, mm_hits

    def _remember(self, cache: set[str], key: str) -> None:
        if len(cache) >= self.CACHE_CAP:
            cache.clear()
        cache.add(key)

    def record(self, rec: RequestRecord) -> None:
        with self._lock:
            self.counters["prompt_tokens"] += rec.prompt_tokens
            self.counters["generation_tokens"] += rec.generation_tokens
            self.counters["prefix_cache_queries"] += rec.prefix_queries
            self.counters["prefix_cache_hits"] += rec.prefix_hits
            self.counters["mm_cache_queries"] += rec.mm_queries
            self.counters["mm_cache_hits"] += rec.mm_hits
            self.success[rec.finished_reason] += 1
            if rec.ttft is not None:
                self.ttft.observe(rec.ttft)
            for gap in rec.inter_token:
                self.itl.observe(gap)
            self.e2e.observe(rec.e2e)

    def render(self) -> str:
        with self._lock:
            lines = self._render_gauges() + self._render_counters() + self._render_histograms()
        return "\n".join(lines) + "\n"

    def _labels(self, **extra: str) -> str:
        pairs = {**self.labels, **extra}
        return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs.items()) + "}"

    def _render_gauges(self) -> list[str]:
        gauges = {
            "num_requests_running": (
                "Number of requests in model execution batches.",
                self.running,
            ),
            "num_requests_waiting": ("Number of requests waiting to be processed.", self.waiting),
            "kv_cache_usage_perc": (
                "KV-cache usage. 1 means 100 percent usage. (stand-in: running / max-num-seqs)",
                self.running / self.max_num_seqs,
            ),
        }
        lines = []
        for name, (help_text, value) in gauges.items():
            lines += [f"# HELP vllm:{name} {help_text}", f"# TYPE vllm:{name} gauge"]
            lines.append(f"vllm:{name}{self._labels()} {float(value)!r}")
        return lines

    def _render_counters(self) -> list[str]:
        lines = []
        for name, value in self.counters.items():
            lines += self._counter(name, HELP[name], [(self._labels(), value)])
        samples = [(self._labels(finished_reason=r), n) for r, n in self.success.items()]
        lines += self._counter("request_success", HELP["request_success"], samples)
        return lines

    def _counter(self, name: str, help_text: str, samples: list[tuple[str, int]]) -> list[str]:
        lines = [f"# HELP vllm:{name}_total {help_text}", f"# TYPE vllm:{name}_total counter"]
        for labels, value in samples:
            lines.append(f"vllm:{name}_total{labels} {float(value)!r}")
        for labels, _ in samples:
            lines.append(f"vllm:{name}_created{labels} {self.created!r}")
        return lines

    def _render_histograms(self) -> list[str]:
        lines = []
        for name, hist in (
            ("time_to_first_token_seconds", self.ttft),
            ("inter_token_latency_seconds", self.itl),
            ("e2e_request_latency_seconds", self.e2e),
        ):
            lines += [f"# HELP vllm:{name} {HELP[name]}", f"# TYPE vllm:{name} histogram"]
            for bound, count in zip(hist.buckets, hist.counts, strict=True):
                lines.append(f"vllm:{name}_bucket{self._labels(le=repr(bound))} {float(count)!r}")
            lines.append(f"vllm:{name}_bucket{self._labels(le='+Inf')} {float(hist.count)!r}")
            lines.append(f"vllm:{name}_count{self._labels()} {float(hist.count)!r}")
            lines.append(f"vllm:{name}_sum{self._labels()} {hist.total!r}")
            lines.append(f"vllm:{name}_created{self._labels()} {self.created!r}")
        return lines


HELP = {
    "prompt_tokens": "Number of prefill tokens processed.",
    "generation_tokens": "Number of generation tokens processed.",
    "prefix_cache_queries": "Prefix cache queries, in terms of number of queried tokens.",
    "prefix_cache_hits": "Prefix cache hits, in terms of number of cached tokens.",
    "mm_cache_queries": "Multi-modal cache queries, in terms of number of queried items.",
    "mm_cache_hits": "Multi-modal cache hits, in terms of number of cached items.",
    "num_preemptions": "Cumulative number of preemption from the engine.",
    "request_success": "Count of successfully processed requests.",
    "time_to_first_token_seconds": "Histogram of time to first token in seconds.",
    "inter_token_latency_seconds": "Histogram of inter-token latency in seconds.",
    "e2e_request_latency_seconds": "Histogram of e2e request latency in seconds.",
}


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _digest(data: str | bytes) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return hashlib.sha256(raw).hexdigest()


# --------------------------------------------------------------------------- chat requests


class ApiError(Exception):
    """An OpenAI-style error response (vLLM's ErrorResponse shape)."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "BadRequestError",
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.param = param

    def body(self) -> dict[str, Any]:
        error = {"message": str(self), "type": self.kind, "param": self.param, "code": self.status}
        return {"error": error}


def request_validation_error(problem: str | Mapping[str, Any]) -> ApiError:
    """FastAPI's request validation failure as vLLM's handler reports it: one line per problem
    and, for a structured one, its location as `param` (docs/reference/vllm.md#openai-responses).
    """
    param = problem["loc"] if isinstance(problem, Mapping) else None
    return ApiError(400, f"1 validation error:\n  {problem}", "Bad Request", param)


IMAGE_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
)
_DATA_URL = re.compile(r"^data:(?P<mime>image/[\w.+-]+)?(?P<params>(;[^;,]*)*),(?P<data>.*)$", re.S)


@dataclass(frozen=True)
class ImageInput:
    kind: str
    size: int
    digest: str
    dimensions: tuple[int, int] | None

    def describe(self) -> str:
        dims = f" {self.dimensions[0]}x{self.dimensions[1]}" if self.dimensions else ""
        return f"{self.kind}{dims}, {self.size} bytes"


def decode_image(url: str) -> ImageInput:
    """Check a base64 data URL the way the engine would before decoding pixels."""
    match = _DATA_URL.match(url)
    if not match:
        raise ApiError(
            400,
            "the stand-in accepts only base64 data URLs (data:image/...;base64,...); "
            "it has no network to fetch remote media",
        )
    if ";base64" not in match.group("params"):
        raise ApiError(400, "image data URL is not base64-encoded (missing ';base64')")
    try:
        data = base64.b64decode(match.group("data"), validate=True)
    except (binascii.Error, ValueError) as err:
        raise ApiError(400, f"invalid base64 image data: {err}") from err
    kind = _image_kind(data)
    if kind is None:
        raise ApiError(400, "image data is not a PNG, JPEG, GIF or WebP file (bad magic bytes)")
    return ImageInput(kind=kind, size=len(data), digest=_digest(data), dimensions=_png_size(data))


def _image_kind(data: bytes) -> str | None:
    for magic, kind in IMAGE_MAGIC:
        if data.startswith(magic):
            return kind
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return None


def _png_size(data: bytes) -> tuple[int, int] | None:
    if not data.startswith(IMAGE_MAGIC[0][0]) or data[12:16] != b"IHDR":
        return None
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


@dataclass(frozen=True)
class ChatRequest:
    model: str
    stream: bool
    include_usage: bool
    max_tokens: int | None
    prompt_tokens: tuple[str, ...]
    images: tuple[ImageInput, ...]
    messages: int


def parse_chat(body: object, cfg: EngineConfig) -> ChatRequest:
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    req = cast(dict[str, Any], body)
    model = req.get("model") or cfg.served_names[0]
    if model not in cfg.served_names:
        aliases = ", ".join(cfg.served_names)
        raise ApiError(
            404,
            f"The model `{model}` does not exist. Valid aliases: {aliases}.",
            "NotFoundError",
            "model",
        )
    messages = req.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list")
    words: list[str] = []
    images: list[ImageInput] = []
    for message in cast(list[Any], messages):
        _collect_message(message, words, images)
    if len(images) > cfg.image_limit:
        raise ApiError(400, f"At most {cfg.image_limit} image(s) may be provided in one prompt.")
    options = req.get("stream_options")
    return ChatRequest(
        model=model,
        stream=bool(req.get("stream")),
        include_usage=isinstance(options, dict)
        and bool(cast(dict[str, Any], options).get("include_usage")),
        max_tokens=_max_tokens(req),
        prompt_tokens=tuple(words),
        images=tuple(images),
        messages=len(messages),
    )


def _collect_message(message: object, words: list[str], images: list[ImageInput]) -> None:
    if not isinstance(message, dict) or "role" not in message:
        raise ApiError(400, "each message must be an object with a 'role'")
    content = cast(dict[str, Any], message).get("content")
    if content is None or isinstance(content, str):
        words += (content or "").split()
        return
    if not isinstance(content, list):
        raise ApiError(400, "message 'content' must be a string or a list of parts")
    for part in cast(list[Any], content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            words += str(part.get("text", "")).split()
        elif kind == "image_url":
            image = decode_image(str((part.get("image_url") or {}).get("url", "")))
            images.append(image)
            words.append(f"<image:{image.digest}>")  # the image's placeholder token
        else:
            raise ApiError(400, f"content part type {kind!r} is not modeled by the stand-in")


def _max_tokens(req: Mapping[str, Any]) -> int | None:
    value = req.get("max_completion_tokens", req.get("max_tokens"))
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ApiError(400, f"max_tokens must be a positive integer, got {value!r}")
    return value


def reply_text(cfg: EngineConfig, req: ChatRequest) -> str:
    images = "; ".join(f"image {i}: {img.describe()}" for i, img in enumerate(req.images, 1))
    text_words = len(req.prompt_tokens) - len(req.images)
    return (
        f"[{STANDIN_NOTICE}.] Model {req.model} (rank 0 of {cfg.nnodes} node(s), "
        f"TP {cfg.tensor_parallel} x PP {cfg.pipeline_parallel}) received {req.messages} "
        f"message(s) with {text_words} word(s) and {len(req.images)} image(s)"
        + (f" ({images})" if images else "")
        + ". A real engine would generate the answer here."
    )


@dataclass(frozen=True)
class Reply:
    pieces: tuple[str, ...]  # the streamed "tokens": words with their leading space
    finish_reason: str


def plan_reply(cfg: EngineConfig, req: ChatRequest) -> Reply:
    words = reply_text(cfg, req).split(" ")
    pieces = (words[0], *(" " + w for w in words[1:]))
    if req.max_tokens is not None and req.max_tokens < len(pieces):
        return Reply(pieces[: req.max_tokens], "length")
    return Reply(pieces, "stop")


# --------------------------------------------------------------------------- engine + HTTP


class Engine:
    """Schedules requests (max-num-seqs at a time) and "generates" the stand-in reply."""

    def __init__(self, cfg: EngineConfig, token_delay: float) -> None:
        self.cfg = cfg
        self.token_delay = token_delay
        self.metrics = Metrics(cfg.served_names[0], cfg.max_num_seqs)
        self._slots = threading.BoundedSemaphore(cfg.max_num_seqs)

    def generate(self, req: ChatRequest, reply: Reply) -> Generator[str, None, None]:
        """Yield the reply's pieces with a per-token delay; records metrics when done."""
        start = time.monotonic()
        self.metrics.queued(1)
        self._slots.acquire()
        self.metrics.queued(-1)
        self.metrics.started(1)
        hits, mm_hits = self.metrics.cache_lookup(req.prompt_tokens, [i.digest for i in req.images])
        stamps: list[float] = []
        reason = reply.finish_reason
        try:
            for piece in reply.pieces:
                time.sleep(self.token_delay)
                stamps.append(time.monotonic())
                yield piece
        except GeneratorExit:
            reason = "abort"
            raise
        finally:
            self._slots.release()
            self.metrics.started(-1)
            self.metrics.record(
                RequestRecord(
                    prompt_tokens=len(req.prompt_tokens),
                    generation_tokens=len(stamps),
                    finished_reason=reason,
                    ttft=stamps[0] - start if stamps else None,
                    e2e=time.monotonic() - start,
                    inter_token=[b - a for a, b in itertools.pairwise(stamps)],
                    prefix_queries=len(req.prompt_tokens),
                    prefix_hits=hits,
                    mm_queries=len(req.images),
                    mm_hits=mm_hits,
                )
            )


class EngineServer(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's default listen backlog is 5; vLLM's uvicorn uses 2048. With 5, a burst of
    # new connections through the gateway gets resets that a real engine would not cause.
    request_queue_size = 2048

    def __init__(self, cfg: EngineConfig, engine: Engine) -> None:
        super().__init__((cfg.host or "", cfg.port), EngineHandler, bind_and_activate=False)
        self.cfg = cfg
        self.engine = engine
        self.healthy = True

    def server_bind(self) -> None:
        # HTTPServer.server_bind() also looks up the host's FQDN, a DNS query that can
        # stall inside a network namespace; the name is unused here.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = (
            str(self.server_address[0]),
            int(self.server_address[1]),
        )


class EngineHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "uvicorn"  # what vLLM's Server header says
    timeout = float(os.environ.get("VLLM_HTTP_TIMEOUT_KEEP_ALIVE", DEFAULT_KEEP_ALIVE_S))

    def version_string(self) -> str:
        return self.server_version

    @property
    def app(self) -> EngineServer:
        return cast(EngineServer, self.server)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_OPTIONS(self) -> None:
        self._dispatch("OPTIONS")

    def _dispatch(self, method: str) -> None:
        path = self.path.split("?", 1)[0]
        needs_key = method != "OPTIONS" and path.startswith(AUTH_PREFIXES)
        if needs_key and not self._authorized():
            self._send_json(401, {"error": "Unauthorized"})
            return
        route = ROUTES.get(path)
        if route is None:
            self._send_json(404, {"detail": "Not Found"})
        elif method not in route[0]:
            self._send_json(405, {"detail": "Method Not Allowed"})
        else:
            try:
                route[1](self)
            except ApiError as err:
                log.info("request refused: %s %s: %s", method, path, err)
                self._send_json(err.status, err.body())

    def _authorized(self) -> bool:
        keys = self.app.cfg.api_keys
        header = self.headers.get("Authorization", "")
        return not keys or any(hmac.compare_digest(header, f"Bearer {key}") for key in keys)

    # --- responses

    def _send_json(self, status: int, payload: object) -> None:
        self._send_bytes(status, json.dumps(payload).encode(), "application/json")

    def _send_bytes(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _read_json(self) -> object:
        media = self.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        body = self._read_body()  # always drained, so a refused request keeps the connection usable
        if media != "application/json":
            raise request_validation_error(
                "Unsupported Media Type: Only 'application/json' is allowed"
            )
        try:
            return json.loads(body or b"null")
        except json.JSONDecodeError as err:
            raise request_validation_error(
                {
                    "type": "json_invalid",
                    "loc": f"body.{err.pos}",
                    "msg": "JSON decode error",
                    "input": "<dict of 0 items>",  # vLLM describes a container, never echoes it
                    "ctx": {"error": err.msg},
                }
            ) from err

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            return self._read_chunked()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _read_chunked(self) -> bytes:
        parts: list[bytes] = []
        while True:
            size = int(self.rfile.readline(1024).split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                self.rfile.readline(1024)  # the blank line after the last chunk
                return b"".join(parts)
            parts.append(self.rfile.read(size))
            self.rfile.readline(1024)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        path = self.path.split("?", 1)[0]
        if self.app.cfg.access_log and path not in self.app.cfg.quiet_paths:
            log.info('%s - "%s" %s', self.client_address[0], self.requestline, code)

    def log_message(self, format: str, *args: Any) -> None:
        log.warning("http: " + format, *args)

    # --- routes

    def health(self) -> None:
        if self.app.healthy:
            self._send_bytes(200, b"", "application/json")
        else:
            self._send_json(503, {"error": "engine dead"})

    def version(self) -> None:
        self._send_json(200, {"version": VLLM_VERSION})

    def load(self) -> None:
        self._send_json(200, {"server_load": 0})

    def metrics(self) -> None:
        body = self.app.engine.metrics.render().encode()
        self._send_bytes(200, body, "text/plain; version=0.0.4; charset=utf-8")

    def models(self) -> None:
        cfg = self.app.cfg
        created = int(self.app.engine.metrics.created)
        cards = [
            {
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": "vllm",
                "root": cfg.model,
                "parent": None,
                "max_model_len": cfg.max_model_len,
                "permission": [_model_permission(created)],
            }
            for name in cfg.served_names
        ]
        self._send_json(200, {"object": "list", "data": cards})

    def tokenize(self) -> None:
        body = self._read_json()
        req = cast(dict[str, Any], body) if isinstance(body, dict) else {}
        if "messages" in req:
            words = list(parse_chat(req, self.app.cfg).prompt_tokens)
        else:
            words = str(req.get("prompt", "")).split()
        ids = [int(_digest(w)[:8], 16) % QWEN_VOCAB_SIZE for w in words]
        self._send_json(
            200, {"count": len(ids), "max_model_len": None, "tokens": ids, "token_strs": None}
        )

    def invocations(self) -> None:
        body = self._read_json()
        if not isinstance(body, dict) or "messages" not in body:
            raise ApiError(
                400, "the stand-in's /invocations serves chat requests ('messages') only"
            )
        self._chat(cast(dict[str, Any], body))

    def chat_completions(self) -> None:
        self._chat(self._read_json())

    def _chat(self, body: object) -> None:
        cfg = self.app.cfg
        req = parse_chat(body, cfg)
        log.info(
            "chat request: model=%s stream=%s prompt_words=%d images=%s",
            req.model,
            req.stream,
            len(req.prompt_tokens),
            [img.describe() for img in req.images],
        )
        reply = plan_reply(cfg, req)
        if req.stream:
            self._stream(req, reply)
        else:
            self._complete(req, reply)

    def _complete(self, req: ChatRequest, reply: Reply) -> None:
        text = "".join(self.app.engine.generate(req, reply))
        # vLLM drops an empty `tool_calls` list from the message it serializes.
        message = {"role": "assistant", "content": text}
        choice = {
            "index": 0,
            "message": message,
            "logprobs": None,
            "finish_reason": reply.finish_reason,
            "stop_reason": None,
        }
        self._send_json(
            200,
            {
                "id": f"chatcmpl-{uuid.uuid4().hex}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": req.model,
                "choices": [choice],
                "usage": _usage(len(req.prompt_tokens), len(reply.pieces)),
                "system_fingerprint": self.app.cfg.system_fingerprint,
            },
        )

    def _stream(self, req: ChatRequest, reply: Reply) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        chunk = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": req.model,
        }

        fingerprint = self.app.cfg.system_fingerprint
        # vLLM stamps the fingerprint on the stream's last event: the usage one if asked for.
        stamp = (
            {} if req.include_usage or fingerprint is None else {"system_fingerprint": fingerprint}
        )

        def event(delta: Mapping[str, Any], finish: str | None) -> dict[str, Any]:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return chunk | {"choices": [choice]} | (stamp if finish else {})

        tokens = self.app.engine.generate(req, reply)
        last = len(reply.pieces) - 1
        try:
            self._sse(event({"role": "assistant", "content": ""}, None))
            for i, piece in enumerate(tokens):
                self._sse(event({"content": piece}, reply.finish_reason if i == last else None))
            if req.include_usage:
                usage = _usage(len(req.prompt_tokens), len(reply.pieces))
                usage_event = chunk | {
                    "choices": [],
                    "usage": usage,
                    "system_fingerprint": fingerprint,
                }
                self._sse(_without_none(usage_event))  # vLLM serializes this event without nulls
            self._write_chunk(b"data: [DONE]\n\n")
            self._write_chunk(b"")
        except OSError:
            tokens.close()  # the client went away: the request counts as aborted
            self.close_connection = True

    def _sse(self, payload: Mapping[str, Any]) -> None:
        self._write_chunk(b"data: " + json.dumps(payload).encode() + b"\n\n")

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")


def _without_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: _without_none(v) for k, v in cast(dict[str, Any], value).items() if v is not None
        }
    return value


def _model_permission(created: int) -> dict[str, Any]:
    """The one permission entry vLLM puts on every model card (its defaults)."""
    return {
        "id": f"modelperm-{uuid.uuid4().hex[:16]}",
        "object": "model_permission",
        "created": created,
        "allow_create_engine": False,
        "allow_sampling": True,
        "allow_logprobs": True,
        "allow_search_indices": False,
        "allow_view": True,
        "allow_fine_tuning": False,
        "organization": "*",
        "group": None,
        "is_blocking": False,
    }


def _usage(prompt: int, completion: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion,
        "completion_tokens": completion,
        "prompt_tokens_details": None,
    }


_GET, _POST, _BOTH = ("GET",), ("POST",), ("GET", "POST")
ROUTES: dict[str, tuple[tuple[str, ...], Callable[[EngineHandler], None]]] = {
    "/health": (_GET, EngineHandler.health),
    "/ping": (_BOTH, EngineHandler.health),
    "/version": (_GET, EngineHandler.version),
    "/load": (_GET, EngineHandler.load),
    "/metrics": (_GET, EngineHandler.metrics),
    "/v1/models": (_GET, EngineHandler.models),
    "/v1/chat/completions": (_POST, EngineHandler.chat_completions),
    "/tokenize": (_POST, EngineHandler.tokenize),
    "/invocations": (_POST, EngineHandler.invocations),
}


# --------------------------------------------------------------------------- main


def run_leader(cfg: EngineConfig, timeout: float, token_delay: float, stop: threading.Event) -> int:
    """Rank 0: bind the API port, wait for the group, then serve until stopped."""
    server = EngineServer(cfg, Engine(cfg, token_delay))
    try:
        server.server_bind()  # as vLLM: bound early, listening only once the engine is ready
    except OSError as err:
        server.server_close()
        raise StandinError(f"cannot bind --host {cfg.host} --port {cfg.port}: {err}") from err
    try:
        leader = _form_group(cfg, timeout, stop)
    except BaseException:
        server.server_close()
        raise
    if leader is None and stop.is_set():
        server.server_close()
        return 0
    try:
        _serve(server, stop)
    finally:
        if leader is not None:
            leader.close()
    if leader is not None and leader.lost:
        raise StandinError(f"engine dead: {leader.lost[0]}")
    return 0


def _form_group(cfg: EngineConfig, timeout: float, stop: threading.Event) -> Leader | None:
    """Wait for every rank (multi-node only); None for a single node or when stopped."""
    if cfg.nnodes == 1:
        return None
    leader = Leader(cfg, stop)
    log.info(
        "DP group leader: node_rank=0, master_addr=%s, mq_connect_ip=%s; waiting for %d rank(s)",
        cfg.master_addr,
        cfg.host_ip,
        cfg.nnodes - 1,
    )
    leader.start()
    deadline = time.monotonic() + timeout
    while not leader.formed.wait(POLL_S):
        if stop.is_set():
            leader.close()
            return None
        if time.monotonic() >= deadline:
            summary = leader.summary()
            leader.close()
            raise StandinError(f"the group did not form within {timeout:g} s: {summary}")
    return leader


def _serve(server: EngineServer, stop: threading.Event) -> None:
    cfg = server.cfg
    server.server_activate()
    thread = threading.Thread(target=server.serve_forever, args=(0.1,), name="http", daemon=True)
    thread.start()
    log.info(
        "HTTP API listening on %s:%d (served model names %s)",
        cfg.host or "0.0.0.0",
        cfg.port,
        list(cfg.served_names),
    )
    try:
        while not stop.wait(POLL_S):
            pass
    finally:
        server.healthy = False
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def standin_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.engine_standin",
        description=(
            "CPU stand-in for `vllm serve` (vLLM 0.33.0) used by the offline rehearsal. It "
            "accepts exactly vLLM's flags, forms the multi-node group over TCP and serves "
            "vLLM's HTTP surface, but loads no model and runs no inference."
        ),
        epilog="Example: engine_standin.py serve Qwen/Qwen3-VL-2B-Instruct --port 8000 -tp 1",
    )
    parser.add_argument(
        "--join-timeout",
        type=float,
        default=float(
            os.environ.get("VLLM_ENGINE_READY_TIMEOUT_S", DEFAULT_ENGINE_READY_TIMEOUT_S)
        ),
        help="seconds the leader waits for all ranks and a worker tries to reach the leader "
        "and see the group form (default $VLLM_ENGINE_READY_TIMEOUT_S, else 600)",
    )
    parser.add_argument(
        "--token-delay", type=float, default=0.02, help="seconds per generated token (0.02)"
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="only parse and validate; print the modeled settings as JSON and exit",
    )
    parser.add_argument("command", choices=["serve"], help="the vllm subcommand (serve only)")
    parser.add_argument("serve_args", nargs=argparse.REMAINDER, help="`vllm serve` arguments")
    return parser


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    args = standin_parser().parse_args(argv)
    env = os.environ if env is None else env
    ns = parse_serve_args(args.serve_args, serve_options())
    try:
        cfg = build_config(ns, env)
        if cfg.host_ip:
            check_local_address(cfg.host_ip)
    except StandinError as err:
        print(f"ERROR engine stand-in: {err}", file=sys.stderr)
        return 1
    if args.check:
        print(json.dumps(cfg.describe(), indent=2))
        return 0
    _setup_logging(cfg.node_rank)
    return _run(cfg, args.join_timeout, args.token_delay)


def _setup_logging(rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format=f"%(levelname)s %(asctime)s [standin rank {rank}] %(message)s",
        datefmt="%m-%d %H:%M:%S",
    )


def _run(cfg: EngineConfig, timeout: float, token_delay: float) -> int:
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info(
        "%s. vLLM %s surface; config: %s", STANDIN_NOTICE, VLLM_VERSION, json.dumps(cfg.describe())
    )
    try:
        if cfg.is_leader:
            return run_leader(cfg, timeout, token_delay, stop)
        return run_worker(cfg, timeout, stop)
    except StandinError as err:
        log.error("%s", err)
        return 1


if __name__ == "__main__":
    sys.exit(main())

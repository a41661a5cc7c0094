"""vLLM 0.33's `vllm serve` options as data, and the check of a deployment's extraArgs against them.

The table is copied from vLLM 0.33's argparse parser (docs/reference/vllm.md says how); the
settings rules use it to refuse flags that do not exist or that the engine builder owns.
"""

from __future__ import annotations

import csv
import difflib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Final

FLAG_TABLE_FILE: Final = Path(__file__).parent / "data" / "vllm-0.33-serve-options.tsv"


@dataclass(frozen=True)
class FlagSpec:
    """One `vllm serve` option as vLLM 0.33's argparse parser defines it."""

    options: tuple[str, ...]
    dest: str
    default: str
    choices: tuple[str, ...]


@cache
def flag_table() -> Mapping[str, FlagSpec]:
    """Every option string of `vllm serve` (long and short forms) → its spec."""
    table: dict[str, FlagSpec] = {}
    with FLAG_TABLE_FILE.open(newline="") as f:
        rows = csv.reader((line for line in f if not line.startswith("#")), delimiter="\t")
        next(rows)  # header
        for _group, options, dest, default, choices in rows:
            names = tuple(o.strip() for o in options.split(","))
            spec = FlagSpec(names, dest, default, tuple(c for c in choices.split("|") if c))
            table.update((n, spec) for n in names if n.startswith("-"))
    return table


def known_vllm_flags() -> frozenset[str]:
    return frozenset(flag_table())


def _normal_flag(token: str) -> str:
    """The option string argparse matches: `--a_b=1` and `--a-b.sub` both name `--a-b`."""
    name = token.split("=", 1)[0]
    if name.startswith("--"):
        name = "--" + name[2:].replace("_", "-")
        # JSON-valued flags accept dotted sub-keys: --limit-mm-per-prompt.image 4
        base = name.split(".", 1)[0]
        if base in flag_table():
            return base
    return name


def flag_spec(token: str) -> FlagSpec | None:
    return flag_table().get(_normal_flag(token))


# Flags the builder sets itself, by dest, with what controls them; extraArgs may not repeat them.
OWNED_FLAGS: Final[Mapping[str, str]] = {
    "model_tag": "model (or weights.s3Uri)",
    "model": "model (or weights.s3Uri)",
    "revision": "revision",
    "served_model_name": "servedModelName",
    "tensor_parallel_size": "tensorParallel",
    "pipeline_parallel_size": "pipelineParallel",
    "nnodes": "nodesPerGroup",
    "node_rank": "nodesPerGroup (each pod's rank is its LeaderWorkerSet worker index)",
    "master_addr": "nodesPerGroup (the group leader's address)",
    "master_port": "nodesPerGroup (the fixed rendezvous port)",
    "headless": "nodesPerGroup (every rank but 0 runs headless)",
    "distributed_executor_backend": "nodesPerGroup (multi-node groups use the mp backend)",
    "distributed_timeout_seconds": "startupBudgetMinutes",
    "port": "the engine port the gateway and the probes use",
    "dtype": "dtype",
    "max_model_len": "maxModelLen",
    "gpu_memory_utilization": "gpuMemoryUtilization",
    "kv_cache_dtype": "kvCacheDtype",
    "limit_mm_per_prompt": "limitMmPerPrompt",
    "mm_encoder_tp_mode": "mmEncoderTpMode",
    "mm_processor_cache_gb": "mmProcessorCacheGb",
    "mm_processor_kwargs": "maxImagePixels (the image guard)",
    "ec_transfer_config": "vision (the encoder-cache connector of the vision tier)",
    "mm_encoder_only": "vision (only the encoder tier runs encoder-only)",
    "enable_request_id_headers": "vision (encoder and LLM match a request by X-Request-Id)",
    "scheduling_policy": "priorityScheduling (the gateway sets each request's priority)",
    "enable_expert_parallel": "expertParallel",
    "shutdown_timeout": "shutdownTimeoutSeconds",
    "load_format": "weights.s3Uri",
    "disable_access_log_for_endpoints": "the probe and metrics paths",
    # argparse keeps the last of two --kv-transfer-config, which would silently drop LMCache
    "kv_transfer_config": "kvOffloadRedis (LMCache with Redis, the one KV connector wired here)",
}


# Flags extraArgs may not use at all, with why.
FORBIDDEN_FLAGS: Final[Mapping[str, str]] = {
    "api_key": (
        "keys never go on a command line (visible in `ps` and the pod spec); the engines read "
        "VLLM_API_KEY from their Secret"
    ),
}


# Flags older tutorials use that 0.33 rejects, with what replaced them
# (docs/reference/vllm.md#removed-flags).
REPLACED_FLAGS: Final[Mapping[str, str]] = {
    "--worker-use-ray": "--distributed-executor-backend ray (needs Ray in the image)",
    "--engine-use-ray": "--distributed-executor-backend ray (needs Ray in the image)",
    "--disable-mm-preprocessor-cache": "mmProcessorCacheGb: 0",
    "--device": "nothing: the platform is detected",
    "--task": "--runner {generate,pooling,draft} or --convert",
    "--speculative-model": "--speculative-config (JSON)",
    "--num-speculative-tokens": "--speculative-config (JSON)",
    "--rope-scaling": "--hf-overrides (JSON)",
    "--enable-reasoning": "--reasoning-parser alone",
    "--guided-decoding-backend": "--structured-outputs-config (JSON)",
}


@dataclass(frozen=True)
class ExtraArgProblem:
    index: int
    token: str
    reason: str


def check_extra_args(args: Sequence[str]) -> list[ExtraArgProblem]:
    """Every extraArgs token that is not a real vLLM 0.33 flag or repeats a builder flag."""
    problems: list[ExtraArgProblem] = []
    for i, token in enumerate(args):
        if not _is_flag(token):
            if i == 0:
                problems.append(
                    ExtraArgProblem(
                        i,
                        token,
                        "expected a flag (--name) first; values follow the flag they belong to",
                    )
                )
            continue
        reason = _flag_problem(token)
        if reason:
            problems.append(ExtraArgProblem(i, token, reason))
    return problems


def _is_flag(token: str) -> bool:
    # "-1" is a value (e.g. --max-model-len -1), not a flag
    return token.startswith("-") and not re.match(r"^-\d", token)


def _flag_problem(token: str) -> str | None:
    name = _normal_flag(token)
    spec = flag_table().get(name)
    if spec is None:
        return f"not a `vllm serve` flag of vLLM 0.33; {_suggestion(name)}"
    if spec.dest in FORBIDDEN_FLAGS:
        return FORBIDDEN_FLAGS[spec.dest]
    owner = OWNED_FLAGS.get(spec.dest)
    if owner is not None:
        return f"{name} is set by the engine builder from {owner}; set that instead"
    return None


def _suggestion(name: str) -> str:
    if name in REPLACED_FLAGS:
        return f"it was replaced by {REPLACED_FLAGS[name]}"
    longs = [f for f in flag_table() if f.startswith("--")]
    close = difflib.get_close_matches(name, longs, n=1, cutoff=0.6)
    if close:
        return f"did you mean {close[0]}?"
    return f"the real ones are listed in stacks/data/{FLAG_TABLE_FILE.name}"


def parse_version(text: str) -> tuple[int, ...] | None:
    """`1.16.0` → (1, 16, 0); None for anything that is not dotted numbers."""
    if not re.fullmatch(r"\d+(\.\d+){1,3}", text):
        return None
    return tuple(int(part) for part in text.split("."))

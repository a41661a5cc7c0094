"""Capacity planner: does a Qwen3-VL deployment fit its node group, and how much KV cache is left?

The arithmetic follows docs/reference/qwen3-vl.md#kv-cache-per-token and docs/reference/vllm.md
(#multi-node-mp: TP may span nodes; #serve-flags: defaults):

- weights per GPU = text bytes / (TP x PP) + vision bytes / TP in "weights" encoder mode, or the
  full vision bytes in "data" mode (the encoder is replicated on every GPU); shares round up.
  The vision tower lives on the first pipeline stage only; the planner charges it to that stage,
  the fullest one, and reports that stage's numbers.
- KV bytes per token per GPU = 2 x ceil(layers / PP) x max(1, kv_heads // TP) x head_dim x dtype
  bytes; vLLM keeps at least one KV head per GPU, so TP beyond the KV-head count replicates heads.
- KV cache per GPU = floor(GPU memory x gpu_memory_utilization) - weights
  - ACTIVATION_RESERVE_BYTES.

A deployment runs one pod per node on all of the node's GPUs, so TP x PP must equal GPUs per node
x nodes. Every problem names the settings field (camelCase, as users write it) and a concrete fix.
The result is an estimate for planning; vLLM measures the real KV budget at startup.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from types import MappingProxyType
from typing import Literal, get_args

from stacks.catalog import (
    FP8_SUFFIX,
    GIB,
    KIB,
    MIB,
    InstanceType,
    ModelSpec,
    instance_type,
    model_spec,
)
from stacks.schema import DeploymentSettings, Settings

KvCacheDtype = Literal["auto", "bfloat16", "float16", "fp8", "fp8_e4m3", "fp8_e5m2"]
MmEncoderTpMode = Literal["weights", "data"]
PlanField = Literal[
    "tensorParallel",
    "pipelineParallel",
    "nodesPerGroup",
    "maxModelLen",
    "gpuMemoryUtilization",
    "kvCacheDtype",
    "mmEncoderTpMode",
    "expertParallel",
    "nodeGroup",
]

KV_CACHE_DTYPE_BYTES: Mapping[str, int] = MappingProxyType(
    # "auto" = the model dtype: bf16 for every Qwen3-VL checkpoint, the FP8 ones included (those
    # quantize weights only).
    {"auto": 2, "bfloat16": 2, "float16": 2, "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1}
)
MM_ENCODER_TP_MODES: tuple[str, ...] = get_args(MmEncoderTpMode)

ACTIVATION_RESERVE_BYTES = 2 * GIB
"""Per-GPU memory held back from the KV cache besides the weights.

vLLM's startup profiling run reserves the activation peak of a max-size batch, CUDA graph memory
and the multimodal encoder's dummy batch (Qwen3-VL profiles with dummy videos,
docs/reference/vllm.md#qwen3-vl-in-vllm).
The real figure is measured at startup and depends on flags; 2 GiB is a conservative fixed
stand-in so that plans fail here rather than at pod start.
"""

# /dev/shm sizing. NCCL's shared-memory transport and the mp executor's shm broadcast queues
# (docs/reference/vllm.md#multi-node-mp) live in /dev/shm; Docker's default 64 MiB breaks TP > 1. A
# lone single-GPU pod needs little (1 GiB); a pod with peers gets 2 GiB per local GPU, 16 GiB for 8
# GPUs, in line with the 15-20 GiB peers use for TP > 1 (docs/reference/peers.md#shm-too-small).
SHM_SINGLE_GPU_BYTES = 1 * GIB
SHM_PER_GPU_BYTES = 2 * GIB

FP8_BLOCK_N = 128
"""FP8 checkpoints quantize weights in 128-wide blocks; a TP shard of an expert must hold whole
blocks (FP8 block_n=128 + moe_intermediate_size=1536 -> TP must divide 12:
docs/reference/qwen3-vl.md#serving-guidance)."""

MAX_MODEL_LEN_STEP = 1024


@dataclass(frozen=True, kw_only=True)
class PlanRequest:
    model: ModelSpec
    instance: InstanceType
    tensor_parallel: int
    pipeline_parallel: int
    nodes_per_group: int
    max_model_len: int
    gpu_memory_utilization: float
    kv_cache_dtype: str = "auto"
    mm_encoder_tp_mode: str = "weights"
    expert_parallel: bool = False


@dataclass(frozen=True, kw_only=True)
class Plan:
    gpus_per_node: int
    gpus_per_group: int
    weight_bytes_per_gpu: int
    kv_bytes_per_token_per_gpu: int
    kv_bytes_per_token: int
    kv_cache_bytes_per_gpu: int
    kv_cache_tokens: int
    full_length_sequences: int
    min_shm_bytes: int


@dataclass(frozen=True)
class PlanProblem:
    field: PlanField
    value: object
    reason: str


def plan(request: PlanRequest) -> tuple[Plan | None, tuple[PlanProblem, ...]]:
    """Check a request and size it. Every problem is reported; the plan is None if there is any."""
    problems: list[PlanProblem] = []
    layout_ok = _check_layout(request, problems)
    _check_heads(request, problems)
    _check_experts(request, problems)
    settings_ok = _check_settings(request, problems)
    length_ok = _check_max_model_len(request, problems)
    if not (layout_ok and settings_ok):
        return None, tuple(problems)
    result = _size(request)
    problems.extend(_fit_problems(request, result, check_length=length_ok))
    return (None if problems else result), tuple(problems)


def format_bytes(n: int) -> str:
    sign = "-" if n < 0 else ""
    magnitude = abs(n)
    for unit, size in (("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if magnitude >= size:
            return f"{sign}{magnitude / size:.1f} {unit}"
    return f"{sign}{magnitude} B"


_TABLE_HEADER = (
    "deployment",
    "model",
    "instance x nodes",
    "TP x PP",
    "GPUs",
    "weights/GPU",
    "KV bytes/token (group)",
    "KV cache/GPU",
    "full-length seqs",
    "min shm",
)


def plan_table(rows: Sequence[tuple[str, Plan, PlanRequest]]) -> str:
    """Plain-text table, one line per deployment, columns padded to their widest cell."""
    return text_table([_TABLE_HEADER, *(_table_row(name, p, r) for name, p, r in rows)])


def text_table(cells: Sequence[Sequence[str]]) -> str:
    """A header row, a rule, then the rows; columns padded to their widest cell."""
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in cells
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines) + "\n"


def _table_row(name: str, p: Plan, r: PlanRequest) -> tuple[str, ...]:
    return (
        name,
        r.model.id,
        f"{r.instance.name} x {r.nodes_per_group}",
        f"{r.tensor_parallel} x {r.pipeline_parallel}",
        str(p.gpus_per_group),
        format_bytes(p.weight_bytes_per_gpu),
        f"{p.kv_bytes_per_token:,} B",
        format_bytes(p.kv_cache_bytes_per_gpu),
        f"{p.full_length_sequences} x {r.max_model_len}",
        format_bytes(p.min_shm_bytes),
    )


# --- sizing ---------------------------------------------------------------------------------------


def _size(r: PlanRequest) -> Plan:
    tp, pp = r.tensor_parallel, r.pipeline_parallel
    weights = _weight_bytes_per_gpu(r.model, tp, pp, r.mm_encoder_tp_mode)
    per_token = _kv_bytes_per_token_per_gpu(r.model, tp, pp, KV_CACHE_DTYPE_BYTES[r.kv_cache_dtype])
    kv_bytes = _usable_bytes_per_gpu(r) - weights
    tokens = max(kv_bytes, 0) // per_token
    return Plan(
        gpus_per_node=r.instance.gpus,
        gpus_per_group=r.instance.gpus * r.nodes_per_group,
        weight_bytes_per_gpu=weights,
        kv_bytes_per_token_per_gpu=per_token,
        kv_bytes_per_token=per_token * tp * pp,
        kv_cache_bytes_per_gpu=kv_bytes,
        kv_cache_tokens=tokens,
        # a non-positive max_model_len is reported as a problem; 0 sequences keeps the sizing total
        full_length_sequences=tokens // r.max_model_len if r.max_model_len > 0 else 0,
        min_shm_bytes=min_shm_bytes(r.instance.gpus, r.nodes_per_group),
    )


def _weight_bytes_per_gpu(model: ModelSpec, tp: int, pp: int, mm_encoder_tp_mode: str) -> int:
    text = _ceil_div(model.text_weight_bytes, tp * pp)
    vision = (
        model.vision_weight_bytes
        if mm_encoder_tp_mode == "data"
        else _ceil_div(model.vision_weight_bytes, tp)
    )
    return text + vision


def _kv_bytes_per_token_per_gpu(model: ModelSpec, tp: int, pp: int, dtype_bytes: int) -> int:
    heads = max(1, model.kv_heads // tp)
    return 2 * _ceil_div(model.layers, pp) * heads * model.head_dim * dtype_bytes


def _usable_bytes_per_gpu(r: PlanRequest) -> int:
    # Fraction(str(...)) takes the utilization as written (0.9 is exactly 9/10), so the floor is
    # not a byte off from the hand-computed figure.
    share = Fraction(str(r.gpu_memory_utilization))
    budget = math.floor(r.instance.gpu_memory_bytes * share)
    return budget - ACTIVATION_RESERVE_BYTES


def min_shm_bytes(gpus_per_node: int, nodes: int) -> int:
    if gpus_per_node == 1 and nodes == 1:
        return SHM_SINGLE_GPU_BYTES
    return SHM_PER_GPU_BYTES * gpus_per_node


# --- checks that need no sizing -------------------------------------------------------------------


def _check_layout(r: PlanRequest, problems: list[PlanProblem]) -> bool:
    """Node group, TP, PP and group size; True when the GPU layout is usable for sizing."""
    ok = True
    if r.instance.gpus == 0:
        reason = (
            f"{r.instance.name} has no GPUs; use a GPU instance type such as g6e.xlarge, "
            "g6e.48xlarge or p5.48xlarge"
        )
        problems.append(PlanProblem("nodeGroup", r.instance.name, reason))
        ok = False
    counts: tuple[tuple[PlanField, int], ...] = (
        ("tensorParallel", r.tensor_parallel),
        ("pipelineParallel", r.pipeline_parallel),
        ("nodesPerGroup", r.nodes_per_group),
    )
    for field, value in counts:
        if value < 1:
            problems.append(PlanProblem(field, value, "must be at least 1"))
            ok = False
    if not ok:
        return False
    if r.pipeline_parallel > r.model.layers:
        reason = (
            f"must not exceed the {r.model.layers} layers of {r.model.id} "
            "(each pipeline stage holds whole layers)"
        )
        problems.append(PlanProblem("pipelineParallel", r.pipeline_parallel, reason))
        ok = False
    gpus, tp = r.instance.gpus, r.tensor_parallel
    if gpus % tp and tp % gpus:
        reason = (
            f"must divide the {gpus} GPUs of {r.instance.name} (try {_or_join(_divisors(gpus))})"
        )
        problems.append(PlanProblem("tensorParallel", tp, reason))
        ok = False
    total = gpus * r.nodes_per_group
    if tp * r.pipeline_parallel != total:
        problems.append(_group_size_problem(r, total))
        ok = False
    return ok


def _group_size_problem(r: PlanRequest, total: int) -> PlanProblem:
    tp, pp, gpus = r.tensor_parallel, r.pipeline_parallel, r.instance.gpus
    fixes: list[str] = []
    if total % tp == 0 and total // tp <= r.model.layers:
        fixes.append(f"pipelineParallel {total // tp}")
    if (tp * pp) % gpus == 0:
        fixes.append(f"nodesPerGroup {tp * pp // gpus}")
    if not fixes:
        fixes.append(f"a tensorParallel x pipelineParallel of {total}")
    reason = (
        f"tensorParallel x pipelineParallel = {tp} x {pp} = {tp * pp} must equal the {total} GPUs "
        f"of the group ({r.nodes_per_group} x {r.instance.name} with {gpus} GPUs each); "
        f"try {_or_join(fixes)}"
    )
    return PlanProblem("pipelineParallel", pp, reason)


def _check_heads(r: PlanRequest, problems: list[PlanProblem]) -> None:
    model, tp = r.model, r.tensor_parallel
    if tp < 1:
        return
    head_divisors = _divisors(model.attention_heads)
    if model.attention_heads % tp:
        reason = (
            f"must divide the {model.attention_heads} attention heads of {model.id} "
            f"(try {_or_join(head_divisors)})"
        )
        problems.append(PlanProblem("tensorParallel", tp, reason))
    elif model.kv_heads % tp and tp % model.kv_heads:
        fits = [t for t in head_divisors if model.kv_heads % t == 0 or t % model.kv_heads == 0]
        reason = (
            f"must divide the {model.kv_heads} KV heads of {model.id} or be a multiple of them "
            f"(vLLM then replicates KV heads); try {_or_join(fits)}"
        )
        problems.append(PlanProblem("tensorParallel", tp, reason))


def _check_experts(r: PlanRequest, problems: list[PlanProblem]) -> None:
    model, tp = r.model, r.tensor_parallel
    if r.expert_parallel and not model.moe:
        reason = (
            f"{model.id} is a dense model; expert parallelism only applies to the MoE models "
            "(Qwen3-VL-30B-A3B, Qwen3-VL-235B-A22B); set expertParallel to false"
        )
        problems.append(PlanProblem("expertParallel", r.expert_parallel, reason))
        return
    if not (model.moe and model.fp8) or r.expert_parallel or tp < 1:
        return
    blocks = model.moe_intermediate_size // FP8_BLOCK_N
    if blocks % tp:
        tps = [t for t in _divisors(blocks) if model.attention_heads % t == 0]
        reason = (
            f"{model.id} stores each expert's {model.moe_intermediate_size}-wide MLP in FP8 blocks "
            f"of {FP8_BLOCK_N}, so tensor parallelism can split experts only {blocks} ways and "
            f"TP {tp} does not divide {blocks}; set expertParallel to true (the official TP8 "
            f"recipe does) or use tensorParallel {_or_join(tps)}"
        )
        problems.append(PlanProblem("expertParallel", r.expert_parallel, reason))


def _check_settings(r: PlanRequest, problems: list[PlanProblem]) -> bool:
    ok = True
    util = r.gpu_memory_utilization
    if not 0 < util <= 1:
        reason = (
            "must be in (0, 1]: the fraction of each GPU's memory vLLM may use "
            "(vLLM's default is 0.92)"
        )
        problems.append(PlanProblem("gpuMemoryUtilization", util, reason))
        ok = False
    if r.kv_cache_dtype not in KV_CACHE_DTYPE_BYTES:
        choices = _or_join(list(KV_CACHE_DTYPE_BYTES))
        reason = f"must be one of {choices}; fp8 halves the KV cache bytes per token"
        problems.append(PlanProblem("kvCacheDtype", r.kv_cache_dtype, reason))
        ok = False
    if r.mm_encoder_tp_mode not in MM_ENCODER_TP_MODES:
        reason = f"must be {_or_join(list(MM_ENCODER_TP_MODES))}"
        problems.append(PlanProblem("mmEncoderTpMode", r.mm_encoder_tp_mode, reason))
        ok = False
    return ok


def _check_max_model_len(r: PlanRequest, problems: list[PlanProblem]) -> bool:
    limit = r.model.max_context
    if 1 <= r.max_model_len <= limit:
        return True
    reason = (
        f"must be between 1 and {limit}, the max_position_embeddings of {r.model.id} "
        "(longer contexts need YaRN rope scaling, which this planner does not model)"
    )
    problems.append(PlanProblem("maxModelLen", r.max_model_len, reason))
    return False


# --- checks on the sized plan ---------------------------------------------------------------------


def _fit_problems(r: PlanRequest, p: Plan, *, check_length: bool) -> list[PlanProblem]:
    if p.kv_cache_bytes_per_gpu <= 0:
        return [_weights_problem(r, p)]
    if check_length and p.full_length_sequences < 1:
        return [_length_problem(r, p)]
    return []


def _weights_problem(r: PlanRequest, p: Plan) -> PlanProblem:
    tp, pp = r.tensor_parallel, r.pipeline_parallel
    fixes: list[str] = []
    bigger = _smallest_group_that_fits(r)
    if bigger is not None:
        nodes, stages = bigger
        fixes.append(f"nodesPerGroup {nodes} with pipelineParallel {stages}")
    fp8 = None if r.model.fp8 else model_spec(r.model.id + FP8_SUFFIX)
    if fp8 is not None:
        fp8_weights = _weight_bytes_per_gpu(fp8, tp, pp, r.mm_encoder_tp_mode)
        fixes.append(
            f"the FP8 checkpoint {fp8.id} ({format_bytes(fp8_weights)} per GPU at this layout)"
        )
    fixes.append("an instance type with more or larger GPUs")
    reason = (
        f"the weights need {format_bytes(p.weight_bytes_per_gpu)} per GPU at TP {tp} x PP {pp}, "
        f"but only {format_bytes(_usable_bytes_per_gpu(r))} is usable "
        f"({r.instance.gpu_memory_mib} MiB x {r.gpu_memory_utilization} minus the "
        f"{format_bytes(ACTIVATION_RESERVE_BYTES)} activation reserve): "
        f"{format_bytes(-p.kv_cache_bytes_per_gpu)} missing and nothing left for KV cache; "
        f"use {_or_join(fixes)}"
    )
    return PlanProblem("nodesPerGroup", r.nodes_per_group, reason)


def _smallest_group_that_fits(r: PlanRequest) -> tuple[int, int] | None:
    """(nodes, PP) of the smallest larger group, same TP, whose weights leave room for KV cache."""
    gpus, tp = r.instance.gpus, r.tensor_parallel
    usable = _usable_bytes_per_gpu(r)
    max_nodes = r.model.layers * tp // gpus  # beyond this PP would exceed the layer count
    for nodes in range(r.nodes_per_group + 1, max_nodes + 1):
        if (nodes * gpus) % tp:
            continue
        stages = nodes * gpus // tp
        if usable - _weight_bytes_per_gpu(r.model, tp, stages, r.mm_encoder_tp_mode) > 0:
            return nodes, stages
    return None


def _length_problem(r: PlanRequest, p: Plan) -> PlanProblem:
    fixes: list[str] = []
    longest = p.kv_cache_tokens // MAX_MODEL_LEN_STEP * MAX_MODEL_LEN_STEP
    if longest >= MAX_MODEL_LEN_STEP:
        fixes.append(
            f"maxModelLen {longest} (the largest multiple of {MAX_MODEL_LEN_STEP} that fits)"
        )
    if KV_CACHE_DTYPE_BYTES[r.kv_cache_dtype] > 1:
        fp8_per_token = _kv_bytes_per_token_per_gpu(
            r.model, r.tensor_parallel, r.pipeline_parallel, 1
        )
        fixes.append(
            f"kvCacheDtype fp8 (room for {p.kv_cache_bytes_per_gpu // fp8_per_token} tokens)"
        )
    fixes.append("more GPUs per group (nodesPerGroup)")
    needed = r.max_model_len * p.kv_bytes_per_token_per_gpu
    reason = (
        f"one {r.max_model_len}-token sequence needs {format_bytes(needed)} of KV cache per GPU, "
        f"but only {format_bytes(p.kv_cache_bytes_per_gpu)} is left after the weights "
        f"(room for {p.kv_cache_tokens} tokens); use {_or_join(fixes)}"
    )
    return PlanProblem("maxModelLen", r.max_model_len, reason)


# --- helpers --------------------------------------------------------------------------------------


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _or_join(items: Sequence[object]) -> str:
    words = [str(item) for item in items]
    if len(words) <= 1:
        return "".join(words)
    return f"{', '.join(words[:-1])} or {words[-1]}"


def plan_for(settings: Settings, d: DeploymentSettings) -> Plan | None:
    """The capacity plan of a valid deployment (None when its inputs are invalid)."""
    request = plan_request(settings, d)
    return None if request is None else plan(request)[0]


def plan_request(settings: Settings, d: DeploymentSettings) -> PlanRequest | None:
    group = next((g for g in settings.gpu_node_groups if g.name == d.node_group), None)
    model = model_spec(d.model)
    instance = instance_type(group.instance_type) if group else None
    if model is None or instance is None:
        return None
    return PlanRequest(
        model=model,
        instance=instance,
        tensor_parallel=d.tensor_parallel,
        pipeline_parallel=d.pipeline_parallel,
        nodes_per_group=d.nodes_per_group,
        max_model_len=d.max_model_len,
        gpu_memory_utilization=d.gpu_memory_utilization,
        kv_cache_dtype=d.kv_cache_dtype,
        mm_encoder_tp_mode=d.mm_encoder_tp_mode,
        expert_parallel=d.expert_parallel,
    )

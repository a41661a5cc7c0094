"""Planner cases computed by hand (arithmetic in the comments), not with the module's own helpers.

Constants used below: GiB = 1,073,741,824 B; activation reserve 2 GiB = 2,147,483,648 B.
GPU memory (docs/reference/aws-efa.md#efa-instance-types, MiB x 1,048,576): H100 81,920 MiB = 85,899,345,920 B;
L40S 45,776 MiB = 47,999,614,976 B; L4 22,888 MiB = 23,999,807,488 B.
"""

from __future__ import annotations

import re
from typing import get_args

import pytest

from stacks.catalog import InstanceType, ModelSpec, instance_type, model_spec
from stacks.planner import (
    KV_CACHE_DTYPE_BYTES,
    KvCacheDtype,
    Plan,
    PlanProblem,
    PlanRequest,
    format_bytes,
    plan,
    plan_table,
)

GIB = 1_073_741_824


def _instance(name: str) -> InstanceType:
    found = instance_type(name)
    assert found is not None, name
    return found


def _model(model_id: str) -> ModelSpec:
    found = model_spec(model_id)
    assert found is not None, model_id
    return found


def _request(
    model: str | ModelSpec,
    instance: str,
    *,
    tp: int,
    pp: int = 1,
    nodes: int = 1,
    max_len: int,
    util: float = 0.9,
    kv: str = "auto",
    mm: str = "weights",
    ep: bool = False,
) -> PlanRequest:
    return PlanRequest(
        model=_model(model) if isinstance(model, str) else model,
        instance=_instance(instance),
        tensor_parallel=tp,
        pipeline_parallel=pp,
        nodes_per_group=nodes,
        max_model_len=max_len,
        gpu_memory_utilization=util,
        kv_cache_dtype=kv,
        mm_encoder_tp_mode=mm,
        expert_parallel=ep,
    )


def _ok(request: PlanRequest) -> Plan:
    result, problems = plan(request)
    assert problems == ()
    assert result is not None
    return result


def _problems(request: PlanRequest) -> tuple[PlanProblem, ...]:
    result, problems = plan(request)
    assert result is None
    return problems


# --- sized plans ----------------------------------------------------------------------------------


def test_235b_bf16_on_two_p5_tp8_pp2() -> None:
    p = _ok(
        _request(
            "Qwen/Qwen3-VL-235B-A22B-Instruct", "p5.48xlarge", tp=8, pp=2, nodes=2, max_len=131072
        )
    )
    assert (p.gpus_per_node, p.gpus_per_group) == (8, 16)
    # text 235,090,000,000 x 2 = 470,180,000,000 B; vision 576,000,000 x 2 = 1,152,000,000 B
    # weights/GPU = 470,180,000,000 / 16 + 1,152,000,000 / 8 = 29,386,250,000 + 144,000,000
    assert p.weight_bytes_per_gpu == 29_530_250_000
    # 2 x ceil(94/2) x max(1, 4 // 8) x 128 x 2 = 2 x 47 x 1 x 128 x 2
    assert p.kv_bytes_per_token_per_gpu == 24064
    # 24,064 x 16 GPUs = 385,024 = 2 x 192,512 (docs/reference/qwen3-vl.md#kv-cache-per-token, bf16 row: 4 KV heads replicated at TP8)
    assert p.kv_bytes_per_token == 385024
    # floor(85,899,345,920 x 0.9) = 77,309,411,328; - 29,530,250,000 - 2,147,483,648
    assert p.kv_cache_bytes_per_gpu == 45_631_677_680
    # 45,631,677,680 // 24,064 = 1,896,263 (24,064 x 1,896,263 = 45,631,672,832)
    assert p.kv_cache_tokens == 1_896_263
    # 1,896,263 // 131,072 = 14 (14 x 131,072 = 1,835,008)
    assert p.full_length_sequences == 14
    # 8 local GPUs x 2 GiB
    assert p.min_shm_bytes == 16 * GIB


def test_2b_on_g6e_xlarge_tp1() -> None:
    p = _ok(_request("Qwen/Qwen3-VL-2B-Instruct", "g6e.xlarge", tp=1, max_len=32768))
    assert (p.gpus_per_node, p.gpus_per_group) == (1, 1)
    # 1,721,000,000 x 2 + 407,000,000 x 2 = 3,442,000,000 + 814,000,000
    assert p.weight_bytes_per_gpu == 4_256_000_000
    # 2 x 28 x 8 x 128 x 2 (docs/reference/qwen3-vl.md#kv-cache-per-token, 2B bf16)
    assert p.kv_bytes_per_token_per_gpu == p.kv_bytes_per_token == 114688
    # floor(47,999,614,976 x 0.9) = floor(43,199,653,478.4) = 43,199,653,478;
    # - 4,256,000,000 - 2,147,483,648
    assert p.kv_cache_bytes_per_gpu == 36_796_169_830
    # 36,796,169,830 // 114,688 = 320,837; // 32,768 = 9 (9 x 32,768 = 294,912)
    assert p.kv_cache_tokens == 320_837
    assert p.full_length_sequences == 9
    # one GPU, one node
    assert p.min_shm_bytes == 1 * GIB


def test_32b_over_two_g6e_24xlarge_tp4_pp2() -> None:
    p = _ok(
        _request("Qwen/Qwen3-VL-32B-Instruct", "g6e.24xlarge", tp=4, pp=2, nodes=2, max_len=32768)
    )
    assert (p.gpus_per_node, p.gpus_per_group) == (4, 8)
    # 32,760,000,000 x 2 / 8 + 595,000,000 x 2 / 4 = 8,190,000,000 + 297,500,000
    assert p.weight_bytes_per_gpu == 8_487_500_000
    # 2 x ceil(64/2) x (8 // 4) x 128 x 2 = 2 x 32 x 2 x 128 x 2
    assert p.kv_bytes_per_token_per_gpu == 32768
    # 32,768 x 8 = 262,144 = the 32B bf16 row of docs/reference/qwen3-vl.md#kv-cache-per-token (8 KV heads, no replication at TP4)
    assert p.kv_bytes_per_token == 262144
    # 43,199,653,478 - 8,487,500,000 - 2,147,483,648
    assert p.kv_cache_bytes_per_gpu == 32_564_669_830
    # 32,564,669,830 // 32,768 = 993,794; // 32,768 = 30 (30 x 32,768 = 983,040)
    assert p.kv_cache_tokens == 993_794
    assert p.full_length_sequences == 30
    # 4 local GPUs x 2 GiB
    assert p.min_shm_bytes == 8 * GIB


def test_30b_a3b_tp8_replicates_kv_heads() -> None:
    p = _ok(_request("Qwen/Qwen3-VL-30B-A3B-Instruct", "p5.48xlarge", tp=8, max_len=65536))
    # 30,530,000,000 x 2 / 8 + 539,000,000 x 2 / 8 = 7,632,500,000 + 134,750,000
    assert p.weight_bytes_per_gpu == 7_767_250_000
    # 2 x 48 x max(1, 4 // 8 = 0) x 128 x 2 = 24,576
    assert p.kv_bytes_per_token_per_gpu == 24576
    # 24,576 x 8 = 196,608 = 2 x 98,304 (docs/reference/qwen3-vl.md#kv-cache-per-token, value): each of the 4 KV heads is on 2 GPUs
    assert p.kv_bytes_per_token == 2 * 98304
    # 77,309,411,328 - 7,767,250,000 - 2,147,483,648 = 67,394,677,680;
    # // 24,576 = 2,742,296 tokens; // 65,536 = 41 sequences
    assert p.kv_cache_bytes_per_gpu == 67_394_677_680
    assert p.kv_cache_tokens == 2_742_296
    assert p.full_length_sequences == 41


def test_fp8_kv_cache_halves_bytes_per_token() -> None:
    auto = _ok(_request("Qwen/Qwen3-VL-8B-Instruct", "g6e.xlarge", tp=1, max_len=32768))
    fp8 = _ok(_request("Qwen/Qwen3-VL-8B-Instruct", "g6e.xlarge", tp=1, max_len=32768, kv="fp8"))
    # weights 8,191,000,000 x 2 + 576,000,000 x 2 = 17,534,000,000 either way
    assert auto.weight_bytes_per_gpu == fp8.weight_bytes_per_gpu == 17_534_000_000
    # 43,199,653,478 - 17,534,000,000 - 2,147,483,648 = 23,518,169,830
    assert auto.kv_cache_bytes_per_gpu == fp8.kv_cache_bytes_per_gpu == 23_518_169_830
    # 2 x 36 x 8 x 128 x 2 = 147,456 (bf16) vs x 1 byte = 73,728 (fp8), docs/reference/qwen3-vl.md#kv-cache-per-token
    assert (auto.kv_bytes_per_token, fp8.kv_bytes_per_token) == (147456, 73728)
    # 23,518,169,830 // 147,456 = 159,492 (4 x 32,768 fit); // 73,728 = 318,985 (9 fit)
    assert (auto.kv_cache_tokens, auto.full_length_sequences) == (159_492, 4)
    assert (fp8.kv_cache_tokens, fp8.full_length_sequences) == (318_985, 9)


def test_fp8_moe_with_expert_parallel_and_data_mode_encoder() -> None:
    weights = _ok(
        _request(
            "Qwen/Qwen3-VL-235B-A22B-Instruct-FP8", "p5.48xlarge", tp=8, max_len=131072, ep=True
        )
    )
    data = _ok(
        _request(
            "Qwen/Qwen3-VL-235B-A22B-Instruct-FP8",
            "p5.48xlarge",
            tp=8,
            max_len=131072,
            ep=True,
            mm="data",
        )
    )
    # FP8 text 235,090,000,000 x 1 / 8 = 29,386,250,000;
    # bf16 vision 1,152,000,000 / 8 = 144,000,000 (weights mode)
    assert weights.weight_bytes_per_gpu == 29_530_250_000
    # data mode keeps the whole vision tower on every GPU: 29,386,250,000 + 1,152,000,000
    assert data.weight_bytes_per_gpu == 30_538_250_000
    # 2 x 94 x 1 x 128 x 2 = 48,128 per GPU (one stage holds all 94 layers)
    assert weights.kv_bytes_per_token_per_gpu == 48128
    # 77,309,411,328 - 29,530,250,000 - 2,147,483,648 = 45,631,677,680;
    # // 48,128 = 948,131 tokens → 7 x 131,072
    assert (weights.kv_cache_tokens, weights.full_length_sequences) == (948_131, 7)
    # 77,309,411,328 - 30,538,250,000 - 2,147,483,648 = 44,623,677,680 // 48,128 = 927,187
    assert data.kv_cache_bytes_per_gpu == 44_623_677_680
    assert data.kv_cache_tokens == 927_187


def test_single_gpu_pods_in_a_two_node_group_get_per_gpu_shm() -> None:
    p = _ok(
        _request(
            "Qwen/Qwen3-VL-4B-Instruct", "p5.4xlarge", tp=1, pp=2, nodes=2, max_len=65536, util=0.92
        )
    )
    # 4,022,000,000 x 2 / 2 + 415,000,000 x 2 / 1 = 4,022,000,000 + 830,000,000
    assert p.weight_bytes_per_gpu == 4_852_000_000
    # floor(85,899,345,920 x 0.92) = floor(79,027,398,246.4); - 4,852,000,000 - 2,147,483,648
    assert p.kv_cache_bytes_per_gpu == 72_027_914_598
    # 2 x ceil(36/2) x 8 x 128 x 2 = 73,728 per GPU; x 2 GPUs = 147,456 (docs/reference/qwen3-vl.md#kv-cache-per-token, 4B bf16)
    assert (p.kv_bytes_per_token_per_gpu, p.kv_bytes_per_token) == (73728, 147456)
    # 72,027,914,598 // 73,728 = 976,941; // 65,536 = 14
    assert (p.kv_cache_tokens, p.full_length_sequences) == (976_941, 14)
    # one local GPU, but the group spans two nodes: 2 GiB x 1
    assert p.min_shm_bytes == 2 * GIB


# --- problems -------------------------------------------------------------------------------------


def test_tp3_on_p5_48xlarge() -> None:
    problems = _problems(_request("Qwen/Qwen3-VL-8B-Instruct", "p5.48xlarge", tp=3, max_len=32768))
    assert (
        PlanProblem("tensorParallel", 3, "must divide the 8 GPUs of p5.48xlarge (try 1, 2, 4 or 8)")
        in problems
    )
    # 3 x 1 != 8, and 32 attention heads do not split 3 ways either
    assert [p.field for p in problems] == ["tensorParallel", "pipelineParallel", "tensorParallel"]
    assert "32 attention heads" in problems[2].reason


def test_tp_times_pp_must_fill_the_group() -> None:
    (one,) = _problems(_request("Qwen/Qwen3-VL-8B-Instruct", "p5.48xlarge", tp=4, max_len=32768))
    assert (one.field, one.value) == ("pipelineParallel", 1)
    assert "4 x 1 = 4 must equal the 8 GPUs" in one.reason
    assert one.reason.endswith(
        "try pipelineParallel 2"
    )  # 8 / 4; 4 GPUs are not a whole number of nodes
    (two,) = _problems(
        _request("Qwen/Qwen3-VL-235B-A22B-Instruct", "p5.48xlarge", tp=8, nodes=2, max_len=32768)
    )
    # 16 GPUs / TP 8 = PP 2, or keep PP 1 on 8 / 8 = 1 node
    assert two.reason.endswith("try pipelineParallel 2 or nodesPerGroup 1")


def test_235b_bf16_does_not_fit_one_g6e_xlarge() -> None:
    request = _request("Qwen/Qwen3-VL-235B-A22B-Instruct", "g6e.xlarge", tp=1, max_len=32768)
    (problem,) = _problems(request)
    assert (problem.field, problem.value) == ("nodesPerGroup", 1)
    # weights 470,180,000,000 + 1,152,000,000 = 471,332,000,000;
    # usable 43,199,653,478 - 2,147,483,648 = 41,052,169,830 (38.2 GiB);
    # missing 430,279,830,170 B = 400.7 GiB
    assert "only 38.2 GiB is usable" in problem.reason
    assert "400.7 GiB missing" in problem.reason
    # PP n needs 470,180,000,000 / n + 1,152,000,000 < 41,052,169,830 → n > 11.78 → 12 nodes
    assert "nodesPerGroup 12 with pipelineParallel 12" in problem.reason
    # FP8: 235,090,000,000 + 1,152,000,000 = 236,242,000,000 B = 220.0 GiB per GPU at TP1 PP1
    assert "Qwen/Qwen3-VL-235B-A22B-Instruct-FP8 (220.0 GiB per GPU" in problem.reason
    # the suggested group fits: weights ceil(470,180,000,000 / 12) + 1,152,000,000 = 40,333,666,667;
    # KV 41,052,169,830 - 40,333,666,667 = 718,503,163 B;
    # per token 2 x ceil(94/12)=8 x 4 x 128 x 2 = 16,384
    # → 43,853 tokens, one 32,768-token sequence
    p = _ok(
        _request(
            "Qwen/Qwen3-VL-235B-A22B-Instruct", "g6e.xlarge", tp=1, pp=12, nodes=12, max_len=32768
        )
    )
    assert (p.kv_cache_bytes_per_gpu, p.kv_cache_tokens, p.full_length_sequences) == (
        718_503_163,
        43_853,
        1,
    )


def test_max_model_len_too_big_for_memory_suggests_one_that_fits() -> None:
    (problem,) = _problems(_request("Qwen/Qwen3-VL-2B-Instruct", "g6.xlarge", tp=1, max_len=262144))
    assert (problem.field, problem.value) == ("maxModelLen", 262144)
    # floor(23,999,807,488 x 0.9) = 21,599,826,739; - 4,256,000,000 - 2,147,483,648 = 15,196,343,091
    # // 114,688 = 132,501 tokens → 129 x 1024 = 132,096; fp8 KV: // 57,344 = 265,003 tokens
    assert "room for 132501 tokens" in problem.reason
    assert "kvCacheDtype fp8 (room for 265003 tokens)" in problem.reason
    match = re.search(r"maxModelLen (\d+)", problem.reason)
    assert match is not None
    suggested = int(match.group(1))
    assert suggested == 132096
    p = _ok(_request("Qwen/Qwen3-VL-2B-Instruct", "g6.xlarge", tp=1, max_len=suggested))
    assert p.full_length_sequences == 1
    assert _ok(_request("Qwen/Qwen3-VL-2B-Instruct", "g6.xlarge", tp=1, max_len=262144, kv="fp8"))


def test_expert_parallel_on_dense_model() -> None:
    (problem,) = _problems(
        _request("Qwen/Qwen3-VL-8B-Instruct", "p5.48xlarge", tp=8, max_len=32768, ep=True)
    )
    assert (problem.field, problem.value) == ("expertParallel", True)
    assert "dense" in problem.reason
    assert "set expertParallel to false" in problem.reason


def test_fp8_moe_tp8_needs_expert_parallel() -> None:
    # Moe_intermediate_size 1536 / block_n 128 = 12 → TP must divide 12 (see docs/reference/qwen3-vl.md#fp8-checkpoints).
    (problem,) = _problems(
        _request("Qwen/Qwen3-VL-235B-A22B-Instruct-FP8", "p5.48xlarge", tp=8, max_len=131072)
    )
    assert (problem.field, problem.value) == ("expertParallel", False)
    assert "TP 8 does not divide 12" in problem.reason
    # divisors of 12 that also divide 64 heads: 1, 2, 4 ("cap at 4", docs/reference/qwen3-vl.md#serving-guidance)
    assert "set expertParallel to true" in problem.reason
    assert "tensorParallel 1, 2 or 4" in problem.reason
    # 30B-A3B-FP8: 768 / 128 = 6 → TP4 fails as well; divisors of 6 that divide 32 heads: 1, 2
    (small,) = _problems(
        _request("Qwen/Qwen3-VL-30B-A3B-Instruct-FP8", "g6e.24xlarge", tp=4, max_len=32768)
    )
    assert "TP 4 does not divide 6" in small.reason
    assert "tensorParallel 1 or 2" in small.reason
    # bf16 MoE has no block constraint
    assert _ok(_request("Qwen/Qwen3-VL-30B-A3B-Instruct", "g6e.24xlarge", tp=4, max_len=32768))


def test_attention_heads_must_divide_by_tp() -> None:
    # TP 32 spans 4 nodes legally (32 = 4 x 8), but 2B has only 16 attention heads
    (problem,) = _problems(
        _request("Qwen/Qwen3-VL-2B-Instruct", "p5.48xlarge", tp=32, nodes=4, max_len=32768)
    )
    assert problem == PlanProblem(
        "tensorParallel",
        32,
        "must divide the 16 attention heads of Qwen/Qwen3-VL-2B-Instruct (try 1, 2, 4, 8 or 16)",
    )


def test_kv_heads_must_divide_tp_or_the_reverse() -> None:
    odd = ModelSpec(
        id="test/odd-heads",
        layers=24,
        hidden_size=3072,
        attention_heads=24,
        kv_heads=8,
        head_dim=128,
        text_params=1_000_000_000,
        vision_params=0,
        moe=False,
        experts=0,
        moe_intermediate_size=0,
        max_context=32768,
        fp8=False,
    )
    # TP 12 over 3 x g6e.12xlarge (4 GPUs each): 24 % 12 == 0, but 8 % 12 and 12 % 8 are not
    (problem,) = _problems(_request(odd, "g6e.12xlarge", tp=12, nodes=3, max_len=4096))
    assert problem.field == "tensorParallel"
    assert "8 KV heads" in problem.reason
    # divisors of 24 that divide 8 or are multiples of 8
    assert problem.reason.endswith("try 1, 2, 4, 8 or 24")


def test_all_problems_are_collected_at_once() -> None:
    # 32B bf16 on one g6e.xlarge: dense model with expertParallel, maxModelLen above 262,144, and
    # weights of 65,520,000,000 + 1,190,000,000 = 66,710,000,000 B > 41,052,169,830 B usable
    request = _request("Qwen/Qwen3-VL-32B-Instruct", "g6e.xlarge", tp=1, max_len=300000, ep=True)
    problems = _problems(request)
    assert sorted(p.field for p in problems) == ["expertParallel", "maxModelLen", "nodesPerGroup"]


def test_invalid_settings() -> None:
    request = _request(
        "Qwen/Qwen3-VL-8B-Instruct", "p5.48xlarge", tp=8, max_len=0, util=1.5, kv="int4", mm="both"
    )
    problems = _problems(request)
    assert [(p.field, p.value) for p in problems] == [
        ("gpuMemoryUtilization", 1.5),
        ("kvCacheDtype", "int4"),
        ("mmEncoderTpMode", "both"),
        ("maxModelLen", 0),
    ]
    assert "262144" in problems[3].reason


def test_cpu_instance_is_a_node_group_problem() -> None:
    problems = _problems(_request("Qwen/Qwen3-VL-2B-Instruct", "m7i.xlarge", tp=1, max_len=32768))
    assert [(p.field, p.value) for p in problems] == [("nodeGroup", "m7i.xlarge")]
    assert "no GPUs" in problems[0].reason


def test_pipeline_deeper_than_layers() -> None:
    problems = _problems(
        _request("Qwen/Qwen3-VL-2B-Instruct", "g6e.xlarge", tp=1, pp=32, nodes=32, max_len=4096)
    )
    assert [(p.field, p.value) for p in problems] == [("pipelineParallel", 32)]
    assert "28 layers" in problems[0].reason


def test_kv_dtype_table_covers_the_literal() -> None:
    assert tuple(KV_CACHE_DTYPE_BYTES) == get_args(KvCacheDtype)


# --- rendering ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (16 * GIB, "16.0 GiB"),
        (1536 * 1_048_576, "1.5 GiB"),
        (512 * 1024, "512.0 KiB"),
        (100, "100 B"),
        (-3 * GIB // 2, "-1.5 GiB"),
        (5 * 1_048_576, "5.0 MiB"),
    ],
)
def test_format_bytes(n: int, text: str) -> None:
    assert format_bytes(n) == text


def test_plan_table() -> None:
    big = _request(
        "Qwen/Qwen3-VL-235B-A22B-Instruct", "p5.48xlarge", tp=8, pp=2, nodes=2, max_len=131072
    )
    small = _request("Qwen/Qwen3-VL-2B-Instruct", "g6e.xlarge", tp=1, max_len=32768)
    text = plan_table([("prod", _ok(big), big), ("dev", _ok(small), small)])
    lines = text.splitlines()
    assert len(lines) == 4  # header, rule, two rows
    header = re.split(r"\s{2,}", lines[0])
    assert header == [
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
    ]
    assert set(lines[1]) == {"-", " "}
    prod = re.split(r"\s{2,}", lines[2])
    # 29,530,250,000 B / GiB = 27.50; 45,631,677,680 B / GiB = 42.50
    assert prod == [
        "prod",
        "Qwen/Qwen3-VL-235B-A22B-Instruct",
        "p5.48xlarge x 2",
        "8 x 2",
        "16",
        "27.5 GiB",
        "385,024 B",
        "42.5 GiB",
        "14 x 131072",
        "16.0 GiB",
    ]
    dev = re.split(r"\s{2,}", lines[3])
    # 4,256,000,000 B = 4.0 GiB; 36,796,169,830 B = 34.27 GiB
    assert dev == [
        "dev",
        "Qwen/Qwen3-VL-2B-Instruct",
        "g6e.xlarge x 1",
        "1 x 1",
        "1",
        "4.0 GiB",
        "114,688 B",
        "34.3 GiB",
        "9 x 32768",
        "1.0 GiB",
    ]
    # columns line up: every row starts its 3rd cell at the same offset as the header
    offset = lines[0].index("instance x nodes")
    assert lines[2][offset:].startswith("p5.48xlarge x 2")
    assert lines[3][offset:].startswith("g6e.xlarge x 1")

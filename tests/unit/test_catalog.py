"""Catalog rows against docs/reference/aws-efa.md and docs/reference/qwen3-vl.md.

Every expected number is written out here, copied from the facts tables.
"""

from __future__ import annotations

import pytest

from stacks.catalog import (
    INSTANCE_TYPES,
    MODELS,
    PHC_REGIONS,
    InstanceType,
    ModelSpec,
    instance_type,
    model_spec,
    supports_phc,
)


def _get(name: str) -> InstanceType:
    found = instance_type(name)
    assert found is not None, name
    return found


# --- instance types (docs/reference/aws-efa.md, docs/reference/eks-nodes.md#phc-support) ----------------------------------------------------------


def test_p5_48xlarge_matches_facts_table() -> None:
    p5 = _get("p5.48xlarge")
    assert (p5.gpus, p5.gpu_model, p5.gpu_memory_mib) == (8, "H100", 81920)
    assert (p5.vcpus, p5.memory_gib, p5.network_gbps) == (192, 2048, 3200)
    assert (p5.efa_interfaces, p5.network_cards) == (32, 32)
    assert p5.efa_supported
    assert p5.gpu_memory_bytes == 85_899_345_920  # 81920 x 1,048,576


@pytest.mark.parametrize(
    ("name", "efa", "cards"),
    [
        ("p5en.48xlarge", 16, 16),
        ("p5e.48xlarge", 32, 32),
        ("p4d.24xlarge", 4, 4),
        ("p4de.24xlarge", 4, 4),
        ("p6-b200.48xlarge", 8, 8),
        ("p6-b300.48xlarge", 16, 17),
        ("p5.4xlarge", 1, 1),
        ("g6e.48xlarge", 4, 4),
        ("g6e.24xlarge", 2, 2),
        ("g5.48xlarge", 1, 1),
        ("g6.12xlarge", 1, 1),
    ],
)
def test_efa_interfaces_and_network_cards(name: str, efa: int, cards: int) -> None:
    row = _get(name)
    assert (row.efa_interfaces, row.network_cards) == (efa, cards)


def test_gpu_memory_per_family() -> None:
    assert _get("p4d.24xlarge").gpu_memory_mib == 40960
    assert _get("p4de.24xlarge").gpu_memory_mib == 81920
    assert _get("p5e.48xlarge").gpu_memory_mib == 144384
    assert _get("p6-b200.48xlarge").gpu_memory_mib == 183359
    assert _get("g5.xlarge").gpu_memory_mib == 22888
    assert _get("g6.2xlarge").gpu_memory_mib == 22888
    assert _get("g6e.12xlarge").gpu_memory_mib == 45776


def test_g6e_24xlarge() -> None:
    g = _get("g6e.24xlarge")
    assert (g.gpus, g.gpu_model, g.vcpus, g.memory_gib, g.network_gbps) == (4, "L40S", 96, 768, 200)
    assert g.efa_interfaces == 2


def test_g6e_xlarge_has_no_efa() -> None:
    g = _get("g6e.xlarge")
    assert (g.gpus, g.vcpus, g.memory_gib) == (1, 4, 32)
    assert g.efa_interfaces == 0
    assert not g.efa_supported


def test_g_sizes_gpu_counts_and_memory() -> None:
    sizes = ("xlarge", "8xlarge", "12xlarge", "16xlarge", "24xlarge", "48xlarge")
    assert [_get(f"g5.{size}").gpus for size in sizes] == [1, 1, 4, 1, 4, 8]
    assert (_get("g6.16xlarge").vcpus, _get("g6.16xlarge").memory_gib) == (64, 256)
    assert (_get("g6e.16xlarge").vcpus, _get("g6e.16xlarge").memory_gib) == (64, 512)
    assert (_get("g6e.48xlarge").vcpus, _get("g6e.48xlarge").memory_gib) == (192, 1536)


def test_efa_capable_gpu_types_match_device_plugin_allow_list() -> None:
    """Corroboration: the EFA device-plugin chart's default allow-list at v0.5.30 has these g
    sizes (8xlarge..48xlarge), p4d/p4de, p5/p5e/p5en and p6 (docs/reference/aws-efa.md); the
    rendered DaemonSet is checked against the catalog in tests/artifacts/test_helm_releases.py."""
    allow_list = {
        f"{fam}.{size}"
        for fam in ("g5", "g6", "g6e")
        for size in ("8xlarge", "12xlarge", "16xlarge", "24xlarge", "48xlarge")
    }
    allow_list |= {
        "p5.4xlarge",
        "p5.48xlarge",
        "p5e.48xlarge",
        "p5en.48xlarge",
        "p6-b200.48xlarge",
        "p6-b300.48xlarge",
        "p4d.24xlarge",
        "p4de.24xlarge",
    }
    assert {name for name, row in INSTANCE_TYPES.items() if row.efa_supported} == allow_list


def test_gpu_type_names() -> None:
    gpu_names = {name for name, row in INSTANCE_TYPES.items() if row.gpus > 0}
    assert len(gpu_names) == 8 + 3 * 8
    assert {"p6-b300.48xlarge", "g5.2xlarge", "g6.4xlarge", "g6e.48xlarge"} <= gpu_names


def test_cpu_types() -> None:
    cpu = {name: row for name, row in INSTANCE_TYPES.items() if row.gpus == 0}
    assert set(cpu) == {
        "m7i.large",
        "m7i.xlarge",
        "m7i.2xlarge",
        "m7i.4xlarge",
        "m6i.xlarge",
        "m6i.2xlarge",
        "m6i.4xlarge",
        "c7i.2xlarge",
        "r7i.2xlarge",
    }
    assert (cpu["m7i.large"].vcpus, cpu["m7i.large"].memory_gib) == (2, 8)
    assert (cpu["c7i.2xlarge"].vcpus, cpu["c7i.2xlarge"].memory_gib) == (8, 16)
    assert (cpu["r7i.2xlarge"].vcpus, cpu["r7i.2xlarge"].memory_gib) == (8, 64)
    assert all(
        row.efa_interfaces == 0 and row.gpu_model == "" and row.gpu_memory_mib == 0
        for row in cpu.values()
    )


def test_phc_by_family() -> None:
    # M7a, M7g, M7i, R7a, R7g, R7i, I8g, I8ge; no GPU family (see docs/reference/eks-nodes.md#phc-support).
    assert not any(row.phc for row in INSTANCE_TYPES.values() if row.gpus > 0)
    assert {name for name, row in INSTANCE_TYPES.items() if row.phc} == {
        "m7i.large",
        "m7i.xlarge",
        "m7i.2xlarge",
        "m7i.4xlarge",
        "r7i.2xlarge",
    }


def test_supports_phc_needs_family_and_region() -> None:
    assert {
        "us-east-1",
        "us-east-2",
        "ap-northeast-1",
        "eu-north-1",
        "ap-southeast-5",
        "ap-southeast-7",
    } == PHC_REGIONS
    m7i = _get("m7i.xlarge")
    assert supports_phc(m7i, "us-east-1")
    assert supports_phc(m7i, "eu-north-1")
    assert not supports_phc(m7i, "eu-west-1")
    assert not supports_phc(m7i, "us-west-2")
    assert not supports_phc(_get("m6i.xlarge"), "us-east-1")
    assert not supports_phc(_get("p5.48xlarge"), "us-east-1")


def test_unknown_instance_type_and_read_only_mapping() -> None:
    assert instance_type("p9.96xlarge") is None
    with pytest.raises(TypeError):
        INSTANCE_TYPES["x"] = _get("p5.48xlarge")  # type: ignore[index]


# --- models (docs/reference/qwen3-vl.md) ---------------------------------------------------------------------

_BASES = (
    "Qwen/Qwen3-VL-2B-Instruct",
    "Qwen/Qwen3-VL-4B-Instruct",
    "Qwen/Qwen3-VL-8B-Instruct",
    "Qwen/Qwen3-VL-32B-Instruct",
    "Qwen/Qwen3-VL-30B-A3B-Instruct",
    "Qwen/Qwen3-VL-235B-A22B-Instruct",
)


def _model(model_id: str) -> ModelSpec:
    found = model_spec(model_id)
    assert found is not None, model_id
    return found


def test_model_ids_include_every_fp8_variant() -> None:
    assert set(MODELS) == set(_BASES) | {f"{base}-FP8" for base in _BASES}
    assert model_spec("Qwen/Qwen3-VL-72B-Instruct") is None


@pytest.mark.parametrize(
    ("model_id", "total"),
    # docs/reference/qwen3-vl.md#parameter-counts, the total column.
    [
        ("Qwen/Qwen3-VL-2B-Instruct", 2.128e9),
        ("Qwen/Qwen3-VL-4B-Instruct", 4.438e9),
        ("Qwen/Qwen3-VL-8B-Instruct", 8.767e9),
        ("Qwen/Qwen3-VL-32B-Instruct", 33.36e9),
        ("Qwen/Qwen3-VL-30B-A3B-Instruct", 31.07e9),
        ("Qwen/Qwen3-VL-235B-A22B-Instruct", 235.67e9),
    ],
)
def test_params_match_facts_totals(model_id: str, total: float) -> None:
    for spec in (_model(model_id), _model(model_id + "-FP8")):
        assert spec.params == pytest.approx(total, rel=0.005)


@pytest.mark.parametrize(
    ("model_id", "bf16_bytes_per_token"),
    # The bf16 bytes-per-token column (= the 2·L·kv·hd column x 2 bytes) (see docs/reference/qwen3-vl.md#kv-cache-per-token,).
    [
        ("Qwen/Qwen3-VL-2B-Instruct", 114688),
        ("Qwen/Qwen3-VL-4B-Instruct", 147456),
        ("Qwen/Qwen3-VL-8B-Instruct", 147456),
        ("Qwen/Qwen3-VL-32B-Instruct", 262144),
        ("Qwen/Qwen3-VL-30B-A3B-Instruct", 98304),
        ("Qwen/Qwen3-VL-235B-A22B-Instruct", 192512),
    ],
)
def test_kv_bytes_per_token_match_facts(model_id: str, bf16_bytes_per_token: int) -> None:
    m = _model(model_id)
    assert 2 * m.layers * m.kv_heads * m.head_dim * 2 == bf16_bytes_per_token


def test_architecture_spot_checks() -> None:
    big = _model("Qwen/Qwen3-VL-235B-A22B-Instruct")
    assert (big.layers, big.hidden_size, big.attention_heads, big.kv_heads, big.head_dim) == (
        94,
        4096,
        64,
        4,
        128,
    )
    assert (big.moe, big.experts, big.moe_intermediate_size, big.max_context) == (
        True,
        128,
        1536,
        262144,
    )
    small = _model("Qwen/Qwen3-VL-30B-A3B-Instruct")
    assert (small.moe_intermediate_size, small.kv_heads) == (768, 4)
    dense = _model("Qwen/Qwen3-VL-32B-Instruct")
    assert (dense.moe, dense.experts, dense.moe_intermediate_size) == (False, 0, 0)


def test_fp8_variant_shares_architecture() -> None:
    base, fp8 = _model("Qwen/Qwen3-VL-8B-Instruct"), _model("Qwen/Qwen3-VL-8B-Instruct-FP8")
    assert (base.fp8, fp8.fp8) == (False, True)
    assert (fp8.layers, fp8.kv_heads, fp8.text_params, fp8.vision_params) == (
        36,
        8,
        8_191_000_000,
        576_000_000,
    )


def test_weight_bytes() -> None:
    # 2B bf16: 2.128e9 params x 2 = 4.256e9 bytes; the HF repo's model.safetensors is 4.26 GB (docs/reference/qwen3-vl.md#parameter-counts).
    assert _model("Qwen/Qwen3-VL-2B-Instruct").weight_bytes == 4_256_000_000
    assert _model("Qwen/Qwen3-VL-2B-Instruct").weight_bytes == pytest.approx(4.26e9, rel=0.005)
    # 2B FP8: 1,721,000,000 text x 1 + 407,000,000 vision x 2 = 2,535,000,000.
    assert _model("Qwen/Qwen3-VL-2B-Instruct-FP8").weight_bytes == 2_535_000_000
    # 235B FP8: 235,090,000,000 + 2 x 576,000,000 = 236,242,000,000 (the recipe's minimum is 282 GB
    # of VRAM, docs/reference/qwen3-vl.md#parameter-counts).
    assert _model("Qwen/Qwen3-VL-235B-A22B-Instruct-FP8").weight_bytes == 236_242_000_000

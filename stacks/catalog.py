"""Instance-type and model catalogs used by the settings and the capacity planner.

Every number comes from docs/reference/ unless a comment says otherwise:
- GPU instance rows: aws-efa.md#efa-instance-types (Karpenter's generated instance-type
  reference, built from EC2 DescribeInstanceTypes; GPU memory is the EC2 GpuInfo value in MiB)
  and aws-efa.md#efa-interfaces (one EFA interface per network card).
- PTP hardware clock (PHC) families and regions: eks-nodes.md#phc-support.
- Qwen3-VL architecture values and parameter counts: qwen3-vl.md#config-values and
  #parameter-counts; FP8 checkpoints exist for every size (#fp8-checkpoints).

At deploy time the truth is `aws ec2 describe-instance-types`; this table exists so that plans and
launch templates can be checked offline, before anything is created.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30

# AWS lists the families M7a, M7g, M7i, R7a, R7g, R7i, I8g, I8ge and no GPU family
# (docs/reference/eks-nodes.md#phc-support).
PHC_FAMILIES: frozenset[str] = frozenset({"m7a", "m7g", "m7i", "r7a", "r7g", "r7i", "i8g", "i8ge"})

# AWS lists us-east-1, us-east-2, Malaysia, Thailand, Tokyo, Stockholm (the New York City Local
# Zone belongs to us-east-1; docs/reference/eks-nodes.md#phc-support).
PHC_REGIONS: frozenset[str] = frozenset(
    {
        "us-east-1",
        "us-east-2",
        "ap-northeast-1",  # Tokyo
        "eu-north-1",  # Stockholm
        "ap-southeast-5",  # Malaysia
        "ap-southeast-7",  # Thailand
    }
)


@dataclass(frozen=True, kw_only=True)
class InstanceType:
    """One EC2 instance type as the node groups and the planner see it."""

    name: str
    gpus: int
    gpu_model: str
    gpu_memory_mib: int
    vcpus: int
    memory_gib: int
    network_gbps: int
    efa_interfaces: int
    network_cards: int
    phc: bool

    @property
    def efa_supported(self) -> bool:
        return self.efa_interfaces > 0

    @property
    def gpu_memory_bytes(self) -> int:
        return self.gpu_memory_mib * MIB


def _has_phc_family(name: str) -> bool:
    return name.split(".", 1)[0] in PHC_FAMILIES


# Rows of docs/reference/aws-efa.md#efa-instance-types: (GPUs, GPU model, MiB/GPU, vCPU, RAM GiB,
# Gbps, max EFA, network cards).
_P_TYPES: dict[str, tuple[int, str, int, int, int, int, int, int]] = {
    "p4d.24xlarge": (8, "A100", 40960, 96, 1152, 400, 4, 4),
    "p4de.24xlarge": (8, "A100", 81920, 96, 1152, 400, 4, 4),
    "p5.4xlarge": (1, "H100", 81920, 16, 256, 100, 1, 1),
    "p5.48xlarge": (8, "H100", 81920, 192, 2048, 3200, 32, 32),
    "p5e.48xlarge": (8, "H200", 144384, 192, 2048, 3200, 32, 32),
    "p5en.48xlarge": (8, "H200", 144384, 192, 2048, 3200, 16, 16),
    "p6-b200.48xlarge": (8, "B200", 183359, 192, 2048, 3200, 8, 8),
    # 17 network cards but 16 EFA: card 0 apparently cannot carry EFA (same source).
    "p6-b300.48xlarge": (8, "B300", 275040, 192, 4096, 6400, 16, 17),
}

# g5 / g6 / g6e: one GPU model per family (A10G and L4 22888 MiB, L40S 45776 MiB: same source).
_G_GPU: dict[str, tuple[str, int]] = {
    "g5": ("A10G", 22888),
    "g6": ("L4", 22888),
    "g6e": ("L40S", 45776),
}

# GPUs per size (brief; matches the GPU counts docs/reference/aws-efa.md gives for the EFA sizes).
_G_GPUS: dict[str, int] = {
    "xlarge": 1, "2xlarge": 1, "4xlarge": 1, "8xlarge": 1,
    "12xlarge": 4, "16xlarge": 1, "24xlarge": 4, "48xlarge": 8,
}  # fmt: skip

# (vCPU, RAM GiB) per size: AWS published sizes; the 48xlarge rows match the table of
# docs/reference/aws-efa.md (192/768 and 192/1536), as does g6e.24xlarge (96/768).
_G_CPU_RAM: dict[str, dict[str, tuple[int, int]]] = {
    "g5": {
        "xlarge": (4, 16), "2xlarge": (8, 32), "4xlarge": (16, 64), "8xlarge": (32, 128),
        "12xlarge": (48, 192), "16xlarge": (64, 256), "24xlarge": (96, 384), "48xlarge": (192, 768),
    },
    "g6": {
        "xlarge": (4, 16), "2xlarge": (8, 32), "4xlarge": (16, 64), "8xlarge": (32, 128),
        "12xlarge": (48, 192), "16xlarge": (64, 256), "24xlarge": (96, 384), "48xlarge": (192, 768),
    },
    "g6e": {
        "xlarge": (4, 32), "2xlarge": (8, 64), "4xlarge": (16, 128), "8xlarge": (32, 256),
        "12xlarge": (48, 384), "16xlarge": (64, 512), "24xlarge": (96, 768),
        "48xlarge": (192, 1536),
    },
}  # fmt: skip

# (Gbps, max EFA, network cards) per size. 8xlarge..48xlarge: the g5/g6/g6e list of the EFA
# table in docs/reference/aws-efa.md#efa-instance-types; one EFA and one card unless stated
# (2/2 on g6e.24xlarge, 4/4 on g6e.48xlarge). The xlarge..4xlarge sizes have no EFA (same
# source); their Gbps are AWS's published "up to" burst figures (not in docs/reference/), and no
# rule uses them.
_G_NETWORK: dict[str, dict[str, tuple[int, int, int]]] = {
    "g5": {
        "xlarge": (10, 0, 1), "2xlarge": (10, 0, 1), "4xlarge": (25, 0, 1),
        "8xlarge": (25, 1, 1), "12xlarge": (40, 1, 1), "16xlarge": (25, 1, 1),
        "24xlarge": (50, 1, 1), "48xlarge": (100, 1, 1),
    },
    "g6": {
        "xlarge": (10, 0, 1), "2xlarge": (10, 0, 1), "4xlarge": (25, 0, 1),
        "8xlarge": (25, 1, 1), "12xlarge": (40, 1, 1), "16xlarge": (25, 1, 1),
        "24xlarge": (50, 1, 1), "48xlarge": (100, 1, 1),
    },
    "g6e": {
        "xlarge": (20, 0, 1), "2xlarge": (20, 0, 1), "4xlarge": (20, 0, 1),
        "8xlarge": (25, 1, 1), "12xlarge": (100, 1, 1), "16xlarge": (35, 1, 1),
        "24xlarge": (200, 2, 2), "48xlarge": (400, 4, 4),
    },
}  # fmt: skip

# CPU types for the system node group: (vCPU, RAM GiB, Gbps), AWS published sizes (m: 4 GiB per
# vCPU, c: 2, r: 8; not in docs/reference/). AWS lists each as "up to 12.5 Gbps"; the int field
# holds 12, and no rule uses it.
_CPU_TYPES: dict[str, tuple[int, int, int]] = {
    "m7i.large": (2, 8, 12),
    "m7i.xlarge": (4, 16, 12),
    "m7i.2xlarge": (8, 32, 12),
    "m7i.4xlarge": (16, 64, 12),
    "m6i.xlarge": (4, 16, 12),
    "m6i.2xlarge": (8, 32, 12),
    "m6i.4xlarge": (16, 64, 12),
    "c7i.2xlarge": (8, 16, 12),
    "r7i.2xlarge": (8, 64, 12),
}


def _build_instance_types() -> dict[str, InstanceType]:
    types: list[InstanceType] = [
        InstanceType(
            name=name,
            gpus=gpus,
            gpu_model=model,
            gpu_memory_mib=mib,
            vcpus=vcpus,
            memory_gib=ram,
            network_gbps=gbps,
            efa_interfaces=efa,
            network_cards=cards,
            phc=_has_phc_family(name),
        )
        for name, (gpus, model, mib, vcpus, ram, gbps, efa, cards) in _P_TYPES.items()
    ]
    for family, (model, mib) in _G_GPU.items():
        for size, gpus in _G_GPUS.items():
            name = f"{family}.{size}"
            vcpus, ram = _G_CPU_RAM[family][size]
            gbps, efa, cards = _G_NETWORK[family][size]
            types.append(
                InstanceType(
                    name=name,
                    gpus=gpus,
                    gpu_model=model,
                    gpu_memory_mib=mib,
                    vcpus=vcpus,
                    memory_gib=ram,
                    network_gbps=gbps,
                    efa_interfaces=efa,
                    network_cards=cards,
                    phc=_has_phc_family(name),
                )
            )
    types.extend(
        InstanceType(
            name=name,
            gpus=0,
            gpu_model="",
            gpu_memory_mib=0,
            vcpus=vcpus,
            memory_gib=ram,
            network_gbps=gbps,
            efa_interfaces=0,
            network_cards=1,
            phc=_has_phc_family(name),
        )
        for name, (vcpus, ram, gbps) in _CPU_TYPES.items()
    )
    return {row.name: row for row in types}


INSTANCE_TYPES: Mapping[str, InstanceType] = MappingProxyType(_build_instance_types())


def instance_type(name: str) -> InstanceType | None:
    return INSTANCE_TYPES.get(name)


def supports_phc(instance: InstanceType, region: str) -> bool:
    """PHC needs a capable family and region (docs/reference/eks-nodes.md#phc-support); anything
    else uses the NTP endpoint."""
    return instance.phc and region in PHC_REGIONS


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """A Qwen3-VL checkpoint: the architecture values that size weights and KV cache
    (docs/reference/qwen3-vl.md#config-values).

    Weight bytes are an approximation: bf16 checkpoints hold 2 bytes per parameter; the FP8
    checkpoints are counted as 1 byte per language-model parameter plus 2 bytes per vision parameter
    (the vision tower stays bf16). Block scales and any layers the FP8 checkpoints keep in bf16
    (embeddings, lm_head, norms) are ignored, so FP8 figures are slightly low.
    """

    id: str
    layers: int
    hidden_size: int
    attention_heads: int
    kv_heads: int
    head_dim: int
    text_params: int
    vision_params: int
    moe: bool
    experts: int
    moe_intermediate_size: int
    max_context: int
    fp8: bool

    @property
    def params(self) -> int:
        return self.text_params + self.vision_params

    @property
    def text_weight_bytes(self) -> int:
        return self.text_params * (1 if self.fp8 else 2)

    @property
    def vision_weight_bytes(self) -> int:
        return self.vision_params * 2

    @property
    def weight_bytes(self) -> int:
        return self.text_weight_bytes + self.vision_weight_bytes


FP8_SUFFIX = "-FP8"
_HEAD_DIM = 128  # every size (docs/reference/qwen3-vl.md#config-values)
_MAX_CONTEXT = 262144  # max_position_embeddings, every size (same source)


# docs/reference/qwen3-vl.md: #config-values (layers, hidden, heads, KV heads, experts,
# moe_intermediate_size) and #parameter-counts (text, vision). head_dim 128 and
# max_position_embeddings 262144 hold for every size.
_BF16_MODELS: tuple[ModelSpec, ...] = (
    ModelSpec(
        id="Qwen/Qwen3-VL-2B-Instruct",
        layers=28,
        hidden_size=2048,
        attention_heads=16,
        kv_heads=8,
        head_dim=_HEAD_DIM,
        text_params=1_721_000_000,
        vision_params=407_000_000,
        moe=False,
        experts=0,
        moe_intermediate_size=0,
        max_context=_MAX_CONTEXT,
        fp8=False,
    ),
    ModelSpec(
        id="Qwen/Qwen3-VL-4B-Instruct",
        layers=36,
        hidden_size=2560,
        attention_heads=32,
        kv_heads=8,
        head_dim=_HEAD_DIM,
        text_params=4_022_000_000,
        vision_params=415_000_000,
        moe=False,
        experts=0,
        moe_intermediate_size=0,
        max_context=_MAX_CONTEXT,
        fp8=False,
    ),
    ModelSpec(
        id="Qwen/Qwen3-VL-8B-Instruct",
        layers=36,
        hidden_size=4096,
        attention_heads=32,
        kv_heads=8,
        head_dim=_HEAD_DIM,
        text_params=8_191_000_000,
        vision_params=576_000_000,
        moe=False,
        experts=0,
        moe_intermediate_size=0,
        max_context=_MAX_CONTEXT,
        fp8=False,
    ),
    ModelSpec(
        id="Qwen/Qwen3-VL-32B-Instruct",
        layers=64,
        hidden_size=5120,
        attention_heads=64,
        kv_heads=8,
        head_dim=_HEAD_DIM,
        text_params=32_760_000_000,
        vision_params=595_000_000,
        moe=False,
        experts=0,
        moe_intermediate_size=0,
        max_context=_MAX_CONTEXT,
        fp8=False,
    ),
    ModelSpec(
        id="Qwen/Qwen3-VL-30B-A3B-Instruct",
        layers=48,
        hidden_size=2048,
        attention_heads=32,
        kv_heads=4,
        head_dim=_HEAD_DIM,
        text_params=30_530_000_000,
        vision_params=539_000_000,
        moe=True,
        experts=128,
        moe_intermediate_size=768,
        max_context=_MAX_CONTEXT,
        fp8=False,
    ),
    ModelSpec(
        id="Qwen/Qwen3-VL-235B-A22B-Instruct",
        layers=94,
        hidden_size=4096,
        attention_heads=64,
        kv_heads=4,
        head_dim=_HEAD_DIM,
        text_params=235_090_000_000,
        vision_params=576_000_000,
        moe=True,
        experts=128,
        moe_intermediate_size=1536,
        max_context=_MAX_CONTEXT,
        fp8=False,
    ),
)


def _with_fp8(models: tuple[ModelSpec, ...]) -> dict[str, ModelSpec]:
    """Each bf16 checkpoint plus its `-FP8` sibling (one for every size, same architecture:
    docs/reference/qwen3-vl.md#fp8-checkpoints)."""
    result: dict[str, ModelSpec] = {}
    for spec in models:
        fp8 = dataclasses.replace(spec, id=spec.id + FP8_SUFFIX, fp8=True)
        result[spec.id] = spec
        result[fp8.id] = fp8
    return result


MODELS: Mapping[str, ModelSpec] = MappingProxyType(_with_fp8(_BF16_MODELS))


def model_spec(model_id: str) -> ModelSpec | None:
    return MODELS.get(model_id)

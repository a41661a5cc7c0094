"""Capacity plan of a deployment's vision tier (docs/vision.md#plan).

The arithmetic (facts in docs/reference/qwen3-vl.md#config-values and
docs/reference/vision-tier.md):

- image tokens per image = max pixels / (32 x 32): one merged vision token per 32 x 32 pixels;
  per request = that x the images a request may carry.
- an encoder pod runs the vision tower only (`--mm-encoder-only`: no language model, no KV
  cache), so its weights per GPU are the vision bytes / its GPUs, and it must fit the GPU's
  memory share minus the planner's activation reserve.
- one encoder output (one file of the shared cache) = image tokens x hidden size x (1 + the
  DeepStack layers) x 2 bytes (bf16); the volume bound divided by it is how many images the
  cache holds.
- encoder throughput per GPU = peak dense bf16 FLOP/s x ENCODER_MFU / FLOPs per image, with
  FLOPs per image = 2 x vision parameters x patches (4 per merged token). An estimate for
  sizing `encoders`; the rehearsal bench measures nothing of it (CPU only).
- memory freed on the language-model engines: none. An `ec_consumer` still loads its vision
  tower (vLLM 0.33 has no consumer switch to skip it), and it needs it: when the encoder tier
  is down or a file is missing, the engine encodes locally.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

from stacks.catalog import GIB, InstanceType, ModelSpec
from stacks.planner import ACTIVATION_RESERVE_BYTES, format_bytes, text_table

VISION_TOKEN_PIXELS = 32 * 32
PATCHES_PER_TOKEN = 4  # spatial_merge_size 2: 2 x 2 patches per token
DEEPSTACK_LAYERS = 3  # Qwen3-VL adds three DeepStack feature levels to each vision token
EMBEDDING_BYTES = 2  # bf16
# The checkpoints' own image limit, `size.longest_edge` of their preprocessor config
# (see docs/reference/vision-tier.md, section checkpoint-pixels).
CHECKPOINT_MAX_PIXELS = 16_777_216
ENCODER_MFU = Fraction(3, 10)  # a conservative share of peak for a batch-1 ViT (an assumption)

# Dense bf16 tensor FLOP/s per GPU, from the vendors' datasheets (docs/reference/vision-tier.md#gpu-flops).
GPU_BF16_TFLOPS: dict[str, int] = {
    "L4": 121,
    "L40S": 362,
    "A100": 312,
    "H100": 989,
    "H200": 989,
}


@dataclass(frozen=True, kw_only=True)
class VisionPlan:
    image_tokens_per_image: int
    image_tokens_per_request: int
    encoder_weight_bytes_per_gpu: int
    encoder_free_bytes_per_gpu: int  # left for activations and vLLM's encoder cache
    embedding_bytes_per_image: int
    cached_images: int  # images the bounded volume holds
    images_per_second_per_encoder: float | None  # None: the GPU has no datasheet figure here
    llm_bytes_freed_per_gpu: int


@dataclass(frozen=True, kw_only=True)
class VisionPlanRequest:
    model: ModelSpec
    instance: InstanceType  # of the encoder node group
    gpus_per_encoder: int
    gpu_memory_utilization: float
    max_image_pixels: int
    images_per_request: int
    cache_bytes: int


def vision_plan(r: VisionPlanRequest) -> VisionPlan:
    tokens = max(1, r.max_image_pixels // VISION_TOKEN_PIXELS)
    weights = -(-r.model.vision_weight_bytes // r.gpus_per_encoder)
    usable = math.floor(r.instance.gpu_memory_bytes * Fraction(str(r.gpu_memory_utilization)))
    per_image = tokens * r.model.hidden_size * (1 + DEEPSTACK_LAYERS) * EMBEDDING_BYTES
    return VisionPlan(
        image_tokens_per_image=tokens,
        image_tokens_per_request=tokens * r.images_per_request,
        encoder_weight_bytes_per_gpu=weights,
        encoder_free_bytes_per_gpu=usable - ACTIVATION_RESERVE_BYTES - weights,
        embedding_bytes_per_image=per_image,
        cached_images=r.cache_bytes // per_image,
        images_per_second_per_encoder=_images_per_second(
            r.model, r.instance, r.gpus_per_encoder, tokens
        ),
        llm_bytes_freed_per_gpu=0,
    )


def _images_per_second(
    model: ModelSpec, instance: InstanceType, gpus: int, tokens: int
) -> float | None:
    tflops = GPU_BF16_TFLOPS.get(instance.gpu_model)
    if tflops is None:
        return None
    flops_per_image = 2 * model.vision_params * tokens * PATCHES_PER_TOKEN
    return float(tflops * 10**12 * ENCODER_MFU * gpus / flops_per_image)


def cache_bytes(max_size_gib: int) -> int:
    return max_size_gib * GIB


_TABLE_HEADER = (
    "deployment",
    "encoders",
    "image tokens/image",
    "image tokens/request",
    "encoder weights/GPU",
    "encoder free/GPU",
    "images/s per encoder (est.)",
    "output/image",
    "images cached",
    "LLM memory freed",
)


def vision_table(rows: list[tuple[str, int, VisionPlan]]) -> str:
    """Plain-text table of the vision tiers, one line per disaggregated deployment."""
    return text_table([_TABLE_HEADER, *(_row(name, encoders, p) for name, encoders, p in rows)])


def _row(name: str, encoders: int, p: VisionPlan) -> tuple[str, ...]:
    rate = p.images_per_second_per_encoder
    return (
        name,
        str(encoders),
        f"{p.image_tokens_per_image:,}",
        f"{p.image_tokens_per_request:,}",
        format_bytes(p.encoder_weight_bytes_per_gpu),
        format_bytes(p.encoder_free_bytes_per_gpu),
        "unknown GPU" if rate is None else f"{rate:.1f}",
        format_bytes(p.embedding_bytes_per_image),
        f"{p.cached_images:,}",
        format_bytes(p.llm_bytes_freed_per_gpu),
    )

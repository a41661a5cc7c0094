"""Rules of serving.deployments[].vision: the encoder tier, its node group, the shared cache."""

from __future__ import annotations

import re
from collections.abc import Iterator

from stacks.catalog import instance_type, model_spec
from stacks.parse import Problem
from stacks.planner import format_bytes
from stacks.rules.common import deployment_path, positive
from stacks.schema import DeploymentSettings, Settings
from stacks.vision_plan import (
    CHECKPOINT_MAX_PIXELS,
    VisionPlan,
    VisionPlanRequest,
    cache_bytes,
    vision_plan,
)

_CRON_FIELD = re.compile(r"^[0-9*/,-]+$")
# The API server refuses a CronJob whose schedule leaves these ranges; a step (after /) is not
# bounded by them (docs/reference/vision-tier.md#cronjob-schedule).
_CRON_RANGES = (("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12),
                ("day of week", 0, 6))  # fmt: skip
_CRON_VALUE = re.compile(r"(?<![/0-9])[0-9]+")


def vision_rules(s: Settings) -> Iterator[Problem]:
    tiers = [d for d in s.serving.deployments if d.vision.mode == "disaggregated"]
    for d in tiers:
        yield from _deployment_vision_rules(s, f"{deployment_path(s, d)}.vision", d)
    # One EFS file system serves every tier of the stack (program/vision.py), with one mode.
    for d in tiers[1:]:
        if d.vision.cache.throughput_mode != tiers[0].vision.cache.throughput_mode:
            first = deployment_path(s, tiers[0])
            yield Problem(
                f"{deployment_path(s, d)}.vision.cache.throughputMode",
                f"must match {first}.vision.cache.throughputMode "
                f"({tiers[0].vision.cache.throughput_mode}): the stack's vision tiers share one "
                "EFS file system",
                d.vision.cache.throughput_mode,
            )


def _deployment_vision_rules(s: Settings, path: str, d: DeploymentSettings) -> Iterator[Problem]:
    v = d.vision
    yield from positive(f"{path}.encoders", v.encoders)
    yield from positive(f"{path}.timeoutSeconds", v.timeout_seconds)
    if v.retries < 0:
        yield Problem(f"{path}.retries", "must be 0 or more", v.retries)
    elif v.timeout_seconds * (1 + v.retries) >= s.gateway.read_timeout_seconds:
        yield Problem(
            f"{path}.timeoutSeconds",
            f"timeoutSeconds x (1 + retries) = {v.timeout_seconds * (1 + v.retries):g} s must "
            f"stay below gateway.readTimeoutSeconds ({s.gateway.read_timeout_seconds} s), or the "
            "encoder step eats the whole request budget; lower it or the retries",
            v.timeout_seconds,
        )
    yield from _autoscaling_problems(path, d)
    yield from _cache_problems(f"{path}.cache", d)
    if d.limit_mm_per_prompt.get("image", 0) < 1:
        yield Problem(
            f"{path}.mode",
            "disaggregated needs images: limitMmPerPrompt.image is 0, so there is nothing to "
            "encode; set mode aggregated or allow images",
            v.mode,
        )
    yield from _encoder_fit_problems(s, path, d)


def _autoscaling_problems(path: str, d: DeploymentSettings) -> Iterator[Problem]:
    a = d.vision.autoscaling
    key = f"{path}.autoscaling"
    yield from positive(f"{key}.queueDepthTarget", a.queue_depth_target)
    if a.min_replicas < 1:
        yield Problem(
            f"{key}.minReplicas",
            "must be at least 1: with no encoder every image is encoded on the engines, "
            "and KEDA cannot see a queue of a tier that does not run",
            a.min_replicas,
        )
    if a.max_replicas < max(a.min_replicas, d.vision.encoders):
        yield Problem(
            f"{key}.maxReplicas",
            f"must be at least minReplicas ({a.min_replicas}) and vision.encoders "
            f"({d.vision.encoders})",
            a.max_replicas,
        )


def _cache_problems(path: str, d: DeploymentSettings) -> Iterator[Problem]:
    c = d.vision.cache
    yield from positive(f"{path}.ttlHours", c.ttl_hours)
    yield from positive(f"{path}.maxSizeGib", c.max_size_gib)
    fields = c.expiry_schedule.split()
    if len(fields) != len(_CRON_RANGES) or not all(_CRON_FIELD.match(f) for f in fields):
        yield Problem(
            f"{path}.expirySchedule",
            "must be a five-field cron schedule of numbers, *, /, - and , (e.g. '*/15 * * * *')",
            c.expiry_schedule,
        )
        return
    for field, (name, lo, hi) in zip(fields, _CRON_RANGES, strict=True):
        if any(not lo <= int(n) <= hi for n in _CRON_VALUE.findall(field)):
            yield Problem(
                f"{path}.expirySchedule",
                f"the {name} field {field!r} leaves {lo}-{hi}",
                c.expiry_schedule,
            )


def encoder_plan(s: Settings, d: DeploymentSettings) -> VisionPlan | None:
    """The vision plan of a deployment whose model and encoder node group are known."""
    group = next((g for g in s.gpu_node_groups if g.name == encoder_node_group(d)), None)
    model = model_spec(d.model)
    instance = instance_type(group.instance_type) if group else None
    if model is None or instance is None or not instance.gpus or d.vision.gpus_per_encoder < 1:
        return None
    return vision_plan(
        VisionPlanRequest(
            model=model,
            instance=instance,
            gpus_per_encoder=d.vision.gpus_per_encoder,
            gpu_memory_utilization=d.gpu_memory_utilization,
            max_image_pixels=max_image_pixels(d),
            images_per_request=d.limit_mm_per_prompt.get("image", 0),
            cache_bytes=cache_bytes(d.vision.cache.max_size_gib),
        )
    )


def encoder_node_group(d: DeploymentSettings) -> str:
    return d.vision.node_group or d.node_group


def max_image_pixels(d: DeploymentSettings) -> int:
    """The largest image the deployment admits: the image guard's, else the checkpoint's."""
    if d.max_image_pixels is None:
        return CHECKPOINT_MAX_PIXELS
    return min(d.max_image_pixels, CHECKPOINT_MAX_PIXELS)


def _encoder_fit_problems(s: Settings, path: str, d: DeploymentSettings) -> Iterator[Problem]:
    name = encoder_node_group(d)
    group = next((g for g in s.gpu_node_groups if g.name == name), None)
    if group is None:
        groups = ", ".join(sorted(g.name for g in s.gpu_node_groups))
        yield Problem(f"{path}.nodeGroup", f"must name one of gpuNodeGroups: {groups}", name)
        return
    instance = instance_type(group.instance_type)
    if instance is None or not instance.gpus:
        return  # reported by the node group rules
    gpus = d.vision.gpus_per_encoder
    if gpus < 1 or instance.gpus % gpus:
        yield Problem(
            f"{path}.gpusPerEncoder",
            f"must divide the {instance.gpus} GPUs of {instance.name}, so encoder pods pack "
            "its GPUs without leaving one idle",
            gpus,
        )
        return
    plan = encoder_plan(s, d)
    if plan is None:
        return
    if plan.encoder_free_bytes_per_gpu <= 0:
        yield Problem(
            f"{path}.gpusPerEncoder",
            f"the vision tower needs {format_bytes(plan.encoder_weight_bytes_per_gpu)} per GPU "
            f"plus the activation reserve, more than {instance.name} offers at "
            f"gpuMemoryUtilization {d.gpu_memory_utilization}; use more GPUs per encoder",
            gpus,
        )
    if plan.cached_images < 1:
        yield Problem(
            f"{path}.cache.maxSizeGib",
            f"holds no image: one encoder output is {format_bytes(plan.embedding_bytes_per_image)}"
            "; raise it",
            d.vision.cache.max_size_gib,
        )

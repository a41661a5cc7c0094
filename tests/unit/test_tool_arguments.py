"""Bad command lines of the scripts/ tools end in a usage message and exit 2 (or 1), never a
traceback, and are refused before any work starts. Each tool's main() runs in-process."""

from __future__ import annotations

from pathlib import Path

import pytest

from scripts import bench, bench_probe, check, loadtest
from scripts.engine import serve_parser, tiny_model
from scripts.pin import __main__ as pin_cli
from scripts.rehearsal import epd


def test_epd_names_the_stack_option_for_an_unknown_stack(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_:
        epd.main(["--stack", "nope"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--stack nope" in err
    assert "Pulumi.nope.yaml" in err
    assert "no such stack file" in err


def test_bench_refuses_a_write_target_in_a_missing_directory_before_running(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        bench.parser().parse_args(["--write", str(tmp_path / "missing" / "BENCHMARKS.md")])
    assert exit_.value.code == 2
    assert f"argument --write: {tmp_path / 'missing'} is not a directory" in capsys.readouterr().err
    given = tmp_path / "BENCHMARKS.md"
    assert bench.parser().parse_args(["--write", str(given)]).write == given


def test_check_takes_an_argument_with_a_slash_as_a_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert check.main([str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"{tmp_path}: ")
    assert "Is a directory" in err
    # A bare word is still a stack name.
    assert check.main(["nope"]) == 1
    assert "Pulumi.nope.yaml: 1 configuration problem(s)" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [[], ["quota"], ["nope", "{}"], ["quota", "{not json"]])
def test_bench_probe_prints_usage(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_probe.main(argv) == 2
    assert "bench_probe" in capsys.readouterr().err


def test_tiny_model_does_not_take_an_option_for_its_output_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert tiny_model.main(["--help"]) == 2
    assert "usage: python -m scripts.engine.tiny_model OUT_DIR" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_serve_parser_reads_its_request_from_stdin_only(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert serve_parser.main(["--help"]) == 2
    assert "REQUEST_JSON" in capsys.readouterr().err


def test_loadtest_names_a_command_that_runs_as_written(tmp_path: Path) -> None:
    with pytest.raises(loadtest.LoadtestError) as err:
        loadtest.rehearsal_target(tmp_path, "dev", None)
    hint = f"`python -m scripts.rehearse --stack dev --detach --state-dir {tmp_path}`"
    assert hint in str(err.value)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--stack", "dev", "--file", "/nope.yaml"],
            "argument --file: not allowed with argument --stack",
        ),
        (
            ["--file", "/nope.yaml", "--timeout", "0"],
            "argument --timeout: 0: give a number of seconds",
        ),
        (
            ["--file", "/nope.yaml", "--timeout", "x"],
            "argument --timeout: x: give a number of seconds",
        ),
    ],
)
def test_pin_refuses_contradicting_or_impossible_options(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        pin_cli.main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err

"""Run `vllm serve` command lines through the REAL argument parser of the installed engine.

Runs inside the engine's venv (`.venv-engine/bin/python -m scripts.engine.serve_parser`,
from the repository root), where `vllm` is importable; the project's venv calls it through
`parse_lines` (one subprocess for many lines: importing vLLM takes ~10-20 s on 2 cores).

The parser is built the way `vllm serve` builds it (vllm/entrypoints/cli/main.py: a
FlexibleArgumentParser with the serve subcommand's `make_arg_parser`), then vLLM's own
`validate_parsed_serve_args` runs, the checks `vllm serve` makes before it loads anything.
Nothing is started and no model is read.

Protocol (stdin/stdout JSON):
  {"lines": {"<name>": ["vllm", "serve", MODEL, ...], ...}}
    -> {"version": "0.32.0", "results": {"<name>": {"ok": true} | {"ok": false, "error": "..."}}}
  {"options": true}
    -> {"version": ..., "options": ["--flag", "-f", ...]}  (every option string of the parser)
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
PARSE_TIMEOUT_S = 300.0


def _vllm(module: str) -> Any:
    """A vLLM module (imported by name: vLLM exists only in the engine's venv)."""
    return importlib.import_module(module)


def _serve_parser() -> Any:  # pragma: no cover - runs inside the engine venv
    import argparse

    serve = _vllm("vllm.entrypoints.cli.serve")
    argparse_utils = _vllm("vllm.utils.argparse_utils")
    top = argparse_utils.FlexibleArgumentParser(description="vLLM CLI")
    subparsers = top.add_subparsers(required=True, dest="subparser")
    serve.ServeSubcommand().subparser_init(subparsers)
    assert isinstance(top, argparse.ArgumentParser)
    return top


def _parse_one(top: Any, argv: Sequence[str]) -> dict[str, Any]:  # pragma: no cover
    validate_parsed_serve_args = _vllm(
        "vllm.entrypoints.launchers.cli_args"
    ).validate_parsed_serve_args
    if list(argv[:2]) != ["vllm", "serve"]:
        return {"ok": False, "error": f"not a `vllm serve` line: {list(argv[:2])}"}
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = top.parse_args(list(argv[1:]))
            validate_parsed_serve_args(args)
    except SystemExit:
        return {"ok": False, "error": err.getvalue().strip().splitlines()[-1:] or ["exit"]}
    except Exception as exc:  # vLLM's validation raises ValueError / TypeError
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    return {"ok": True}


def _options(top: Any) -> list[str]:  # pragma: no cover
    import argparse

    [serve] = [a for a in top._actions if isinstance(a, argparse._SubParsersAction)]
    parser = serve.choices["serve"]
    return sorted({s for a in parser._actions for s in a.option_strings})


def main(args: Sequence[str]) -> int:  # pragma: no cover - runs inside the engine venv
    if args:
        print(
            f"usage: python -m scripts.engine.serve_parser < REQUEST_JSON\n{__doc__}",
            file=sys.stderr,
        )
        return 2
    request = json.load(sys.stdin)
    top = _serve_parser()
    out: dict[str, Any] = {"version": _vllm("vllm").__version__}
    if request.get("options"):
        out["options"] = _options(top)
    if "lines" in request:
        out["results"] = {name: _parse_one(top, argv) for name, argv in request["lines"].items()}
    json.dump(out, sys.stdout)
    return 0


def _run(python: str | Path, request: Mapping[str, Any]) -> dict[str, Any]:
    proc = subprocess.run(
        [str(python), "-m", "scripts.engine.serve_parser"],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=PARSE_TIMEOUT_S,
        check=False,
        env={"VLLM_TARGET_DEVICE": "cpu", "PATH": "/usr/bin:/bin", "HOME": "/tmp"},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"serve_parser failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    # vLLM may log to stdout before the JSON; the answer is the last line.
    return json.loads(proc.stdout.strip().splitlines()[-1])


def parse_lines(
    python: str | Path, lines: Mapping[str, Sequence[str]], *, options: bool = False
) -> dict[str, Any]:
    """{name: argv} -> the engine's answer (see the module docstring), in one subprocess;
    with options=True the answer also lists every option string of the parser."""
    return _run(python, {"lines": {k: list(v) for k, v in lines.items()}, "options": options})


def parser_options(python: str | Path) -> tuple[str, list[str]]:
    """(vLLM version, every option string of the installed engine's `vllm serve` parser)."""
    answer = _run(python, {"options": True})
    return answer["version"], answer["options"]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

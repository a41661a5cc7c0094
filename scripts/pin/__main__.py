"""Pin a stack's container images by digest, or verify the pins.

  python -m scripts.pin --stack prod            resolve every image tag, write tag@sha256:...
  python -m scripts.pin --stack prod --verify   exit 1 unless every pin equals its tag's digest
  python -m scripts.pin --file PATH ...         any stack file (default Pulumi.<stack>.yaml)
  --insecure-registry 127.0.0.1:5000            plain HTTP for that loopback registry (tests)

Pinning writes nothing unless every image resolved; it needs network access to each
image's registry (docker.io, ghcr.io, public.ecr.aws, ...). Exit 0 ok, 1 problems, 2 usage.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from scripts.pin.registry import DEFAULT_TIMEOUT, PinError, Resolver, insecure_registry
from scripts.pin.stackfile import StackProblems, pin, stack_path, verify


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m scripts.pin",
        description=__doc__.split("\n\n", 1)[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--stack", help="stack name: edits Pulumi.<stack>.yaml at the repo root")
    which.add_argument("--file", type=Path, help="the stack file to edit (instead of --stack)")
    p.add_argument("--verify", action="store_true", help="check the pins, change nothing")
    p.add_argument(
        "--insecure-registry",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="loopback registry spoken to over plain HTTP (repeatable)",
    )
    p.add_argument(
        "--timeout", type=_seconds, default=DEFAULT_TIMEOUT, help="seconds per HTTP request"
    )
    return p


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{value}: give a number of seconds above 0")
    return seconds


def fix_command(args: argparse.Namespace) -> str:
    """The command that pins what --verify found wrong: this one without --verify."""
    words = ["python", "-m", "scripts.pin"]
    words += ["--file", str(args.file)] if args.file else ["--stack", args.stack]
    for registry in args.insecure_registry:
        words += ["--insecure-registry", registry]
    return shlex.join(words)


def run(args: argparse.Namespace) -> list[str]:
    path = args.file or stack_path(args.stack)
    insecure = frozenset(insecure_registry(r) for r in args.insecure_registry)
    resolver = Resolver(insecure=insecure, timeout=args.timeout)
    if args.verify:
        return verify(path, resolver, fix_command(args))
    return pin(path, resolver)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        lines = run(args)
    except StackProblems as err:
        print(err, file=sys.stderr)
        return 1
    except PinError as err:
        print(f"pin: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pin: interrupted; nothing written", file=sys.stderr)
        return 130
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

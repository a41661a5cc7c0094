"""Verification records: which config of a stack passed `python -m scripts.verify`, and when.

`python -m scripts.verify` writes one record per stack to `.verify/<stack>.json` (the latest
run wins); `python -m scripts.promote` refuses to promote a stack whose CURRENT config has no
passing record. The config hash covers the `config:` mapping of `Pulumi.<stack>.yaml`
only, as canonical JSON, so comments, key order and quoting do not change it while any
value change does.

The records are committed (the directory is deliberately not git-ignored): the
promotion pull request carries the record of the stack it promotes from, so reviewers
and the CI job that applies the promotion read the same evidence.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, get_args

from stacks.parse import SettingsError
from stacks.settings import read_config

ROOT = Path(__file__).resolve().parent.parent
RECORD_DIR = ROOT / ".verify"

Target = Literal["rehearsal", "ssh", "kubectl"]
Result = Literal["passed", "failed"]


class RecordError(ValueError):
    """A stack file or a record that cannot be read; the message says which and why."""


@dataclass(frozen=True, kw_only=True)
class VerificationRecord:
    """One run of the verification suite against one stack."""

    stack: str
    time: str  # UTC, ISO 8601 (e.g. 2025-06-01T12:00:00+00:00)
    config_hash: str  # config_hash() of Pulumi.<stack>.yaml when the suite ran
    target: Target  # where the suite ran: the offline rehearsal, nodes over SSH, pods
    result: Result
    details: str = ""  # one human line, e.g. "57 passed in 41.2s"

    def __post_init__(self) -> None:
        if self.target not in get_args(Target):
            raise RecordError(
                f"target must be one of {', '.join(get_args(Target))}, not {self.target!r}"
            )
        if self.result not in get_args(Result):
            raise RecordError(
                f"result must be one of {', '.join(get_args(Result))}, not {self.result!r}"
            )


def config_hash(stack_file: Path) -> str:
    """sha256 of the canonical JSON of the file's `config:` mapping."""
    try:
        config = read_config(stack_file)
    except SettingsError as err:
        raise RecordError(str(err)) from None
    # default=str: an unquoted YAML date would otherwise be unserializable; str() is stable.
    canonical = json.dumps(
        config, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def new_record(
    stack: str, stack_file: Path, *, target: Target, result: Result, details: str = ""
) -> VerificationRecord:
    """A record for a run that just finished against `stack_file`'s current config."""
    return VerificationRecord(
        stack=stack,
        time=datetime.now(UTC).isoformat(timespec="seconds"),
        config_hash=config_hash(stack_file),
        target=target,
        result=result,
        details=details,
    )


def record_path(stack: str, directory: Path = RECORD_DIR) -> Path:
    return directory / f"{stack}.json"


def write_record(record: VerificationRecord, directory: Path = RECORD_DIR) -> Path:
    """Write (replace) the stack's record; return its path."""
    path = record_path(record.stack, directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(record), indent=2, sort_keys=True) + "\n")
    return path


def read_record(stack: str, directory: Path = RECORD_DIR) -> VerificationRecord | None:
    """The stack's latest record, or None when it was never verified."""
    path = record_path(stack, directory)
    try:
        raw: Any = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except OSError as err:
        raise RecordError(f"{path}: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise RecordError(f"{path}: not valid JSON: {err}") from None
    fields = {"stack", "time", "config_hash", "target", "result", "details"}
    if not isinstance(raw, dict) or not {"stack", "time", "config_hash", "target", "result"} <= set(
        raw
    ):
        raise RecordError(f"{path}: not a verification record (needs {', '.join(sorted(fields))})")
    return VerificationRecord(**{k: v for k, v in raw.items() if k in fields})


def unverified_reason(stack: str, stack_file: Path, directory: Path = RECORD_DIR) -> str | None:
    """Why `stack` has no passing record for its current config; None when it has one."""
    record = read_record(stack, directory)
    verify = f"`python -m scripts.verify --stack {stack}`"
    if record is None:
        missing = record_path(stack, directory)
        return f"{stack} has never been verified ({missing} is missing): run {verify} first"
    if record.result != "passed":
        return (
            f"the latest verification of {stack} ({record.time}, {record.target}) failed: "
            f"fix {stack} and run {verify} again"
        )
    current = config_hash(stack_file)
    if record.config_hash != current:
        return (
            f"{stack_file.name} changed since {stack} was verified ({record.time}, {record.target}): "
            f"the record is for config {record.config_hash[:12]}, the file is now {current[:12]}; "
            f"deploy the current config and run {verify} again"
        )
    return None

"""Verification records: the config hash and the passing-record check promotion relies on."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from scripts.verification import (
    RecordError,
    VerificationRecord,
    config_hash,
    new_record,
    read_record,
    unverified_reason,
    write_record,
)

# The canonical form of {"b": 1, "a": "x"}: sorted keys, no spaces.
CANONICAL = '{"a":"x","b":1}'


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_hash_is_sha256_of_the_canonical_json_of_config(tmp_path: Path) -> None:
    stack = write(tmp_path / "Pulumi.t.yaml", "config:\n  b: 1\n  a: x\n")
    assert config_hash(stack) == hashlib.sha256(CANONICAL.encode()).hexdigest()


def test_hash_ignores_comments_order_quoting_and_other_top_level_keys(tmp_path: Path) -> None:
    plain = write(tmp_path / "a.yaml", "config:\n  b: 1\n  a: x\n")
    noisy = write(
        tmp_path / "b.yaml",
        '# a comment\nencryptedkey: abc\nconfig:\n  a: "x"  # why\n  # more\n  b: 1\n',
    )
    assert config_hash(plain) == config_hash(noisy)


def test_hash_changes_with_any_value(tmp_path: Path) -> None:
    one = write(tmp_path / "a.yaml", "config:\n  a: {b: [1, 2]}\n")
    other = write(tmp_path / "b.yaml", "config:\n  a: {b: [2, 1]}\n")
    assert config_hash(one) != config_hash(other)


def test_hash_of_a_file_without_config_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(RecordError, match="has no `config:` mapping"):
        config_hash(write(tmp_path / "a.yaml", "encryptedkey: abc\n"))


def test_record_round_trips_through_its_json_file(tmp_path: Path) -> None:
    stack = write(tmp_path / "Pulumi.dev.yaml", "config:\n  a: 1\n")
    record = new_record("dev", stack, target="kubectl", result="passed", details="12 passed")
    path = write_record(record, tmp_path / ".verify")
    assert path == tmp_path / ".verify" / "dev.json"
    on_disk = json.loads(path.read_text())
    assert on_disk["config_hash"] == hashlib.sha256(b'{"a":1}').hexdigest()
    assert on_disk["time"].endswith("+00:00")  # UTC
    assert read_record("dev", tmp_path / ".verify") == record


def test_latest_record_wins(tmp_path: Path) -> None:
    stack = write(tmp_path / "Pulumi.dev.yaml", "config:\n  a: 1\n")
    write_record(new_record("dev", stack, target="rehearsal", result="failed"), tmp_path)
    write_record(new_record("dev", stack, target="ssh", result="passed"), tmp_path)
    latest = read_record("dev", tmp_path)
    assert latest is not None
    assert (latest.target, latest.result) == ("ssh", "passed")


def test_unknown_target_is_refused() -> None:
    with pytest.raises(RecordError, match="target must be one of rehearsal, ssh, kubectl"):
        VerificationRecord(stack="dev", time="t", config_hash="h", target="ci", result="passed")  # type: ignore[arg-type]


def test_reasons_for_an_unverified_stack(tmp_path: Path) -> None:
    stack = write(tmp_path / "Pulumi.dev.yaml", "config:\n  a: 1\n")
    records = tmp_path / ".verify"
    missing = unverified_reason("dev", stack, records)
    assert "never been verified" in (missing or "")

    write_record(new_record("dev", stack, target="kubectl", result="failed"), records)
    failed = unverified_reason("dev", stack, records)
    assert "failed" in (failed or "")

    write_record(new_record("dev", stack, target="kubectl", result="passed"), records)
    assert unverified_reason("dev", stack, records) is None

    stack.write_text("config:\n  a: 2\n")
    stale = unverified_reason("dev", stack, records)
    assert "changed since dev was verified" in (stale or "")


def test_a_corrupt_record_is_a_clear_error(tmp_path: Path) -> None:
    write(tmp_path / "dev.json", '{"stack": "dev"}')
    with pytest.raises(RecordError, match="not a verification record"):
        read_record("dev", tmp_path)


def test_a_directory_for_a_stack_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(RecordError, match=r": Is a directory$"):
        config_hash(tmp_path)

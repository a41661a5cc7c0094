"""Helpers for the platform tests: decode node user data, and check its parts with real programs.

chronyd only ever runs as `unshare -n chronyd -x -p -f FILE`: -p parses the file, prints it and
exits; -x and an empty network namespace make sure it could neither adjust this machine's clock
nor send a packet even if it did more.
"""

from __future__ import annotations

import base64
import email
import json
import shutil
import subprocess
from collections.abc import Callable
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
import yaml

from stacks.schema import PROJECT
from tests.harness import ROOT, Resource, StackRun

CHECK_TIMEOUT_SECONDS = 30


def decode_user_data(encoded: str) -> dict[str, str]:
    """Content type -> body of each part of base64 MIME multipart user data (one part per type)."""
    message = email.message_from_string(base64.b64decode(encoded).decode())
    assert message.is_multipart(), "user data is not MIME multipart"
    assert message.get_content_type() == "multipart/mixed"
    parts: dict[str, str] = {}
    for part in message.get_payload():
        assert isinstance(part, Message)
        content_type = part.get_content_type()
        assert content_type not in parts, f"two {content_type} parts"
        payload = part.get_payload()
        assert isinstance(payload, str)
        parts[content_type] = payload
    return parts


def node_config(parts: dict[str, str]) -> dict[str, Any]:
    return yaml.safe_load(parts["application/node.eks.aws"])


def cloud_config(parts: dict[str, str]) -> dict[str, Any]:
    body = parts["text/cloud-config"]
    assert body.startswith("#cloud-config\n"), "cloud-init ignores a part without the header"
    return yaml.safe_load(body)


def chrony_conf(parts: dict[str, str]) -> str:
    files = [f for f in cloud_config(parts)["write_files"] if f["path"] == "/etc/chrony.conf"]
    assert len(files) == 1, "the time-sync part must write /etc/chrony.conf exactly once"
    return files[0]["content"]


def _need(*programs: str) -> None:
    for program in programs:
        if shutil.which(program) is None:
            pytest.skip(f"{program} is not installed (make debs)")


def run_chronyd_parse(conf: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """chronyd's own verdict on a config file (rc 0 and the parsed directives on stdout)."""
    _need("chronyd", "unshare")
    path = tmp_path / "chrony.conf"
    path.write_text(conf)
    return subprocess.run(
        ["unshare", "-n", "chronyd", "-x", "-p", "-f", str(path)],
        capture_output=True,
        text=True,
        timeout=CHECK_TIMEOUT_SECONDS,
        check=False,
    )


def run_cloud_init_schema(body: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """cloud-init's schema validation of a cloud-config document."""
    _need("cloud-init")
    path = tmp_path / "cloud-config.yaml"
    path.write_text(body)
    return subprocess.run(
        ["cloud-init", "schema", "--config-file", str(path)],
        capture_output=True,
        text=True,
        timeout=CHECK_TIMEOUT_SECONDS,
        check=False,
    )


def kubeconfig(run: StackRun) -> dict[str, Any]:
    (provider,) = run.of_type("pulumi:providers:kubernetes")
    return json.loads(provider.inputs["kubeconfig"])


def k8s_provider(run: StackRun) -> Resource:
    (provider,) = run.of_type("pulumi:providers:kubernetes")
    return provider


def mock_id(resource_name: str) -> str:
    """The id the harness's mocks give a resource (what other resources receive as its id)."""
    return f"{resource_name}-id"


def config_key(key: str) -> str:
    return f"{PROJECT}:{key}"


def stack_variant(
    tmp_path: Path, base: str, name: str, edit: Callable[[dict[str, Any]], None]
) -> Path:
    """A copy of Pulumi.<base>.yaml named Pulumi.<name>.yaml with `edit` applied to its config."""
    document = yaml.safe_load((ROOT / f"Pulumi.{base}.yaml").read_text())
    edit(document["config"])
    path = tmp_path / f"Pulumi.{name}.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path

"""Helpers for the platform tests: decode node user data, and check rendered files with the real
programs that consume them.

chronyd only ever runs as `unshare -n chronyd -x -p -f FILE`: -p parses the file, prints it and
exits; -x and an empty network namespace make sure it could neither adjust this machine's clock
nor send a packet even if it did more. kubectl, likewise, only runs under `unshare -n`, with a
stand-in `aws` first on its PATH.
"""

from __future__ import annotations

import base64
import email
import json
import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
import yaml

from stacks.schema import PROJECT
from tests.support.harness import ROOT, Resource, StackRun

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


# Stands in for the AWS CLI in the kubeconfig's exec plugin: records each call (its arguments, and
# the KUBERNETES_EXEC_INFO kubectl hands a plugin) and answers with a token, as
# `aws eks get-token` does.
_FAKE_AWS = """#!/bin/sh
printf '%s\\n' "$*" >> "$(dirname "$0")/calls"
printf '%s\\n' "$KUBERNETES_EXEC_INFO" >> "$(dirname "$0")/exec-info"
echo '{"kind": "ExecCredential", "apiVersion": "client.authentication.k8s.io/v1beta1",
      "status": {"token": "k8s-aws-v1.stand-in"}}'
"""


@dataclass(frozen=True)
class KubectlRun:
    result: subprocess.CompletedProcess[str]
    aws_calls: list[str]  # the argument lines the stand-in `aws` was called with
    exec_info: list[dict[str, Any]]  # what kubectl told the plugin (KUBERNETES_EXEC_INFO)


def self_signed_ca(tmp_path: Path) -> str:
    """A base64 PEM certificate, as EKS returns in certificateAuthority.data."""
    _need("openssl")
    key, cert = tmp_path / "ca.key", tmp_path / "ca.pem"
    command = "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1"
    subprocess.run(
        [*command.split(), "-subj", "/CN=kubernetes", "-keyout", str(key), "-out", str(cert)],
        capture_output=True,
        timeout=CHECK_TIMEOUT_SECONDS,
        check=True,
    )
    return base64.b64encode(cert.read_bytes()).decode()


def run_kubectl(config: dict[str, Any], args: Sequence[str], tmp_path: Path) -> KubectlRun:
    """kubectl's own verdict on a kubeconfig.

    It runs in an empty network namespace: a command that talks to the cluster loads and
    validates the file, builds the TLS config from the CA, runs the exec credential plugin, and
    only then fails to resolve the server, without a packet leaving. A clean environment and HOME
    keep the caller's AWS and kubectl settings out.
    """
    _need("kubectl", "unshare")
    home, bin_dir = tmp_path / "home", tmp_path / "bin"
    home.mkdir(exist_ok=True)
    bin_dir.mkdir(exist_ok=True)
    aws = bin_dir / "aws"
    aws.write_text(_FAKE_AWS)
    aws.chmod(0o755)
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps(config))
    result = subprocess.run(
        ["unshare", "-n", "kubectl", "--kubeconfig", str(path), *args],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        env={"PATH": f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}", "HOME": str(home)},
        timeout=CHECK_TIMEOUT_SECONDS,
        check=False,
    )
    calls, info = bin_dir / "calls", bin_dir / "exec-info"
    return KubectlRun(
        result=result,
        aws_calls=calls.read_text().splitlines() if calls.exists() else [],
        exec_info=[json.loads(line) for line in info.read_text().split("\n") if line]
        if info.exists()
        else [],
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

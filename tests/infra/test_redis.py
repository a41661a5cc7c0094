"""Redis hosts: the server and its exporter listen, every command needs AUTH, AOF is on."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.infra import probes
from tests.infra.probes import InfraHost


@pytest.fixture(scope="module")
def cli(
    host: InfraHost, role_vars: dict[str, Any], secrets: dict[str, Any]
) -> Callable[..., list[str]]:
    """Runs redis-cli as the exporter user (the password through REDISCLI_AUTH, not argv)."""

    def run(*command: str) -> list[str]:
        out = host.check_output(
            "REDISCLI_AUTH=%s redis-cli -p %s --user %s --no-auth-warning "
            + " ".join(["%s"] * len(command)),
            secrets["redis_exporter_password"],
            str(role_vars["port"]),
            role_vars["user"],
            *command,
        )
        return out.splitlines()

    return run


def test_listens(host: InfraHost, role_vars: dict[str, Any]) -> None:
    assert probes.listening(host, role_vars["port"])
    assert probes.listening(host, role_vars["exporter_port"])


def test_commands_need_auth(host: InfraHost, role_vars: dict[str, Any]) -> None:
    result = host.run("env -u REDISCLI_AUTH redis-cli -p %s ping", str(role_vars["port"]))
    assert "NOAUTH" in result.stdout + result.stderr


def test_auth_works(cli: Callable[..., list[str]]) -> None:
    assert cli("ping") == ["PONG"]


def test_persistence_is_on(host: InfraHost, cli: Callable[..., list[str]]) -> None:
    assert cli("config", "get", "appendonly") == ["appendonly", "yes"]
    directory = cli("config", "get", "dir")[1]
    assert host.file(f"{directory}/appendonlydir").is_directory

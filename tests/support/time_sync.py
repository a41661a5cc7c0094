"""Helpers shared by the time_sync tests of several layers."""

from __future__ import annotations


def directives(conf: str) -> list[str]:
    return [line for line in conf.splitlines() if line and not line.startswith("#")]

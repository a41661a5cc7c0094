"""Helpers shared by the nginx_conf tests of several layers."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


STACKS = ["dev", "staging", "prod"]


CHROOT_SCRIPT = ROOT / "scripts" / "nginx-chroot.sh"


# `server ... resolve` is open source since nginx 1.27.3 (docs/reference/nginx.md#upstream-resolve).
RESOLVE_OPEN_SOURCE_SINCE = (1, 27, 3)

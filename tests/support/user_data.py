"""Helpers shared by the user_data tests of several layers."""

from __future__ import annotations

import base64

from components.render.node_user_data import NodeUserDataArgs, render_node_user_data
from tests.support.platform_checks import (
    decode_user_data,
)


def parts_of(args: NodeUserDataArgs) -> dict[str, str]:
    return decode_user_data(base64.b64encode(render_node_user_data(args).encode()).decode())


# A GPU node (no PTP hardware clock) and a system node with one, as the node groups render them.
NODES = (
    NodeUserDataArgs(phc=False, shutdown_grace_seconds=75),
    NodeUserDataArgs(phc=True, shutdown_grace_seconds=60),
)

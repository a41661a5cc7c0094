"""Pods of a stack as the rehearsal's firewall sees them (scripts/rehearsal/firewall.py): the
rendered labels of the gateway and of one multi-node LWS group's leader and worker (plus the
labels the LWS controller adds), and an unrelated pod, each at an address of our choosing."""

from __future__ import annotations

from collections.abc import Mapping

from components.render.gateway_pod import COMPONENT as GATEWAY_COMPONENT
from components.render.vllm_command import LEADER, WORKER
from components.render.vllm_pods import pod_labels
from scripts.rehearsal.firewall import Endpoint
from stacks.naming import (
    GATEWAY_NAME,
    LWS_GROUP_INDEX_LABEL,
    LWS_NAME_LABEL,
    LWS_WORKER_INDEX_LABEL,
    common_labels,
    lws_name,
)
from tests.support.engines import settings_of, spec_of

STACK = "staging"
MULTI_NODE = "qwen3-vl-32b"  # staging's two-node deployment


def engine_labels(group: int, rank: int) -> dict[str, str]:
    spec = spec_of(STACK, MULTI_NODE)
    return {
        **pod_labels(spec, LEADER if rank == 0 else WORKER),
        LWS_NAME_LABEL: lws_name(MULTI_NODE),
        LWS_GROUP_INDEX_LABEL: str(group),
        LWS_WORKER_INDEX_LABEL: str(rank),
    }


def endpoints(addresses: Mapping[str, str]) -> list[Endpoint]:
    """Roles gateway, leader (group 0), worker (group 0, rank 1), stranger (group 1, rank 1)
    and other, at addresses[role]; roles missing from `addresses` are left out."""
    ns = settings_of(STACK).serving.namespace
    gateway = common_labels(GATEWAY_COMPONENT, GATEWAY_NAME)  # components/gateway.py's
    labels = {
        "gateway": gateway,
        "leader": engine_labels(0, 0),
        "worker": engine_labels(0, 1),
        "stranger": engine_labels(1, 1),
        "other": {"app": "other"},
    }
    return [
        Endpoint(role, ns, labels[role], address)
        for role, address in addresses.items()
        if role in labels
    ]

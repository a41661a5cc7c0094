"""What prod asks beyond validity (digests, revisions, EFA), and the placeholders that warn."""

from __future__ import annotations

import re
from collections.abc import Iterator

from stacks.parse import Problem
from stacks.rules.common import COMMIT, DIGEST, deployment_path, images
from stacks.rules.data import webui_warnings
from stacks.rules.gateway import image_guard_warnings
from stacks.schema import Settings


def prod_rules(s: Settings) -> Iterator[Problem]:
    """What prod refuses that dev and staging tolerate."""
    if s.environment != "prod":
        return
    if not s.protect:
        yield Problem(
            "protect",
            "must be true in prod so `pulumi destroy` cannot delete data by accident",
            False,
        )
    for path, image in images(s):
        if not DIGEST.search(image):
            yield Problem(
                path,
                "prod images must be pinned by digest (name:tag@sha256:<64 hex>); "
                "promote from staging to copy its digests",
                image,
            )
    for d in s.serving.deployments:
        path = deployment_path(s, d)
        if not COMMIT.match(d.revision):
            yield Problem(
                f"{path}.revision",
                "prod needs a 40-character commit sha, not a branch "
                "or tag, so every node loads the same weights",
                d.revision,
            )
        group = next((g for g in s.gpu_node_groups if g.name == d.node_group), None)
        if d.nodes_per_group > 1 and group is not None and not group.efa:
            yield Problem(
                f"{path}.nodeGroup",
                f"a {d.nodes_per_group}-node deployment in prod "
                f"needs an EFA node group; {group.name} has efa: false (NCCL over TCP "
                "is an order of magnitude slower)",
                d.node_group,
            )


_PLACEHOLDER = re.compile(r"^0+$")


def warnings(s: Settings) -> list[Problem]:
    """Pins that pass validation but cannot be deployed as written (all-zero placeholders)."""
    found = [
        Problem(
            path,
            f"placeholder digest: pin it with `python -m scripts.pin --stack {s.stack}` "
            "or promote from the previous stack before deploying",
            image,
        )
        for path, image in images(s)
        if "@sha256:" in image and _PLACEHOLDER.match(image.rsplit(":", 1)[1])
    ]
    found += [
        Problem(
            f"{deployment_path(s, d)}.revision",
            "placeholder revision: set the model's Hub commit sha before deploying",
            d.revision,
        )
        for d in s.serving.deployments
        if _PLACEHOLDER.match(d.revision)
    ]
    found += webui_warnings(s)
    found += image_guard_warnings(s)
    return found

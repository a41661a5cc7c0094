"""What the pin tests of every layer agree on: the prod stack file and its image keys."""

from __future__ import annotations

from scripts.pin.stackfile import ROOT

PROD = ROOT / "Pulumi.prod.yaml"
ZEROS = "sha256:" + "0" * 64
PROD_IMAGE_KEYS = [
    "serving.vllmImage",
    "gateway.image",
    "gateway.exporterImage",
    "gateway.quotaImage",
    "redis.image",
    "redis.exporterImage",
    "webui.image",
]

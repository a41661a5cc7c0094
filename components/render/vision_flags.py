"""What a disaggregated deployment's engines and encoders share (pure): the EC transfer config,
the shared cache directory, and the connector and cache mounts. vllm_command.py and vllm_pods.py
add these to the engines; vision_tier.py builds the encoder tier from them (docs/vision.md).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Final

from stacks.naming import (
    EC_CONNECTOR_CONFIGMAP,
    EC_CONNECTOR_MOUNT,
    VISION_CACHE_CLAIM,
    VISION_CACHE_MOUNT,
)
from stacks.schema import DeploymentSettings

CONNECTOR_MODULE: Final = "qwen_vl_ec_connector"  # its file name in the ConfigMap
CONNECTOR_CLASS: Final = "AtomicFileECConnector"
PRODUCER: Final = "ec_producer"
CONSUMER: Final = "ec_consumer"
CONNECTOR_VOLUME: Final = "ec-connector"
VISION_CACHE_VOLUME: Final = "vision-cache"


def disaggregated(d: DeploymentSettings) -> bool:
    return d.vision.mode == "disaggregated"


def cache_dir(d: DeploymentSettings) -> str:
    """Where this deployment's encoder outputs live: per deployment and model revision, since
    vLLM names an output by the image's hash alone and another model's would not fit."""
    model = hashlib.sha256(f"{d.model}@{d.revision}".encode()).hexdigest()[:12]
    return f"{VISION_CACHE_MOUNT}/{d.name}/{model}"


def ec_transfer_config(d: DeploymentSettings, role: str) -> str:
    """The --ec-transfer-config JSON (docs/reference/vision-tier.md#ec-transfer-config)."""
    config = {
        "ec_connector": CONNECTOR_CLASS,
        "ec_connector_module_path": CONNECTOR_MODULE,
        "ec_role": role,
        "ec_connector_extra_config": {"shared_storage_path": cache_dir(d)},
    }
    return json.dumps(config, separators=(",", ":"))


def consumer_flags(d: DeploymentSettings) -> list[str]:
    """What an engine of a disaggregated deployment adds to its vLLM flags."""
    if not disaggregated(d):
        return []
    # the gateway's encoder step and the engine request share X-Request-Id
    return ["--ec-transfer-config", ec_transfer_config(d, CONSUMER), "--enable-request-id-headers"]


# --- what engines and encoders mount --------------------------------------------------------------


def connector_env() -> dict[str, str]:
    return {"name": "PYTHONPATH", "value": EC_CONNECTOR_MOUNT}


def vision_mounts() -> list[dict[str, Any]]:
    return [
        {"name": VISION_CACHE_VOLUME, "mountPath": VISION_CACHE_MOUNT},
        {"name": CONNECTOR_VOLUME, "mountPath": EC_CONNECTOR_MOUNT, "readOnly": True},
    ]


def vision_volumes() -> list[dict[str, Any]]:
    return [
        {"name": VISION_CACHE_VOLUME, "persistentVolumeClaim": {"claimName": VISION_CACHE_CLAIM}},
        {"name": CONNECTOR_VOLUME, "configMap": {"name": EC_CONNECTOR_CONFIGMAP}},
    ]

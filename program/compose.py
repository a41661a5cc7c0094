"""Wires a stack's components in dependency order and returns its outputs.

Each stage lives in its own module under stacks/ and hands the next stages what
they need (the Kubernetes provider, Secret names, Service names); components
never read config. Kubernetes resources all use the cluster's provider, so
`pulumi destroy` removes them before the cluster and node groups.
"""

from __future__ import annotations

from typing import Any

from program.data import build_data, build_webui, data_outputs, webui_outputs
from program.engines import build_engines
from program.gateway import build_gateway
from program.isolation import build_isolation
from program.observability import build_observability
from program.platform import build_platform
from program.secrets import build_secrets
from program.vision import build_vision
from stacks.schema import Settings


def compose(settings: Settings) -> dict[str, Any]:
    """Build every component of the stack; return the stack outputs by name."""
    outputs: dict[str, Any] = {"stack": settings.stack, "environment": settings.environment}
    secrets = build_secrets(settings)
    platform = build_platform(settings)
    outputs.update(platform.outputs)
    # Before the workloads: their pods start inside the default-deny and its allow rules.
    build_isolation(settings, platform)
    data = build_data(settings, platform, secrets)
    outputs.update(data_outputs(data))
    engines = build_engines(settings, platform, secrets, data.component if data else None)
    outputs["engines"] = engines.outputs()
    outputs.update(build_gateway(settings, platform, secrets).outputs())
    outputs.update(webui_outputs(build_webui(settings, platform, secrets, data)))
    observability = build_observability(settings, platform, secrets, engines.components)
    outputs.update(observability.outputs())
    build_vision(settings, platform, observability, engines.components)
    return outputs

"""Helpers shared by the loadtest tests of several layers."""

from __future__ import annotations


def outputs(url: str | None = "http://gw.example.com", **changes: object) -> dict[str, object]:
    return {
        "stack": "prod",
        "gateway_url": url,
        "gateway_api_keys": {"default": "k-default", "loadtest": "k-load"},
        "engines": {
            "qwen3-vl-2b": {"leader_service_host": "x", "served_model_name": "qwen3-vl-2b"},
            "qwen3-vl-235b": {"leader_service_host": "y", "served_model_name": "big"},
        },
    } | changes

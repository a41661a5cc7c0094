"""Helpers shared by the autoscaling tests of several layers."""

from __future__ import annotations

PROMETHEUS = "http://monitoring-prometheus.monitoring.svc.cluster.local:9090"

"""How much CPU, memory and shared memory an engine pod gets on its GPU node.

Config-model arithmetic: the settings rules check a deployment's cpu/memoryGib against these
bounds, and the LWS renderer sizes the pods with the same functions.
"""

from __future__ import annotations

import math
from typing import Final

from stacks.catalog import GIB, InstanceType
from stacks.schema import DeploymentSettings

# Kubelet, containerd and the DaemonSets (device plugins, CNI, exporters) keep a tenth of
# the vCPUs and memory; the engine pod gets the rest with requests == limits (Guaranteed QoS).
SYSTEM_SHARE_DENOMINATOR: Final = 10


# EFA nodes pre-allocate 5128 2-MiB huge pages (10.02 GiB) that leave allocatable memory;
# pods request the 5120 MiB the EKS NCCL test requests (docs/reference/aws-efa.md#hugepages).
EFA_NODE_HUGEPAGES_GIB: Final = 11


# The most a pod can ask for: kubelet reservations and eviction headroom take ~2 GiB on EKS.
KUBELET_RESERVED_GIB: Final = 2


def default_cpu(instance: InstanceType) -> int:
    return instance.vcpus - max(1, math.ceil(instance.vcpus / SYSTEM_SHARE_DENOMINATOR))


def default_memory_gib(instance: InstanceType, efa: bool) -> int:
    usable = math.floor(
        instance.memory_gib * (SYSTEM_SHARE_DENOMINATOR - 1) / SYSTEM_SHARE_DENOMINATOR
    )
    return usable - (EFA_NODE_HUGEPAGES_GIB if efa else 0)


def max_cpu(instance: InstanceType) -> int:
    return instance.vcpus - 1


def max_memory_gib(instance: InstanceType, efa: bool) -> int:
    return instance.memory_gib - KUBELET_RESERVED_GIB - (EFA_NODE_HUGEPAGES_GIB if efa else 0)


def pod_cpu(d: DeploymentSettings, instance: InstanceType) -> int:
    return d.cpu if d.cpu is not None else default_cpu(instance)


def pod_memory_gib(d: DeploymentSettings, instance: InstanceType, efa: bool) -> int:
    return d.memory_gib if d.memory_gib is not None else default_memory_gib(instance, efa)


def shm_size_bytes(d: DeploymentSettings, min_shm_bytes: int) -> int:
    """shmSizeGib when set, else the planner's minimum for the group."""
    return d.shm_size_gib * GIB if d.shm_size_gib is not None else min_shm_bytes


# Pinned host memory LMCache stages chunks in; it counts against the engine pod's memory.
LMCACHE_LOCAL_CPU_GIB: Final = 5.0

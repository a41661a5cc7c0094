"""chrony configuration of every node: Amazon Time Sync Service first, PHC where the hardware has it.

Pure (no Pulumi): the node user data (components/render/node_user_data.py) installs this text as
/etc/chrony.conf on system and GPU nodes, and the offline rehearsal runs chronyd on the same text
with its own time server address. Facts: docs/reference/eks-nodes.md#chrony-lines and #phc-support.
"""

from __future__ import annotations

from typing import Final

# Link-local NTP endpoint of the Amazon Time Sync Service: no internet, NAT or SG rule needed.
AMAZON_TIME_SYNC_SERVER: Final = "169.254.169.123"
# AWS's public (leap-smeared, like the local endpoint) NTP pool, as a backup only.
AMAZON_PUBLIC_POOL: Final = "time.aws.com"
# Symlink the AL2023 udev rule creates for the ENA PTP hardware clock (/dev/ptpN can change).
PHC_DEVICE: Final = "/dev/ptp_ena"
CHRONY_CONF_PATH: Final = "/etc/chrony.conf"
CHRONY_STATE_DIR: Final = "/var/lib/chrony"
CHRONYD_SERVICE: Final = "chronyd"


def render_chrony_conf(
    *,
    phc: bool,
    server: str = AMAZON_TIME_SYNC_SERVER,
    state_dir: str = CHRONY_STATE_DIR,
) -> str:
    """The whole chrony.conf of a node.

    + phc: add the ENA PTP hardware clock as a preferred reference (only for instance types and
      regions that support it: stacks.catalog.supports_phc).
    + server: the NTP server polled first (the rehearsal passes its own time server).
    + state_dir: where chronyd keeps its drift file.
    """
    lines = [
        "# chrony for qwen-vl-serving nodes, rendered by components/render/time_sync.py.",
        "# The local time server comes first and is preferred; it is polled every 16 s (2^4).",
        f"server {server} prefer iburst minpoll 4 maxpoll 4",
        "# Backup only, for when the local endpoint cannot be reached.",
        f"pool {AMAZON_PUBLIC_POOL} iburst",
    ]
    if phc:
        lines += [
            "# The ENA PTP hardware clock: microsecond accuracy, no network round trip.",
            f"refclock PHC {PHC_DEVICE} poll 0 delay 0.000010 prefer",
        ]
    lines += [
        "# Remember the clock's frequency error across restarts.",
        f"driftfile {state_dir}/drift",
        "# Step a large error instead of slewing it for hours, but only in the first 3 updates",
        "# after boot: later steps would make timestamps in logs and metrics jump.",
        "makestep 1.0 3",
        "# Keep the kernel's sync status and error estimates current: node_exporter's timex",
        "# collector (node_timex_offset_seconds, node_timex_sync_status) reads them.",
        "rtcsync",
    ]
    return "\n".join(lines) + "\n"

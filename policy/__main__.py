"""Entry point the Pulumi CLI runs for `--policy-pack policy`: serves every rule of rules.py.

The CLI starts this file from inside policy/, so the repository root is put on sys.path
for `policy.rules` and the shared constants and planner it imports from components/ and
stacks/. The pack is therefore run from a checkout of this repository, not published.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pulumi_policy import EnforcementLevel, PolicyPack

from policy.rules import POLICIES

PolicyPack(
    name="qwen-vl-serving",
    description="Guardrails for Qwen3-VL on EKS with vLLM: GPU shm, EFA, service links, digests, "
    "exposure, gateway streaming, EFA networking, container resources.",
    # Each policy sets its own level; this applies only to a policy that does not.
    enforcement_level=EnforcementLevel.MANDATORY,
    policies=list(POLICIES),
)

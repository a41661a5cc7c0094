"""Entry point the Pulumi CLI runs for `--policy-pack policy`: serves every rule of rules.py.

The CLI starts this file from inside policy/ with the interpreter of ../.venv, which finds
`policy.rules` and the config model and renderers it imports through the .pth file that
`make venv` writes. The pack is therefore run from a checkout of this repository, not published.
"""

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

"""The `vllm serve` argv and env builder: real flags only, consistent ranks, secrets by reference.

This module: rendered files checked by the real programs that read them. The other layers' tests
of the same code: tests/unit/test_vllm_command.py.
"""

from __future__ import annotations

import subprocess
import sys

from stacks.settings import ROOT


def test_pure_builders_import_without_pulumi() -> None:
    code = (
        "import sys, components.render.vllm_pods, components.render.vllm_command;"
        "bad = [m for m in sys.modules if m.split('.')[0].startswith('pulumi')];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)

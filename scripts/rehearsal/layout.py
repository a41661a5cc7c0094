"""Where a rehearsal keeps its state: shared by the rehearsal, verify and the load test, which
must not import the planner (it pulls in the Pulumi components)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final

REPO_ROOT: Final = Path(__file__).resolve().parents[2]
DEFAULT_STATE_DIR: Final = REPO_ROOT / ".rehearsal"  # git-ignored


@dataclass(frozen=True)
class Layout:
    """Where a rehearsal keeps its state, files and logs."""

    state_dir: Path

    @property
    def state_file(self) -> Path:
        return self.state_dir / "state.json"

    @property
    def inventory(self) -> Path:
        return self.state_dir / "inventory.json"

    @property
    def secrets(self) -> Path:
        return self.state_dir / "secrets.json"

    @property
    def hosts(self) -> Path:
        return self.state_dir / "hosts"

    def host(self, role: str) -> Path:
        return self.hosts / role

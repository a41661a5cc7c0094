"""The vision cache's expiry job, run as the CronJob runs it (`python3 -c EXPIRY_SCRIPT ...`) on a
directory laid out like the shared volume: what it deletes, what it keeps, and the size bound."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from components.render.vision_tier import EXPIRY_SCRIPT, STALE_TEMP_SECONDS, expiry_command
from stacks.settings import load_stack_file, stack_file

DAY = 24 * 3600
FILE = "encoder_cache.safetensors"


def put(root: Path, name: str, size: int, age_s: float) -> Path:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def sweep(root: Path, max_bytes: int) -> dict[str, int]:
    argv = [
        sys.executable, "-c", EXPIRY_SCRIPT,
        "--root", str(root),
        "--ttl-seconds", str(DAY),
        "--max-bytes", str(max_bytes),
        "--stale-temp-seconds", str(STALE_TEMP_SECONDS),
        "--low-water", "0.9",
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=60)
    return json.loads(done.stdout)


def test_outputs_idle_past_the_ttl_and_dead_writers_temp_files_go(tmp_path: Path) -> None:
    old = put(tmp_path, f"rev/a/{FILE}", 100, DAY + 60)
    fresh = put(tmp_path, f"rev/b/{FILE}", 100, 60)
    writing = put(tmp_path, f"rev/c/.{FILE}.1.tmp", 100, 5)  # a writer at work right now
    dead = put(tmp_path, f"rev/d/.{FILE}.2.tmp", 100, STALE_TEMP_SECONDS + 60)
    report = sweep(tmp_path, max_bytes=10**9)
    assert not old.exists()
    assert not dead.exists()
    assert fresh.exists()
    assert writing.exists()
    assert (report["expired"], report["stale_temp"], report["evicted"]) == (1, 1, 0)
    assert report["files"] == 1  # fresh (temp files are not outputs)
    assert report["bytes"] == 100


def test_over_the_bound_the_least_recently_used_go_first(tmp_path: Path) -> None:
    files = [put(tmp_path, f"rev/{i}/{FILE}", 1000, 600 - i * 60) for i in range(5)]  # 0 oldest
    report = sweep(tmp_path, max_bytes=3500)
    # 5000 bytes > 3500: evict oldest until <= 0.9 x 3500 = 3150, so 2 go (3000 left)
    assert [f.exists() for f in files] == [False, False, True, True, True]
    assert report["evicted"] == 2
    assert report["bytes"] == 3000


def test_the_command_staging_renders_runs_with_its_flags_read(tmp_path: Path) -> None:
    """The CronJob's own argv (interpreter and root swapped): its flags are the ones the script
    reads, and staging's cache.maxSizeGib: 50 arrives as bytes."""
    d = load_stack_file(stack_file("staging")).serving.deployments[0]
    argv = expiry_command(d)
    argv[0] = sys.executable
    argv[argv.index("--root") + 1] = str(tmp_path)
    kept = put(tmp_path, f"rev/a/{FILE}", 100, 60)
    old = put(tmp_path, f"rev/b/{FILE}", 100, DAY + 60)  # staging keeps the default 24 h TTL
    done = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=60)
    report = json.loads(done.stdout)
    assert report["max_bytes"] == 50 * 1024**3
    assert (kept.exists(), old.exists(), report["expired"]) == (True, False, 1)

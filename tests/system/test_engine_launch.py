"""The engine launcher's /dev/shm clean-up against the real /dev/shm of this machine."""

from __future__ import annotations

import _multiprocessing  # pyright: ignore[reportMissingImports]
import contextlib
import os
from pathlib import Path

import pytest

from scripts.engine import launch


def test_a_semaphore_created_during_the_holder_scan_is_not_removed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Another engine starting while one stops: its semaphore appears while the holders are
    # being scanned. Taken for a leftover, it was unlinked before the engine's spawned child
    # opened it, and that engine failed to start (FileNotFoundError in SemLock._rebuild).
    newcomer = launch.SHM_DIR / f"sem.mp-qwen-test-{os.getpid()}"
    real_scan = launch._shm_in_use

    def scan_while_another_engine_starts() -> set[int]:
        held = real_scan()
        newcomer.write_bytes(b"\0" * 32)
        return held

    monkeypatch.setattr(launch, "_shm_in_use", scan_while_another_engine_starts)
    try:
        removed = launch.remove_leftover_shm(frozenset(launch.shm_files()))
        assert newcomer.name not in removed
        assert Path(newcomer).exists()
    finally:
        with contextlib.suppress(FileNotFoundError):
            newcomer.unlink()


def test_a_semaphore_held_only_by_its_creator_is_not_removed() -> None:
    # What vLLM's EngineCore does before it spawns a worker: sem_open maps the semaphore under a
    # temporary name and links it to its real name after, so a scan by name missed the creator
    # and unlinked the semaphore the worker was about to open. (The C type directly: the
    # multiprocessing wrapper would start a resource tracker that outlives the test.)
    name = f"/mp-qwen-test-{os.getpid()}"
    semaphore = _multiprocessing.SemLock(1, 1, 1, name, False)
    file = "sem." + name.lstrip("/")
    try:
        removed = launch.remove_leftover_shm(frozenset(launch.shm_files()) - {file})
        assert file not in removed
        assert (launch.SHM_DIR / file).exists()
    finally:
        with contextlib.suppress(FileNotFoundError):
            _multiprocessing.sem_unlink(name)
        del semaphore

"""Chart pins that exist, with digests that are the published archives'.

With CHART_MIRROR (the chart mirror `make charts` reads, e.g. /work/shared/charts; layout in
scripts/charts/fetch.py): every pin has an archive named exactly `<chart>-<version>.tgz` in
the mirror (published/ or top level) whose Chart.yaml is that chart at that version, and every
recorded digest equals the sha256 of the mirror's published archive (`published/` holds the
bytes the chart repository serves). Without a mirror: build/charts' archives are checked against
the recorded digests (a repackaged archive, which `make charts` takes from a mirror's top level,
legitimately differs and is reported as skipped).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from scripts.charts.fetch import PUBLISHED_DIR, chart_metadata, sha256_file
from stacks.versions import HELM_CHARTS
from tests.support.charts import archive, mirror

KEYS = sorted(HELM_CHARTS)


def exact_name(key: str) -> str:
    row = HELM_CHARTS[key]
    return f"{row.chart}-{row.version}.tgz"


def need_mirror() -> Path:
    found = mirror()
    if found is None:
        pytest.skip("CHART_MIRROR is not set (e.g. CHART_MIRROR=/work/shared/charts)")
    assert found.is_dir(), f"CHART_MIRROR={found} is not a directory"
    return found


@pytest.mark.parametrize("key", KEYS)
def test_every_pin_has_an_archive_at_exactly_its_version_in_the_mirror(key: str) -> None:
    root = need_mirror()
    row = HELM_CHARTS[key]
    candidates = [root / PUBLISHED_DIR / exact_name(key), root / exact_name(key)]
    present = [p for p in candidates if p.is_file()]
    assert present, f"{key} {row.version}: none of {[str(p) for p in candidates]} exists"
    for path in present:
        meta = chart_metadata(path)
        assert (meta["name"], str(meta["version"])) == (row.chart, row.version), path


@pytest.mark.parametrize("key", KEYS)
def test_recorded_digest_is_the_published_archives(key: str) -> None:
    row = HELM_CHARTS[key]
    root = mirror()
    if root is None:
        local = archive(key)
        if row.digest is None:
            pytest.skip(f"{key}: no digest recorded (docs/delivery.md#chart-pins)")
        sha = sha256_file(local)
        if sha != row.digest:
            pytest.skip(
                f"{local} (sha256 {sha}) is not the published archive (a repackaged mirror "
                f"archive?); set CHART_MIRROR to compare {row.digest} with the published one"
            )
        return
    published = root / PUBLISHED_DIR / exact_name(key)
    if row.digest is None:
        assert not published.is_file(), (
            f"{published} is the published archive of {key}: record its sha256 "
            f"{sha256_file(published)} as the pin's digest"
        )
        pytest.skip(f"{key}: no digest recorded and no published archive to read one from")
    if not published.is_file():
        pytest.skip(f"{key}: the mirror has no published archive to compare {row.digest} with")
    assert sha256_file(published) == row.digest, f"{key}: recorded digest is not {published}'s"


@pytest.mark.parametrize("key", KEYS)
def test_build_archive_is_the_pinned_chart(key: str) -> None:
    """What `make charts` put in build/charts is the chart at the pinned version."""
    row = HELM_CHARTS[key]
    meta = chart_metadata(archive(key))
    assert (meta["name"], str(meta["version"])) == (row.chart, row.version)
    if row.digest is not None and sha256_file(archive(key)) == row.digest:
        return  # the published bytes themselves
    root = mirror()
    if root is not None:
        # Not the published bytes: then it is the mirror's repackaged archive, byte for byte.
        assert sha256_file(archive(key)) in {
            sha256_file(p)
            for p in (root / exact_name(key), root / PUBLISHED_DIR / exact_name(key))
            if p.is_file()
        }

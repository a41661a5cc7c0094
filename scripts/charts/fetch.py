"""Fetch Helm chart archives by pin: from a local mirror when one is given, else with `helm pull`.

    python -m scripts.charts.fetch --dest DIR [--mirror DIR] [--helm PATH] [--dry-run]

The mirror (--mirror, or the CHART_MIRROR environment variable) is a directory laid out like
a chart mirror: `published/<chart>-<version>.tgz` holds archives byte-identical to what the
chart repository serves (their sha256 must equal the pin's digest), and `<chart>-<version>.tgz`
at the top level holds archives repackaged from the chart's source with `helm package`, whose
sha256 legitimately differs from the published digest (helm writes tar timestamps). A mirror
file is preferred in that order. Without a mirror file, `helm pull` runs (chart repository URL
with --repo, or an oci:// reference) with --version, and the pulled file is checked against the
digest. Every archive's Chart.yaml name and version are checked against the pin.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import yaml

from stacks.versions import HELM_CHARTS

MIRROR_ENV: Final = "CHART_MIRROR"
HELM_ENV: Final = "HELM"
PUBLISHED_DIR: Final = "published"
PULL_TIMEOUT_SECONDS: Final = 300

# Where the archive came from, and what its digest check means.
PUBLISHED: Final = "mirror (published archive)"
REPACKAGED: Final = "mirror (repackaged archive)"
PULLED: Final = "helm pull"


@dataclass(frozen=True, kw_only=True)
class ChartPin:
    """One chart at one version.

    A row of stacks/versions.py's HELM_CHARTS with its key: that table is the only place a
    chart version is written.
    """

    key: str
    chart: str
    version: str
    repo: str
    digest: str | None


class FetchError(RuntimeError):
    """A chart could not be fetched or failed a check; the message says what was tried."""


@dataclass(frozen=True, kw_only=True)
class FetchResult:
    key: str
    path: Path  # the archive in --dest (in a dry run: where it would be)
    source: str  # PUBLISHED, REPACKAGED or PULLED
    origin: str  # the mirror file, or the helm pull command
    sha256: str | None  # None in a dry run
    digest_status: str  # "verified", "repackaged", "unrecorded" or "not checked (dry run)"
    note: str


def archive_name(pin: ChartPin) -> str:
    return f"{pin.chart}-{pin.version}.tgz"


def is_oci(pin: ChartPin) -> bool:
    return pin.repo.startswith("oci://")


def helm_pull_command(helm: str | Path, pin: ChartPin, dest: Path) -> list[str]:
    if is_oci(pin):
        ref = f"{pin.repo.rstrip('/')}/{pin.chart}"
        return [str(helm), "pull", ref, "--version", pin.version, "--destination", str(dest)]
    return [
        str(helm), "pull", pin.chart, "--repo", pin.repo,
        "--version", pin.version, "--destination", str(dest),
    ]  # fmt: skip


def _version_variants(version: str) -> list[str]:
    """The version as pinned first, then with the leading "v" toggled (LWS names its archives
    lws-v0.10.0.tgz while its documentation pins 0.10.0)."""
    other = version[1:] if version.startswith("v") else f"v{version}"
    return [version, other]


def mirror_candidates(pin: ChartPin, mirror: Path) -> list[tuple[Path, str]]:
    names = [f"{pin.chart}-{v}.tgz" for v in _version_variants(pin.version)]
    return [(mirror / PUBLISHED_DIR / n, PUBLISHED) for n in names] + [
        (mirror / n, REPACKAGED) for n in names
    ]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def chart_metadata(archive: Path) -> dict:
    """Chart.yaml of a chart archive (the top-level <name>/Chart.yaml member)."""
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            if (
                member.name.count("/") == 1
                and member.name.endswith("/Chart.yaml")
                and member.isfile()
            ):
                f = tar.extractfile(member)
                assert f is not None
                return yaml.safe_load(f.read()) or {}
    raise FetchError(f"{archive}: no <chart>/Chart.yaml in the archive")


def _same_version(a: str, b: str) -> bool:
    return a.removeprefix("v") == b.removeprefix("v")


def _check_metadata(pin: ChartPin, archive: Path) -> None:
    meta = chart_metadata(archive)
    name, version = meta.get("name"), str(meta.get("version"))
    if name != pin.chart or not _same_version(version, pin.version):
        raise FetchError(
            f"{archive}: Chart.yaml says {name} {version}, but the pin {pin.key!r} is "
            f"{pin.chart} {pin.version}"
        )


def _helm_env(home: Path) -> dict[str, str]:
    """The environment for helm: no HELM_* of the user, every helm home in a scratch dir."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HELM_")}
    env |= {
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
    }
    return env


def _resolve_helm(helm: str | Path | None) -> str:
    return str(helm or os.environ.get(HELM_ENV) or "helm")


def _copy(src: Path, dest_dir: Path) -> Path:
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / src.name
    tmp = target.with_name(f".{target.name}.partial")
    shutil.copyfile(src, tmp)
    tmp.replace(target)
    return target


def _check_digest(pin: ChartPin, sha: str, source: str, origin: str) -> tuple[str, str]:
    if pin.digest is None:
        return "unrecorded", (
            f"no digest is recorded for {pin.key}; this file's sha256 is {sha}"
            + (" (a repackaged archive: do not record it as the published digest)"
               if source == REPACKAGED else " (record it beside the pin)")
        )  # fmt: skip
    if sha == pin.digest:
        return "verified", f"sha256 equals the recorded published digest {pin.digest}"
    if source == REPACKAGED:
        return "repackaged", (
            f"repackaged archive (helm package writes tar timestamps): its sha256 {sha} "
            f"legitimately differs from the published digest {pin.digest}; the content was not "
            f"verified by digest"
        )
    raise FetchError(
        f"digest mismatch for {pin.key} {pin.version} from {origin}: sha256 {sha}, "
        f"recorded published digest {pin.digest}. Refusing to use it."
    )


def fetch_chart(
    pin: ChartPin,
    dest: Path,
    *,
    mirror: Path | None = None,
    helm: str | Path | None = None,
    dry_run: bool = False,
) -> FetchResult:
    """Put pin's archive into dest and check it; raise FetchError saying what was tried."""
    dest = Path(dest)
    tried: list[str] = []
    if mirror is not None:
        for candidate, source in mirror_candidates(pin, Path(mirror)):
            if not candidate.is_file():
                tried.append(f"{candidate} (absent)")
                continue
            target = dest / candidate.name
            if dry_run:
                check = (
                    f"its sha256 must equal {pin.digest}" if source == PUBLISHED and pin.digest
                    else "its sha256 will be compared with the published digest "
                    "(a difference is expected for a repackaged archive)"
                    if pin.digest else "no digest recorded"
                )  # fmt: skip
                return FetchResult(
                    key=pin.key, path=target, source=source, origin=str(candidate), sha256=None,
                    digest_status="not checked (dry run)",
                    note=f"would copy {candidate} -> {target}; {check}",
                )  # fmt: skip
            sha = sha256_file(candidate)
            status, note = _check_digest(pin, sha, source, str(candidate))
            _check_metadata(pin, candidate)
            path = _copy(candidate, dest)
            return FetchResult(
                key=pin.key, path=path, source=source, origin=str(candidate), sha256=sha,
                digest_status=status, note=note,
            )  # fmt: skip

    helm_bin = _resolve_helm(helm)
    command = helm_pull_command(helm_bin, pin, Path("<tmp>"))
    shown = " ".join(command[:-2])
    if dry_run:
        check = f"its sha256 must equal {pin.digest}" if pin.digest else "no digest recorded"
        return FetchResult(
            key=pin.key, path=dest / archive_name(pin), source=PULLED, origin=shown, sha256=None,
            digest_status="not checked (dry run)", note=f"would run: {shown}; {check}",
        )  # fmt: skip

    with tempfile.TemporaryDirectory(prefix="chart-fetch-") as tmp:
        out = Path(tmp) / "out"
        out.mkdir()
        command = helm_pull_command(helm_bin, pin, out)
        try:
            proc = subprocess.run(
                command, env=_helm_env(Path(tmp) / "helm"), capture_output=True, text=True,
                timeout=PULL_TIMEOUT_SECONDS, check=False,
            )  # fmt: skip
            failure = None if proc.returncode == 0 else (
                proc.stderr.strip() or proc.stdout.strip() or f"exit status {proc.returncode}"
            )  # fmt: skip
        except FileNotFoundError:
            failure = (
                f"helm was not found ({helm_bin!r}; install it with "
                f"scripts/charts/install_helm.sh DIR and pass --helm DIR/helm or set {HELM_ENV})"
            )
        except subprocess.TimeoutExpired:
            failure = f"timed out after {PULL_TIMEOUT_SECONDS}s"
        pulled = sorted(out.glob("*.tgz"))
        if failure is None and len(pulled) != 1:
            failure = f"expected one archive, helm wrote {[p.name for p in pulled]}"
        if failure is not None:
            raise FetchError(_failure_message(pin, mirror, tried, shown, failure))
        sha = sha256_file(pulled[0])
        status, note = _check_digest(pin, sha, PULLED, shown)
        _check_metadata(pin, pulled[0])
        path = _copy(pulled[0], dest)
    return FetchResult(
        key=pin.key, path=path, source=PULLED, origin=shown, sha256=sha,
        digest_status=status, note=note,
    )  # fmt: skip


def _failure_message(
    pin: ChartPin, mirror: Path | None, tried: list[str], shown: str, failure: str
) -> str:
    first_line = failure.splitlines()[0] if failure else failure
    where = (
        f"the mirror {mirror} has none of: {', '.join(tried)}; then "
        if mirror is not None
        else f"no chart mirror was given (--mirror or {MIRROR_ENV}); "
    )
    return (
        f"Cannot fetch chart {pin.key} ({pin.chart} {pin.version}): {where}`{shown}` failed: "
        f"{first_line}. If this machine is offline, set {MIRROR_ENV} (or pass --mirror) to a "
        f"directory holding {archive_name(pin)}, preferably the published archive as "
        f"{PUBLISHED_DIR}/{archive_name(pin)}; "
        f"otherwise check that {pin.repo} is reachable and serves version {pin.version}."
    )


def fetch_all(
    pins: Iterable[ChartPin],
    dest: Path,
    *,
    mirror: Path | None = None,
    helm: str | Path | None = None,
    dry_run: bool = False,
) -> list[FetchResult]:
    return [fetch_chart(p, dest, mirror=mirror, helm=helm, dry_run=dry_run) for p in pins]


def table_pins() -> list[ChartPin]:
    return [
        ChartPin(key=key, chart=c.chart, version=c.version, repo=c.repo, digest=c.digest)
        for key, c in HELM_CHARTS.items()
    ]


def main(argv: Sequence[str] | None = None, pins: Sequence[ChartPin] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.charts.fetch", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("--dest", type=Path, required=True, help="directory for the archives")
    parser.add_argument(
        "--mirror", type=Path, default=os.environ.get(MIRROR_ENV) or None,
        help=f"local chart mirror (default: ${MIRROR_ENV})",
    )  # fmt: skip
    parser.add_argument("--helm", default=None, help=f"helm binary (default: ${HELM_ENV} or helm)")
    parser.add_argument("--only", action="append", default=[], help="fetch only this pin key")
    parser.add_argument("--dry-run", action="store_true", help="print what would be fetched")
    args = parser.parse_args(argv)

    selected = list(pins if pins is not None else table_pins())
    if args.only:
        unknown = set(args.only) - {p.key for p in selected}
        if unknown:
            parser.error(f"unknown pin key(s): {', '.join(sorted(unknown))}")
        selected = [p for p in selected if p.key in args.only]
    if args.mirror is not None and not args.mirror.is_dir():
        parser.error(f"mirror {args.mirror} is not a directory")

    failures = 0
    for p in selected:
        try:
            r = fetch_chart(p, args.dest, mirror=args.mirror, helm=args.helm, dry_run=args.dry_run)
        except FetchError as e:
            failures += 1
            print(f"ERROR {p.key}: {e}", file=sys.stderr)
            continue
        sha = f" sha256={r.sha256}" if r.sha256 else ""
        print(f"{r.key} {p.version}: {r.source} [{r.digest_status}] {r.path}{sha}")
        print(f"    {r.note}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

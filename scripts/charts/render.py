"""Render a chart offline with `helm template`, and compare passed values with a chart's defaults.

helm runs with HELM_CACHE_HOME, HELM_CONFIG_HOME and HELM_DATA_HOME in a fresh temporary
directory and every other HELM_* variable removed, so nothing of the user's helm configuration
(repositories, registry logins, plugins) is read or written; KUBECONFIG points at an empty file
so no cluster is contacted (`helm template` is client-only, and --kube-version/--api-versions
stand in for the cluster's capabilities).
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import tarfile
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import yaml

# libyaml's parser when PyYAML has it: ten times faster on kube-prometheus-stack's 5 MB of CRDs.
_SafeLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Loader(_SafeLoader):
    """SafeLoader without the YAML 1.1 `=` (value) and timestamp implicit types.

    PyYAML refuses a plain `=` (which CRD schemas use, e.g. an enum of operators) and turns
    dates into datetime objects; Kubernetes' YAML-to-JSON conversion keeps both as strings.
    """


_Loader.yaml_implicit_resolvers = {
    first: [
        (tag, regexp)
        for tag, regexp in resolvers
        if tag not in ("tag:yaml.org,2002:value", "tag:yaml.org,2002:timestamp")
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def load_all(text: str) -> list[dict]:
    """Parse multi-document YAML as Kubernetes does; empty documents are dropped."""
    return [d for d in yaml.load_all(text, Loader=_Loader) if d]


class HelmError(RuntimeError):
    """helm exited with an error; the message holds the command and helm's stderr."""


def helm_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HELM_")}
    kubeconfig = home / "kubeconfig"
    kubeconfig.parent.mkdir(parents=True, exist_ok=True)
    kubeconfig.touch()
    env |= {
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
        "KUBECONFIG": str(kubeconfig),
    }
    return env


def helm_template(  # noqa: PLR0913, PLR0917 (the signature the callers agreed on)
    helm: Path,
    chart: Path,
    release: str,
    namespace: str,
    values: Mapping[str, Any],
    kube_version: str,
    api_versions: Sequence[str],
    include_crds: bool,
    *,
    timeout: float = 300,
) -> list[dict]:
    """`helm template` the chart (an archive or a directory) and return its objects.

    values are written to a temporary file as JSON (a YAML subset, so types survive exactly);
    multi-document output is parsed and empty documents are dropped.
    """
    with tempfile.TemporaryDirectory(prefix="helm-template-") as tmp:
        tmp_path = Path(tmp)
        values_file = tmp_path / "values.json"
        values_file.write_text(json.dumps(values, sort_keys=True))
        command = [
            str(helm), "template", release, str(chart),
            "--namespace", namespace,
            "--values", str(values_file),
            "--kube-version", kube_version,
        ]  # fmt: skip
        for api in api_versions:
            command += ["--api-versions", api]
        if include_crds:
            command.append("--include-crds")
        proc = subprocess.run(
            command, env=helm_env(tmp_path / "helm"), capture_output=True, text=True,
            timeout=timeout, check=False,
        )  # fmt: skip
    if proc.returncode != 0:
        raise HelmError(f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stderr.strip()}")
    return load_all(proc.stdout)


def by_kind(docs: Sequence[Mapping[str, Any]], kind: str) -> list[Mapping[str, Any]]:
    return [d for d in docs if d.get("kind") == kind]


# --- values compared with the chart's defaults -------------------------------------------


def _read_member(tar: tarfile.TarFile, name: str) -> bytes | None:
    try:
        f = tar.extractfile(name)
    except KeyError:
        return None
    return f.read() if f else None


def _chart_defaults(tar: tarfile.TarFile, root: str) -> dict[str, Any]:
    """values.yaml of the chart under `root`, with each dependency's defaults merged in under
    its alias (or name), from charts/<dep>/ directories or nested charts/<dep>-<v>.tgz archives."""
    values = yaml.load(_read_member(tar, f"{root}/values.yaml") or b"", Loader=_Loader) or {}
    meta = yaml.load(_read_member(tar, f"{root}/Chart.yaml") or b"", Loader=_Loader) or {}
    deps = meta.get("dependencies") or []
    if not deps:  # apiVersion v1 charts list them in requirements.yaml
        req = yaml.load(_read_member(tar, f"{root}/requirements.yaml") or b"", Loader=_Loader) or {}
        deps = req.get("dependencies") or []
    names = tar.getnames()
    for dep in deps:
        key = dep.get("alias") or dep["name"]
        sub: dict[str, Any] | None = None
        if f"{root}/charts/{dep['name']}/values.yaml" in names:
            sub = _chart_defaults(tar, f"{root}/charts/{dep['name']}")
        else:
            for n in names:
                base = n.rsplit("/", 1)[-1]
                if (
                    n.startswith(f"{root}/charts/")
                    and n.count("/") == root.count("/") + 2
                    and base.startswith(f"{dep['name']}-")
                    and base.endswith(".tgz")
                ):
                    data = _read_member(tar, n)
                    assert data is not None
                    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as inner:
                        inner_root = inner.getnames()[0].split("/")[0]
                        sub = _chart_defaults(inner, inner_root)
                    break
        if sub is not None:
            values[key] = _merge(sub, values.get(key) or {})
    return values


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, dict) else v
    return out


def chart_default_values(chart: Path) -> dict[str, Any]:
    """The chart archive's default values, subcharts' defaults included."""
    with tarfile.open(chart, "r:gz") as tar:
        root = tar.getnames()[0].split("/")[0]
        return _chart_defaults(tar, root)


def unknown_value_keys(defaults: Mapping[str, Any], values: Mapping[str, Any]) -> list[str]:
    """Paths of keys in values that the chart's defaults do not have.

    A key is reported only where the default at its parent is a non-empty mapping: an empty or
    null default ({} / ~) is a free-form map (nodeSelector, annotations, extraArgs, ...) whose
    keys cannot be judged. `global` is skipped. Helm ignores unknown keys silently (unless the
    chart has a values.schema.json), so each of these is probably a mistake or a key the chart
    version renamed.
    """
    found: list[str] = []

    def walk(d: Mapping[str, Any], v: Mapping[str, Any], path: str) -> None:
        for k, val in v.items():
            p = f"{path}.{k}" if path else str(k)
            if k == "global" and not path:
                continue
            if k not in d:
                found.append(p)
            elif isinstance(d[k], dict) and d[k] and isinstance(val, dict):
                walk(d[k], val, p)

    if defaults:
        walk(defaults, values, "")
    return found


def chart_templates_text(chart: Path) -> str:
    """Every template of the chart archive and of its subcharts (nested archives included)."""

    def collect(tar: tarfile.TarFile) -> list[str]:
        texts: list[str] = []
        for member in tar:
            if not member.isfile():
                continue
            data = tar.extractfile(member)
            if data is None:
                continue
            if "/templates/" in member.name:
                texts.append(data.read().decode("utf-8", "replace"))
            elif member.name.endswith(".tgz") and "/charts/" in member.name:
                with tarfile.open(fileobj=io.BytesIO(data.read()), mode="r:gz") as inner:
                    texts.extend(collect(inner))
        return texts

    with tarfile.open(chart, "r:gz") as tar:
        return "\n".join(collect(tar))


UNKNOWN: Final = "unknown: not in values.yaml and not referenced by any template"
UNDOCUMENTED: Final = "not in values.yaml, but a template references it"
FREE_FORM: Final = "free-form map: a template ranges over its parent"


def value_key_report(chart: Path, values: Mapping[str, Any]) -> dict[str, str]:
    """For every key of values that the chart's values.yaml lacks (see unknown_value_keys):
    UNKNOWN (almost surely ignored by the chart), UNDOCUMENTED (values.yaml only has it in a
    comment, as charts often do) or FREE_FORM (e.g. cluster-autoscaler's extraArgs)."""
    defaults = chart_default_values(chart)
    text = chart_templates_text(chart)
    report: dict[str, str] = {}
    for path in unknown_value_keys(defaults, values):
        parent, _, leaf = path.rpartition(".")
        parent_leaf = parent.rpartition(".")[2]
        ranged = parent_leaf and re.search(
            r"range\s+\$\w+\s*,\s*\$\w+\s*:=\s*\.Values(?:\.[\w-]+)*\."
            + re.escape(parent_leaf)
            + r"\s*-?\}\}",
            text,
        )
        if ranged:
            report[path] = FREE_FORM
        elif re.search(r"\." + re.escape(leaf) + r"\b", text) or f'"{leaf}"' in text:
            report[path] = UNDOCUMENTED
        else:
            report[path] = UNKNOWN
    return report

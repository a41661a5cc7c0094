"""The chart tools (scripts/charts: fetch, render, crd_schema) against real charts and helm.

Pinned archives come from build/charts (`make charts`); the mirror-only checks (published vs
repackaged archives, LWS 0.7.0) need CHART_MIRROR and are skipped without it.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from scripts.charts import fetch
from scripts.charts.crd_schema import (
    CrdSchemaError,
    CrdValidator,
    go_regex_to_python,
    openapi_to_jsonschema,
    root_schema,
)
from scripts.charts.fetch import ChartPin, FetchError, fetch_chart
from scripts.charts.render import (
    FREE_FORM,
    UNDOCUMENTED,
    UNKNOWN,
    HelmError,
    helm_template,
    load_all,
    value_key_report,
)
from stacks.versions import CLUSTER_AUTOSCALER, KEDA, KUBE_PROMETHEUS_STACK, LEADER_WORKER_SET
from tests.support.charts import archive, mirror, need_helm

K8S = "1.33.0"


def pin(key: str) -> ChartPin:
    (found,) = [p for p in fetch.table_pins() if p.key == key]
    return found


def need_mirror() -> Path:
    found = mirror()
    if found is None:
        pytest.skip("CHART_MIRROR is not set")
    return found


def kinds(docs: list[dict[str, Any]]) -> list[str]:
    return sorted(d["kind"] for d in docs)


# --- fetch -------------------------------------------------------------------------------------


def test_published_is_preferred_and_repackaged_is_explained(tmp_path: Path) -> None:
    root = need_mirror()
    keda = fetch_chart(pin(KEDA), tmp_path, mirror=root)
    assert keda.source == fetch.PUBLISHED
    assert keda.digest_status == "verified"
    ca = fetch_chart(pin(CLUSTER_AUTOSCALER), tmp_path, mirror=root)
    assert ca.source == fetch.REPACKAGED
    assert "legitimately differs" in ca.note


def test_published_digest_mismatch_is_refused(tmp_path: Path) -> None:
    root = need_mirror()
    bad = ChartPin(
        key="keda", chart="keda", version=pin(KEDA).version, repo="https://x", digest="0" * 64
    )
    with pytest.raises(FetchError, match="digest mismatch"):
        fetch_chart(bad, tmp_path / "out", mirror=root)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_chart_yaml_must_match_the_pin(tmp_path: Path) -> None:
    local = tmp_path / "m"
    local.mkdir()
    shutil.copy(archive(KEDA), local / "keda-9.9.9.tgz")
    other = ChartPin(key="keda", chart="keda", version="9.9.9", repo="https://x", digest=None)
    with pytest.raises(FetchError, match=re.escape(f"Chart.yaml says keda {pin(KEDA).version}")):
        fetch_chart(other, tmp_path / "out", mirror=local)


def test_leading_v_is_tolerated(tmp_path: Path) -> None:
    local = tmp_path / "m"
    local.mkdir()
    shutil.copy(archive(LEADER_WORKER_SET), local / archive(LEADER_WORKER_SET).name)
    lws = pin(LEADER_WORKER_SET)
    unprefixed = ChartPin(
        key="lws", chart="lws", version=lws.version.removeprefix("v"), repo=lws.repo, digest=None
    )
    assert (
        fetch_chart(unprefixed, tmp_path / "out", mirror=local).path.name
        == archive(LEADER_WORKER_SET).name
    )


def test_dry_run_touches_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(fetch.MIRROR_ENV, raising=False)
    assert fetch.main(["--dest", str(tmp_path / "d"), "--dry-run", "--only", "lws"]) == 0
    out = capsys.readouterr().out
    assert (
        f"would run: helm pull oci://registry.k8s.io/lws/charts/lws --version {pin(LEADER_WORKER_SET).version}"
        in out
    )
    assert not (tmp_path / "d").exists()


def test_missing_helm_is_explained(tmp_path: Path) -> None:
    with pytest.raises(FetchError, match=r"install_helm\.sh"):
        fetch_chart(pin(KEDA), tmp_path, helm=tmp_path / "no-helm")


# --- render ------------------------------------------------------------------------------------


def test_values_reach_the_objects_and_crds_only_on_request() -> None:
    helm = need_helm()
    docs = helm_template(
        helm,
        archive(LEADER_WORKER_SET),
        "lws",
        "lws-system",
        {"nodeSelector": {"role": "system"}},
        K8S,
        [],
        False,
    )
    assert all(isinstance(d, dict) and d for d in docs)
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    assert dep["spec"]["template"]["spec"]["nodeSelector"] == {"role": "system"}
    assert "CustomResourceDefinition" not in kinds(docs)
    with_crds = helm_template(helm, archive(LEADER_WORKER_SET), "lws", "x", {}, K8S, [], True)
    assert kinds(with_crds).count("CustomResourceDefinition") == 3


def test_cluster_autoscaler_needs_a_cluster_name() -> None:
    helm, chart = need_helm(), archive(CLUSTER_AUTOSCALER)
    assert "Deployment" not in kinds(
        helm_template(helm, chart, "ca", "kube-system", {}, K8S, [], False)
    )
    named = {"autoDiscovery": {"clusterName": "demo"}, "awsRegion": "us-west-2"}
    assert "Deployment" in kinds(
        helm_template(helm, chart, "ca", "kube-system", named, K8S, [], False)
    )


def test_kube_version_is_checked() -> None:
    with pytest.raises(HelmError, match="kubeVersion"):
        helm_template(need_helm(), archive(KEDA), "keda", "keda", {}, "1.20.0", [], False)


def test_api_versions_reach_capabilities() -> None:
    helm, chart = need_helm(), archive(KUBE_PROMETHEUS_STACK)
    values = {
        "grafana": {"adminPassword": "x"},
        "prometheusOperator": {"verticalPodAutoscaler": {"enabled": True}},
    }
    without = helm_template(helm, chart, "k", "m", values, K8S, [], False)
    with_vpa = helm_template(helm, chart, "k", "m", values, K8S, ["autoscaling.k8s.io/v1"], False)
    assert "VerticalPodAutoscaler" not in kinds(without)
    assert "VerticalPodAutoscaler" in kinds(with_vpa)


def test_user_helm_config_is_neither_read_nor_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    bad = tmp_path / "repositories.yaml"
    bad.write_text("this: [is not valid")
    monkeypatch.setenv("HELM_REPOSITORY_CONFIG", str(bad))
    monkeypatch.setenv("HELM_CONFIG_HOME", str(home / "helm-config"))
    assert helm_template(need_helm(), archive(KEDA), "keda", "keda", {}, K8S, [], False)
    assert list(home.rglob("*")) == []


def test_yaml_like_kubernetes() -> None:
    [doc] = load_all("---\na: =\nb: 2026-01-01\nc: true\n---\n\n---\n")
    assert doc == {"a": "=", "b": "2026-01-01", "c": True}


def test_value_key_report() -> None:
    ca = value_key_report(
        archive(CLUSTER_AUTOSCALER),
        {
            "extraArgs": {"expander": "least-waste"},
            "nodeSelectr": {"a": "b"},
            "autoDiscovery": {"clusterName": "x", "clustername": "y"},
        },
    )
    assert ca == {
        "extraArgs.expander": FREE_FORM,
        "nodeSelectr": UNKNOWN,
        "autoDiscovery.clustername": UNKNOWN,
    }
    kps = value_key_report(
        archive(KUBE_PROMETHEUS_STACK),
        {
            "grafana": {"fullnameOverride": "grafana", "persistence": {"enabled": True}},
            "kube-state-metrics": {"metricLabelsAllowlist": []},
        },
    )
    assert kps == {"grafana.fullnameOverride": UNDOCUMENTED}


# --- the conversion, on synthetic schemas -------------------------------------------------------


def validator(openapi: dict[str, Any]) -> CrdValidator:
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "things.example.com"},
        "spec": {
            "group": "example.com",
            "names": {"kind": "Thing", "plural": "things"},
            "scope": "Namespaced",
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": openapi},
                },
                {
                    "name": "v0",
                    "served": False,
                    "storage": False,
                    "schema": {"openAPIV3Schema": openapi},
                },
            ],
        },
    }
    return CrdValidator([crd])


def thing(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "example.com/v1",
        "kind": "Thing",
        "metadata": {"name": "t"},
        "spec": spec,
    }


SCHEMA = {
    "type": "object",
    "properties": {
        "spec": {
            "type": "object",
            "properties": {
                "free": {
                    "type": "object",
                    "x-kubernetes-preserve-unknown-fields": True,
                    "properties": {"known": {"type": "integer"}},
                },
                "any": {"x-kubernetes-preserve-unknown-fields": True},
                "port": {
                    "x-kubernetes-int-or-string": True,
                    "anyOf": [{"type": "integer"}, {"type": "string"}],
                },
                "maybe": {"type": "string", "nullable": True},
                "never": {"type": "string"},
                "empty": {"type": "object"},
                "map": {"type": "object", "additionalProperties": {"type": "string"}},
                "ratio": {"type": "number", "minimum": 0, "exclusiveMinimum": True},
                "tpl": {
                    "type": "object",
                    "x-kubernetes-embedded-resource": True,
                    "properties": {
                        "spec": {"type": "object", "properties": {"a": {"type": "string"}}}
                    },
                },
                "oneof": {
                    "type": "object",
                    "properties": {"a": {"type": "string"}, "b": {"type": "string"}},
                    "oneOf": [{"required": ["a"]}, {"required": ["b"]}],
                },
                "name": {"type": "string", "pattern": "^((?i)ab)c$"},
            },
        }
    },
}


def test_synthetic_accepts() -> None:
    v = validator(SCHEMA)
    ok = thing(
        {
            "free": {"known": 1, "whatever": {"x": [1]}},
            "any": [1, "x"],
            "port": "http",
            "maybe": None,
            "empty": {},
            "map": {"k": "v"},
            "ratio": 0.5,
            "tpl": {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": {"name": "c", "labels": {"a": "b"}},
                "spec": {"a": "x"},
            },
            "oneof": {"a": "x"},
            "name": "ABc",
        }
    )
    assert v.validate(ok) == []
    assert v.validate(thing({"port": 8080})) == []


def test_synthetic_rejects() -> None:
    v = validator(SCHEMA)
    bad = thing(
        {
            "free": {"known": "1"},
            "port": 1.5,
            "never": None,
            "empty": {"x": 1},
            "map": {"k": 1},
            "ratio": 0,
            "tpl": {"metadata": {"nam": "c"}, "spec": {"b": 1}},
            "oneof": {"a": "x", "b": "y"},
            "name": "abC",
            "typo": 1,
        }
    )
    got = {i.path: i.message for i in v.validate(bad)}
    assert set(got) == {
        "spec.free.known",
        "spec.port",
        "spec.never",
        "spec.empty.x",
        "spec.map.k",
        "spec.ratio",
        "spec.tpl.metadata.nam",
        "spec.tpl.spec.b",
        "spec.oneof",
        "spec.name",
        "spec.typo",
    }
    assert got["spec.never"].startswith("null is not allowed")
    assert got["spec.empty.x"] == "unknown field"
    assert "not served" in v.validate(dict(thing({}), apiVersion="example.com/v0"))[0].message


def test_conversion_details() -> None:
    out = openapi_to_jsonschema(
        {
            "type": "integer",
            "minimum": 1,
            "exclusiveMinimum": True,
            "nullable": True,
            "enum": [1, 2],
            "description": "d",
        }
    )
    assert out == {"type": ["integer", "null"], "exclusiveMinimum": 1, "enum": [1, 2, None]}
    junctor = openapi_to_jsonschema(
        {
            "type": "object",
            "properties": {"a": {"type": "string"}},
            "anyOf": [{"properties": {"a": {"type": "string"}}}],
        }
    )
    assert junctor["additionalProperties"] is False
    assert "additionalProperties" not in junctor["anyOf"][0]
    assert root_schema({"type": "object"})["additionalProperties"] is False
    with pytest.raises(CrdSchemaError):
        CrdValidator(
            [
                {
                    "apiVersion": "apiextensions.k8s.io/v1beta1",
                    "kind": "CustomResourceDefinition",
                    "metadata": {"name": "x"},
                    "spec": {},
                }
            ]
        )


def test_go_regex() -> None:
    assert go_regex_to_python("(?i)abc") == "(?i)abc"
    assert go_regex_to_python("a(?i)b|c") == "a(?i:b|c)"
    assert go_regex_to_python("^(x(?i)y)z$") == "^(x(?i:y))z$"
    assert go_regex_to_python(r"^a\z") == r"^a\Z"
    assert go_regex_to_python(r"[(?i)]") == r"[(?i)]"
    assert go_regex_to_python("(?U)a+") is None

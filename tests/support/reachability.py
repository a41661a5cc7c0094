"""Reachability of a stack's pods, computed by IBM's network-config-analyzer (nca) from what the
program registered: its NetworkPolicies and its pod templates' labels.

nca is not the code that wrote the policies: it is an independent implementation of Kubernetes
NetworkPolicy semantics, run from its own pinned venv (requirements-nca.lock, installed by
scripts/nca/install.sh into build/nca-venv, or NCA_VENV). We hand it a cluster of pods:
- the program's own workloads, with the labels of their registered pod templates: the gateway,
  Redis and web UI (one pod each), and every LWS group a deployment can have (KEDA's
  maxReplicas) plus one more, leader and workers, with the labels the LWS controller adds
  (name, group-index, worker-index: the template does not carry those);
- stand-ins the stack does not create: an unrelated pod of the serving namespace, an
  application pod that opted into Redis, Prometheus (monitoring), CoreDNS (kube-system) and a
  pod of another namespace.
and read back its connectivity map (`--output_format txt_no_fw_rules`: one line per pair).
"""

from __future__ import annotations

import ipaddress
import os
import re
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from stacks.naming import (
    KUBE_DNS_POD_LABELS,
    LWS_GROUP_INDEX_LABEL,
    LWS_NAME_LABEL,
    LWS_WORKER_INDEX_LABEL,
    MONITORING_NAMESPACE,
    NAMESPACE_NAME_LABEL,
    PROMETHEUS_POD_LABELS,
    REDIS_CLIENT_LABEL,
    SYSTEM_NAMESPACE,
)
from stacks.schema import Settings
from tests.support.harness import ROOT, StackRun
from tests.support.manifests import manifest

NCA_VENV = Path(os.environ.get("NCA_VENV", ROOT / "build" / "nca-venv"))
INSTALL = ROOT / "scripts" / "nca" / "install.sh"
ELSEWHERE = "elsewhere"  # a namespace of other tenants


@dataclass(frozen=True)
class Pod:
    name: str
    namespace: str
    labels: Mapping[str, str]


def install_nca() -> Path:
    """The nca executable, after making sure its venv matches the lock (idempotent, quick)."""
    subprocess.run(["bash", str(INSTALL), str(NCA_VENV)], check=True, timeout=600)
    return NCA_VENV / "bin" / "nca"


def _template_labels(template: Mapping[str, Any]) -> dict[str, str]:
    return dict(template.get("metadata", {}).get("labels", {}))


def stack_pods(run: StackRun, settings: Settings) -> list[Pod]:
    """The workloads the program registered, one pod per Deployment/StatefulSet and every LWS
    group up to the most the deployment can have, plus one group beyond that."""
    ns = settings.serving.namespace
    found: list[Pod] = []
    for kind in ("kubernetes:apps/v1:Deployment", "kubernetes:apps/v1:StatefulSet"):
        for resource in run.of_type(kind):
            doc = manifest(resource)
            if doc["metadata"].get("namespace") != ns:
                continue
            labels = _template_labels(doc["spec"]["template"])
            found.append(Pod(f"{doc['metadata']['name']}-0", ns, labels))
    by_name = {d.name: d for d in settings.serving.deployments}
    for resource in run.of_type("kubernetes:leaderworkerset.x-k8s.io/v1:LeaderWorkerSet"):
        doc = manifest(resource)
        lws = doc["metadata"]["name"]
        d = by_name[lws]
        groups = max(d.replicas, d.autoscaling.max_replicas) + 1
        template = doc["spec"]["leaderWorkerTemplate"]
        size = template.get("size", 1)
        for group in range(groups):
            for rank in range(size):
                pod_template = template.get("leaderTemplate", template["workerTemplate"])
                if rank > 0:
                    pod_template = template["workerTemplate"]
                labels = {
                    **_template_labels(pod_template),
                    LWS_NAME_LABEL: lws,
                    LWS_GROUP_INDEX_LABEL: str(group),
                    LWS_WORKER_INDEX_LABEL: str(rank),
                }
                name = f"{lws}-{group}" if rank == 0 else f"{lws}-{group}-{rank}"
                found.append(Pod(name, ns, labels))
    return found


def stand_ins(settings: Settings) -> list[Pod]:
    ns = settings.serving.namespace
    return [
        Pod("other", ns, {"app": "other"}),
        Pod("app-client", ns, {"app": "app-client", REDIS_CLIENT_LABEL: "true"}),
        # an application of the namespace whose own policy opens all its egress (OPEN_EGRESS):
        # what it still cannot reach is refused by the receivers' ingress rules alone
        Pod("app-open", ns, dict(OPEN_EGRESS_LABELS)),
        Pod("prometheus", MONITORING_NAMESPACE, dict(PROMETHEUS_POD_LABELS)),
        Pod("coredns", SYSTEM_NAMESPACE, dict(KUBE_DNS_POD_LABELS)),
        Pod("client", ELSEWHERE, {"app": "client"}),
    ]


OPEN_EGRESS_LABELS = {"app": "app-open"}


def open_egress_policy(settings: Settings) -> dict[str, Any]:
    """A stand-in application's own policy: every egress allowed for the app-open pod."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "test-app-open-egress", "namespace": settings.serving.namespace},
        "spec": {
            "podSelector": {"matchLabels": dict(OPEN_EGRESS_LABELS)},
            "policyTypes": ["Egress"],
            "egress": [{}],
        },
    }


def network_policies(run: StackRun) -> list[dict[str, Any]]:
    return [manifest(r) for r in run.of_type("kubernetes:networking.k8s.io/v1:NetworkPolicy")]


def _nca_label(value: str) -> str:
    """nca's YAML scanner turns every scalar that int() accepts into an int, quoted or not, and
    then refuses it as a label value; LWS's group and worker indexes are such strings. They are
    renamed the same way in pods and selectors (matching compares labels for equality only)."""
    try:
        int(value)
    except ValueError:
        return value
    return f"n{value}"


def _nca_labels(labels: Mapping[str, str]) -> dict[str, str]:
    return {k: _nca_label(v) for k, v in labels.items()}


def _nca_policy(node: Any) -> Any:
    if isinstance(node, list):
        return [_nca_policy(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _nca_policy(v) for k, v in node.items()}
    if isinstance(node.get("matchLabels"), dict):
        out["matchLabels"] = _nca_labels(node["matchLabels"])
    if isinstance(node.get("matchExpressions"), list):
        out["matchExpressions"] = [
            {**e, "values": [_nca_label(v) for v in e["values"]]} if "values" in e else e
            for e in node["matchExpressions"]
        ]
    return out


def cluster_yaml(pods: Iterable[Pod], policies: Iterable[Mapping[str, Any]]) -> str:
    pods = list(pods)
    namespaces = sorted({p.namespace for p in pods})
    items: list[Any] = [
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": n, "labels": {NAMESPACE_NAME_LABEL: n}},
        }
        for n in namespaces
    ]
    items += [
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": p.name, "namespace": p.namespace, "labels": _nca_labels(p.labels)},
            "spec": {"containers": [{"name": "c", "image": "stand-in"}]},
        }
        for p in pods
    ]
    items += [_nca_policy(dict(p)) for p in policies]
    return yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": items}, sort_keys=True)


# --- nca's answer ---------------------------------------------------------------------------------

_LINE = re.compile(r"^(?P<src>\S+) => (?P<dst>\S+) : (?P<conn>.+)$")
_POD = re.compile(r"^(?P<ns>[^/]+)/(?P<name>[^\[]+)\[Pod\]$")


@dataclass(frozen=True)
class Grant:
    """One line of nca's map: traffic from src to dst on (protocol, port) sets."""

    src: str  # "ns/pod" or an address range "a.b.c.d-e.f.g.h"
    dst: str
    conn: str

    def covers(self, protocol: str, port: int) -> bool:
        if self.conn == "All connections":
            return True
        for part in re.findall(r"\{([^}]*)\}", self.conn):
            fields = dict(re.findall(r"(protocols|dst_ports):([^:]+?)(?=,\w+:|$)", part))
            if protocol not in [p.strip() for p in fields.get("protocols", "").split(",")]:
                continue
            if "dst_ports" not in fields:
                return True
            for chunk in fields["dst_ports"].replace(" ", "").split(","):
                low, _, high = chunk.partition("-")
                if int(low) <= port <= int(high or low):
                    return True
        return False


def _endpoint(text: str) -> str:
    match = _POD.match(text)
    return f"{match['ns']}/{match['name']}" if match else text


def parse_connectivity(text: str) -> list[Grant]:
    grants = []
    for line in text.splitlines():
        match = _LINE.match(line.strip())
        if match:
            grants.append(Grant(_endpoint(match["src"]), _endpoint(match["dst"]), match["conn"]))
    return grants


def _in_range(address: str, endpoint: str) -> bool:
    if "/" in endpoint or "-" not in endpoint or not endpoint[0].isdigit():
        return False
    low, high = endpoint.split("-", 1)
    ip = ipaddress.IPv4Address(address)
    return ipaddress.IPv4Address(low) <= ip <= ipaddress.IPv4Address(high)


def _matches(endpoint: str, who: str) -> bool:
    """`who` is "ns/pod" or a plain IPv4 address outside the cluster."""
    if "/" in who:
        return endpoint == who
    return _in_range(who, endpoint)


@dataclass(frozen=True)
class Connectivity:
    grants: tuple[Grant, ...]

    def allowed(self, src: str, dst: str, port: int, protocol: str = "TCP") -> bool:
        return any(
            _matches(g.src, src) and _matches(g.dst, dst) and g.covers(protocol, port)
            for g in self.grants
        )


def analyze(
    nca: Path, pods: Iterable[Pod], policies: Iterable[Mapping[str, Any]], workdir: Path
) -> Connectivity:
    path = workdir / "cluster.yaml"
    path.write_text(cluster_yaml(pods, policies))
    done = subprocess.run(
        [
            str(nca),
            "--connectivity", str(path),
            "--pod_list", str(path),
            "--ns_list", str(path),
            "--output_format", "txt_no_fw_rules",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, f"nca failed:\n{done.stdout}\n{done.stderr}"
    grants = parse_connectivity(done.stdout)
    assert grants, f"nca printed no connectivity:\n{done.stdout}\n{done.stderr}"
    return Connectivity(tuple(grants))

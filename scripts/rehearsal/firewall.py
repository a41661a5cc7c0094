"""The stack's NetworkPolicies as nftables rules, one ruleset per rehearsal host (netns).

Pure: the rendered policies (components/render/network_policies.py, the manifests the cluster
gets) and the rehearsal's pod -> address map in, an `nft -f` script per address out. The
kernel then enforces in the rehearsal what the VPC CNI enforces in the cluster.

Semantics are Kubernetes NetworkPolicy's (networking.k8s.io/v1):
- a pod selected by a policy with Ingress (Egress) in policyTypes is isolated in that direction,
  and only what some rule of some such policy allows passes; a pod no such policy selects is
  open in that direction;
- a connection needs both the sender's egress and the receiver's ingress; replies of an allowed
  connection pass (conntrack: `ct state established,related`);
- peers: podSelector (the policy's namespace), namespaceSelector (by the namespaces'
  `kubernetes.io/metadata.name` label, the only namespace label the rehearsal knows),
  both (pods of those namespaces), ipBlock (cidr minus except); an empty `from`/`to` list or
  none at all means every peer, an absent `ports` every port;
- ports: numbers with an optional endPort; named ports are refused (the renderer uses none).

Where the rehearsal differs from a cluster (said so in docs/security.md):
- a host may run several pods (the rehearsal's `services` host runs Redis and Prometheus).
  Ingress is exact per pod when each pod declares the ports it listens on (`Endpoint.ports`):
  a rule for one pod opens only that pod's ports. Egress cannot tell the pods of a host
  apart: the host may send what any of its pods may;
- traffic inside a host (loopback, or to its own address) is never filtered, as a pod's own
  traffic is not.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

TABLE: Final = "qvr_policy"
NAMESPACE_NAME_LABEL: Final = "kubernetes.io/metadata.name"


class FirewallError(ValueError):
    """A policy the translation does not support (e.g. a named port)."""


@dataclass(frozen=True)
class Endpoint:
    """One pod as the rehearsal runs it: its labels and the address of the host it runs on."""

    name: str
    namespace: str
    labels: Mapping[str, str]
    address: str
    ports: tuple[int, ...] = ()  # ports it listens on; needed where a host runs several pods
    namespace_labels: Mapping[str, str] = field(default_factory=dict)

    def ns_labels(self) -> dict[str, str]:
        return {NAMESPACE_NAME_LABEL: self.namespace, **self.namespace_labels}


# --- label selectors ------------------------------------------------------------------------------


def selector_matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """A LabelSelector: matchLabels and matchExpressions, all of them; {} matches everything."""
    if selector is None:
        return True
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        present = key in labels
        if op == "In" and not (present and labels[key] in values):
            return False
        if op == "NotIn" and present and labels[key] in values:
            return False
        if op == "Exists" and not present:
            return False
        if op == "DoesNotExist" and present:
            return False
        if op not in ("In", "NotIn", "Exists", "DoesNotExist"):
            raise FirewallError(f"unknown selector operator {op!r}")
    return True


def selects(policy: Mapping[str, Any], pod: Endpoint) -> bool:
    meta, spec = policy["metadata"], policy["spec"]
    return meta["namespace"] == pod.namespace and selector_matches(
        spec.get("podSelector") or {}, pod.labels
    )


def policy_types(policy: Mapping[str, Any]) -> list[str]:
    spec = policy["spec"]
    if "policyTypes" in spec:
        return list(spec["policyTypes"])
    return ["Ingress", *(["Egress"] if "egress" in spec else [])]


# --- peers and ports ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Peers:
    """Who a rule admits: pod addresses and CIDRs (with exceptions); `anyone` for no `from`."""

    anyone: bool = False
    addresses: frozenset[str] = frozenset()
    blocks: tuple[tuple[str, tuple[str, ...]], ...] = ()


def resolve_peers(
    peers: Sequence[Mapping[str, Any]] | None, namespace: str, pods: Sequence[Endpoint]
) -> Peers:
    if not peers:
        return Peers(anyone=True)
    addresses: set[str] = set()
    blocks: list[tuple[str, tuple[str, ...]]] = []
    for peer in peers:
        if "ipBlock" in peer:
            block = peer["ipBlock"]
            blocks.append((block["cidr"], tuple(block.get("except") or ())))
            continue
        ns_selector = peer.get("namespaceSelector")
        pod_selector = peer.get("podSelector")
        for pod in pods:
            if ns_selector is None:
                in_ns = pod.namespace == namespace
            else:
                in_ns = selector_matches(ns_selector, pod.ns_labels())
            if in_ns and selector_matches(pod_selector or {}, pod.labels):
                addresses.add(pod.address)
    return Peers(addresses=frozenset(addresses), blocks=tuple(blocks))


def port_matches(ports: Sequence[Mapping[str, Any]] | None) -> list[str]:
    """nft matches for a rule's ports; [""] for every port and protocol."""
    if not ports:
        return [""]
    found = []
    for p in ports:
        proto = str(p.get("protocol", "TCP")).lower()
        if proto not in ("tcp", "udp", "sctp"):
            raise FirewallError(f"protocol {proto!r} not supported")
        if "port" not in p:
            found.append(f"meta l4proto {proto}")
            continue
        if not isinstance(p["port"], int):
            raise FirewallError(f"named port {p['port']!r}: the rehearsal knows numbers only")
        end = p.get("endPort")
        found.append(f"{proto} dport {p['port']}" + (f"-{end}" if end else ""))
    return found


def _set(items: Iterable[str]) -> str:
    def key(item: str) -> tuple[int, Any, str]:
        if item.isdigit():
            return (0, int(item), item)
        return (1, ipaddress.ip_network(item, strict=False), item)

    items = sorted(items, key=key)
    return items[0] if len(items) == 1 else "{ " + ", ".join(items) + " }"


def peer_matches(peers: Peers, direction: str) -> list[str]:
    """nft address matches (`saddr` for ingress, `daddr` for egress); [""] for anyone."""
    if peers.anyone:
        return [""]
    key = "saddr" if direction == "Ingress" else "daddr"
    found = [f"ip {key} {_set(peers.addresses)}"] if peers.addresses else []
    for cidr, excepted in peers.blocks:
        match = f"ip {key} {cidr}"
        if excepted:
            match = f"ip {key} != {_set(excepted)} " + match
        found.append(match)
    return found


@dataclass(frozen=True)
class NodeTraffic:
    """nft matches accepted on every host before the pods' rules: the traffic of the simulated
    NODE, which shares the rehearsal host's namespace with its pods but is no pod (chronyd to the
    time server, the node exporter scraped by Prometheus). NetworkPolicy does not apply to it in
    a cluster either (host network)."""

    ingress: tuple[str, ...] = ()  # e.g. "ip saddr 10.231.0.9 tcp dport 9100"
    egress: tuple[str, ...] = ()  # e.g. "udp dport 123"


def _node_lines(matches: Sequence[str]) -> list[str]:
    return [f'{m} accept comment "node"' for m in matches]


# --- rules ----------------------------------------------------------------------------------------


def _rules_for(
    pod: Endpoint, direction: str, policies: Sequence[Mapping[str, Any]], pods: Sequence[Endpoint]
) -> list[tuple[str, str]] | None:
    """(nft match, policy name) for one pod and direction; None when the pod is not isolated."""
    key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    isolating = [p for p in policies if selects(p, pod) and direction in policy_types(p)]
    if not isolating:
        return None
    rules: list[tuple[str, str]] = []
    for policy in isolating:
        name = policy["metadata"]["name"]
        for rule in policy["spec"].get(key) or []:
            peers = resolve_peers(rule.get(peers_key), policy["metadata"]["namespace"], pods)
            for who in peer_matches(peers, direction):
                for port in port_matches(rule.get("ports")):
                    body = " ".join(x for x in (who, port) if x)
                    rules.append((body, name))
    return rules


def _own_ports(pod: Endpoint, shared: bool) -> str:
    """Where a host runs several pods, what is allowed to one pod is its own ports only."""
    if not shared:
        return ""
    if not pod.ports:
        raise FirewallError(f"{pod.name}: shares a host, so it must declare its ports")
    return "tcp dport " + _set(str(p) for p in pod.ports)


def _ingress_lines(
    host_pods: Sequence[Endpoint], policies: Sequence[Mapping[str, Any]], pods: Sequence[Endpoint]
) -> list[str]:
    shared = len(host_pods) > 1
    lines: list[str] = []
    for pod in host_pods:
        own = _own_ports(pod, shared)
        rules = _rules_for(pod, "Ingress", policies, pods)
        if rules is None:
            lines.append(f'{own} accept comment "{pod.name}: not isolated"'.strip())
            continue
        for body, name in rules:
            # a rule's own port match is narrower than the pod's ports; without one, scope it
            scoped = body if "dport" in body or "l4proto" in body else f"{own} {body}"
            lines.append(f'{scoped.strip()} accept comment "{name}"'.strip())
    return lines


def _egress_lines(
    host_pods: Sequence[Endpoint], policies: Sequence[Mapping[str, Any]], pods: Sequence[Endpoint]
) -> list[str]:
    lines: list[str] = []
    for pod in host_pods:
        rules = _rules_for(pod, "Egress", policies, pods)
        if rules is None:
            return [f'accept comment "{pod.name}: not isolated"']
        lines += [f'{body} accept comment "{name}"'.strip() for body, name in rules]
    return lines


def render_ruleset(
    address: str,
    policies: Sequence[Mapping[str, Any]],
    pods: Sequence[Endpoint],
    node: NodeTraffic | None = None,
) -> str:
    """The `nft -f` script of the host at `address` (replaces its table if it exists)."""
    node = node or NodeTraffic()
    host_pods = [p for p in pods if p.address == address]
    if not host_pods:
        raise FirewallError(f"no pod runs at {address}")

    def chain(name: str, hook: str, loopback: str, body: list[str]) -> list[str]:
        head = [f"{loopback} lo accept", "ct state established,related accept"]
        return [
            f"  chain {name} {{",
            f"    type filter hook {hook} priority filter; policy drop;",
            *(f"    {line}" for line in [*head, *body]),
            "  }",
        ]

    names = ", ".join(p.name for p in host_pods)
    return "\n".join(
        [
            f"# NetworkPolicies of {names} ({address}): scripts/rehearsal/firewall.py",
            f"table inet {TABLE}",  # so that the delete below never fails
            f"delete table inet {TABLE}",
            f"table inet {TABLE} {{",
            *chain(
                "ingress",
                "input",
                "iif",
                [*_node_lines(node.ingress), *_ingress_lines(host_pods, policies, pods)],
            ),
            *chain(
                "egress",
                "output",
                "oif",
                [*_node_lines(node.egress), *_egress_lines(host_pods, policies, pods)],
            ),
            "}",
            "",
        ]
    )


def translate(
    policies: Sequence[Mapping[str, Any]],
    pods: Sequence[Endpoint],
    node: NodeTraffic | None = None,
) -> dict[str, str]:
    """address -> nft script, for every host address in `pods`."""
    return {a: render_ruleset(a, policies, pods, node) for a in sorted({p.address for p in pods})}

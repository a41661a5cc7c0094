"""VllmDeployment: one model deployment as a LeaderWorkerSet of vLLM engine groups.

Provisions the deployment's engine Secret (VLLM_API_KEY, and HF_TOKEN for gated models, from
Pulumi secrets), the LeaderWorkerSet (leaderworkerset.x-k8s.io/v1, a CustomResource) and the
headless Service over its leaders. The manifests come from components/render/vllm_pods.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pulumi
import pulumi_kubernetes as k8s

from components.render.vllm_command import EngineSpec, served_model_name
from components.render.vllm_pods import build_leader_service, build_lws, deployment_labels
from stacks.naming import (
    ENGINE_API_KEY_ENTRY,
    HF_TOKEN_ENTRY,
    TYPE_PREFIX,
    VLLM_PORT,
    service_host,
)


@dataclass(frozen=True, kw_only=True)
class VllmDeploymentArgs:
    spec: EngineSpec
    namespace: pulumi.Input[str]
    engine_api_key: pulumi.Input[str]
    hf_token: pulumi.Input[str] | None = None  # required when spec.hf_token
    # KEDA scales the LWS through its scale subresource; Pulumi must not reset spec.replicas.
    replicas_managed_externally: bool = False
    # What the pods need first (the GPU node groups), so destroy removes the groups first.
    depends_on: Sequence[pulumi.Resource] = ()


class VllmDeployment(pulumi.ComponentResource):
    secret: k8s.core.v1.Secret
    lws: k8s.apiextensions.CustomResource
    leader_service: k8s.core.v1.Service
    leader_host: pulumi.Output[str]
    served_model_name: str

    def __init__(
        self, name: str, args: VllmDeploymentArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__(f"{TYPE_PREFIX}:engines:VllmDeployment", name, None, opts)
        spec = args.spec
        if spec.hf_token != (args.hf_token is not None):
            raise ValueError("spec.hf_token and args.hf_token must agree")
        children = pulumi.ResourceOptions(parent=self, depends_on=list(args.depends_on))
        d = spec.deployment
        labels = deployment_labels(d)

        entries: dict[str, pulumi.Input[str]] = {ENGINE_API_KEY_ENTRY: args.engine_api_key}
        if args.hf_token is not None:
            entries[HF_TOKEN_ENTRY] = args.hf_token
        self.secret = k8s.core.v1.Secret(
            f"{name}-secret",
            metadata={"name": spec.secret_name, "namespace": args.namespace, "labels": labels},
            type="Opaque",
            string_data=pulumi.Output.secret(entries),
            opts=children,
        )

        ignore = ["spec.replicas"] if args.replicas_managed_externally else []
        lws = build_lws(spec)
        self.lws = k8s.apiextensions.CustomResource(
            f"{name}-lws",
            api_version=lws["apiVersion"],
            kind=lws["kind"],
            metadata={**lws["metadata"], "namespace": args.namespace},
            spec=lws["spec"],
            opts=pulumi.ResourceOptions.merge(
                children,
                pulumi.ResourceOptions(depends_on=[self.secret], ignore_changes=ignore),
            ),
        )

        service = build_leader_service(spec)
        self.leader_service = k8s.core.v1.Service(
            f"{name}-leader",
            metadata=k8s.meta.v1.ObjectMetaArgsDict(
                name=service["metadata"]["name"],
                namespace=args.namespace,
                labels=service["metadata"]["labels"],
                annotations=service["metadata"]["annotations"],
            ),
            spec=service["spec"],
            opts=children,
        )

        self.served_model_name = served_model_name(d)
        self.leader_host = pulumi.Output.all(
            self.leader_service.metadata.name, self.leader_service.metadata.namespace
        ).apply(lambda parts: service_host(parts[0], parts[1]))
        self.register_outputs({
            "leader_host": self.leader_host,
            "leader_port": VLLM_PORT,
            "served_model_name": self.served_model_name,
            "lws_name": lws["metadata"]["name"],
        })  # fmt: skip

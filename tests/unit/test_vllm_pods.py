"""LeaderWorkerSet and leader Service manifests, checked against hand-computed values."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from components.render.vllm_command import EngineSpec
from components.render.vllm_pods import (
    EXCLUSIVE_TOPOLOGY_ANNOTATION,
    GROUP_READY_SCRIPT,
    RENDEZVOUS_CHECK_SCRIPT,
    build_leader_service,
    build_lws,
    quantity,
)
from stacks.naming import (
    EFA_LABEL,
    EFA_RESOURCE,
    GPU_RESOURCE,
    GPU_TAINT_KEY,
    HUGEPAGES_RESOURCE,
    LWS_NAME_LABEL,
    LWS_WORKER_INDEX_LABEL,
    NODE_GROUP_LABEL,
)
from stacks.schema import WeightsSettings
from tests.support.engines import container, pod_templates, spec_of

GIB = 2**30


def templates(spec: EngineSpec) -> dict[str, dict[str, Any]]:
    return pod_templates(build_lws(spec))


def volume(template: dict[str, Any], name: str) -> dict[str, Any]:
    [found] = [v for v in template["spec"]["volumes"] if v["name"] == name]
    return found


@pytest.fixture(scope="module")
def staging_32b() -> EngineSpec:
    return spec_of("staging", "qwen3-vl-32b")


@pytest.fixture(scope="module")
def prod_235b() -> EngineSpec:
    return spec_of("prod", "qwen3-vl-235b")


@pytest.fixture(scope="module")
def dev_2b() -> EngineSpec:
    return spec_of("dev", "qwen3-vl-2b")


def test_multi_node_group_shape(staging_32b: EngineSpec) -> None:
    lws = build_lws(staging_32b)
    assert lws["apiVersion"] == "leaderworkerset.x-k8s.io/v1"
    assert lws["kind"] == "LeaderWorkerSet"
    assert lws["metadata"]["name"] == "qwen3-vl-32b"
    spec = lws["spec"]
    assert spec["replicas"] == 1
    assert spec["startupPolicy"] == "LeaderCreated"
    assert spec["leaderWorkerTemplate"]["size"] == 2
    # any container restart or pod loss recreates the group, once no pod of it is Pending
    assert spec["leaderWorkerTemplate"]["restartPolicy"] == "RecreateGroupAfterStart"
    assert lws["metadata"]["annotations"][EXCLUSIVE_TOPOLOGY_ANNOTATION] == NODE_GROUP_LABEL
    for template in templates(staging_32b).values():
        pod = template["spec"]
        assert pod["nodeSelector"] == {NODE_GROUP_LABEL: "l40s-efa", EFA_LABEL: "true"}
        assert {
            "key": GPU_TAINT_KEY,
            "operator": "Equal",
            "value": "true",
            "effect": "NoSchedule",
        } in pod["tolerations"]
        assert pod["enableServiceLinks"] is False


def test_efa_resources_on_leader_and_workers(
    staging_32b: EngineSpec, prod_235b: EngineSpec
) -> None:
    # g6e.24xlarge: 4 GPUs, 2 EFA, 96 vCPU, 768 GiB -> cpu 96 - 10, memory floor(691.2) - 11
    # p5.48xlarge: 8 GPUs, 32 EFA, 192 vCPU, 2048 GiB -> cpu 192 - 20, memory 1843 - 11
    for spec, gpus, efa, cpu, memory in (
        (staging_32b, "4", "2", "86", "680Gi"),
        (prod_235b, "8", "32", "172", "1832Gi"),
    ):
        roles = templates(spec)
        assert set(roles) == {"leader", "worker"}
        for template in roles.values():
            resources = container(template)["resources"]
            assert resources["requests"] == resources["limits"]
            assert resources["limits"] == {
                "cpu": cpu,
                "memory": memory,
                GPU_RESOURCE: gpus,
                EFA_RESOURCE: efa,
                HUGEPAGES_RESOURCE: "5120Mi",
            }
            assert container(template)["securityContext"]["capabilities"]["add"] == ["IPC_LOCK"]


def test_single_gpu_deployment(dev_2b: EngineSpec) -> None:
    lws = build_lws(dev_2b)
    lwt = lws["spec"]["leaderWorkerTemplate"]
    assert lwt["size"] == 1
    assert lwt["restartPolicy"] == "None"
    assert "leaderTemplate" not in lwt
    assert EXCLUSIVE_TOPOLOGY_ANNOTATION not in lws["metadata"]["annotations"]
    leader = templates(dev_2b)["leader"]
    # g6e.xlarge: 4 vCPU, 32 GiB, 1 GPU, no EFA
    assert container(leader)["resources"]["limits"] == {
        "cpu": "3",
        "memory": "28Gi",
        GPU_RESOURCE: "1",
    }
    assert "securityContext" not in container(leader)
    assert "--headless" not in container(leader)["command"]


def test_cpu_and_memory_settings_override_the_defaults(dev_2b: EngineSpec) -> None:
    d = dataclasses.replace(dev_2b.deployment, cpu=2, memory_gib=20)
    limits = container(templates(dataclasses.replace(dev_2b, deployment=d))["leader"])["resources"][
        "limits"
    ]
    assert limits["cpu"] == "2"
    assert limits["memory"] == "20Gi"


@pytest.mark.parametrize(
    ("fixture", "size"), [("dev_2b", "1Gi"), ("staging_32b", "8Gi"), ("prod_235b", "16Gi")]
)
def test_shm_is_in_memory_and_sized_by_the_planner(
    fixture: str, size: str, request: pytest.FixtureRequest
) -> None:
    spec: EngineSpec = request.getfixturevalue(fixture)
    for template in templates(spec).values():
        assert volume(template, "dshm") == {
            "name": "dshm",
            "emptyDir": {"medium": "Memory", "sizeLimit": size},
        }
        assert {"name": "dshm", "mountPath": "/dev/shm"} in container(template)["volumeMounts"]


def test_shm_setting_overrides_the_planner(staging_32b: EngineSpec) -> None:
    d = dataclasses.replace(staging_32b.deployment, shm_size_gib=20)
    template = templates(dataclasses.replace(staging_32b, deployment=d))["worker"]
    assert volume(template, "dshm")["emptyDir"]["sizeLimit"] == "20Gi"


def test_leader_probes_use_open_health_endpoint_within_the_budget(
    staging_32b: EngineSpec, prod_235b: EngineSpec, dev_2b: EngineSpec
) -> None:
    for spec, minutes in ((staging_32b, 45), (prod_235b, 90), (dev_2b, 20)):
        leader = container(templates(spec)["leader"])
        for probe in ("startupProbe", "livenessProbe"):
            # /v1/* needs the API key once VLLM_API_KEY is set; /health does not
            assert leader[probe]["httpGet"] == {"path": "/health", "port": "http"}
        startup = leader["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] == minutes * 60
        assert leader["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]


def test_leader_readiness_is_the_group_check(
    staging_32b: EngineSpec, prod_235b: EngineSpec, dev_2b: EngineSpec
) -> None:
    for spec in (staging_32b, prod_235b, dev_2b):
        ready = container(templates(spec)["leader"])["readinessProbe"]
        command = ready["exec"]["command"]
        assert command[:3] == ["python3", "-c", GROUP_READY_SCRIPT]
        args = dict(zip(command[3::2], command[4::2], strict=True))
        assert args == {
            "--port": "8000",
            "--model": spec.deployment.served_model_name or spec.deployment.name,
            "--stall-seconds": "15",
            "--budget-seconds": "6",
            "--state": "/tmp/vllm-group-ready.json",
        }
        compile(GROUP_READY_SCRIPT, "group-ready", "exec")  # valid Python
        # the script's own deadline ends before the kubelet's timeout kills it
        assert int(args["--budget-seconds"]) < ready["timeoutSeconds"] <= ready["periodSeconds"]
        # worst case, hang under load to "not ready" (< 60 s): the last step is seen within a
        # period, the first probe seeing a stall longer than --stall-seconds comes after
        # stall // period + 1 periods, then failureThreshold - 1 more
        period, stall = ready["periodSeconds"], int(args["--stall-seconds"])
        worst = period * (1 + stall // period + 1 + ready["failureThreshold"] - 1)
        assert worst <= 50


def test_workers_have_no_http_probes_or_ports(prod_235b: EngineSpec) -> None:
    worker = container(templates(prod_235b)["worker"])
    assert not {"startupProbe", "readinessProbe", "livenessProbe", "ports"} & set(worker)
    assert worker["command"][-1] == "--headless"


def test_workers_wait_for_the_rendezvous_with_the_flags_of_their_own_argv(
    prod_235b: EngineSpec,
) -> None:
    roles = templates(prod_235b)
    assert "initContainers" not in roles["leader"]["spec"]
    [check] = roles["worker"]["spec"]["initContainers"]
    worker = container(roles["worker"])
    argv = worker["command"]
    addr = argv[argv.index("--master-addr") + 1]
    port = argv[argv.index("--master-port") + 1]
    assert (addr, port) == ("$(MASTER_ADDR)", "29501")
    command = check["command"]
    assert command[:3] == ["python3", "-c", RENDEZVOUS_CHECK_SCRIPT]
    assert dict(zip(command[3::2], command[4::2], strict=True)) == {
        "--master-addr": addr,
        "--master-port": port,
        "--timeout-seconds": "600",
        "--retry-seconds": "2",
    }
    compile(RENDEZVOUS_CHECK_SCRIPT, "rendezvous-check", "exec")
    # the same env, so $(MASTER_ADDR) expands to the same leader address in both containers
    assert check["env"] == worker["env"]
    assert check["image"] == worker["image"]
    assert check["resources"]["requests"] == check["resources"]["limits"]  # Guaranteed QoS kept
    assert check["terminationMessagePolicy"] == "FallbackToLogsOnError"


def test_rendezvous_bound_follows_the_setting(staging_32b: EngineSpec) -> None:
    d = dataclasses.replace(staging_32b.deployment, rendezvous_timeout_seconds=90)
    [check] = templates(dataclasses.replace(staging_32b, deployment=d))["worker"]["spec"][
        "initContainers"
    ]
    assert check["command"][check["command"].index("--timeout-seconds") + 1] == "90"


def test_execute_model_timeout_is_on_every_rank(staging_32b: EngineSpec) -> None:
    d = dataclasses.replace(staging_32b.deployment, execute_model_timeout_seconds=45)
    for template in templates(dataclasses.replace(staging_32b, deployment=d)).values():
        env = {e["name"]: e.get("value") for e in container(template)["env"]}
        assert env["VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS"] == "45"


def test_graceful_drain_outlasts_shutdown_timeout(staging_32b: EngineSpec) -> None:
    shutdown = staging_32b.deployment.shutdown_timeout_seconds
    roles = templates(staging_32b)
    leader_stop = container(roles["leader"])["lifecycle"]["preStop"]["sleep"]["seconds"]
    worker_stop = container(roles["worker"])["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert leader_stop == 15
    # workers keep their ranks up until the leader has drained
    assert worker_stop >= leader_stop + shutdown
    for template in roles.values():
        grace = template["spec"]["terminationGracePeriodSeconds"]
        assert grace == 75  # worker preStop (15 s + 45 s shutdown) + 15 s margin
        assert grace > worker_stop
    flags = container(roles["leader"])["command"]
    assert flags[flags.index("--shutdown-timeout") + 1] == str(shutdown)


def test_node_cache_is_a_host_path_under_hf_home(dev_2b: EngineSpec) -> None:
    template = templates(dev_2b)["leader"]
    assert volume(template, "model-cache")["hostPath"]["type"] == "DirectoryOrCreate"
    assert {"name": "model-cache", "mountPath": "/cache"} in container(template)["volumeMounts"]
    env = {v["name"]: v.get("value") for v in container(template)["env"]}
    assert env["HF_HOME"].startswith("/cache/")
    assert "volumeClaimTemplates" not in build_lws(dev_2b)["spec"]["leaderWorkerTemplate"]


def test_pvc_cache_comes_from_lws_claim_templates(staging_32b: EngineSpec) -> None:
    weights = WeightsSettings(cache="pvc", pvc_size_gib=300, storage_class="gp3-fast")
    d = dataclasses.replace(staging_32b.deployment, weights=weights)
    spec = dataclasses.replace(staging_32b, deployment=d)
    lwt = build_lws(spec)["spec"]["leaderWorkerTemplate"]
    assert lwt["volumeClaimTemplates"] == [{
        "metadata": {"name": "model-cache"},
        "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "gp3-fast",
                 "resources": {"requests": {"storage": "300Gi"}}},
    }]  # fmt: skip
    for template in templates(spec).values():
        assert all(v["name"] != "model-cache" for v in template["spec"]["volumes"])
        assert {"name": "model-cache", "mountPath": "/cache"} in container(template)["volumeMounts"]


def test_leader_service_is_headless_over_leaders_only(prod_235b: EngineSpec) -> None:
    service = build_leader_service(prod_235b)
    assert service["metadata"]["name"] == "qwen3-vl-235b-leader"
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == {
        LWS_NAME_LABEL: "qwen3-vl-235b",
        LWS_WORKER_INDEX_LABEL: "0",
    }
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}
    ]


def test_quantity() -> None:
    assert quantity(16 * GIB) == "16Gi"
    assert quantity(1536 * 2**20) == "1536Mi"
    assert quantity(1000) == "1000"

"""The vision tier: its settings rules (key paths and fixes), its plan (hand-computed), and the
command lines, mounts and objects it renders for engines and encoders."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from components.render.alert_rules import build_alert_rules
from components.render.dashboards import INFERENCE_FILE, build_dashboards
from components.render.network_policies import build_network_policies
from components.render.nginx_conf import build_nginx_conf_args, render_nginx_conf
from components.render.vision_tier import (
    build_encoder_deployment,
    build_encoder_service,
    build_expiry_cronjob,
    encoder_command,
)
from components.render.vllm_command import build_vllm_command, build_vllm_env, spec_for
from components.render.vllm_pods import build_lws
from scripts.rehearsal.epd_bench import image_workload
from stacks.catalog import GIB, instance_type, model_spec
from stacks.parse import SettingsError
from stacks.rules.vision import encoder_plan
from stacks.settings import build
from stacks.vision_plan import VisionPlanRequest, vision_plan
from tests.support.settings import NS, Config, stack_config

VISION = "vision"


def staging() -> Config:
    return copy.deepcopy(stack_config("staging"))


def two_b(config: Config) -> dict[str, Any]:
    return config[NS + "serving"]["deployments"][0]


def problems(config: Config) -> str:
    with pytest.raises(SettingsError) as err:
        build("test", "staging", config)
    return str(err.value)


def settings(config: Config | None = None) -> Any:
    return build("test", "staging", config or staging())


# --- rules ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "path", "words"),
    [
        ({"gpusPerEncoder": 3}, "vision.gpusPerEncoder", "must divide the 1 GPUs of g6e.xlarge"),
        ({"retries": -1}, "vision.retries", "must be 0 or more"),
        ({"timeoutSeconds": 300, "retries": 1}, "vision.timeoutSeconds", "gateway.readTimeout"),
        ({"encoders": 3}, "vision.autoscaling.maxReplicas", "at least minReplicas (1) and"),
        ({"nodeGroup": "nope"}, "vision.nodeGroup", "must name one of gpuNodeGroups"),
        ({"cache": {"expirySchedule": "hourly"}}, "vision.cache.expirySchedule", "five-field"),
        ({"cache": {"expirySchedule": "61 * * * *"}}, "vision.cache.expirySchedule", "0-59"),
        ({"cache": {"expirySchedule": "0 0 * 13 *"}}, "vision.cache.expirySchedule", "1-12"),
        ({"cache": {"expirySchedule": "0 0 0 * *"}}, "vision.cache.expirySchedule", "1-31"),
        ({"cache": {"ttlHours": 0}}, "vision.cache.ttlHours", "greater than 0"),
    ],
)
def test_bad_vision_settings_name_their_key(change: dict[str, Any], path: str, words: str) -> None:
    config = staging()
    vision = two_b(config)[VISION]
    for key, value in change.items():
        vision[key] = {**vision.get(key, {}), **value} if isinstance(value, dict) else value
    text = problems(config)
    assert f"serving.deployments[0].{path}" in text
    assert words in text


def test_deployments_sharing_the_file_system_must_agree_on_its_throughput_mode() -> None:
    config = staging()
    thirty_two_b = config[NS + "serving"]["deployments"][1]
    thirty_two_b[VISION] = {"mode": "disaggregated", "cache": {"throughputMode": "bursting"}}
    text = problems(config)
    assert "serving.deployments[1].vision.cache.throughputMode=bursting" in text
    assert "serving.deployments[0]" in text  # the deployment whose mode the file system has


def test_disaggregated_without_images_is_refused() -> None:
    config = staging()
    two_b(config)["limitMmPerPrompt"] = {"image": 0, "video": 0}
    assert "serving.deployments[0].vision.mode" in problems(config)


def test_extra_args_may_not_repeat_the_vision_flags() -> None:
    config = staging()
    two_b(config)["extraArgs"] = ["--mm-encoder-only"]
    text = problems(config)
    assert "serving.deployments[0].extraArgs[0]" in text
    assert "set by the engine builder from vision" in text


def test_the_vision_block_is_off_by_default() -> None:
    config = staging()
    del two_b(config)[VISION]
    s = settings(config)
    assert s.serving.deployments[0].vision.mode == "aggregated"
    argv = build_vllm_command(s.serving.deployments[0])
    assert "--ec-transfer-config" not in argv
    assert "--enable-request-id-headers" not in argv


# --- plan -----------------------------------------------------------------------------------------


def test_plan_of_the_2b_on_an_l40s_matches_the_hand_computed_figures() -> None:
    model, instance = model_spec("Qwen/Qwen3-VL-2B-Instruct"), instance_type("g6e.xlarge")
    assert model is not None
    assert instance is not None
    p = vision_plan(
        VisionPlanRequest(
            model=model,
            instance=instance,
            gpus_per_encoder=1,
            gpu_memory_utilization=0.9,
            max_image_pixels=4096 * 4096,
            images_per_request=4,
            cache_bytes=50 * GIB,
        )
    )
    assert p.image_tokens_per_image == 16384  # 4096 x 4096 / (32 x 32)
    assert p.image_tokens_per_request == 65536
    assert p.encoder_weight_bytes_per_gpu == 814_000_000  # 407 M vision parameters x 2 bytes
    assert p.embedding_bytes_per_image == 268_435_456  # 16384 x 2048 x (1 + 3) x 2
    assert p.cached_images == 200  # 50 GiB / 256 MiB
    # 362 TFLOP/s x 0.3 / (2 x 407e6 x 16384 tokens x 4 patches)
    assert p.images_per_second_per_encoder == pytest.approx(2.036, abs=0.001)
    assert p.llm_bytes_freed_per_gpu == 0
    # an L40S's 45776 MiB x 0.9 - the 2 GiB reserve - 814e6 bytes of vision weights
    assert p.encoder_free_bytes_per_gpu == 43_199_653_478 - 2 * GIB - 814_000_000


def test_the_committed_staging_stack_plans_its_vision_tier() -> None:
    s = settings()
    p = encoder_plan(s, s.serving.deployments[0])
    assert p is not None
    assert p.encoder_free_bytes_per_gpu > 0


# --- what engines and encoders run ----------------------------------------------------------------


def ec_config(argv: list[str]) -> dict[str, Any]:
    return json.loads(argv[argv.index("--ec-transfer-config") + 1])


def test_engines_consume_and_encoders_produce_through_our_connector() -> None:
    d = settings().serving.deployments[0]
    consumer, producer = ec_config(build_vllm_command(d)), ec_config(encoder_command(d))
    assert consumer["ec_role"] == "ec_consumer"
    assert producer["ec_role"] == "ec_producer"
    for config in (consumer, producer):
        assert config["ec_connector"] == "AtomicFileECConnector"
        assert config["ec_connector_module_path"] == "qwen_vl_ec_connector"
    path = consumer["ec_connector_extra_config"]["shared_storage_path"]
    assert path == producer["ec_connector_extra_config"]["shared_storage_path"]
    assert path.startswith("/vision-cache/qwen3-vl-2b/")


def test_another_revision_gets_another_cache_directory() -> None:
    config = staging()
    before = ec_config(build_vllm_command(settings(config).serving.deployments[0]))
    two_b(config)["revision"] = "1" * 40
    after = ec_config(build_vllm_command(settings(config).serving.deployments[0]))
    assert before["ec_connector_extra_config"] != after["ec_connector_extra_config"]


def test_engine_pods_mount_the_cache_and_the_connector_on_pythonpath() -> None:
    s = settings()
    spec = spec_for(s, s.serving.deployments[0])
    env = {e["name"]: e.get("value") for e in build_vllm_env(spec)}
    assert env["PYTHONPATH"] == "/opt/qwen-vl-serving/ec"
    pod = build_lws(spec)["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]
    mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert {"/vision-cache", "/opt/qwen-vl-serving/ec"} <= mounts
    claims = [
        v["persistentVolumeClaim"]["claimName"]
        for v in pod["volumes"]
        if "persistentVolumeClaim" in v
    ]
    assert claims == ["vision-cache"]


def test_the_encoder_deployment_takes_one_gpu_and_probes_health() -> None:
    s = settings()
    spec = spec_for(s, s.serving.deployments[0])
    manifest = build_encoder_deployment(spec, spec)
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert manifest["spec"]["replicas"] == 1
    service = build_encoder_service(s.serving.deployments[0])
    assert service["spec"]["clusterIP"] == "None"
    assert service["metadata"]["name"] == "qwen3-vl-2b-encoder"


def test_the_expiry_job_runs_one_sweep_at_a_time_on_the_schedule() -> None:
    s = settings()
    spec = spec_for(s, s.serving.deployments[0])
    job = build_expiry_cronjob(spec, spec)["spec"]
    assert job["schedule"] == "*/15 * * * *"
    assert job["concurrencyPolicy"] == "Forbid"
    command = job["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[command.index("--ttl-seconds") + 1] == str(24 * 3600)
    assert command[command.index("--max-bytes") + 1] == str(50 * GIB)


# --- the gateway and the network ------------------------------------------------------------------


def test_the_gateway_bounds_and_retries_the_encoder_step() -> None:
    conf = render_nginx_conf(build_nginx_conf_args(settings()))
    block = conf[conf.index("location /_encoder/qwen3-vl-2b/") :]
    block = block[: block.index("}")]
    assert "proxy_read_timeout 10000ms;" in block
    assert "proxy_next_upstream_tries 2;" in block
    assert "non_idempotent" in block
    assert "qwen3-vl-2b-encoder.qwen-vl.svc.cluster.local:8000" in conf


def test_only_the_gateway_and_prometheus_reach_the_encoders() -> None:
    policies = {p["metadata"]["name"]: p["spec"] for p in build_network_policies(settings())}
    encoder = policies["encoder-qwen3-vl-2b-http"]
    sources = encoder["ingress"][0]["from"]
    assert len(sources) == 2  # the gateway's pods and Prometheus
    gateway_to = [peer for rule in policies["gateway"]["egress"] for peer in rule.get("to", [])]
    assert {"podSelector": {"matchLabels": encoder["podSelector"]["matchLabels"]}} in gateway_to


def test_the_bench_workload_repeats_80_percent_of_its_images() -> None:
    seeds = image_workload()
    first_uses = [i for i, seed in enumerate(seeds) if seed not in seeds[:i]]
    assert len(seeds) == 20
    assert len(first_uses) == 4  # 20 % new, 80 % repeats of an image sent before
    assert image_workload() == seeds  # the same workload every run


def test_the_dashboard_counts_hits_misses_and_fallbacks_of_each_vision_tier() -> None:
    board = build_dashboards(settings())[INFERENCE_FILE]
    rows = [p for p in board["panels"] if p.get("type") == "row"]
    titles = [r["title"] for r in rows]
    assert titles[-1] == "qwen3-vl-2b: vision tier"
    exprs = " ".join(
        t["expr"]
        for p in board["panels"]
        if p.get("type") != "row" and p["gridPos"]["y"] > rows[-1]["gridPos"]["y"]
        for t in p["targets"]
    )
    for outcome in ("loaded", "local", "encoded", "rejected"):
        assert f'outcome="{outcome}"' in exprs
    assert 'job="vllm-encoder"' in exprs
    assert 'deployment="qwen3-vl-32b"' not in exprs


def test_an_alert_fires_when_the_encoder_tier_is_down_or_bypassed() -> None:
    groups = {g["name"]: g["rules"] for g in build_alert_rules(settings())["groups"]}
    vision = {r["alert"]: r for r in groups["qwen-vl-serving-vision"]}
    assert set(vision) == {"VisionEncoderDown", "VisionEncoderFallback", "VisionCacheRejectedFiles"}
    assert 'up{job="vllm-encoder",deployment="qwen3-vl-2b"}' in vision["VisionEncoderDown"]["expr"]
    assert "> 0.5" in vision["VisionEncoderFallback"]["expr"]


def test_encoders_resize_images_as_the_engines_do_and_the_plan_follows_the_guard() -> None:
    config = staging()
    two_b(config)["maxImagePixels"] = 1003520
    s = settings(config)
    d = s.serving.deployments[0]

    def kwargs(argv: list[str]) -> str:
        return argv[argv.index("--mm-processor-kwargs") + 1]

    assert kwargs(encoder_command(d)) == kwargs(build_vllm_command(d)) == '{"max_pixels":1003520}'
    p = encoder_plan(s, d)
    assert p is not None
    assert p.image_tokens_per_image == 980  # 1003520 / (32 x 32)
    assert p.embedding_bytes_per_image == 980 * 2048 * 4 * 2

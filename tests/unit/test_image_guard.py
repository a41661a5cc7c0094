"""The image guard seen from both ends: the warning `make check` gives when a guard admits
requests no context holds (numbers by hand), and the rehearsal's clamp of it to the tiny model."""

from __future__ import annotations

import copy
import json

from scripts.rehearsal.real_engine import RealEngine, real_argv
from stacks.rules.gateway import image_guard_warnings
from stacks.settings import build
from tests.support.settings import NS, Config, stack_config

SERVE = ["vllm", "serve", "Qwen/Qwen3-VL-2B-Instruct"]


def dev_with(**deployment: object) -> Config:
    config = copy.deepcopy(stack_config("dev"))
    config[NS + "serving"]["deployments"][0].update(deployment)
    return config


def warnings_of(config: Config) -> list[str]:
    return [str(w) for w in image_guard_warnings(build("test", "dev", config))]


def test_the_checkpoint_limit_with_4_images_overflows_a_32k_context() -> None:
    # 16,777,216 px / (32 x 32) = 16,384 tokens per image; x 4 = 65,536 > 32,768.
    # It fits when each image has at most 32,768 / 4 = 8,192 tokens = 8,388,608 px.
    config = dev_with(maxImagePixels=None, limitMmPerPrompt={"image": 4}, maxModelLen=32768)
    [warning] = warnings_of(config)
    assert warning.startswith("serving.deployments[0].maxImagePixels=null: ")
    assert "65,536 image tokens, more than maxModelLen 32,768" in warning
    assert "well below 8,388,608" in warning


def test_a_guard_that_fits_gives_no_warning() -> None:
    # 4,194,304 px = 4,096 tokens; x 4 = 16,384 <= 32,768.
    config = dev_with(maxImagePixels=4194304, limitMmPerPrompt={"image": 4}, maxModelLen=32768)
    assert warnings_of(config) == []


def test_text_only_deployments_are_never_warned() -> None:
    config = dev_with(maxImagePixels=None, limitMmPerPrompt={"image": 0}, maxModelLen=1024)
    assert warnings_of(config) == []


def test_the_rehearsal_clamps_max_pixels_to_the_tiny_model_and_keeps_other_kwargs() -> None:
    kwargs = '{"max_pixels":4194304,"fps":2}'
    argv = real_argv([*SERVE, "--mm-processor-kwargs", kwargs], RealEngine())
    value = json.loads(argv[argv.index("--mm-processor-kwargs") + 1])
    assert value == {"max_pixels": 256 * 256, "fps": 2}


def test_a_smaller_guard_than_the_tiny_model_stays() -> None:
    argv = real_argv([*SERVE, "--mm-processor-kwargs", '{"max_pixels":4096}'], RealEngine())
    assert json.loads(argv[argv.index("--mm-processor-kwargs") + 1]) == {"max_pixels": 4096}

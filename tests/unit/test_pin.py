"""scripts/pin without a registry: image references, the stack file round trip, the keys."""

from __future__ import annotations

import pytest

from scripts.pin.registry import (
    PinError,
    Resolver,
    _token_query,
    parse_ref,
)
from scripts.pin.stackfile import ROOT, image_settings
from scripts.stack_document import dump_document, load_document
from stacks.rules.common import images
from stacks.settings import load_stack_file
from tests.support.pin import PROD, PROD_IMAGE_KEYS, ZEROS


@pytest.mark.parametrize("stack_name", ["dev", "staging", "prod"])
def test_untouched_stack_files_round_trip_byte_for_byte(stack_name: str) -> None:
    path = ROOT / f"Pulumi.{stack_name}.yaml"
    assert dump_document(load_document(path, ValueError)) == path.read_text()


def test_image_keys_come_from_the_schema() -> None:
    found = [s.path for s in image_settings(load_document(PROD, ValueError)["config"])]
    assert found == PROD_IMAGE_KEYS
    # Everything the prod digest rule checks is pinned (webui and redis may be disabled there).
    assert {path for path, _ in images(load_stack_file(PROD))} <= set(found)


@pytest.mark.parametrize(
    ("text", "registry", "repository", "tag", "digest"),
    [
        ("nginx", "docker.io", "library/nginx", None, None),
        ("nginx:1.28.0", "docker.io", "library/nginx", "1.28.0", None),
        (
            "oliver006/redis_exporter:v1.67.0",
            "docker.io",
            "oliver006/redis_exporter",
            "v1.67.0",
            None,
        ),
        ("docker.io/library/redis:7.4.2", "docker.io", "library/redis", "7.4.2", None),
        (
            "ghcr.io/open-webui/open-webui:v0.7.0",
            "ghcr.io",
            "open-webui/open-webui",
            "v0.7.0",
            None,
        ),
        ("localhost:5000/a/b:1@" + ZEROS, "localhost:5000", "a/b", "1", ZEROS),
        ("127.0.0.1:5000/app@" + ZEROS, "127.0.0.1:5000", "app", None, ZEROS),
    ],
)
def test_parse_ref(
    text: str, registry: str, repository: str, tag: str | None, digest: str | None
) -> None:
    ref = parse_ref(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (
        registry,
        repository,
        tag,
        digest,
    )


def test_pinned_keeps_the_written_name() -> None:
    assert parse_ref("nginx:1.28.0@" + ZEROS).pinned("sha256:" + "1" * 64) == (
        "nginx:1.28.0@sha256:" + "1" * 64
    )
    assert Resolver().base_url("docker.io") == "https://registry-1.docker.io"
    assert Resolver().base_url("ghcr.io") == "https://ghcr.io"


@pytest.mark.parametrize(
    "bad", ["Nginx:1", "nginx:1@sha256:abc", "nginx@sha512:" + "0" * 128, "a//b"]
)
def test_parse_ref_rejects(bad: str) -> None:
    with pytest.raises(PinError, match="not a valid image reference"):
        parse_ref(bad)


def test_token_request_asks_the_pull_scope_besides_the_challenges() -> None:
    ref = parse_ref("public.ecr.aws/deep-learning-containers/vllm:1")
    query = _token_query({"scope": "aws", "service": "public.ecr.aws"}, ref)
    assert query == (
        "scope=aws&scope=repository%3Adeep-learning-containers%2Fvllm%3Apull&service=public.ecr.aws"
    )

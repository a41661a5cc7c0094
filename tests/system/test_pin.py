"""scripts/pin against a real registry: Debian's docker-registry on loopback, fed by skopeo.

The digests the tool writes are checked against `skopeo inspect --raw | sha256sum`, an
implementation that shares no code with it. Skipped when docker-registry or skopeo is not
installed (`apt-get install --no-install-recommends docker-registry skopeo`).
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from scripts.pin.registry import (
    PinError,
    Resolver,
    insecure_registry,
    parse_ref,
)
from scripts.pin.stackfile import ROOT
from tests.support import registry as rf
from tests.support.pin import PROD, PROD_IMAGE_KEYS, ZEROS

CLI_TIMEOUT = 120  # seconds; one CLI run resolves seven images on loopback in well under 1 s
MIN_PROD_COMMENTS = 10  # Pulumi.prod.yaml has ~15 comment lines

needs_registry = pytest.mark.skipif(
    bool(rf.missing_tools()), reason=f"not installed: {', '.join(rf.missing_tools())}"
)


def run_pin(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """The CLI as a user runs it, from the repository root."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "NO_PROXY": "127.0.0.1"}
    return subprocess.run(
        [sys.executable, "-m", "scripts.pin", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        env=env,
        check=False,
    )


def assert_no_traceback(done: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in done.stderr + done.stdout, done.stderr


@dataclass(frozen=True)
class LocalStack:
    """A copy of Pulumi.prod.yaml whose seven images live in the local registry."""

    path: Path
    registry: rf.Registry
    refs: dict[str, str]  # config key path -> local repo:tag (no digest)
    layouts: Path

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_pin("--file", self.path, "--insecure-registry", self.registry.host, *args)

    def values(self) -> dict[str, str]:
        """Image values as PyYAML (not the tool's ruamel) reads them."""
        config = yaml.safe_load(self.path.read_text())["config"]
        return {key: _lookup(config, key) for key in self.refs}


def _lookup(config: dict[str, object], key: str) -> str:
    section, name = key.split(".")
    values = config[f"qwen-vl-serving:{section}"]
    assert isinstance(values, dict)
    return str(values[name])


def _local_name(image: str) -> str:
    """The repository path of a prod image without registry: nginx, open-webui/open-webui."""
    name = image.split("@")[0].rsplit(":", 1)[0]
    first, _, rest = name.partition("/")
    return rest if "." in first else name


def make_local_stack(tmp: Path, registry: rf.Registry, namespace: str) -> LocalStack:
    """Push one distinct image per prod image key, then point a prod copy at them."""
    text = PROD.read_text()
    config = yaml.safe_load(text)["config"]
    refs: dict[str, str] = {}
    for key in PROD_IMAGE_KEYS:
        original = _lookup(config, key)
        tag = original.split("@")[0].rsplit(":", 1)[1]
        local = registry.ref(f"{namespace}/{_local_name(original)}", tag)
        push_image(tmp / "layouts", local, content=f"{local} v1".encode())
        refs[key] = local
        # Placeholder digest kept, exactly as the committed file has it.
        text = text.replace(original, f"{local}@{ZEROS}")
    path = tmp / "Pulumi.prod.yaml"
    path.write_text(text)
    return LocalStack(path, registry, refs, tmp / "layouts")


def push_image(layouts: Path, ref: str, content: bytes, multi_arch: bool = False) -> None:
    tag = ref.rsplit(":", 1)[1]
    layout = rf.build_layout(layouts / re.sub(r"\W", "_", ref), tag, content, multi_arch)
    rf.push(layout, tag, ref, multi_arch)


def comments(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip().startswith("#")]


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[rf.Registry]:
    with rf.running_registry(tmp_path_factory.mktemp("registry")) as running:
        yield running


@pytest.fixture
def stack(tmp_path: Path, registry: rf.Registry, request: pytest.FixtureRequest) -> LocalStack:
    # One namespace per test: a test that re-tags cannot disturb another.
    namespace = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")
    return make_local_stack(tmp_path, registry, namespace)


# --- pinning --------------------------------------------------------------------------------


@needs_registry
def test_pin_writes_the_registry_digest_of_every_image(stack: LocalStack) -> None:
    done = stack.cli()
    assert done.returncode == 0, done.stderr
    for key, ref in stack.refs.items():
        assert stack.values()[key] == f"{ref}@{rf.registry_digest(ref)}", key
        assert key in done.stdout
    assert "7 of 7 image(s) changed" in done.stdout


@needs_registry
def test_pin_changes_only_the_image_lines(stack: LocalStack) -> None:
    before = stack.path.read_text()
    assert stack.cli().returncode == 0
    after = stack.path.read_text()
    assert comments(after) == comments(before)
    assert len(comments(before)) > MIN_PROD_COMMENTS  # the comments really are in the test
    changed = [
        (old, new)
        for old, new in zip(before.splitlines(), after.splitlines(), strict=True)
        if old != new
    ]
    assert len(changed) == len(PROD_IMAGE_KEYS)
    for old, new in changed:
        assert old.split("@")[0] == new.split("@")[0]  # key, indentation, tag kept


@needs_registry
def test_pin_replaces_an_existing_real_digest(stack: LocalStack) -> None:
    stale = stack.values()["redis.image"].replace(ZEROS, "sha256:" + "ab" * 32)
    stack.path.write_text(stack.path.read_text().replace(stack.values()["redis.image"], stale))
    assert stack.cli().returncode == 0
    ref = stack.refs["redis.image"]
    assert stack.values()["redis.image"] == f"{ref}@{rf.registry_digest(ref)}"


@needs_registry
def test_pin_is_atomic_and_idempotent(stack: LocalStack) -> None:
    inode = stack.path.stat().st_ino
    assert stack.cli().returncode == 0
    assert stack.path.stat().st_ino != inode  # replaced by a rename, not rewritten in place
    assert sorted(p.name for p in stack.path.parent.iterdir()) == ["Pulumi.prod.yaml", "layouts"]
    pinned = stack.path.stat()
    again = stack.cli()
    assert again.returncode == 0
    assert "0 of 7 image(s) changed" in again.stdout
    assert stack.path.stat().st_ino == pinned.st_ino  # nothing to change: not rewritten
    assert stack.path.stat().st_mtime_ns == pinned.st_mtime_ns


@needs_registry
def test_multi_platform_image_pins_the_index_not_a_platform(
    stack: LocalStack, registry: rf.Registry
) -> None:
    ref = stack.refs["serving.vllmImage"]
    push_image(stack.layouts, ref, b"two platforms", multi_arch=True)
    raw = rf.raw_manifest(ref)
    assert b"image.index" in raw
    assert stack.cli().returncode == 0
    assert stack.values()["serving.vllmImage"] == f"{ref}@{rf.registry_digest(ref)}"


@needs_registry
def test_unknown_tag_names_key_and_tag_and_writes_nothing(stack: LocalStack) -> None:
    missing = stack.refs["gateway.exporterImage"].rsplit(":", 1)[0] + ":9.9.9"
    text = stack.path.read_text().replace(stack.refs["gateway.exporterImage"], missing)
    stack.path.write_text(text)
    done = stack.cli()
    assert done.returncode == 1
    assert_no_traceback(done)
    assert "gateway.exporterImage" in done.stderr
    assert "tag '9.9.9' not found" in done.stderr
    assert "nothing written" in done.stderr
    assert stack.path.read_text() == text


# --- verifying ------------------------------------------------------------------------------


@needs_registry
def test_verify_passes_after_pinning(stack: LocalStack) -> None:
    assert stack.cli().returncode == 0
    pinned = stack.path.read_text()
    done = stack.cli("--verify")
    assert done.returncode == 0, done.stderr
    assert "all 7 image pin(s) match" in done.stdout
    assert stack.path.read_text() == pinned


@needs_registry
def test_verify_fails_naming_the_key_when_the_tag_moves(stack: LocalStack) -> None:
    assert stack.cli().returncode == 0
    ref = stack.refs["gateway.image"]
    old = rf.registry_digest(ref)
    push_image(stack.layouts, ref, b"a different nginx")  # same tag, new image
    new = rf.registry_digest(ref)
    assert new != old
    done = stack.cli("--verify")
    assert done.returncode == 1
    assert_no_traceback(done)
    assert "1 image problem(s)" in done.stderr
    assert f"gateway.image: pinned {old} but {ref} now resolves to {new}" in done.stderr
    assert "python -m scripts.pin --file" in done.stderr


@needs_registry
def test_verify_reports_every_placeholder_naming_the_tool(stack: LocalStack) -> None:
    done = stack.cli("--verify")
    assert done.returncode == 1
    assert_no_traceback(done)
    assert "7 image problem(s)" in done.stderr
    for key in PROD_IMAGE_KEYS:
        assert re.search(
            rf"- {re.escape(key)}: .*placeholder digest.*python -m scripts\.pin", done.stderr
        )


@needs_registry
def test_verify_reports_an_unpinned_image(stack: LocalStack) -> None:
    value = stack.values()["webui.image"]
    stack.path.write_text(stack.path.read_text().replace(value, value.split("@")[0]))
    done = stack.cli("--verify")
    assert done.returncode == 1
    assert re.search(
        r"webui\.image: .* is not pinned by digest; run `python -m scripts\.pin", done.stderr
    )


# --- token authentication (what docker.io, ghcr.io, nvcr.io, public.ecr.aws require) -------


@needs_registry
def test_bearer_token_challenge_is_answered_anonymously(tmp_path: Path) -> None:
    with (
        rf.running_token_server(tmp_path / "token") as tokens,
        rf.running_registry(tmp_path / "registry", auth=tokens.auth_config()) as registry,
    ):
        ref = registry.ref("secured/app", "1.0")
        push_image(tmp_path / "layouts", ref, b"behind a token")
        assert tokens.requests
        tokens.requests.clear()
        resolver = Resolver(insecure=frozenset({registry.host}))
        assert resolver.resolve(parse_ref(ref)) == rf.registry_digest(ref)
        assert (
            tokens.requests[0]
            == "scope=repository%3Asecured%2Fapp%3Apull&service=pin-test-registry"
        )


# --- user mistakes: a message, no traceback -------------------------------------------------


@needs_registry
def test_unreachable_registry_is_named(stack: LocalStack) -> None:
    closed = f"127.0.0.1:{rf.free_port()}"
    text = stack.path.read_text().replace(stack.registry.host, closed)
    stack.path.write_text(text)
    done = run_pin("--file", stack.path, "--insecure-registry", closed)
    assert done.returncode == 1
    assert_no_traceback(done)
    assert f"cannot reach registry {closed}" in done.stderr
    assert f"Pinning needs network access to {closed}" in done.stderr
    assert stack.path.read_text() == text


@needs_registry
def test_https_to_a_plain_http_registry_suggests_the_option(stack: LocalStack) -> None:
    done = run_pin("--file", stack.path)
    assert done.returncode == 1
    assert_no_traceback(done)
    assert f"--insecure-registry {stack.registry.host}" in done.stderr


def test_missing_file_and_unknown_stack(tmp_path: Path) -> None:
    missing = run_pin("--file", tmp_path / "Pulumi.nope.yaml")
    unknown = run_pin("--stack", "nope", "--verify")
    for done in (missing, unknown):
        assert done.returncode == 1
        assert_no_traceback(done)
    assert "no such stack file" in missing.stderr
    assert "no stack 'nope'" in unknown.stderr
    assert "stacks: dev, prod, staging" in unknown.stderr


def test_not_a_stack_file(tmp_path: Path) -> None:
    path = tmp_path / "Pulumi.x.yaml"
    path.write_text("name: qwen-vl-serving\nruntime: python\n")
    done = run_pin("--file", path, "--verify")
    assert done.returncode == 1
    assert "no `config:` mapping" in done.stderr


def test_insecure_registry_must_be_loopback(tmp_path: Path) -> None:
    copy = tmp_path / "Pulumi.prod.yaml"  # never the real file: a bug here must not edit it
    copy.write_text(PROD.read_text())
    done = run_pin("--file", copy, "--insecure-registry", "registry.example.com:5000")
    assert done.returncode == 1
    assert "allowed only for a loopback registry" in done.stderr
    assert insecure_registry("[::1]:5000") == "[::1]:5000"
    with pytest.raises(PinError):
        insecure_registry("127.0.0.1")  # no port


def test_committed_prod_placeholders_fail_verify_without_network() -> None:
    # Placeholders are reported before any registry is asked, so this is offline.
    if PROD.read_text().count(ZEROS) < len(PROD_IMAGE_KEYS):
        pytest.skip("Pulumi.prod.yaml is pinned for real now")
    done = run_pin("--stack", "prod", "--verify")
    assert done.returncode == 1
    assert done.stderr.count("placeholder digest") == len(PROD_IMAGE_KEYS)
    assert "run `python -m scripts.pin --stack prod`" in done.stderr


# --- no registry needed ---------------------------------------------------------------------


# --- registries that leave the digest to the client ------------------------------------------

MANIFEST = b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}'


@contextmanager
def stub_registry(digest_header: str | None) -> Iterator[str]:
    """A loopback server serving MANIFEST; `digest_header` on GET only, as some proxies do."""

    class Handler(BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:
            self._answer(with_body=False)

        def do_GET(self) -> None:
            self._answer(with_body=True)

        def _answer(self, with_body: bool) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
            self.send_header("Content-Length", str(len(MANIFEST)))
            if digest_header and with_body:
                self.send_header("Docker-Content-Digest", digest_header)
            self.end_headers()
            if with_body:
                self.wfile.write(MANIFEST)

        def log_message(self, format: str, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1})
    thread.start()
    try:
        yield f"127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


def test_digest_is_computed_when_the_registry_sends_none() -> None:
    with stub_registry(None) as host:
        resolver = Resolver(insecure=frozenset({host}))
        digest = resolver.resolve(parse_ref(f"{host}/app:1"))
    assert digest == "sha256:" + hashlib.sha256(MANIFEST).hexdigest()


def test_a_digest_header_that_does_not_match_the_bytes_is_refused() -> None:
    with stub_registry("sha256:" + "1" * 64) as host:
        resolver = Resolver(insecure=frozenset({host}))
        with pytest.raises(PinError, match="something between here and the registry alters it"):
            resolver.resolve(parse_ref(f"{host}/app:1"))

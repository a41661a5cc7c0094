"""Resolve an image reference to its manifest digest through the OCI Distribution API v2.

Standard library only (urllib), so pinning works from a bare checkout. The digest is the
one `docker pull` and `crane digest` report: the digest of the manifest the registry
serves for the tag, which for a multi-platform image is its index (manifest list), never
one platform's manifest. That is why every request accepts the four manifest types.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.message import Message
from http.client import HTTPException
from typing import Protocol

# Order is preference only; a registry serves what it stores if the type is accepted.
MANIFEST_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
ACCEPT = ", ".join(MANIFEST_TYPES)

DOCKER_HUB = "docker.io"
# docker.io is the name people write; the API lives on another host.
_API_HOSTS = {DOCKER_HUB: "registry-1.docker.io", "index.docker.io": "registry-1.docker.io"}

SHA256 = re.compile(r"^sha256:[0-9a-f]{64}$")
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG = re.compile(r"^[\w][\w.-]{0,127}$")
_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')

# Registries cap manifests at 4 MiB; a bigger body is not a manifest.
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
DEFAULT_TIMEOUT = 20.0
HTTP_OK = 200
HTTP_UNAUTHORIZED = 401
HTTP_NOT_FOUND = 404
HTTP_TOO_MANY = 429


class PinError(Exception):
    """A problem the user can fix; the message names it and says what to do."""


class TagNotFound(PinError):
    """The registry has no manifest for the tag (or no such repository)."""


class RegistryUnreachable(PinError):
    """No HTTP answer from the registry or its token service."""


@dataclass(frozen=True)
class ImageRef:
    """`[registry/]repository[:tag][@digest]`, as written and as the API names it."""

    text: str  # as written in the stack file
    name: str  # the written text before `:tag` and `@digest` (kept when re-pinning)
    registry: str  # docker.io when the reference names no registry
    repository: str  # API name: library/nginx for `nginx`
    tag: str | None
    digest: str | None

    def pinned(self, digest: str) -> str:
        """The reference as written, with its tag, pinned to `digest`."""
        return f"{self.name}:{self.tag}@{digest}" if self.tag else f"{self.name}@{digest}"

    @property
    def unpinned(self) -> str:
        return f"{self.name}:{self.tag}" if self.tag else self.name


def parse_ref(text: str) -> ImageRef:
    """Split an image reference with Docker's defaults (`nginx` → docker.io/library/nginx)."""
    rest, _, digest = text.strip().partition("@")
    name, tag = rest, None
    if ":" in rest.rsplit("/", 1)[-1]:  # a colon before the last `/` is a registry port
        name, tag = rest.rsplit(":", 1)
    registry, repository = _split_registry(name)
    problem = _ref_problem(repository, tag, digest or None)
    if problem:
        raise PinError(f"{text!r} is not a valid image reference: {problem}")
    return ImageRef(text, name, registry, repository, tag, digest or None)


def _split_registry(name: str) -> tuple[str, str]:
    first, sep, remainder = name.partition("/")
    # Docker's rule: the first component is a registry only if it looks like a host.
    if sep and ("." in first or ":" in first or first == "localhost"):
        registry, repository = first, remainder
    else:
        registry, repository = DOCKER_HUB, name
    if registry in _API_HOSTS and "/" not in repository:
        repository = f"library/{repository}"
    return registry, repository


def _ref_problem(repository: str, tag: str | None, digest: str | None) -> str | None:
    if not _REPOSITORY.match(repository):
        return f"repository {repository!r} (lowercase letters, digits, . _ - and /)"
    if tag is not None and not _TAG.match(tag):
        return f"tag {tag!r}"
    if digest is not None and not SHA256.match(digest):
        return f"digest {digest!r} (only sha256:<64 lowercase hex> pins are supported)"
    return None


def host_and_port(registry: str) -> tuple[str, int | None]:
    parsed = urllib.parse.urlsplit(f"//{registry}")
    return parsed.hostname or "", parsed.port


def is_loopback(registry: str) -> bool:
    host, _ = host_and_port(registry)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def insecure_registry(value: str) -> str:
    """Check an --insecure-registry value: plain HTTP is allowed for loopback only."""
    if not is_loopback(value) or host_and_port(value)[1] is None:
        raise PinError(
            f"--insecure-registry {value}: plain HTTP is allowed only for a loopback "
            "registry given as HOST:PORT (127.0.0.1:5000, localhost:5000, [::1]:5000)"
        )
    return value


@dataclass(frozen=True)
class _Response:
    status: int
    headers: Mapping[str, str]  # lower-case names
    challenges: tuple[str, ...]  # every WWW-Authenticate header
    body: bytes

    def error_codes(self) -> str:
        """The `errors` of a Distribution API error body, for messages."""
        try:
            errors = json.loads(self.body)["errors"]
            return "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors)
        except (ValueError, KeyError, TypeError, AttributeError):
            return ""


def _response(status: int, headers: Message, body: bytes) -> _Response:
    flat = {k.lower(): v for k, v in headers.items()}
    return _Response(status, flat, tuple(headers.get_all("WWW-Authenticate") or ()), body)


@dataclass
class Resolver:
    """Resolves tags to digests; `insecure` lists loopback HOST:PORTs spoken to over HTTP."""

    insecure: frozenset[str] = frozenset()
    timeout: float = DEFAULT_TIMEOUT
    # One anonymous pull token per registry and repository, reused for its HEAD and GET.
    _tokens: dict[tuple[str, str], str] = field(default_factory=dict)
    # A registry that could not be reached is not tried again (each try can take `timeout`).
    _down: dict[str, RegistryUnreachable] = field(default_factory=dict)

    def resolve(self, ref: ImageRef) -> str:
        """The digest the registry serves for `ref`'s tag (HEAD first: free on Docker Hub)."""
        if ref.tag is None:
            raise PinError(f"{ref.text}: names no tag, so there is nothing to resolve")
        if ref.registry in self._down:
            raise self._down[ref.registry]
        head = self._fetch("HEAD", ref)
        digest = head.headers.get("docker-content-digest", "")
        if head.status == HTTP_OK and SHA256.match(digest):
            return digest
        # No usable digest header, or an error whose reason is in a body HEAD cannot carry
        # (distribution says "OCI index found, but accept header does not support ..."):
        # GET the manifest and hash its bytes ourselves.
        get = self._fetch("GET", ref)
        _check(get, ref)
        computed = "sha256:" + hashlib.sha256(get.body).hexdigest()
        claimed = get.headers.get("docker-content-digest", "")
        if SHA256.match(claimed) and claimed != computed:
            raise PinError(
                f"{ref.text}: {ref.registry} says the manifest digest is {claimed} but its "
                f"bytes hash to {computed}; something between here and the registry alters it"
            )
        return computed

    def base_url(self, registry: str) -> str:
        if registry in self.insecure:
            return f"http://{registry}"
        return f"https://{_API_HOSTS.get(registry, registry)}"

    def _fetch(self, method: str, ref: ImageRef) -> _Response:
        url = f"{self.base_url(ref.registry)}/v2/{ref.repository}/manifests/{ref.tag}"
        headers = {"Accept": ACCEPT}
        if token := self._tokens.get((ref.registry, ref.repository)):
            headers["Authorization"] = f"Bearer {token}"
        response = self._request(method, url, headers, ref.registry)
        if response.status != HTTP_UNAUTHORIZED or "Authorization" in headers:
            return response
        # Public images still need a token on docker.io, ghcr.io, nvcr.io, public.ecr.aws.
        token = self._token(_bearer_challenge(response, ref), ref)
        self._tokens[ref.registry, ref.repository] = token
        headers["Authorization"] = f"Bearer {token}"
        return self._request(method, url, headers, ref.registry)

    def _token(self, challenge: Mapping[str, str], ref: ImageRef) -> str:
        realm = challenge.get("realm", "")
        if not self._realm_allowed(realm, ref.registry):
            raise PinError(
                f"{ref.text}: {ref.registry} sends token requests to {realm!r}; "
                "pin only asks tokens over HTTPS (or plain HTTP on an --insecure-registry)"
            )
        url = realm + ("&" if "?" in realm else "?") + _token_query(challenge, ref)
        response = self._request("GET", url, {"Accept": "application/json"}, ref.registry)
        if response.status != HTTP_OK:
            raise PinError(
                f"{ref.text}: the token service {realm} refused an anonymous pull token "
                f"(HTTP {response.status}); pin supports public images only"
            )
        try:
            answer = json.loads(response.body)
            return str(answer.get("token") or answer["access_token"])
        except (ValueError, KeyError, TypeError, AttributeError):
            raise PinError(f"{ref.text}: the token service {realm} sent no token") from None

    def _realm_allowed(self, realm: str, registry: str) -> bool:
        parsed = urllib.parse.urlsplit(realm)
        if parsed.scheme == "https":
            return True
        return parsed.scheme == "http" and registry in self.insecure and is_loopback(parsed.netloc)

    def _request(
        self, method: str, url: str, headers: Mapping[str, str], registry: str
    ) -> _Response:
        request = urllib.request.Request(url, headers=dict(headers), method=method)
        opener = self._opener(url)
        try:
            with opener.open(request, timeout=self.timeout) as answer:
                return _response(answer.status, answer.headers, _read(answer, method))
        except urllib.error.HTTPError as err:
            try:
                return _response(err.code, err.headers, _read(err, method))
            finally:
                err.close()
        except (urllib.error.URLError, OSError, HTTPException) as err:
            self._down[registry] = _unreachable(registry, url, err)
            raise self._down[registry] from None

    def _opener(self, url: str) -> urllib.request.OpenerDirector:
        # Loopback never goes through an environment proxy; real registries may need one.
        host = urllib.parse.urlsplit(url).netloc
        if is_loopback(host):
            return urllib.request.build_opener(urllib.request.ProxyHandler({}))
        return urllib.request.build_opener()


class _Readable(Protocol):
    def read(self, size: int, /) -> bytes: ...


def _read(answer: _Readable, method: str) -> bytes:
    if method == "HEAD":
        return b""
    body = answer.read(MAX_MANIFEST_BYTES + 1)
    if len(body) > MAX_MANIFEST_BYTES:
        raise PinError(f"a manifest larger than {MAX_MANIFEST_BYTES} bytes is not a manifest")
    return body


def _token_query(challenge: Mapping[str, str], ref: ImageRef) -> str:
    """The challenge's scopes plus a pull of this repository, as containerd asks them.

    A challenge may name a scope that is not the repository's (public.ecr.aws answers
    `scope="aws"` on some paths), so the pull scope is always asked for as well.
    """
    scopes = [*challenge.get("scope", "").split(), f"repository:{ref.repository}:pull"]
    query = [("scope", scope) for scope in dict.fromkeys(scopes)]  # once each, in order
    if "service" in challenge:
        query.append(("service", challenge["service"]))
    return urllib.parse.urlencode(query)


def _bearer_challenge(response: _Response, ref: ImageRef) -> dict[str, str]:
    for challenge in response.challenges:
        scheme, _, params = challenge.partition(" ")
        if scheme.lower() == "bearer":
            return dict(_CHALLENGE_PARAM.findall(params))
    raise PinError(
        f"{ref.text}: {ref.registry} wants credentials "
        f"({', '.join(response.challenges) or 'no WWW-Authenticate challenge'}); "
        "pin resolves anonymously, so the image must be public"
    )


def _check(response: _Response, ref: ImageRef) -> None:
    if response.status == HTTP_OK:
        return
    if response.status == HTTP_NOT_FOUND:
        raise _not_found(ref, response)
    if response.status == HTTP_UNAUTHORIZED:
        # Docker Hub answers 401, not 404, for a repository that does not exist.
        raise TagNotFound(
            f"{ref.text}: {ref.registry}/{ref.repository} does not exist or is not public "
            f"(HTTP 401 {response.error_codes()}); check the image name"
        )
    if response.status == HTTP_TOO_MANY:
        raise PinError(f"{ref.text}: {ref.registry} rate-limits this address; retry later")
    raise PinError(
        f"{ref.text}: {ref.registry} answered HTTP {response.status} "
        f"{response.error_codes()}".rstrip()
    )


def _not_found(ref: ImageRef, response: _Response) -> TagNotFound:
    detail = response.error_codes() or "HTTP 404"
    # distribution answers 404 for a manifest type the Accept header leaves out.
    hint = "a manifest type pin does not know" if "accept header" in detail else "check the tag"
    return TagNotFound(
        f"{ref.text}: tag {ref.tag!r} not found in {ref.registry}/{ref.repository} "
        f"({detail}); {hint}"
    )


def _unreachable(registry: str, url: str, err: BaseException) -> RegistryUnreachable:
    reason = getattr(err, "reason", None) or err
    host = urllib.parse.urlsplit(url).netloc
    hint = ""
    if isinstance(reason, ssl.SSLError) and is_loopback(registry):
        hint = f" (a plain-HTTP local registry needs --insecure-registry {registry})"
    return RegistryUnreachable(
        f"cannot reach registry {registry} at {host}: {reason}{hint}. "
        f"Pinning needs network access to {registry}; run it where that registry is reachable"
    )

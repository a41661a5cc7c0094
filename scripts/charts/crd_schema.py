"""Validate custom resources offline against the CRDs a chart renders, as strictly as the API server.

Build a `CrdValidator` from rendered documents (apiextensions.k8s.io/v1 CustomResourceDefinition
objects; anything else is ignored) and call `validate(obj)`: it returns one `Issue` per problem,
each with the field path (`spec.podMetricsEndpoints[0].portNumber`) and a message. The schema
used is `spec.versions[].schema.openAPIV3Schema` of the version named by the object's
apiVersion, which must be served.

Why a conversion is needed: a CRD schema is an OpenAPI v3.0 "structural schema" with Kubernetes
extensions, not JSON Schema, and a JSON Schema validator given it verbatim accepts much that the
API server refuses (and refuses some things it accepts):
- Unknown fields. JSON Schema allows any property not listed; the API server with strict field
  validation (kubectl's default, and what server-side apply reports) rejects every field that
  its schema does not declare, except below `x-kubernetes-preserve-unknown-fields: true`. The
  conversion adds `additionalProperties: false` to every object schema that declares
  `properties` (or declares nothing at all: such an object keeps no fields), except under
  preserve-unknown-fields and except inside allOf/anyOf/oneOf/not, which in a structural schema
  only add value checks and never declare fields.
- `nullable: true` is OpenAPI, not JSON Schema: it becomes `type: [T, "null"]`. Without it a
  null is reported (the API server silently drops a null object field, so the value is lost).
- `x-kubernetes-int-or-string: true` allows an integer or a string whatever `type` says.
- `x-kubernetes-embedded-resource: true` marks a nested object (a pod template, a PVC template)
  that implicitly has apiVersion, kind and metadata, checked like the root's.
- OpenAPI 3.0 `exclusiveMinimum`/`exclusiveMaximum` are booleans modifying minimum/maximum;
  in JSON Schema 2020-12 they are numbers.
- metadata: the API server validates the root `metadata` as an ObjectMeta whatever the CRD says
  (a CRD may only restrict name/generateName). Here it is checked loosely: it must be an object
  whose keys are ObjectMeta fields, with string name/namespace/generateName and string-to-string
  labels and annotations.
Not checked (the API server does): `x-kubernetes-validations` (CEL rules), list-type=map key
uniqueness, `format` (int32, date-time, ...), and defaults (the schema's defaults are not applied,
so a value that would only be valid after defaulting is judged as given).

The JSON Schema part is done by the `jsonschema` library (Draft 2020-12 validator, no format
checker); the project's lock already has jsonschema 4.26.0 (via kubernetes-validate and
check-jsonschema).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import jsonschema
from jsonschema import Draft202012Validator

CRD_API: Final = "apiextensions.k8s.io/v1"
CRD_KIND: Final = "CustomResourceDefinition"

# ObjectMeta fields (k8s.io/apimachinery/pkg/apis/meta/v1.ObjectMeta).
OBJECT_META_FIELDS: Final = frozenset(
    {
        "name", "generateName", "namespace", "selfLink", "uid", "resourceVersion", "generation",
        "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "labels",
        "annotations", "ownerReferences", "finalizers", "managedFields",
    }
)  # fmt: skip
_STRING_MAP: Final = {"type": "object", "additionalProperties": {"type": "string"}}
_LOOSE_METADATA: Final = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "generateName": {"type": "string"},
        "namespace": {"type": "string"},
        "labels": _STRING_MAP,
        "annotations": _STRING_MAP,
        "finalizers": {"type": "array", "items": {"type": "string"}},
        "ownerReferences": {"type": "array", "items": {"type": "object"}},
    },
    "propertyNames": {"enum": sorted(OBJECT_META_FIELDS)},
}
# OpenAPI keywords that carry no validation (or that are handled explicitly below).
_DROPPED: Final = frozenset(
    {
        "description", "title", "example", "externalDocs", "default", "format", "nullable",
        "x-kubernetes-preserve-unknown-fields", "x-kubernetes-int-or-string",
        "x-kubernetes-embedded-resource", "x-kubernetes-validations", "x-kubernetes-list-type",
        "x-kubernetes-list-map-keys", "x-kubernetes-map-type", "exclusiveMinimum",
        "exclusiveMaximum", "properties", "additionalProperties", "items", "allOf", "anyOf",
        "oneOf", "not", "enum", "type",
    }
)  # fmt: skip


_NULL: Final = "null is not allowed"


class CrdSchemaError(ValueError):
    """A CRD could not be used (not v1, no schema, ...)."""


@dataclass(frozen=True)
class Issue:
    path: str  # e.g. spec.leaderWorkerTemplate.volumeClaimTemplates
    message: str

    def __str__(self) -> str:
        return f"{self.path or '<root>'}: {self.message}"


class ValidationFailed(ValueError):
    def __init__(self, obj: Mapping[str, Any], issues: list[Issue]) -> None:
        self.issues = issues
        meta = obj.get("metadata") or {}
        name = meta.get("name", "?") if isinstance(meta, Mapping) else "?"
        lines = "\n".join(f"  {i}" for i in issues)
        super().__init__(f"{obj.get('kind')}/{name} is invalid:\n{lines}")


_INLINE_FLAGS: Final = re.compile(r"\(\?([imsU]+)\)")


def go_regex_to_python(pattern: str) -> str | None:
    """A Go RE2 `pattern` as a Python regex, or None when it cannot be translated.

    RE2 allows flag groups such as `(?i)` anywhere, applying to the rest of the enclosing
    group; Python only allows them at the very start, so a mid-pattern `(?i)` becomes a scoped
    `(?i:` closed where its group ends. `\\z` (end of text) is Python's `\\Z`.
    """
    out: list[str] = []
    closers: list[int] = [0]  # extra ")" to emit when the current group closes
    i, in_class = 0, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            nxt = pattern[i + 1]
            out.append("\\Z" if nxt == "z" and not in_class else c + nxt)
            i += 2
            continue
        if in_class:
            in_class = c != "]"
            out.append(c)
        elif c == "[":
            in_class = True
            out.append(c)
            if pattern[i + 1 : i + 2] == "]":  # a literal ] first in the class
                out.append("]")
                i += 1
        elif c == "(":
            m = _INLINE_FLAGS.match(pattern, i)
            if m and m.group(1) != "U" and out:
                out.append(f"(?{m.group(1).replace('U', '')}:")
                closers[-1] += 1
                i = m.end()
                continue
            if m and m.group(1) == "U":
                return None  # ungreedy mode has no Python equivalent
            closers.append(0)
            out.append(c)
        elif c == ")":
            out.append(")" * closers.pop() + ")" if len(closers) > 1 else ")")
        else:
            out.append(c)
        i += 1
    out.append(")" * closers[0])
    translated = "".join(out)
    try:
        re.compile(translated)
    except re.error:
        return None
    return translated


def openapi_to_jsonschema(node: Mapping[str, Any], *, in_junctor: bool = False) -> dict[str, Any]:
    """One CRD openAPIV3Schema node (structural schema) as a Draft 2020-12 JSON Schema."""
    if not isinstance(node, Mapping):
        raise CrdSchemaError(f"schema node is not a mapping: {node!r}")
    out: dict[str, Any] = {k: copy.deepcopy(v) for k, v in node.items() if k not in _DROPPED}
    _value_keywords(node, out)
    _type_keyword(node, out)
    _children(node, out, in_junctor=in_junctor)
    return out


def _value_keywords(node: Mapping[str, Any], out: dict[str, Any]) -> None:
    if "pattern" in node:
        translated = go_regex_to_python(node["pattern"])
        if translated is None:
            out.pop("pattern")  # not checked: no Python equivalent
        else:
            out["pattern"] = translated
    if "enum" in node:
        extra = [None] if node.get("nullable") and None not in node["enum"] else []
        out["enum"] = list(node["enum"]) + extra
    for bound, flag in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
        if node.get(flag) is True and bound in node:
            out.pop(bound, None)
            out[flag] = node[bound]


def _type_keyword(node: Mapping[str, Any], out: dict[str, Any]) -> None:
    if node.get("x-kubernetes-int-or-string"):
        types = ["integer", "string"]
    elif "type" in node:
        types = [node["type"]]
    else:
        return  # no type: any value (null included)
    if node.get("nullable"):
        types.append("null")
    out["type"] = types[0] if len(types) == 1 else types


def _children(node: Mapping[str, Any], out: dict[str, Any], *, in_junctor: bool) -> None:
    for junctor in ("allOf", "anyOf", "oneOf"):
        if junctor in node:
            out[junctor] = [openapi_to_jsonschema(s, in_junctor=True) for s in node[junctor]]
    if "not" in node:
        out["not"] = openapi_to_jsonschema(node["not"], in_junctor=True)
    items = node.get("items")
    if items is not None:
        out["items"] = (
            openapi_to_jsonschema(items, in_junctor=in_junctor)
            if isinstance(items, Mapping)
            else {}
        )
    props = {
        k: openapi_to_jsonschema(v, in_junctor=in_junctor)
        for k, v in (node.get("properties") or {}).items()
    }
    if node.get("x-kubernetes-embedded-resource"):
        props.setdefault("apiVersion", {"type": "string"})
        props.setdefault("kind", {"type": "string"})
        props["metadata"] = _metadata_schema(props.get("metadata"))
    if props:
        out["properties"] = props
    additional = node.get("additionalProperties")
    if isinstance(additional, Mapping):
        out["additionalProperties"] = openapi_to_jsonschema(additional, in_junctor=in_junctor)
    elif isinstance(additional, bool):
        out["additionalProperties"] = additional
    elif (
        not in_junctor
        and not node.get("x-kubernetes-preserve-unknown-fields")
        and node.get("type") == "object"
    ):
        # Strict: an object keeps only the fields its schema declares.
        out["additionalProperties"] = False


def _metadata_schema(declared: Mapping[str, Any] | None) -> dict[str, Any]:
    """The loose ObjectMeta check, plus whatever a CRD says about metadata.name/generateName."""
    schema = copy.deepcopy(_LOOSE_METADATA)
    if declared:
        for field in ("name", "generateName"):
            extra = (declared.get("properties") or {}).get(field)
            if extra:
                extra = {k: v for k, v in extra.items() if k != "additionalProperties"}
                schema["properties"][field] = {"allOf": [{"type": "string"}, extra]}
    return schema


def root_schema(openapi: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON Schema of a whole custom resource: apiVersion, kind and metadata are implicit."""
    schema = openapi_to_jsonschema(openapi)
    props = schema.setdefault("properties", {})
    props.setdefault("apiVersion", {"type": "string"})
    props.setdefault("kind", {"type": "string"})
    props["metadata"] = _metadata_schema(props.get("metadata"))
    schema["type"] = "object"
    if not openapi.get("x-kubernetes-preserve-unknown-fields"):
        schema["additionalProperties"] = False
    return schema


@dataclass(frozen=True)
class _Version:
    name: str
    served: bool
    validator: Draft202012Validator | None


class CrdValidator:
    """Custom-resource validation against a set of CRDs, keyed by (group, kind)."""

    def __init__(self, crds: Iterable[Mapping[str, Any]], *, check_schemas: bool = True) -> None:
        """check_schemas: check every converted schema against the JSON Schema meta-schema
        (a guard on the conversion; about a second per large CRD set, so callers that build
        many validators from the same CRDs may check once and skip it afterwards)."""
        self._crds: dict[tuple[str, str], dict[str, _Version]] = {}
        self._plural: dict[tuple[str, str], str] = {}
        for crd in crds:
            if crd.get("kind") != CRD_KIND:
                continue
            if crd.get("apiVersion") != CRD_API:
                raise CrdSchemaError(
                    f"{crd.get('metadata', {}).get('name')}: only {CRD_API} CRDs are supported, "
                    f"got {crd.get('apiVersion')}"
                )
            spec = crd["spec"]
            key = (spec["group"], spec["names"]["kind"])
            versions: dict[str, _Version] = {}
            for v in spec.get("versions") or []:
                openapi = (v.get("schema") or {}).get("openAPIV3Schema")
                validator = None
                if openapi is not None:
                    schema = root_schema(openapi)
                    if check_schemas:
                        Draft202012Validator.check_schema(schema)
                    validator = Draft202012Validator(schema)
                versions[v["name"]] = _Version(v["name"], bool(v.get("served")), validator)
            self._crds[key] = versions
            self._plural[key] = crd["metadata"]["name"]

    @classmethod
    def from_docs(
        cls, docs: Iterable[Mapping[str, Any]], *, check_schemas: bool = True
    ) -> CrdValidator:
        return cls(
            (d for d in docs if d and d.get("kind") == CRD_KIND), check_schemas=check_schemas
        )

    def kinds(self) -> list[str]:
        return sorted(f"{k}.{g}" for g, k in self._crds)

    def served_versions(self, group: str, kind: str) -> list[str]:
        return [v.name for v in self._crds.get((group, kind), {}).values() if v.served]

    def validate(self, obj: Mapping[str, Any]) -> list[Issue]:
        api_version, kind = obj.get("apiVersion"), obj.get("kind")
        if not isinstance(api_version, str) or "/" not in api_version or not kind:
            return [Issue("", f"apiVersion {api_version!r}, kind {kind!r}: not a custom resource")]
        group, version = api_version.rsplit("/", 1)
        versions = self._crds.get((group, kind))
        if versions is None:
            return [Issue("", f"no CRD for kind {kind} in group {group} (have: {self.kinds()})")]
        v = versions.get(version)
        if v is None or not v.served:
            return [
                Issue(
                    "apiVersion",
                    f"version {version} of {kind}.{group} is not served "
                    f"(served: {self.served_versions(group, kind)})",
                )
            ]
        if v.validator is None:
            return [Issue("", f"{kind}.{group} {version} has no schema; nothing checked")]
        issues: set[Issue] = set()
        for error in v.validator.iter_errors(obj):
            issues.update(_issues(error))
        # A null reported as such needs no second message (anyOf/oneOf) at the same path.
        null_paths = {i.path for i in issues if i.message.startswith(_NULL)}
        kept = [i for i in issues if i.path not in null_paths or i.message.startswith(_NULL)]
        return sorted(kept, key=lambda i: (i.path, i.message))

    def check(self, obj: Mapping[str, Any]) -> None:
        issues = self.validate(obj)
        if issues:
            raise ValidationFailed(obj, issues)


def format_path(parts: Iterable[Any]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _issues(error: jsonschema.ValidationError) -> list[Issue]:
    path = list(error.absolute_path)
    if error.validator == "additionalProperties" and error.validator_value is False:
        schema = error.schema if isinstance(error.schema, Mapping) else {}
        declared = set((schema.get("properties") or {}).keys())
        instance = error.instance if isinstance(error.instance, Mapping) else {}
        extra = sorted(k for k in instance if k not in declared)
        return [Issue(format_path([*path, k]), "unknown field") for k in extra]
    if "propertyNames" in error.schema_path:
        return [Issue(format_path([*path, error.instance]), "unknown metadata field")]
    if error.validator == "type" and error.instance is None:
        return [
            Issue(
                format_path(path),
                f"{_NULL} (not nullable; expected {error.validator_value})",
            )
        ]
    return [Issue(format_path(path), error.message)]

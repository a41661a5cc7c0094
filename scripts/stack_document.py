"""Pulumi stack files as round-trip YAML documents for the tools that rewrite a few values
(promote, pin): comments, key order and quoting are kept, so an untouched file comes back
byte for byte and a change shows in review as exactly the lines it changed."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap
from ruamel.yaml.error import YAMLError

from scripts.affected_stacks import stacks_in


def _yaml() -> YAML:
    # Matches the committed stack files.
    y = YAML()
    y.preserve_quotes = True
    y.width = 4096  # never fold the long image@sha256 lines
    y.indent(mapping=2, sequence=4, offset=2)
    # A promoted default of None reads `key: null`, not a bare `key:`.
    y.representer.add_representer(type(None), _represent_null)
    return y


def _represent_null(representer: Any, _: None) -> Any:
    return representer.represent_scalar("tag:yaml.org,2002:null", "null")


def load_document(path: Path, error: type[Exception]) -> CommentedMap:
    """The stack file as a document; a user's mistake raises `error` with the fix in its text."""
    try:
        document = _yaml().load(path.read_text())
    except FileNotFoundError:
        known = ", ".join(stacks_in(path.parent)) if path.parent.is_dir() else ""
        raise error(f"{path}: no such stack file (stacks there: {known or 'none'})") from None
    except OSError as err:  # a directory, or a file this user may not read
        raise error(f"{path}: {err.strerror}") from None
    except YAMLError as err:
        raise error(f"{path}: not valid YAML: {err}") from None
    if not isinstance(document, CommentedMap) or not isinstance(
        document.get("config"), CommentedMap
    ):
        raise error(f"{path}: not a Pulumi stack file (no `config:` mapping)")
    return document


def dump_document(document: CommentedMap) -> str:
    out = io.StringIO()
    _yaml().dump(document, out)
    return out.getvalue()

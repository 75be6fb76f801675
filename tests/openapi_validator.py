"""Validate response bodies against OpenAI's published OpenAPI description (test helper).

The document lives beside the repository at `../shared/openai-openapi/openapi.yaml` (override with the
environment variable OPENAI_OPENAPI_YAML). It is about 3 MB, so it is parsed once per process. OpenAPI's
`nullable: true` is rewritten to `anyOf: [<schema>, {type: null}]` before JSON-Schema (2020-12) validation.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

_DOC_URI = "urn:openai-openapi"


def openapi_path() -> Path:
    """Where the OpenAPI yaml is expected (env override first)."""
    env = os.environ.get("OPENAI_OPENAPI_YAML")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "openai-openapi" / "openapi.yaml"


def _rewrite_nullable(node: Any) -> Any:
    """Return a copy of `node` where every `nullable: true` schema accepts null too."""
    if isinstance(node, list):
        return [_rewrite_nullable(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: _rewrite_nullable(v) for k, v in node.items()}
    if out.pop("nullable", False) is True:
        return {"anyOf": [out, {"type": "null"}]}
    return out


@functools.cache
def _document() -> dict[str, Any]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with open(openapi_path(), encoding="utf-8") as f:
        doc = yaml.load(f, Loader=loader)
    return _rewrite_nullable(doc)


@functools.cache
def _validator(schema_name: str) -> jsonschema.Draft202012Validator:
    doc = _document()
    if schema_name not in doc["components"]["schemas"]:
        raise KeyError(f"no schema named {schema_name}")
    registry = Registry().with_resource(
        _DOC_URI, Resource.from_contents(doc, default_specification=DRAFT202012)
    )
    schema = {"$ref": f"{_DOC_URI}#/components/schemas/{schema_name}"}
    return jsonschema.Draft202012Validator(schema, registry=registry)


def is_available() -> bool:
    """True when the OpenAPI document can be found."""
    return openapi_path().is_file()


def validate(obj: Any, schema_name: str) -> None:
    """Raise jsonschema.ValidationError unless `obj` satisfies components.schemas[schema_name]."""
    _validator(schema_name).validate(obj)

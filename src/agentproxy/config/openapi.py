"""OpenAPI descriptions of upstreams (`upstreams[].openapi: spec.yaml`), read into operations.

What the proxy takes from a spec: each operation's id, method and path template (so a rule
can name `http:createTransfer` instead of `http:POST /v1/transfers`), which path parameters
are integers (bound only in canonical form: Starlette, FastAPI and Spring read `/042` as
42), and the JSON schema of its request body (validated before policy runs). Paths are the
spec's, after its first server URL's path, less the upstream URL's own path: the paths
agents send. OpenAPI 3.0 and 3.1. Pure: a parsed document in, operations out.
"""

from __future__ import annotations

import re
from typing import Any, Final
from urllib.parse import urlsplit

from agentproxy.config.model import OpenApiOperation

__all__ = ["METHODS", "OpenApiError", "operations_of"]

METHODS: Final = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
_OPERATION_ID: Final = re.compile(r"[A-Za-z0-9_.-]{1,128}")


class OpenApiError(ValueError):
    """The spec cannot be read as the proxy needs it; the message says where."""


def operations_of(spec: Any, base_path: str = "") -> tuple[OpenApiOperation, ...]:
    """The operations of an OpenAPI 3.x document. `base_path`: the upstream URL's path.

    Raises OpenApiError naming the first problem: not OpenAPI 3, an operation without an
    operationId or with one used twice, a path the proxy cannot match as a template.
    """
    if not isinstance(spec, dict) or not str(spec.get("openapi", "")).startswith("3."):
        raise OpenApiError('not an OpenAPI 3 document (no "openapi: 3.x" at its top)')
    version = "3.0" if str(spec["openapi"]).startswith("3.0") else "3.1"
    prefix = _server_path(spec) or ""
    base = base_path.rstrip("/")
    paths = spec.get("paths") or {}
    if not isinstance(paths, dict):
        raise OpenApiError('"paths" must be a mapping')
    components = spec.get("components") if isinstance(spec.get("components"), dict) else None
    out: list[OpenApiOperation] = []
    seen: set[str] = set()
    for raw_path, item in paths.items():
        if not isinstance(raw_path, str) or not raw_path.startswith("/"):
            raise OpenApiError(f"path {raw_path!r} must start with '/'")
        if not isinstance(item, dict):
            continue
        full = prefix.rstrip("/") + raw_path
        if base and not (full == base or full.startswith(base + "/")):
            raise OpenApiError(
                f"path {full!r} is not under the upstream URL's path {base!r}: agents could "
                "never call it"
            )
        path = full[len(base) :] or "/"
        shared = _parameters(item.get("parameters"), spec)
        for method in METHODS:
            operation = item.get(method)
            if not isinstance(operation, dict):
                continue
            op_id = operation.get("operationId")
            where = f"{method.upper()} {raw_path}"
            if not isinstance(op_id, str) or not _OPERATION_ID.fullmatch(op_id):
                raise OpenApiError(
                    f"{where}: needs an operationId (letters, digits, '.', '_', '-') "
                    "for rules to name it"
                )
            if op_id in seen:
                raise OpenApiError(f"{where}: operationId {op_id!r} is used twice")
            seen.add(op_id)
            params = {**shared, **_parameters(operation.get("parameters"), spec)}
            integers = tuple(
                name
                for name, schema in params.items()
                if _is_integer(schema, spec) and "{" + name + "}" in path
            )
            schema, required, media = _body(operation.get("requestBody"), spec)
            if schema is not None and components is not None:
                schema = (
                    {**schema, "components": components} if isinstance(schema, dict) else schema
                )
            out.append(
                OpenApiOperation(
                    op_id, method.upper(), path, integers, schema, required, media, version
                )
            )
    return tuple(out)


def _server_path(spec: dict[str, Any]) -> str | None:
    servers = spec.get("servers")
    if not isinstance(servers, list) or not servers or not isinstance(servers[0], dict):
        return None
    url = servers[0].get("url")
    if not isinstance(url, str):
        return None
    # Server variables ({version}) are filled with their defaults.
    variables = servers[0].get("variables") or {}
    for name, value in variables.items() if isinstance(variables, dict) else ():
        if isinstance(value, dict) and "default" in value:
            url = url.replace("{" + str(name) + "}", str(value["default"]))
    return urlsplit(url).path or None


def _resolve(value: Any, spec: dict[str, Any]) -> Any:
    """`value`, or what its local `$ref` points at (followed a few times, not forever)."""
    for _ in range(16):
        if not isinstance(value, dict) or not isinstance(value.get("$ref"), str):
            return value
        ref = value["$ref"]
        if not ref.startswith("#/"):
            raise OpenApiError(f"$ref {ref!r}: only references within the spec are read")
        target: Any = spec
        for part in ref[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or part not in target:
                raise OpenApiError(f"$ref {ref!r} points at nothing")
            target = target[part]
        value = target
    raise OpenApiError("$ref chain too long")


def _parameters(value: Any, spec: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for param in value if isinstance(value, list) else ():
        param = _resolve(param, spec)
        if isinstance(param, dict) and param.get("in") == "path":
            out[str(param.get("name"))] = param.get("schema")
    return out


def _is_integer(schema: Any, spec: dict[str, Any]) -> bool:
    schema = _resolve(schema, spec)
    if not isinstance(schema, dict):
        return False
    kind = schema.get("type")
    return kind == "integer" or (isinstance(kind, list) and "integer" in kind)


def _body(value: Any, spec: dict[str, Any]) -> tuple[Any, bool, tuple[str, ...]]:
    body = _resolve(value, spec)
    if not isinstance(body, dict):
        return None, False, ()
    content = body.get("content") or {}
    if not isinstance(content, dict):
        raise OpenApiError('a requestBody\'s "content" must be a mapping of media types')
    media = next(
        (
            content[name]
            for name in content
            if name == "application/json" or str(name).endswith("+json")
        ),
        None,
    )
    schema = media.get("schema") if isinstance(media, dict) else None
    return schema, bool(body.get("required")), tuple(str(name).lower() for name in content)

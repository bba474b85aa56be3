"""Requests checked against an upstream's OpenAPI operations: typed path parameters and
request bodies, before policy runs.

An integer path parameter is bound only in canonical form: frameworks that read the spec
(FastAPI, Spring, Starlette's `{id:int}`) take `/042`, `/+42` and `/٤٢` for 42, past a rule
on `resource.id != "42"`. A JSON body is validated against its operation's schema (jsonschema:
draft 4 for OpenAPI 3.0, 2020-12 for 3.1), and a member the schema does not declare is
refused unless the schema admits others (`additionalProperties`, `patternProperties`), so a
rule on the fields a workflow may change cannot be passed by one nobody declared. Pure.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Mapping
from typing import Any, Final

from agentproxy.config.model import OpenApiOperation
from agentproxy.errors import BadRequest

__all__ = ["BodyValidator", "check_path_params"]

# Unknown members named in one refusal, at most.
_NAMED: Final = 5


def check_path_params(operation: OpenApiOperation, bindings: Mapping[str, str]) -> None:
    """Raises BadRequest for an integer path parameter not written as the integer it is."""
    for name in operation.integer_params:
        raw = bindings.get(name)
        if raw is None:
            continue
        text = urllib.parse.unquote(raw, errors="replace")
        if not (text == "0" or (text.lstrip("-")[:1] in "123456789" and _digits(text))):
            raise BadRequest(
                f"path parameter {name!r} of operation {operation.id} is an integer: send it "
                f"as one (like 42), not {raw[:32]!r}"
            )


def _digits(text: str) -> bool:
    body = text[1:] if text.startswith("-") else text
    return bool(body) and body.isascii() and body.isdigit() and len(body) <= 19


class BodyValidator:
    """An operation's request body schema, compiled once."""

    def __init__(self, operation: OpenApiOperation) -> None:
        # Imported here: only configs with an OpenAPI upstream pay for jsonschema.
        import jsonschema

        self.operation = operation
        schema = operation.body_schema
        self._root = schema if isinstance(schema, dict) else {}
        if operation.version == "3.0":
            schema = _nullable(schema)
            self._root = schema if isinstance(schema, dict) else {}
            cls: Any = jsonschema.Draft4Validator
        else:
            cls = jsonschema.Draft202012Validator
        self._validator = cls(schema)
        self._best_match = jsonschema.exceptions.best_match

    def check(self, document: Any) -> None:
        """Raises BadRequest naming the first thing wrong: a member the schema does not
        declare, or what the schema says of the value."""
        unknown = _unknown(document, self._root, self._root, "")
        if unknown:
            named = ", ".join(unknown[:_NAMED]) + (" …" if len(unknown) > _NAMED else "")
            raise BadRequest(
                f"request body of operation {self.operation.id}: {named} "
                f"{'is' if len(unknown) == 1 else 'are'} not in its schema"
            )
        error = self._best_match(self._validator.iter_errors(document))
        if error is not None:
            where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.path)
            raise BadRequest(
                f"request body of operation {self.operation.id}: "
                f"{where.lstrip('.') or 'the body'}: {error.message[:300]}"
            )


def _resolve(schema: Any, root: dict[str, Any]) -> Any:
    for _ in range(16):
        if not isinstance(schema, dict) or not isinstance(schema.get("$ref"), str):
            return schema
        ref = schema["$ref"]
        target: Any = root
        for part in ref.removeprefix("#/").split("/") if ref.startswith("#/") else ["\0"]:
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or part not in target:
                return {}
            target = target[part]
        schema = target
    return {}


def _members(schema: Any, root: dict[str, Any], seen: int = 0) -> tuple[dict[str, list[Any]], bool]:
    """The members an object schema declares (with each one's schemas, across allOf, anyOf
    and oneOf), and whether it admits others."""
    schema = _resolve(schema, root)
    if not isinstance(schema, dict) or seen > 32:
        return {}, True
    declared: dict[str, list[Any]] = {}
    open_ = False
    for name, sub in (schema.get("properties") or {}).items():
        declared.setdefault(name, []).append(sub)
    extra = schema.get("additionalProperties", schema.get("unevaluatedProperties"))
    if extra not in (None, False) or schema.get("patternProperties"):
        open_ = True
    combined = [s for key in ("allOf", "anyOf", "oneOf") for s in schema.get(key) or ()]
    for sub in combined:
        more, sub_open = _members(sub, root, seen + 1)
        for name, subs in more.items():
            declared.setdefault(name, []).extend(subs)
        open_ = open_ or sub_open
    if not declared and not combined and extra is None and schema.get("type") not in ("object",):
        open_ = True  # says nothing of members: not an object schema
    return declared, open_


def _unknown(value: Any, schema: Any, root: dict[str, Any], where: str) -> list[str]:
    if isinstance(value, dict):
        declared, open_ = _members(schema, root)
        found: list[str] = []
        for key, item in value.items():
            path = f"{where}.{key}" if where else key
            subs = declared.get(key)
            if subs is None:
                if not open_:
                    found.append(repr(path[:64]))
                continue
            for sub in subs:
                found += _unknown(item, sub, root, path)
        return found
    if isinstance(value, list):
        resolved = _resolve(schema, root)
        items = resolved.get("items") if isinstance(resolved, dict) else None
        if isinstance(items, dict):
            found = []
            for index, item in enumerate(value):
                found += _unknown(item, items, root, f"{where}[{index}]")
            return found
    return []


def _nullable(schema: Any) -> Any:
    """OpenAPI 3.0's `nullable: true` as JSON Schema says it (a `null` type)."""
    if isinstance(schema, list):
        return [_nullable(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: _nullable(value) for key, value in schema.items()}
    if out.get("nullable") is True and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out

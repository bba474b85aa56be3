"""OpenAPI-described upstreams (issue 22): rules name operations by operationId, integer path
parameters are bound only in canonical form, and request bodies are validated against their
schemas before policy runs. A real Starlette API stands behind a real proxy."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import Keys, ProxyFactory
from tests.proxy.test_rest_bodies import Api, api, send

__all__ = ["api"]  # the fixture

SPEC = """
openapi: 3.0.3
info: {title: hr, version: "1"}
servers: [{url: "https://hr.example/v1"}]
paths:
  /transfers:
    post:
      operationId: createTransfer
      requestBody:
        required: true
        content:
          application/json:
            schema: {$ref: "#/components/schemas/Transfer"}
      responses: {"200": {description: ok}}
  /employees/{id}:
    parameters:
      - {name: id, in: path, required: true, schema: {type: integer}}
    get:
      operationId: getEmployee
      responses: {"200": {description: ok}}
    patch:
      operationId: updateEmployee
      requestBody:
        content:
          application/json:
            schema:
              allOf:
                - {$ref: "#/components/schemas/Contact"}
                - type: object
                  properties: {title: {type: string}}
      responses: {"200": {description: ok}}
components:
  schemas:
    Transfer:
      type: object
      required: [amount, to]
      properties:
        amount: {type: integer, minimum: 1}
        to: {type: string}
        memo: {type: string, nullable: true}
        tags:
          type: array
          items: {type: object, properties: {name: {type: string}}}
    Contact:
      type: object
      properties: {phone: {type: string}}
"""

POLICY = """
default: deny
rules:
  - id: transfers
    agents: [payer]
    actions: ["http:createTransfer"]
    when: 'args.amount <= 100'
    effect: allow
  - id: reads
    agents: [payer]
    actions: ["http:getEmployee"]
    when: 'resource.id != "1"'
    effect: allow
  - id: updates
    agents: [payer]
    actions: ["http:updateEmployee"]
    effect: allow
"""


async def openapi_proxy(make_proxy: ProxyFactory, api: Api, tmp_path: Path) -> str:
    spec = tmp_path / "hr-openapi.yaml"
    spec.write_text(SPEC)
    proxy = await make_proxy(
        policy=POLICY, upstream_url=api.url, upstream_extra=f"    openapi: {spec}"
    )
    return proxy.base


async def test_rules_name_operations_and_bodies_follow_the_schema(
    make_proxy: ProxyFactory, api: Api, keys: Keys, tmp_path: Path
) -> None:
    base = await openapi_proxy(make_proxy, api, tmp_path)
    token = keys.token("payer")
    ok = b'{"amount": 50, "to": "x", "memo": null, "tags": [{"name": "rent"}]}'
    status, got, _ = await send(base, token, "POST", "/v1/transfers", ok)
    assert status == 200, got
    assert api.last()[1] == ok
    for body, detail in [
        (b'{"amount": 50, "to": "x", "salary": 1}', "'salary' is not in its schema"),
        (b'{"amount": 50, "to": "x", "tags": [{"name": "a", "x": 1}]}', "'tags[0].x' is not"),
        (b'{"amount": "50", "to": "x"}', "amount: '50' is not of type 'integer'"),
        (b'{"amount": 0, "to": "x"}', "amount: 0 is less than the minimum of 1"),
        (b'{"amount": 50}', "'to' is a required property"),
    ]:
        status, got, _ = await send(base, token, "POST", "/v1/transfers", body)
        assert status == 400, (body, got)
        assert "operation createTransfer" in got["detail"] and detail in got["detail"], got
    status, got, _ = await send(base, token, "POST", "/v1/transfers", None, content_type=None)
    assert status == 400 and "requires a request body" in got["detail"]
    status, got, _ = await send(
        base, token, "POST", "/v1/transfers", b"amount=5&to=x", "application/x-www-form-urlencoded"
    )
    assert status == 415 and "takes application/json" in got["detail"]
    # No rule reads the update's body: it is validated all the same (allOf's members count).
    status, got, _ = await send(base, token, "PATCH", "/v1/employees/7", b'{"phone": "1"}')
    assert status == 200, got
    status, got, _ = await send(base, token, "PATCH", "/v1/employees/7", b'{"role": "admin"}')
    assert status == 400 and "'role' is not in its schema" in got["detail"]
    assert [b for _, b, _ in api.bodies] == [ok, b'{"phone": "1"}']


async def test_integer_path_parameters_are_bound_in_canonical_form(
    make_proxy: ProxyFactory, api: Api, keys: Keys, tmp_path: Path
) -> None:
    base = await openapi_proxy(make_proxy, api, tmp_path)
    token = keys.token("payer")
    assert (await send(base, token, "GET", "/v1/employees/42", content_type=None))[0] == 200
    assert (await send(base, token, "GET", "/v1/employees/1", content_type=None))[0] == 403
    # FastAPI and Spring read each of these as employee 1, past `resource.id != "1"`.
    for spelling in ("01", "+1", "%2B1", "1.0", "%D9%A1", "abc"):
        status, got, _ = await send(
            base, token, "GET", f"/v1/employees/{spelling}", content_type=None
        )
        assert status == 400, (spelling, got)
        assert "path parameter 'id' of operation getEmployee is an integer" in got["detail"]
    assert [p for p, _, _ in api.bodies] == ["/v1/employees/42"]


def test_validate_names_unknown_operations(tmp_path: Path) -> None:
    (tmp_path / "spec.yaml").write_text(SPEC)
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "p.yaml").write_text(
        POLICY.replace("http:updateEmployee", "http:updateEmploye")
    )
    (tmp_path / "pub.pem").write_text("x")
    (tmp_path / "agentproxy.yaml").write_text(
        """
upstreams:
  - {name: hr, url: "http://127.0.0.1:1", openapi: spec.yaml}
identity:
  issuers: [{issuer: "https://idp", audiences: [a], public_key_file: pub.pem, algorithms: [RS256]}]
policy_files: ["policies/*.yaml"]
"""
    )
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "agentproxy",
            "validate",
            "--config",
            str(tmp_path / "agentproxy.yaml"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 1
    assert (
        "rule updates.actions: 'http:updateEmploye' is \"http:METHOD /path\", or an operationId"
        in out.stderr
    )
    assert "(upstreams with a spec: hr)" in out.stderr

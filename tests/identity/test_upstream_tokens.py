"""The pure half of per-call upstream credentials: the token request, the answer, the cache
lifetime, and the settings a loader accepts. A hostile or broken authorization server must
not be able to write headers, stretch a credential past its caller, or leak a secret."""

from __future__ import annotations

import base64
import dataclasses
from pathlib import Path

import orjson
import pytest

from agentproxy.config.model import Secret, TokenExchange
from agentproxy.identity.sts import GRANT_TYPE
from agentproxy.identity.upstream_tokens import (
    ExchangeError,
    basic_auth,
    cached_until,
    exchange_form,
    read_answer,
)
from tests.config.test_loader import MAIN, problems, write

SETTINGS = TokenExchange(
    token_url="https://idp.example/token",
    client_id="agent proxy",
    client_secret=Secret(b"p:a%ss", "test"),
    audience="hr-api",
    scope="hr:read",
)


def answer(**members: object) -> bytes:
    return orjson.dumps({"access_token": "abc.def-ghi_~+/=", "token_type": "Bearer", **members})


def test_the_form_names_the_caller_as_subject_and_the_upstream_as_audience() -> None:
    form = exchange_form(SETTINGS, "caller.token")
    assert form == {
        "grant_type": GRANT_TYPE,
        "subject_token": "caller.token",
        "subject_token_type": "urn:ietf:params:oauth:token-type:access_token",
        "requested_token_type": "urn:ietf:params:oauth:token-type:access_token",
        "audience": "hr-api",
        "scope": "hr:read",
    }
    # client_secret_basic keeps the secret out of the form; post puts it there.
    post = dataclasses.replace(SETTINGS, auth_method="client_secret_post")
    assert exchange_form(post, "t")["client_secret"] == "p:a%ss"


def test_basic_auth_form_encodes_id_and_secret_first() -> None:
    # RFC 6749 §2.3.1: a ':' in the secret must not split it, nor a space the id.
    decoded = base64.b64decode(basic_auth(SETTINGS).removeprefix("Basic ")).decode()
    assert decoded == "agent%20proxy:p%3Aa%25ss"


def test_a_good_answer_gives_the_token_and_its_lifetime() -> None:
    assert read_answer(200, answer(expires_in=300)) == ("abc.def-ghi_~+/=", 300.0)
    assert read_answer(200, answer())[1] == 60.0  # no expires_in: kept only a minute


@pytest.mark.parametrize(
    "body",
    [
        answer(access_token="abc\r\nX-Admin: yes"),  # would write a header of its own
        answer(access_token="abc def"),
        answer(access_token=""),
        answer(access_token="a" * 20000),
        answer(access_token=7),
        answer(token_type="N_A"),  # RFC 8693: not an access token
        answer(token_type="DPoP"),
        answer(issued_token_type="urn:ietf:params:oauth:token-type:refresh_token"),
        answer(expires_in=0),
        answer(expires_in=-5),
        answer(expires_in="300"),
        answer(expires_in=True),
        b"<html>ok</html>",
        b"[]",
    ],
)
def test_an_unusable_answer_is_a_failure_never_a_header(body: bytes) -> None:
    with pytest.raises(ExchangeError) as info:
        read_answer(200, body)
    assert not info.value.refused
    assert "abc" not in info.value.detail


def test_only_errors_about_the_caller_refuse_it() -> None:
    for error in ("invalid_grant", "invalid_target", "invalid_scope", "access_denied"):
        with pytest.raises(ExchangeError) as info:
            read_answer(400, orjson.dumps({"error": error}))
        assert info.value.refused and error in info.value.detail
    # The proxy's own setup (its client, the grant) and server faults are not the caller's.
    for status, body in [
        (401, orjson.dumps({"error": "invalid_client"})),
        (400, orjson.dumps({"error": "unsupported_grant_type"})),
        (400, orjson.dumps({"error": "bad\r\nheader"})),
        (500, orjson.dumps({"error": "invalid_grant"})),
        (503, b"down"),
    ]:
        with pytest.raises(ExchangeError) as info:
            read_answer(status, body)
        assert not info.value.refused
        assert "\r" not in info.value.detail


def test_a_credential_is_dropped_before_it_expires_and_never_outlives_its_caller() -> None:
    assert cached_until(1000.0, 600.0, 10_000.0) == 1000.0 + 600 - 30
    assert cached_until(1000.0, 60.0, 10_000.0) == 1000.0 + 60 - 6
    assert cached_until(1000.0, 600.0, 1100.0) == 1100.0


EXCHANGE = """
    credentials:
      token_exchange:
        token_url: "{url}"
        client_id: agentproxy
        client_secret_file: secret
{more}"""


def exchange_config(url: str = "https://idp.example/token", more: str = "") -> str:
    static = "    credentials: {header: X-Api-Key, value_file: secret}\n"
    return MAIN.replace(static, EXCHANGE.format(url=url, more=more).lstrip("\n"))


def test_the_loader_reads_token_exchange(tmp_path: Path) -> None:
    from agentproxy.proxy.runtime import load_config

    config = load_config(write(tmp_path, exchange_config(more="        audience: hr-api\n")))
    (upstream,) = config.upstreams
    assert upstream.credentials is None
    exchange = upstream.token_exchange
    assert exchange is not None and exchange.audience == "hr-api"
    assert (exchange.header, exchange.prefix) == ("Authorization", "Bearer ")
    assert "s3cret" not in repr(exchange)


@pytest.mark.parametrize(
    ("url", "more", "expected"),
    [
        ("https://idp.example/token", "", "needs an audience or a resource"),
        ("http://idp.example/token", "        audience: a\n", "must be an https URL"),
        ("https://idp.example/token", "        resource: hr-api\n", "absolute URI"),
        ("https://idp.example/token", "        audience: a\n        scope: 'a  b'\n", "scope"),
        (
            "https://idp.example/token",
            "        audience: a\n        auth_method: private_key_jwt\n",
            "auth_method",
        ),
    ],
)
def test_the_loader_refuses_what_would_leak_or_mislead(
    tmp_path: Path, url: str, more: str, expected: str
) -> None:
    found = problems(write(tmp_path, exchange_config(url, more)))
    assert any(expected in line for line in found), found


def test_a_static_credential_and_an_exchange_do_not_mix(tmp_path: Path) -> None:
    text = exchange_config(more="        audience: a\n      header: X-Api-Key\n")
    found = problems(write(tmp_path, text))
    assert any("not both" in line for line in found), found

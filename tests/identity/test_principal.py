"""principal_from_claims: RFC 8693 actor chains, roles, task, and malformed identities."""

from __future__ import annotations

from typing import Any

import pytest

from agentproxy.config.model import ClaimNames
from agentproxy.errors import Unauthenticated
from agentproxy.identity.principal import MAX_ACT_DEPTH, principal_from_claims

NAMES = ClaimNames()
ISSUER = "https://idp.test"
EXPIRES = 1_800_000_600.0


def refusal(claims: dict[str, Any], names: ClaimNames = NAMES) -> str:
    with pytest.raises(Unauthenticated) as caught:
        principal_from_claims(claims, names, ISSUER, EXPIRES)
    return caught.value.detail


def test_a_token_without_act_names_the_agent_itself() -> None:
    principal = principal_from_claims(
        {"sub": "agent-1", "jti": "t-1", "roles": ["reader"], "task": "TASK-42"},
        NAMES,
        ISSUER,
        EXPIRES,
    )
    assert principal.agent == "agent-1"
    assert principal.acting_for is None
    assert principal.chain == ()
    assert principal.roles == frozenset({"reader"})
    assert principal.task == "TASK-42"
    assert principal.token_id == "t-1"
    assert principal.issuer == ISSUER
    assert principal.expires_at == EXPIRES


def test_the_configured_agent_claim_names_the_agent() -> None:
    names = ClaimNames(agent="client_id", roles="scope", task="job")
    principal = principal_from_claims(
        {"sub": "ignored", "client_id": "billing-bot", "scope": "read write", "job": "j-1"},
        names,
        ISSUER,
        EXPIRES,
    )
    assert principal.agent == "billing-bot"
    assert principal.roles == frozenset({"read", "write"})
    assert principal.task == "j-1"


def test_act_makes_sub_the_user_and_act_sub_the_agent() -> None:
    principal = principal_from_claims(
        {"sub": "alice", "act": {"sub": "agent-b"}}, NAMES, ISSUER, EXPIRES
    )
    assert (principal.agent, principal.acting_for, principal.chain) == ("agent-b", "alice", ())


def test_nested_act_lists_earlier_actors_earliest_first() -> None:
    two = {"sub": "alice", "act": {"sub": "b", "act": {"sub": "a"}}}
    principal = principal_from_claims(two, NAMES, ISSUER, EXPIRES)
    assert (principal.agent, principal.acting_for, principal.chain) == ("b", "alice", ("a",))

    three = {"sub": "alice", "act": {"sub": "c", "act": {"sub": "b", "act": {"sub": "a"}}}}
    principal = principal_from_claims(three, NAMES, ISSUER, EXPIRES)
    assert (principal.agent, principal.acting_for, principal.chain) == ("c", "alice", ("a", "b"))


def test_with_act_the_configured_agent_claim_is_not_used() -> None:
    names = ClaimNames(agent="client_id")
    principal = principal_from_claims(
        {"sub": "alice", "client_id": "someone-else", "act": {"sub": "agent-b"}},
        names,
        ISSUER,
        EXPIRES,
    )
    assert (principal.agent, principal.acting_for) == ("agent-b", "alice")


def test_act_nesting_is_bounded() -> None:
    def nested(depth: int) -> dict[str, Any]:
        act: dict[str, Any] = {"sub": f"actor-{depth}"}
        for level in range(depth - 1, 0, -1):
            act = {"sub": f"actor-{level}", "act": act}
        return {"sub": "alice", "act": act}

    principal = principal_from_claims(nested(MAX_ACT_DEPTH), NAMES, ISSUER, EXPIRES)
    assert principal.agent == "actor-1"
    assert principal.chain[0] == f"actor-{MAX_ACT_DEPTH}"
    assert len(principal.chain) == MAX_ACT_DEPTH - 1
    assert refusal(nested(MAX_ACT_DEPTH + 1)) == f"actor chain is deeper than {MAX_ACT_DEPTH}"


@pytest.mark.parametrize(
    ("claims", "detail"),
    [
        ({}, "token has no 'sub' claim"),
        ({"sub": 42}, "claim 'sub' is not a string"),
        ({"sub": "alice", "act": "agent-b"}, "claim 'act' is not an object (RFC 8693 §4.1)"),
        ({"sub": "alice", "act": None}, "claim 'act' is not an object (RFC 8693 §4.1)"),
        ({"sub": "alice", "act": {}}, "token has no 'act.sub' claim"),
        ({"sub": "alice", "act": {"sub": ["b"]}}, "claim 'act.sub' is not a string"),
        (
            {"sub": "alice", "act": {"sub": "b", "act": ["a"]}},
            "claim 'act.act' is not an object (RFC 8693 §4.1)",
        ),
        ({"act": {"sub": "b"}}, "token has no 'sub' claim"),
    ],
)
def test_malformed_identities_are_refused(claims: dict[str, Any], detail: str) -> None:
    assert refusal(claims) == detail


@pytest.mark.parametrize(
    "claims",
    [
        {"sub": "agent\n1"},
        {"sub": "agent\x071"},
        {"sub": ""},
        {"sub": "a" * 257},
        {"sub": "alice\r\nX-Injected: 1", "act": {"sub": "b"}},
        {"sub": "alice", "act": {"sub": "b\x00"}},
        {"sub": "alice", "act": {"sub": "b", "act": {"sub": "a\u2028"}}},
    ],
)
def test_unsafe_identifiers_are_refused_without_echoing_them(claims: dict[str, Any]) -> None:
    detail = refusal(claims)
    assert "control characters" in detail
    assert "\n" not in detail and "\x07" not in detail and "\x00" not in detail


def test_roles_as_a_list_or_a_space_separated_string() -> None:
    as_list = principal_from_claims({"sub": "a", "roles": ["x", "y"]}, NAMES, ISSUER, EXPIRES)
    as_string = principal_from_claims({"sub": "a", "roles": " x  y "}, NAMES, ISSUER, EXPIRES)
    missing = principal_from_claims({"sub": "a"}, NAMES, ISSUER, EXPIRES)
    assert as_list.roles == as_string.roles == frozenset({"x", "y"})
    assert missing.roles == frozenset()


@pytest.mark.parametrize("roles", [["x", 1], {"x": True}, 7, ["x", ""], ["bad\nrole"]])
def test_malformed_roles_are_refused(roles: Any) -> None:
    assert refusal({"sub": "a", "roles": roles}).startswith("claim 'roles' must be a list")


@pytest.mark.parametrize("task", ["", "t" * 129, "has space", "semi;colon", "ünïcode", 12])
def test_malformed_tasks_are_refused(task: Any) -> None:
    assert refusal({"sub": "a", "task": task}).startswith("claim 'task' must be 1-128 characters")


def test_a_task_of_128_safe_characters_is_kept() -> None:
    task = "Ab0._:-" + "x" * 121
    assert principal_from_claims({"sub": "a", "task": task}, NAMES, ISSUER, EXPIRES).task == task


def test_a_non_string_jti_gives_no_token_id() -> None:
    assert principal_from_claims({"sub": "a", "jti": 7}, NAMES, ISSUER, EXPIRES).token_id is None


def test_claims_are_a_read_only_deep_copy() -> None:
    source: dict[str, Any] = {"sub": "a", "ctx": {"tenant": "t1", "ids": [1, 2]}}
    principal = principal_from_claims(source, NAMES, ISSUER, EXPIRES)
    source["ctx"]["tenant"] = "t2"
    source["ctx"]["ids"].append(3)
    assert principal.claims == {"sub": "a", "ctx": {"tenant": "t1", "ids": [1, 2]}}
    with pytest.raises(TypeError):
        principal.claims["sub"] = "b"  # type: ignore[index]

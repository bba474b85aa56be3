"""The shared types' helpers."""

from __future__ import annotations

from agentproxy.core import Principal, principal_view


def test_a_principals_view_is_built_once_per_object_and_never_confused() -> None:
    """The verifier reuses one Principal per token, so its view is cached by identity: an
    equal principal from another token gets its own view, never a stale one."""
    bot = Principal(agent="hr-bot", roles=frozenset({"hr", "admin"}), claims={"dept": ("hr",)})
    view = principal_view(bot)
    assert view == {
        "agent": "hr-bot",
        "user": None,
        "chain": [],
        "roles": ["admin", "hr"],
        "claims": {"dept": ["hr"]},
        "issuer": "",
    }
    assert principal_view(bot) is view
    twin = Principal(agent="hr-bot", roles=frozenset({"hr", "admin"}), claims={"dept": ("hr",)})
    assert principal_view(twin) == view and principal_view(twin) is not view
    other = Principal(agent="ops-bot")
    assert principal_view(other)["agent"] == "ops-bot"


def test_views_of_principals_no_longer_seen_are_let_go() -> None:
    """Bounded: a stream of one-off tokens cannot grow the cache without end."""
    from agentproxy.core import _PRINCIPAL_VIEWS

    for n in range(5000):
        principal_view(Principal(agent=f"bot-{n}"))
    assert len(_PRINCIPAL_VIEWS._views) <= 4096

"""The shared types' helpers."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import NamedTuple

from agentproxy.core import Principal, jsonable, plain, principal_view


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
        "scopes": [],
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


class _Names(NamedTuple):
    first: str
    last: str


class _StrKeyed(dict[str, object]):
    pass


class _Frozen(Mapping[str, object]):
    """A Mapping that is no dict: only isinstance against the ABC can tell."""

    def __init__(self, **items: object) -> None:
        self._items = items

    def __getitem__(self, key: str) -> object:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


def test_plain_makes_every_mapping_a_dict_and_every_sequence_a_list() -> None:
    """Shapes are looked up by exact type first; subclasses and other Mappings still take
    the isinstance path, so nothing CEL or an audit record cannot read gets through."""
    value = MappingProxyType(
        {
            "ordered": OrderedDict(a=(1, 2)),
            "sub": _StrKeyed(b=[MappingProxyType({"c": None})]),
            "abc": _Frozen(d=_Names("Ada", "Lovelace")),
            "empty": MappingProxyType({}),
            1: "key made text",
            "leaves": ("s", 1, 2.5, True, None, b"raw"),
        }
    )
    out = plain(value)
    assert out == {
        "ordered": {"a": [1, 2]},
        "sub": {"b": [{"c": None}]},
        "abc": {"d": ["Ada", "Lovelace"]},
        "empty": {},
        "1": "key made text",
        "leaves": ["s", 1, 2.5, True, None, b"raw"],
    }
    assert all(type(out[k]) is dict for k in ("ordered", "sub", "abc", "empty"))
    assert type(out["abc"]["d"]) is list
    assert jsonable(value)["leaves"][-1] == "base64:cmF3"
    assert jsonable(_Frozen(e=(b"x",))) == {"e": ["base64:eA=="]}

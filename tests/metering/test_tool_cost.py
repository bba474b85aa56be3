"""Tool-call cost and attribution through a real proxy; the price table and the cardinality
guard on their own."""

from __future__ import annotations

import aiohttp

from agentproxy.config.model import Price
from agentproxy.metering.attribution import OTHER, CardinalityGuard
from agentproxy.metering.prices import PriceTable, TokenUsage
from tests.conftest import Keys, ProxyFactory

POLICY = """
default: deny
rules:
  - id: lookups
    agents: [hr-bot]
    actions: ["http:GET /v1/employees/{id}"]
    effect: allow
    cost: {amount: 0.02, currency: USD}
  - id: bulk
    agents: [hr-bot]
    actions: ["http:GET /v1/bulk"]
    effect: allow
    cost: {expr: 'double(size(resource.query.ids.split(","))) * 0.001', currency: USD}
    limits:
      - {name: bulk-budget, spend: 0.01, currency: USD, window: 1h, key: agent}
"""

METERING = """
metering:
  currency: USD
  attribution: {labels: {user: principal.user, team: principal.claims.team}, max_values: 3}
"""


def metric_sum(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_costs_are_counted_and_attributed(make_proxy: ProxyFactory, keys: Keys) -> None:
    proxy = await make_proxy(policy=POLICY, extra=METERING)
    token = keys.token("hr-bot", team="people")
    async with aiohttp.ClientSession() as s:
        for _ in range(3):
            async with s.get(
                proxy.base + "/v1/employees/1", headers={"Authorization": f"Bearer {token}"}
            ) as r:
                assert r.status == 200
        async with s.get(
            proxy.base + "/v1/bulk?ids=1,2,3,4", headers={"Authorization": f"Bearer {token}"}
        ) as r:
            assert r.status == 200
        # 4 ids cost 0.004, 0.008 so far; 4 more would make 0.012 > 0.01
        async with s.get(
            proxy.base + "/v1/bulk?ids=5,6,7,8", headers={"Authorization": f"Bearer {token}"}
        ) as r:
            assert r.status == 200
        async with s.get(
            proxy.base + "/v1/bulk?ids=9,10,11,12", headers={"Authorization": f"Bearer {token}"}
        ) as r:
            assert r.status == 429
        async with s.get(proxy.admin + "/metrics") as r:
            text = await r.text()
    assert (
        abs(
            metric_sum(
                text,
                "agentproxy_cost_total",
                agent="hr-bot",
                team="people",
                action="http:GET /v1/employees/{id}",
            )
            - 0.06
        )
        < 1e-9
    )
    assert abs(metric_sum(text, "agentproxy_cost_total", action="http:GET /v1/bulk") - 0.008) < 1e-9
    assert metric_sum(text, "agentproxy_calls_total", agent="hr-bot") == 5.0
    assert 'user=""' in text  # no user: an empty label value, not an error


async def test_attribution_values_are_capped(make_proxy: ProxyFactory, keys: Keys) -> None:
    proxy = await make_proxy(policy=POLICY, extra=METERING)
    async with aiohttp.ClientSession() as s:
        for i in range(20):
            token = keys.token("hr-bot", team=f"team-{i}")
            async with s.get(
                proxy.base + "/v1/employees/1", headers={"Authorization": f"Bearer {token}"}
            ) as r:
                assert r.status == 200
        async with s.get(proxy.admin + "/metrics") as r:
            text = await r.text()
    teams = {
        line.split('team="')[1].split('"')[0]
        for line in text.splitlines()
        if line.startswith("agentproxy_calls_total{")
    }
    assert len(teams) == 4 and OTHER in teams  # max_values 3, plus "other"
    assert metric_sum(text, "agentproxy_calls_total", team=OTHER) == 17.0


def test_ten_thousand_users_make_at_most_n_plus_one_values() -> None:
    guard = CardinalityGuard(100)
    values = {guard.value("user", f"user-{i}") for i in range(10_000)}
    assert len(values) == 101
    assert guard.value("user", "user-5") == "user-5"  # seen before the cap: kept


def test_price_table() -> None:
    table = PriceTable((("gpt-4o-mini*", Price(0.15, 0.6)), ("gpt-4o*", Price(2.5, 10, 1.25))))
    usage = TokenUsage(input=1_000_000, output=500_000, cached_input=200_000)
    assert table.cost("gpt-4o-2024-08-06", usage) == 2.5 + 5.0 + 0.25
    assert table.cost("gpt-4o-mini", usage) == 0.15 + 0.3 + 0.03  # cached defaults to input
    assert table.cost("claude-x", usage) is None


def test_values_not_admitted_take_no_place() -> None:
    guard = CardinalityGuard(2)
    assert [guard.value("model", f"junk-{i}", admit=False) for i in range(50)] == [OTHER] * 50
    assert guard.value("model", "gpt-4o") == "gpt-4o"
    assert guard.value("model", "gpt-4o", admit=False) == "gpt-4o"  # it has its place
    assert guard.value("model", "claude") == "claude"
    assert guard.value("model", "third") == OTHER

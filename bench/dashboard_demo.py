"""Render the Grafana cost dashboard from a real Prometheus scrape of a demo run.

Starts, on free loopback ports: the OpenAI/Anthropic-speaking test upstream
(tests/harness/llm_upstream.py, with a per-model response delay added in front), `agentproxy
run` with a generated config (issuer key, policy, price table, attribution by user and team)
and a real Prometheus scraping the proxy's admin /metrics every second. Drives demo traffic
with the official openai and anthropic clients (three agents acting for six users, RFC 8693
delegation tokens; chat, messages, responses and embeddings, streamed and not, some refused),
then evaluates every panel's PromQL from helm/agentproxy/dashboards/agentproxy-cost.json
through Prometheus's HTTP API and draws the dashboard with matplotlib to docs/dashboard.png.
Everything it started is stopped at the end.

    make demo-metrics       # or: .venv/bin/python bench/dashboard_demo.py [--duration 50]

The dashboard's fixed rate windows (`[5m]`) are evaluated as `[15s]` so that a one-minute
demo fills them; `$__range` is the demo window. The PNG's footer says so.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import random
import re
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import matplotlib.dates as mdates
import matplotlib.pyplot as plt
import openai
from aiohttp import web
from matplotlib.axes import Axes
from matplotlib.colors import LinearSegmentedColormap, to_rgba
from matplotlib.figure import Figure
from matplotlib.patches import FancyBboxPatch
from matplotlib.ticker import FuncFormatter, MaxNLocator
from prometheus_client.parser import text_string_to_metric_families

from agentproxy.identity.issue import generate_demo_keypair, mint_token

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # tests.metering.* are imported from the repo checkout

from common import free_port  # noqa: E402
from tests.conftest import start_app  # noqa: E402
from tests.harness.llm_upstream import LlmServer, LlmUpstream, Usage  # noqa: E402
from tests.harness.prometheus import Prometheus  # noqa: E402

DASHBOARD = ROOT / "helm/agentproxy/dashboards/agentproxy-cost.json"
ISSUER = "https://idp.demo.local"
AUDIENCE = "agentproxy"
RATE_WINDOW = "15s"  # stands in for the dashboard's [5m]: a one-minute demo fills it
STEP = 1.0  # query_range resolution, seconds (= the scrape interval)
CONCURRENCY = 24

POLICY = """
default: deny
rules:
  - id: support-small-models-only
    agents: [support-bot]
    actions: ["llm:chat/gpt-4o", "llm:messages/claude-sonnet*"]
    effect: deny
    reason: support answers with the small models
  - id: writers
    agents: [writer]
    actions: ["llm:chat/**", "llm:messages/**"]
    when: '!has(args.max_tokens) || args.max_tokens <= 4000'
    effect: allow
  - id: analysts
    agents: [analyst]
    actions: ["llm:chat/gpt-4o-mini", "llm:responses/**", "llm:embeddings/**"]
    effect: allow
  - id: support
    agents: [support-bot]
    actions: ["llm:chat/gpt-4o-mini", "llm:messages/claude-haiku*"]
    effect: allow
"""

CONFIG = """
mode: enforce
listen: {{http: "127.0.0.1:{http}", admin: "127.0.0.1:{admin}"}}
upstreams:
  - name: anthropic
    url: "{upstream}"
    protocol: llm
    match: {{path_prefix: /v1/messages}}
    credentials: {{header: X-Api-Key, value_file: provider-key}}
  - name: openai
    url: "{upstream}"
    protocol: llm
    credentials: {{header: Authorization, value_file: provider-key, prefix: "Bearer "}}
identity:
  issuers:
    - issuer: "{issuer}"
      audiences: [{audience}]
      public_key_file: issuer.pub.pem
      algorithms: [RS256]
policy_files: ["policy.yaml"]
decision_log: "off"
metering:
  currency: USD
  prices:
    "gpt-4o-mini*": {{input_per_mtok: 0.15, output_per_mtok: 0.6, cached_input_per_mtok: 0.075}}
    "gpt-4o*": {{input_per_mtok: 2.5, output_per_mtok: 10, cached_input_per_mtok: 1.25}}
    "claude-sonnet*": {{input_per_mtok: 3, output_per_mtok: 15, cached_input_per_mtok: 0.3}}
    "claude-haiku*": {{input_per_mtok: 0.8, output_per_mtok: 4, cached_input_per_mtok: 0.08}}
    "text-embedding-3-*": {{input_per_mtok: 0.02}}
  attribution:
    labels: {{user: principal.user, team: principal.claims.team}}
    max_values: 50
"""

# model -> (seconds before the upstream answers: low, high). The test upstream answers at once.
LATENCY = {
    "gpt-4o-mini": (0.08, 0.3),
    "gpt-4o": (0.25, 0.9),
    "claude-sonnet-4": (0.3, 1.0),
    "claude-haiku-3.5": (0.1, 0.35),
    "text-embedding-3-small": (0.02, 0.06),
    "mistral-embed": (0.03, 0.08),
    "llama-3.1-70b": (0.2, 0.6),
}

# Grafana's dark theme and classic palette.
BG, PANEL, BORDER = "#111217", "#181b1f", "#2c3039"
TEXT, MUTED, GRID = "#ccccdc", "#8e8e9e", "#25282e"
PALETTE = ["#73bf69", "#f2cc0c", "#8ab8ff", "#ff780a", "#f2495c", "#5794f2", "#b877d9",
           "#705da0", "#37872d", "#fade2a", "#447ebc", "#c15c17", "#6ed0e0", "#e5a8e2",
           "#f9ba8f", "#b7dbab", "#f29191", "#aea2e0", "#cca300", "#82b5d8"]  # fmt: skip
STAT_BLUE = "#5794f2"


# -- the demo stack ---------------------------------------------------------------------------


async def start_upstream(stack: AsyncExitStack, rng: random.Random) -> LlmUpstream:
    """The test upstream's handlers, behind a middleware that waits a model-typical time."""
    state = LlmUpstream()

    @web.middleware
    async def think(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        body = await request.json()
        low, high = LATENCY.get(str(body.get("model")), (0.05, 0.2))
        await asyncio.sleep(rng.uniform(low, high))
        return await handler(request)

    app = LlmServer(state).app()
    app.middlewares.append(think)
    runner, port = await start_app(app)
    stack.push_async_callback(runner.cleanup)
    state.url = f"http://127.0.0.1:{port}"
    return state


@dataclass
class ProxyProcess:
    base: str
    admin: str
    process: asyncio.subprocess.Process
    log: Path


async def start_proxy(stack: AsyncExitStack, work: Path, upstream: str) -> ProxyProcess:
    generate_demo_keypair(work / "issuer.key.pem", work / "issuer.pub.pem")
    (work / "provider-key").write_text("sk-demo-provider-key\n")
    (work / "policy.yaml").write_text(POLICY)
    http, admin = free_port(), free_port()
    config = work / "agentproxy.yaml"
    config.write_text(
        CONFIG.format(http=http, admin=admin, upstream=upstream, issuer=ISSUER, audience=AUDIENCE)
    )
    log = work / "agentproxy.log"
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agentproxy", "run", "--config", str(config),
            "--log-level", "warning",
            stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
        )  # fmt: skip

    async def stop() -> None:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()

    stack.push_async_callback(stop)
    proxy = ProxyProcess(f"http://127.0.0.1:{http}", f"http://127.0.0.1:{admin}", process, log)
    deadline = time.monotonic() + 20
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline and process.returncode is None:
            try:
                async with session.get(proxy.admin + "/readyz") as response:
                    if response.status == 200:
                        return proxy
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"agentproxy did not become ready:\n{log.read_text()[-3000:]}")


# -- demo traffic -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Caller:
    agent: str
    user: str
    team: str


CALLERS = [
    Caller("writer", "alice", "docs"),
    Caller("writer", "bob", "marketing"),
    Caller("analyst", "carol", "finance"),
    Caller("analyst", "dave", "data"),
    Caller("support-bot", "erin", "support"),
    Caller("support-bot", "frank", "support"),
]

# What each agent does, as (weight, operation, model, stream, max_tokens). Operations the
# policy refuses are in here on purpose, so that the denials panel has something to show.
Call = tuple[float, str, str, bool, int | None]
MENU: dict[str, list[Call]] = {
    "writer": [
        (5, "chat", "gpt-4o", False, 1500),
        (4, "chat", "gpt-4o", True, 2000),
        (3, "messages", "claude-sonnet-4", True, 2000),
        (2, "messages", "claude-sonnet-4", False, 1000),
        (1, "chat", "llama-3.1-70b", False, 1000),  # not in the price table: unpriced tokens
        (2.0, "chat", "gpt-4o", False, 16000),  # refused: max_tokens over 4000
    ],
    "analyst": [
        (5, "embeddings", "text-embedding-3-small", False, None),
        (2, "embeddings", "mistral-embed", False, None),  # unpriced
        (3, "responses", "gpt-4o-mini", False, 800),
        (3, "chat", "gpt-4o-mini", True, 800),
        (1.2, "messages", "claude-sonnet-4", False, 1000),  # refused: no rule for analysts
    ],
    "support-bot": [
        (6, "chat", "gpt-4o-mini", False, 500),
        (4, "chat", "gpt-4o-mini", True, 500),
        (4, "messages", "claude-haiku-3.5", True, 600),
        (1.5, "chat", "gpt-4o", False, 500),  # refused: small models only
    ],
}


def calls_per_second(agent: str, phase: float) -> float:
    """A working day squeezed into the demo: writers peak early, analysts run a batch late,
    support is steady with a lunchtime dip."""
    if agent == "writer":
        return 0.6 + 3.5 * math.exp(-(((phase - 0.35) / 0.15) ** 2))
    if agent == "analyst":
        return 0.5 + (5.0 if 0.6 < phase < 0.8 else 0.0)
    return 2.2 - 1.2 * math.exp(-(((phase - 0.5) / 0.08) ** 2))


def usage_for(model: str, rng: random.Random) -> Usage:
    if model.startswith(("text-embedding", "mistral-embed")):
        return Usage(input=rng.randint(2_000, 12_000), output=0)
    if model in ("gpt-4o", "claude-sonnet-4", "llama-3.1-70b"):
        return Usage(rng.randint(1_500, 6_000), rng.randint(300, 1_500), rng.randint(0, 2_000))
    return Usage(rng.randint(400, 2_500), rng.randint(100, 600), rng.randint(0, 800))


@dataclass
class Tally:
    outcomes: Counter[str] = field(default_factory=Counter)

    def add(self, caller: Caller, call: Call, outcome: str) -> None:
        _, operation, model, stream, max_tokens = call
        kind = operation + (" (sse)" if stream else "")
        limit = "" if max_tokens is None else f"max_tokens={max_tokens}"
        self.outcomes[f"{caller.agent:<12} {kind:<15} {model:<23} {limit:<17} {outcome}"] += 1


class Traffic:
    def __init__(self, proxy: ProxyProcess, key: Path, rng: random.Random) -> None:
        self.rng = rng
        self.tally = Tally()
        self.openai: dict[Caller, openai.AsyncOpenAI] = {}
        self.anthropic: dict[Caller, anthropic.AsyncAnthropic] = {}
        for caller in CALLERS:
            token = mint_token(
                key_file=key,
                issuer=ISSUER,
                audience=AUDIENCE,
                subject=caller.user,  # RFC 8693: the user is the subject ...
                actors=[caller.agent],  # ... and the agent acts for them
                claims={"team": caller.team},
                ttl=3600,
                now=time.time(),
            )
            self.openai[caller] = openai.AsyncOpenAI(
                base_url=proxy.base + "/v1", api_key=token, max_retries=0
            )
            self.anthropic[caller] = anthropic.AsyncAnthropic(
                base_url=proxy.base,
                api_key="unused",
                max_retries=0,
                default_headers={"Authorization": f"Bearer {token}"},
            )

    async def close(self) -> None:
        for client in self.openai.values():
            await client.close()
        for other in self.anthropic.values():
            await other.close()

    async def one(self, caller: Caller, call: Call) -> None:
        _, operation, model, stream, max_tokens = call
        messages: list[Any] = [{"role": "user", "content": "Summarise the quarter."}]
        try:
            if operation == "chat":
                client = self.openai[caller]
                options: dict[str, Any] = {} if max_tokens is None else {"max_tokens": max_tokens}
                if stream:
                    chunks = await client.chat.completions.create(
                        model=model, messages=messages, stream=True, **options
                    )
                    async for _ in chunks:
                        pass
                else:
                    await client.chat.completions.create(model=model, messages=messages, **options)
            elif operation == "embeddings":
                await self.openai[caller].embeddings.create(model=model, input="quarterly report")
            elif operation == "responses":
                await self.openai[caller].responses.create(
                    model=model, input="Summarise the quarter.", max_output_tokens=max_tokens
                )
            elif stream:
                async with self.anthropic[caller].messages.stream(
                    model=model, max_tokens=max_tokens or 1024, messages=messages
                ) as events:
                    await events.get_final_message()
            else:
                await self.anthropic[caller].messages.create(
                    model=model, max_tokens=max_tokens or 1024, messages=messages
                )
            outcome = "ok"
        except (openai.APIStatusError, anthropic.APIStatusError) as exc:
            outcome = str(exc.status_code)
        self.tally.add(caller, call, outcome)

    async def warm_up(self) -> int:
        """One call of each kind by each caller, so that every series exists before the window
        (as in a proxy that has been running): rate() and increase() need a series' first
        sample to count from. Returns the number of calls made."""
        calls = [(caller, call) for caller in CALLERS for call in MENU[caller.agent]]
        await asyncio.gather(*(self.one(caller, call) for caller, call in calls))
        self.tally = Tally()
        return len(calls)

    async def run(self, upstream: LlmUpstream, duration: float) -> None:
        gate = asyncio.Semaphore(CONCURRENCY)
        tasks: set[asyncio.Task[None]] = set()

        async def gated(caller: Caller, call: Call) -> None:
            async with gate:
                await self.one(caller, call)

        tick, start = 0.25, time.monotonic()
        while (elapsed := time.monotonic() - start) < duration:
            phase = elapsed / duration
            for model in LATENCY:  # token counts vary from tick to tick
                upstream.usage[model] = usage_for(model, self.rng)
            for caller in CALLERS:
                share = sum(c.agent == caller.agent for c in CALLERS)
                expected = calls_per_second(caller.agent, phase) * tick / share
                for _ in range(poisson(expected, self.rng)):
                    menu = MENU[caller.agent]
                    call = self.rng.choices(menu, weights=[c[0] for c in menu])[0]
                    task = asyncio.create_task(gated(caller, call))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
            await asyncio.sleep(tick)
        if tasks:
            await asyncio.gather(*tasks)


def poisson(mean: float, rng: random.Random) -> int:
    limit, k, p = math.exp(-mean), 0, rng.random()
    while p > limit:
        k += 1
        p *= rng.random()
    return k


# -- PromQL -----------------------------------------------------------------------------------


@dataclass
class Series:
    name: str
    times: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)


@dataclass
class PanelData:
    panel: dict[str, Any]
    queries: list[str]
    series: list[Series]


def rewrite(expr: str, range_seconds: int) -> str:
    expr = re.sub(r"\[\d+[smhd]\]", f"[{RATE_WINDOW}]", expr)
    return (
        expr.replace("$__range", f"{range_seconds}s")
        .replace("$__rate_interval", RATE_WINDOW)
        .replace("$__interval", f"{int(STEP)}s")
    )


def legend(fmt: str, labels: dict[str, str]) -> str:
    if not fmt:
        return "{" + ", ".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
    text = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt)
    return text.strip() or "(empty)"


async def promql(
    session: aiohttp.ClientSession, url: str, path: str, params: dict[str, str]
) -> list[dict[str, Any]]:
    async with session.get(url + path, params=params) as response:
        answer = await response.json()
    if answer.get("status") != "success":
        raise RuntimeError(f"{params['query']!r}: {answer.get('error')}")
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result


async def evaluate(prometheus: str, window: tuple[float, float]) -> list[PanelData]:
    start, end = window
    range_seconds = math.ceil(end - start)
    dashboard = json.loads(DASHBOARD.read_text())
    out = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        for panel in dashboard["panels"]:
            queries, series = [], []
            instant = panel["type"] in ("stat", "bargauge", "gauge")
            for target in panel["targets"]:
                query = rewrite(target["expr"], range_seconds)
                queries.append(query)
                fmt = target.get("legendFormat", "")
                if instant:
                    rows = await promql(session, prometheus, "/api/v1/query",
                                        {"query": query, "time": f"{end:.3f}"})  # fmt: skip
                    for row in rows:
                        t, v = row["value"]
                        s = Series(legend(fmt, row["metric"]), [float(t)], [float(v)])
                        series.append(s)
                    continue
                params = {"query": query, "start": f"{start:.3f}", "end": f"{end:.3f}",
                          "step": f"{STEP}"}  # fmt: skip
                for row in await promql(session, prometheus, "/api/v1/query_range", params):
                    points = [(float(t), float(v)) for t, v in row["values"]]
                    points = [(t, v) for t, v in points if math.isfinite(v)]
                    if points:
                        times, values = zip(*points, strict=True)
                        s = Series(legend(fmt, row["metric"]), list(times), list(values))
                        series.append(s)
            out.append(PanelData(panel, queries, series))
    return out


@dataclass(frozen=True)
class Totals:
    calls: float
    cost: float


async def scraped(proxy: ProxyProcess) -> Totals:
    """The proxy's own counters, read from its admin /metrics."""
    async with aiohttp.ClientSession() as session, session.get(proxy.admin + "/metrics") as r:
        text = await r.text()
    sums: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            sums[sample.name] += sample.value
    return Totals(sums["agentproxy_calls_total"], sums["agentproxy_cost_total"])


def matches(result: list[dict[str, Any]], value: float) -> bool:
    return bool(result) and float(result[0]["value"][1]) == value


def parse_seconds(duration: str) -> float:
    return float(duration.removesuffix("s"))


# -- drawing ----------------------------------------------------------------------------------


def fmt_value(value: float, unit: str, decimals: int | None = None) -> str:
    if unit.startswith("suffix:"):  # Grafana's custom unit: the number, then the text
        return fmt_value(value, "short", decimals) + unit.removeprefix("suffix:").rstrip()
    if unit == "s":
        if value == 0:
            return "0 s"
        for scale, suffix in ((1, "s"), (1e-3, "ms"), (1e-6, "µs")):
            if abs(value) >= scale:
                return f"{value / scale:.3g} {suffix}"
        return f"{value / 1e-9:.3g} ns"
    if unit == "reqps":
        return f"{value:.3g} req/s"
    if unit == "short":
        for scale, suffix in ((1e9, " Bil"), (1e6, " Mil"), (1e3, " K")):
            if abs(value) >= scale:
                return f"{value / scale:.3g}{suffix}"
        return f"{value:.3g}"
    if decimals is not None:
        return f"{value:,.{decimals}f}"
    return f"{value:,.3g}" if abs(value) < 1000 else f"{value:,.0f}"


def draw_timeseries(fig: Figure, box: tuple[float, float, float, float], data: PanelData) -> None:
    x, y, w, h = box
    unit = data.panel["fieldConfig"]["defaults"].get("unit", "none")
    ax = fig.add_axes((x + 0.036, y + 0.026, w * 0.56 - 0.036, h - 0.03))
    ax.set_facecolor(PANEL)
    rows: list[tuple[str, str, float, float]] = []
    for i, s in enumerate(data.series):
        color = PALETTE[i % len(PALETTE)]
        times = [dt.datetime.fromtimestamp(t) for t in s.times]
        ax.plot(times, s.values, color=color, linewidth=1.3)
        ax.fill_between(times, s.values, color=color, alpha=0.10, linewidth=0)
        rows.append((s.name, color, sum(s.values) / len(s.values), max(s.values)))
    scale = data.panel["fieldConfig"]["defaults"].get("custom", {}).get("scaleDistribution", {})
    if scale.get("type") == "log":
        # As Grafana draws it: latencies from µs to s on one readable axis.
        ax.set_yscale("log", base=scale.get("log", 10))
    else:
        ax.set_ylim(bottom=0)
        ax.yaxis.set_major_locator(MaxNLocator(4))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt_value(v, unit)))
    ax.xaxis.set_major_locator(mdates.AutoDateLocator(maxticks=6))
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))
    ax.tick_params(colors=MUTED, labelsize=7, length=0, pad=3)
    ax.tick_params(axis="x", pad=6)
    ax.grid(color=GRID, linewidth=0.8)
    for spine in ax.spines.values():
        spine.set_visible(False)
    rows.sort(key=lambda r: -r[2])
    box = (x + w * 0.58, y, w * 0.42, h)
    if len(rows) + 1 <= (h - 0.004) / 0.0155:
        draw_legend_table(fig, box, rows, unit)
    else:
        draw_legend_list(fig, box, rows)


def draw_legend_table(
    fig: Figure,
    box: tuple[float, float, float, float],
    rows: list[tuple[str, str, float, float]],
    unit: str,
) -> None:
    """The legend as the dashboard asks for it: a table with the mean and max of each series."""
    x, y, w, h = box
    top, step = y + h - 0.004, 0.0155
    for label, right in (("Mean", 0.80), ("Max", 1.0)):
        fig.text(x + w * right, top, label, color=MUTED, fontsize=7, ha="right", va="top")
    for i, (name, color, mean, peak) in enumerate(rows):
        ry = top - step * (i + 1)
        fig.add_artist(plt.Line2D([x, x + 0.008], [ry - 0.005] * 2, color=color, linewidth=2.5))
        label = name if len(name) <= 31 else name[:30] + "…"
        fig.text(x + 0.011, ry, label, color=TEXT, fontsize=7, va="top")
        for value, right in ((mean, 0.80), (peak, 1.0)):
            text = fmt_value(value, unit)
            fig.text(x + w * right, ry, text, color=TEXT, fontsize=7, ha="right", va="top")


def draw_legend_list(
    fig: Figure, box: tuple[float, float, float, float], rows: list[tuple[str, str, float, float]]
) -> None:
    """Too many series for a table in this panel: names only, in two columns (by mean)."""
    x, y, w, h = box
    step = 0.0128
    per_column = max(1, int((h - 0.004) / step))
    shown = rows[: 2 * per_column]
    for i, (name, color, _, _) in enumerate(shown):
        cx = x + (w / 2) * (i // per_column)
        ry = y + h - 0.004 - step * (i % per_column)
        fig.add_artist(plt.Line2D([cx, cx + 0.008], [ry - 0.005] * 2, color=color, linewidth=2.5))
        label = name if len(name) <= 28 else name[:27] + "…"
        fig.text(cx + 0.011, ry, label, color=TEXT, fontsize=6.6, va="top")
    if len(rows) > len(shown):
        fig.text(x + w, y, f"+{len(rows) - len(shown)} more", color=MUTED, fontsize=6.6, ha="right")


def draw_bargauge(fig: Figure, box: tuple[float, float, float, float], data: PanelData) -> None:
    x, y, w, h = box
    defaults = data.panel["fieldConfig"]["defaults"]
    unit, decimals = defaults.get("unit", "none"), defaults.get("decimals")
    rows = sorted(data.series, key=lambda s: -s.values[-1])
    ax: Axes = fig.add_axes((x + w * 0.2, y + 0.006, w * 0.66, h - 0.008))
    ax.set_axis_off()
    peak = max([s.values[-1] for s in rows] + [1e-12])
    n = max(len(rows), 1)
    ax.set_xlim(0, peak)
    ax.set_ylim(n - 0.5, -0.5)
    size = 8 if n <= 6 else 7
    for i, s in enumerate(rows):
        color = PALETTE[i % len(PALETTE)]
        value = s.values[-1]
        ax.barh(i, peak, height=0.72, color="#22252b", linewidth=0)  # showUnfilled
        cmap = LinearSegmentedColormap.from_list("g", [to_rgba(color, 0.25), to_rgba(color, 1)])
        ax.imshow([[0.0, 1.0]], cmap=cmap, aspect="auto", interpolation="bicubic",
                  extent=(0, max(value, peak * 1e-3), i + 0.36, i - 0.36), zorder=2)  # fmt: skip
        yy = y + 0.006 + (h - 0.008) * (1 - (i + 0.5) / n)
        label = s.name if len(s.name) <= 26 else s.name[:25] + "…"
        fig.text(x + w * 0.19, yy, label, color=TEXT, fontsize=size, ha="right", va="center")
        fig.text(x + w * 0.87, yy, fmt_value(value, unit, decimals), color=color,
                 fontsize=size + 1, weight="bold", va="center")  # fmt: skip
    ax.set_xlim(0, peak)
    ax.set_ylim(n - 0.5, -0.5)


def draw_stat(fig: Figure, box: tuple[float, float, float, float], data: PanelData) -> None:
    x, y, w, h = box
    defaults = data.panel["fieldConfig"]["defaults"]
    color = STAT_BLUE if defaults.get("color", {}).get("fixedColor") == "blue" else PALETTE[0]
    n = max(len(data.series), 1)
    for i, s in enumerate(data.series):
        cy = y + h * (1 - (i + 0.5) / n)
        value = fmt_value(s.values[-1], defaults.get("unit", "none"), defaults.get("decimals"))
        fig.text(x + w / 2, cy + h * 0.22 / n, s.name, color=TEXT, fontsize=11, ha="center",
                 va="center")  # fmt: skip
        fig.text(x + w / 2, cy - h * 0.08 / n, value, color=color, fontsize=34 / n**0.5,
                 weight="bold", ha="center", va="center")  # fmt: skip


def render(panels: list[PanelData], out: Path, window: tuple[float, float], notes: str) -> None:
    width, height = 16.0, 10.4
    plt.switch_backend("agg")
    fig = plt.figure(figsize=(width, height), dpi=100, facecolor=BG)
    plt.rcParams["font.family"] = "DejaVu Sans"
    title = json.loads(DASHBOARD.read_text())["title"]
    when = dt.datetime.fromtimestamp(window[1]).strftime("%Y-%m-%d %H:%M")
    fig.text(0.008, 0.982, "agentproxy cost dashboard — rendered from a real Prometheus scrape "
             f"of a demo run, {when}", color=TEXT, fontsize=14, weight="bold", va="top")  # fmt: skip
    span = f"{dt.datetime.fromtimestamp(window[0]):%H:%M:%S} – {dt.datetime.fromtimestamp(window[1]):%H:%M:%S}"
    fig.text(0.992, 0.982, f"{title}   ·   {span}", color=MUTED, fontsize=9, ha="right",
             va="top")  # fmt: skip
    fig.text(0.008, 0.004, notes, color=MUTED, fontsize=7.5, va="bottom", linespacing=1.5)
    left, right, top, bottom, gap = 0.006, 0.994, 0.952, 0.036, 0.003
    units = max(p.panel["gridPos"]["y"] + p.panel["gridPos"]["h"] for p in panels)
    col, row = (right - left) / 24, (top - bottom) / units
    for data in panels:
        g = data.panel["gridPos"]
        x0, y0 = left + g["x"] * col + gap, top - (g["y"] + g["h"]) * row + gap
        w, h = g["w"] * col - 2 * gap, g["h"] * row - 2 * gap
        fig.add_artist(FancyBboxPatch((x0, y0), w, h, boxstyle="round,pad=0,rounding_size=0.003",
                                      facecolor=PANEL, edgecolor=BORDER, linewidth=0.8, zorder=-1))  # fmt: skip
        fig.text(x0 + 0.006, y0 + h - 0.008, data.panel["title"], color=TEXT, fontsize=9.5,
                 weight="bold", va="top")  # fmt: skip
        inner = (x0 + 0.006, y0 + 0.006, w - 0.012, h - 0.034)
        if not data.series:
            fig.text(x0 + w / 2, y0 + h / 2, "No data", color=MUTED, fontsize=12, ha="center")
        elif data.panel["type"] == "timeseries":
            draw_timeseries(fig, inner, data)
        elif data.panel["type"] == "stat":
            draw_stat(fig, inner, data)
        else:
            draw_bargauge(fig, inner, data)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, facecolor=BG)
    plt.close(fig)


# -- main -------------------------------------------------------------------------------------


async def demo(duration: float, out: Path, seed: int) -> int:
    began = time.monotonic()
    rng = random.Random(seed)
    async with AsyncExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="agentproxy-demo-")))
        upstream = await start_upstream(stack, rng)
        proxy = await start_proxy(stack, work, upstream.url)
        prometheus = await Prometheus.start(proxy.admin.removeprefix("http://"), work / "prom")
        stack.push_async_callback(prometheus.stop)
        print(f"upstream   {upstream.url}  (tests/harness/llm_upstream.py, delays per model)")
        print(f"agentproxy {proxy.base}  admin {proxy.admin}  (pid {proxy.process.pid})")
        print(f"prometheus {prometheus.url}  scraping {proxy.admin}/metrics every 1s")
        await prometheus.wait_for("up", lambda r: bool(r) and r[0]["value"][1] == "1", 20)

        traffic = Traffic(proxy, work / "issuer.key.pem", rng)
        stack.push_async_callback(traffic.close)
        warm = await traffic.warm_up()
        before = await scraped(proxy)
        await prometheus.wait_for(
            "sum(agentproxy_calls_total)", lambda r: matches(r, before.calls), timeout=20
        )
        print(f"warm-up: {warm} calls; idle {RATE_WINDOW} so that rate windows start empty")
        await asyncio.sleep(parse_seconds(RATE_WINDOW) + 3)
        t0 = time.time()
        print(f"driving {duration:.0f}s of traffic ...", flush=True)
        await traffic.run(upstream, duration)
        for line, count in sorted(traffic.tally.outcomes.items()):
            print(f"  {count:4d}  {line}")

        after = await scraped(proxy)
        await prometheus.wait_for(
            "sum(agentproxy_calls_total)", lambda r: matches(r, after.calls), timeout=20
        )
        await asyncio.sleep(3)  # a few idle scrapes: the charts show the traffic stop
        window = (t0 - 3, time.time())
        panels = await evaluate(prometheus.url, window)

    cost = after.cost - before.cost
    notes = (
        f"Demo: {sum(traffic.tally.outcomes.values())} calls by 3 agents for 6 users in "
        f"{duration:.0f}s through agentproxy to a test OpenAI/Anthropic upstream; Prometheus "
        f"scraping every 1s. The dashboard's [5m] rate windows are evaluated as [{RATE_WINDOW}] "
        f"and $__range as the {math.ceil(window[1] - window[0])}s demo window.\n"
        f"Before the window, {warm} warm-up calls created every series (as in a proxy that has been running). "
        f"The proxy's own counters over the window: {after.calls - before.calls:.0f} forwarded "
        f"calls, {cost:.4f} USD."
    )
    render(panels, out, window, notes)
    print(
        f"proxy /metrics over the window: {after.calls - before.calls:.0f} forwarded calls, "
        f"{cost:.4f} USD (the 'Total cost' panel's increase() extrapolates to the window)"
    )
    empty = []
    for data in panels:
        print(f"panel {data.panel['title']!r}: {len(data.series)} series")
        for query in data.queries:
            print(f"    {query}")
        if data.panel["type"] != "timeseries":
            for s in data.series:
                print(f"    {s.name} = {s.values[-1]:.6g}")
        if not data.series:
            empty.append(data.panel["title"])
    print(f"wrote {out} in {time.monotonic() - began:.0f}s")
    if empty:
        print(f"panels without data: {', '.join(empty)}", file=sys.stderr)
        return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=50, help="seconds of traffic")
    parser.add_argument("--out", type=Path, default=ROOT / "docs/dashboard.png")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    return asyncio.run(demo(args.duration, args.out, args.seed))


if __name__ == "__main__":
    sys.exit(main())

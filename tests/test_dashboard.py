"""The live dashboard in a real headless Chromium: first against canned stats (20 adapters
with SGLang metrics on: top-N + "others"; one adapter on a stock-cache scheme with metrics
off: the panels degrade), then against the real CPU server (base-lr-shared, three
shared-A role adapters, `--enable-metrics`): exact per-adapter counters after a 3-role
trace, in /lragent/stats and on /metrics, then the page under traffic. The page marks
`data-ready` and writes a JSON summary into the DOM once every available panel has
points; the test reads it over the DevTools protocol. Screenshots are kept under `artifacts/`.
"""

from __future__ import annotations

import asyncio
import base64
import http.server
import json
import os
import random
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import requests

from lragent_sglang.server import dashboard, metrics
from lragent_sglang.adapters.make import make_role_adapters
from lragent_sglang.agents.server_process import ServerProcess

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
ADAPTER_PANELS = {"base_hit_rate", "lr_hit_rate", "lr_reprefill", "computed", "adapter_table"}
CACHE_PANELS = {"evictions", "memory", "host_tier", "lr_memory", "unshared_memory", "unshared_prefill"}
SGLANG_PANELS = {"sglang_throughput", "sglang_requests", "sglang_usage"}
RANK_PANELS = {"rank_table"}
PANELS = ADAPTER_PANELS | RANK_PANELS | CACHE_PANELS | SGLANG_PANELS
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1400,2200",
]


def chromium() -> str:
    """Debian's chromium, or skip: scripts/bootstrap.sh installs it where it may (root or CI)."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("chromium not installed (scripts/bootstrap.sh runs `apt-get install chromium` as root or in CI)")
    return path


class DevTools:
    """One headless Chromium driven over the DevTools protocol (aiohttp's websocket client),
    in real time: the page polls a busy CPU server whose answers take seconds, which
    Chromium's virtual-time flags (`--dump-dom`, `--screenshot`) do not wait for reliably."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.next_id = 0

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        await self.ws.send_json({"id": self.next_id, "method": method, "params": params})
        while True:
            msg = await self.ws.receive_json()
            if msg.get("id") == self.next_id:
                assert "error" not in msg, msg
                return msg["result"]

    async def state(self) -> tuple[str, dict[str, Any]]:
        """(body's data-ready, the page's JSON summary); ("0", {}) while a busy server has
        not delivered the page yet."""
        res = await self.call("Runtime.evaluate", expression=STATE_JS, returnByValue=True)
        ready, summary = json.loads(res["result"].get("value", '["0", "{}"]'))
        return ready, json.loads(summary)


STATE_JS = """JSON.stringify([
  (document.body && document.body.dataset.ready) || "0",
  (document.getElementById("lragent-summary") || {}).textContent || "{}",
])"""


def devtools_port(log: Path, proc: subprocess.Popen, timeout: float = 60) -> int:
    """The port Chromium printed ("DevTools listening on ws://127.0.0.1:PORT/...")."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", log.read_text(errors="replace"))
        if found:
            return int(found.group(1))
        assert proc.poll() is None, log.read_text(errors="replace")[-2000:]
        time.sleep(0.2)
    raise AssertionError("chromium printed no DevTools address")


async def watch(port: int, url: str, done: Callable[[str, dict[str, Any]], bool], timeout: float, shot: Path) -> tuple[str, dict[str, Any]]:
    """Open `url`, read the page's state every half second until `done(ready, summary)` or
    `timeout`, then screenshot the whole page to `shot`; returns the last state."""
    import aiohttp

    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/json/list") as resp:
            target = next(t for t in await resp.json() if t["type"] == "page")
        async with http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            tab = DevTools(ws)
            await tab.call("Page.navigate", url=url)
            deadline = time.monotonic() + timeout
            ready, summary = "0", {}
            while time.monotonic() < deadline:
                await asyncio.sleep(0.5)
                ready, summary = await tab.state()
                if done(ready, summary):
                    break
            png = await tab.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
    shot.write_bytes(base64.b64decode(png["data"]))
    return ready, summary


def page_state(url: str, shot: str, done: Callable[[str, dict[str, Any]], bool], timeout: float = 180) -> tuple[str, dict[str, Any]]:
    """The page's (data-ready, summary) once `done` holds (or at `timeout`), with a
    screenshot kept as `artifacts/<shot>`."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / shot
    path.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="lragent-chromium-") as profile:
        log = Path(profile) / "chromium.log"
        with open(log, "wb") as err:
            proc = subprocess.Popen(
                [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}/p", "--remote-debugging-port=0", "about:blank"],
                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
            )
        try:
            state = asyncio.run(watch(devtools_port(log, proc), url, done, timeout, path))
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert path.stat().st_size > 10_000, "no screenshot"
    return state


def samples_at_least(n: int) -> Callable[[str, dict[str, Any]], bool]:
    return lambda ready, summary: ready == "1" and summary.get("samples", 0) >= n


def test_page_is_self_contained():
    html = dashboard.page()
    assert "<svg" in html and 'fetch("/lragent/stats"' in html and 'fetch("/metrics"' in html
    assert not re.search(r'(src|href)\s*=\s*"https?:', html), "the page must not load anything from outside"


def test_page_reads_the_sglang_metrics_it_declares():
    html = dashboard.page()
    for name in dashboard.SGLANG_METRICS:
        assert f'"{name}"' in html, name
    panels = set(re.findall(r'data-panel="(\w+)"', html))
    assert panels == PANELS


# ---- canned upstreams ------------------------------------------------------------------

def canned_base_shared(elapsed: float, adapters: int) -> dict[str, Any]:
    """base-shared counters that grow with time, adapter i busier than i-1."""
    per, keys = {}, {}
    for i in range(adapters):
        prompt = int(elapsed * 100 * (i + 1))
        base, lr = prompt * 8 // 10, prompt * (30 + i) // 100
        per[f"role{i}"] = {
            "requests": prompt // 50, "prompt_tokens": prompt, "base_hit_tokens": base, "lr_hit_tokens": lr,
            "lr_reprefill_tokens": base - lr, "computed_tokens": prompt - lr,
        }
        keys[f"role{i}"] = {"lr_tokens": 500 + 10 * i, "lr_bytes": (500 + 10 * i) * 64,
                            "lr_inserted_tokens": prompt, "lr_evicted_tokens": prompt // 10}
    return {"schedulers": [{
        "scheme": "base-shared", "sharing": {"keys_by_adapter": False, "shares_base": True, "one_lr_cache": False},
        "base": {"tokens": 2000, "bytes": 2000 * 1024, "inserted_tokens": int(elapsed * 300), "evicted_tokens": int(elapsed * 50)},
        "lr": {"tokens": 5000, "bytes": 5000 * 64, "inserted_tokens": int(elapsed * 300), "evicted_tokens": int(elapsed * 30)},
        "host": {"tokens": 3000, "bytes": 3000 * 1024, "written_tokens": int(elapsed * 200),
                 "loaded_back_tokens": int(elapsed * 120), "evicted_tokens": int(elapsed * 40), "hit_tokens": int(elapsed * 150),
                 "pool_tokens": 4000, "pool_available_tokens": 1000},
        "per_adapter": per, "per_lr_key": keys, "lr_pool_size": 10000, "lr_pool_available": 4000,
    }]}


def canned_metrics(elapsed: float) -> str:
    """SGLang's /metrics in the shape its 0.5.17 server writes (comments, labels, two processes)."""
    labels = 'engine_type="unified",model_name="m",tp_rank="0"'
    return "\n".join([
        "# HELP sglang:prompt_tokens_total Number of prefill tokens processed.",
        "# TYPE sglang:prompt_tokens_total counter",
        f'sglang:prompt_tokens_total{{{labels},is_streaming="false"}} {elapsed * 900:.1f}',
        f'sglang:cached_tokens_total{{cache_source="device",{labels}}} {elapsed * 600:.1f}',
        f'sglang:generation_tokens_total{{{labels},is_streaming="false"}} {elapsed * 40:.1f}',
        f'sglang:num_running_reqs{{{labels},pid="1"}} 3.0',
        f'sglang:num_running_reqs{{{labels},pid="2"}} 2.0',
        f"sglang:num_queue_reqs{{{labels}}} 1.0",
        f"sglang:gen_throughput{{{labels}}} 40.0",
        f"sglang:token_usage{{{labels}}} 0.25",
        f"sglang:cache_hit_rate{{{labels}}} 0.5",
        f'sglang:e2e_request_latency_seconds_bucket{{{labels},le="+Inf"}} 7.0',
        "",
    ])


def canned_non_shared(elapsed: float) -> dict[str, Any]:
    """One adapter on SGLang's own cache (no LR statistics) with its HiRadixCache (sizes, no
    traffic counters), half its prompt tokens hit."""
    prompt = 2 * int(elapsed * 50)
    return {"schedulers": [{
        "scheme": "non-shared", "sharing": {"keys_by_adapter": True, "shares_base": False, "one_lr_cache": False},
        "base": {"tokens": 800, "bytes": 800 * 1024, "evicted_tokens": int(elapsed * 5)},
        "host": {"tokens": 600, "bytes": 600 * 1024, "pool_tokens": 1600},
        "per_adapter": {"plan": {"requests": prompt // 50, "prompt_tokens": prompt, "base_hit_tokens": prompt // 2,
                                 "lr_hit_tokens": prompt // 2, "lr_reprefill_tokens": 0, "computed_tokens": prompt - prompt // 2}},
    }]}


def serve_canned(routes: Callable[[str, float], tuple[int, str, bytes]]) -> Iterator[str]:
    """The page served by `dashboard.make_handler`, forwarding to an upstream answering `routes(path, elapsed)`."""
    start = time.monotonic()

    class Upstream(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status, ctype, data = routes(self.path.split("?", 1)[0], time.monotonic() - start)
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    front = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), dashboard.make_handler(f"http://127.0.0.1:{upstream.server_address[1]}")
    )
    for srv in (upstream, front):
        threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{front.server_address[1]}{dashboard.ROUTE}"
    finally:
        for srv in (front, upstream):
            srv.shutdown()
            srv.server_close()


def as_json(body: Any) -> tuple[int, str, bytes]:
    return 200, "application/json", json.dumps(body).encode()


@pytest.fixture
def twenty_adapters() -> Iterator[str]:
    def routes(path: str, elapsed: float) -> tuple[int, str, bytes]:
        if path == "/server_info":
            return as_json({"lora_paths": [f"role{i}" for i in range(20)], "enable_metrics": True})
        if path == "/metrics":
            return 200, "text/plain; version=0.0.4", canned_metrics(elapsed).encode()
        return as_json(canned_base_shared(elapsed, 20))

    yield from serve_canned(routes)


@pytest.fixture
def stock_metrics_off() -> Iterator[str]:
    def routes(path: str, elapsed: float) -> tuple[int, str, bytes]:
        if path == "/server_info":
            return as_json({"lora_paths": [{"lora_name": "plan"}], "enable_metrics": False})
        if path == "/metrics":
            return 404, "application/json", b'{"detail":"Not Found"}'
        return as_json(canned_non_shared(elapsed))

    yield from serve_canned(routes)


@pytest.fixture
def two_ranks() -> Iterator[str]:
    """`--dp-size 2`: rank 0 served two adapters and two trajectories, rank 1 three and one."""
    def routes(path: str, elapsed: float) -> tuple[int, str, bytes]:
        if path == "/server_info":
            return as_json({"lora_paths": [f"role{i}" for i in range(3)], "enable_metrics": False})
        if path == "/metrics":
            return 404, "application/json", b'{"detail":"Not Found"}'
        ranks = [canned_base_shared(elapsed, n)["schedulers"][0] for n in (2, 3)]
        for rank, (state, keys) in enumerate(zip(ranks, (["t1", "t2"], ["t3"]))):
            state.update(dp_rank=rank, routing_keys={k: 6 for k in keys})
        return as_json({"schedulers": ranks})

    yield from serve_canned(routes)


def test_metrics_are_forwarded_with_their_content_type(twenty_adapters):
    base = twenty_adapters.rsplit(dashboard.ROUTE, 1)[0]
    resp = requests.get(base + "/metrics", timeout=10)
    assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("text/plain")
    assert "sglang:num_running_reqs" in resp.text


def test_upstream_errors_are_forwarded_as_such(stock_metrics_off):
    """A server without --enable-metrics: the page must see its 404, not a proxy error."""
    base = stock_metrics_off.rsplit(dashboard.ROUTE, 1)[0]
    assert requests.get(base + "/metrics", timeout=10).status_code == 404


@pytest.mark.slow
def test_twenty_adapters_top_n_and_others(twenty_adapters):
    ready, summary = page_state(twenty_adapters, "dashboard-20-adapters.png", samples_at_least(6))
    assert ready == "1", summary
    assert set(summary["panels"]) == PANELS and all(summary["panels"][p] > 0 for p in PANELS - RANK_PANELS), summary
    assert summary["panels"]["rank_table"] == "n/a", "one scheduler: no rank rows"
    assert summary["adapters"] == 20 and len(summary["shown"]) == 8 and summary["others"] == 12
    assert summary["shown"][0] == "role19", "the busiest adapters are drawn"
    assert summary["panels"]["adapter_table"] == 20, "the table lists every adapter"
    others = "others (12, avg)"
    assert len(summary["lr_keys_shown"]) == 8
    assert summary["latest"]["lr_memory"][others] == (500 + 10 * 5.5) * 64, "mean LR bytes of role0..role11"
    assert summary["latest"]["base_hit_rate"][others] == pytest.approx(80, abs=1)
    assert summary["latest"]["base_hit_rate"]["role19"] == pytest.approx(80, abs=1)
    assert summary["latest"]["lr_hit_rate"]["role19"] == pytest.approx(49, abs=1)
    # base-shared: one tree per adapter would hold each adapter's LR reach, 500 + 10 i tokens
    # of adapter i (more than the 2000 shared base tokens), at the base's bytes per token.
    assert summary["latest"]["host_tier"] == pytest.approx(
        {"copied to host": 200, "loaded back": 120, "dropped from host": 40}, rel=0.2), "host traffic in real time"
    assert summary["latest"]["memory"]["base KV in host memory"] == 3000 * 1024
    assert summary["latest"]["unshared_memory"]["without sharing (estimate)"] == sum(500 + 10 * i for i in range(20)) * 1024
    assert summary["sglang"] == "on"
    assert summary["latest"]["sglang_requests"] == {"running": 5, "queued": 1}, "running summed over processes"
    assert summary["latest"]["sglang_usage"] == {"KV pool usage": 25, "cache hit rate": 50}
    assert summary["latest"]["sglang_throughput"]["prompt"] == pytest.approx(900, rel=0.2), "rates in real time"


@pytest.mark.slow
def test_stock_scheme_without_metrics_degrades(stock_metrics_off):
    ready, summary = page_state(stock_metrics_off, "dashboard-stock-metrics-off.png", samples_at_least(6))
    assert ready == "1", summary
    unavailable = {p for p, v in summary["panels"].items() if v == "n/a"}
    assert unavailable == {"lr_hit_rate", "lr_reprefill", "lr_memory", "host_tier"} | RANK_PANELS | SGLANG_PANELS, summary
    assert summary["latest"]["memory"] == {"base KV": 800 * 1024, "base KV in host memory": 600 * 1024}
    assert summary["sglang"] == "off" and summary["per_adapter"] == ["plan"] and summary["adapters"] == 1
    assert summary["latest"]["base_hit_rate"]["plan"] == pytest.approx(50, abs=1)


@pytest.mark.slow
def test_data_parallel_ranks_and_their_sum(two_ranks):
    ready, summary = page_state(two_ranks, "dashboard-dp-ranks.png", samples_at_least(3))
    assert ready == "1", summary
    assert summary["panels"]["rank_table"] == 2
    r0, r1 = summary["ranks"]
    assert (r0["rank"], r0["trajectories"], r1["rank"], r1["trajectories"]) == (0, 2, 1, 1)
    totals = {name: e["prompt_tokens"] for name, e in summary["totals"].items()}
    assert 2 * r0["prompt_tokens"] == totals["role0"] + totals["role1"], "role0 and role1 ran on both ranks"
    assert r1["prompt_tokens"] == r0["prompt_tokens"] + totals["role2"], "role2 on rank 1 only"
    assert r0["baseBytes"] == r1["baseBytes"] == 2000 * 1024


# ---- the real server -------------------------------------------------------------------

PREFIX_TOKENS = 64
VOCAB = (1000, 40000)
ROLES = ("plan", "action", "reflect")


@pytest.fixture(scope="module")
def lr_server(smollm2, tmp_path_factory) -> Iterator[ServerProcess]:
    """base-lr-shared, three shared-A role adapters, SGLang metrics on (published every decode step)."""
    tmp = tmp_path_factory.mktemp("dashboard")
    adapters = make_role_adapters(smollm2, tmp / "adapters", roles=ROLES, shared_v_a=True)
    args = [
        "--model-path", str(smollm2), "--dtype", "float32", "--enable-lora",
        "--lora-paths", *[f"{r}={p}" for r, p in adapters.items()],
        "--max-loras-per-batch", str(len(adapters)), "--max-lora-rank", "8",
        "--lragent-scheme", "base-lr-shared", "--enable-metrics", "--decode-log-interval", "1",
    ]
    with ServerProcess(args, log_path=tmp / "server.log") as srv:
        yield srv


def stats(srv: ServerProcess) -> dict[str, Any]:
    return requests.get(srv.url + "/lragent/stats", timeout=30).json()["schedulers"][0]


def scrape(srv: ServerProcess) -> dict[str, list[tuple[dict[str, str], float]]]:
    """/metrics as sample name -> [(labels, value)]."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(requests.get(srv.url + "/metrics", timeout=30).text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def per_adapter_metrics(scraped: dict) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for field, (name, _) in metrics.ADAPTER_COUNTERS.items():
        for labels, value in scraped.get(f"{metrics.PREFIX}{name}_total", []):
            out.setdefault(labels[metrics.ADAPTER_LABEL], {})[field] = value
    return out


def diff(after: dict[str, dict[str, int]], before: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    return {a: {f: v - before.get(a, {}).get(f, 0) for f, v in e.items()} for a, e in after.items()}


@pytest.mark.e2e
@pytest.mark.slow
def test_per_adapter_counters_after_a_three_role_trace(lr_server):
    srv = lr_server
    rng = random.Random(1)
    prefix = [rng.randrange(*VOCAB) for _ in range(PREFIX_TOKENS)]
    sampling = {"max_new_tokens": 2, "temperature": 0, "ignore_eos": True}
    before = stats(srv)
    sent = {r: 0 for r in ROLES}
    # plan writes the prefix; action and reflect read it; plan comes back and reads it too.
    for role in (*ROLES, "plan"):
        ids = prefix + [rng.randrange(*VOCAB) for _ in range(8)]
        srv.generate(input_ids=ids, lora_path=role, sampling_params=sampling)
        sent[role] += len(ids)
    after = stats(srv)
    d = diff(after["per_adapter"], before.get("per_adapter", {}))
    assert {r: d[r]["requests"] for r in ROLES} == {"plan": 2, "action": 1, "reflect": 1}
    assert {r: d[r]["prompt_tokens"] for r in ROLES} == sent
    for role in ROLES:
        assert d[role]["lr_hit_tokens"] >= PREFIX_TOKENS, (role, d[role])
        assert d[role]["base_hit_tokens"] == d[role]["lr_hit_tokens"], "one shared LR key: no gap"
        assert d[role]["lr_reprefill_tokens"] == 0
        assert d[role]["computed_tokens"] == d[role]["prompt_tokens"] - d[role]["lr_hit_tokens"]
    assert set(after["per_lr_key"]) == {"shared-lr"}, "the tree sees one LR key for all roles"
    key_hits = after["per_lr_key"]["shared-lr"]["base_hit_tokens"] - before["per_lr_key"]["shared-lr"]["base_hit_tokens"]
    assert sum(e["base_hit_tokens"] for e in d.values()) == key_hits, "per adapter adds up to per LR key"

    # /metrics: the same per-adapter numbers, and our prompt tokens add up to SGLang's.
    deadline = time.monotonic() + 15
    while True:
        scraped = scrape(srv)
        live = stats(srv)["per_adapter"]
        prompt_total = sum(v for _, v in scraped.get("sglang:prompt_tokens_total", []))
        ours = per_adapter_metrics(scraped)
        if (ours == live and prompt_total == sum(e["prompt_tokens"] for e in live.values())) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert ours == live, srv.log_tail()
    assert prompt_total == sum(e["prompt_tokens"] for e in live.values()), "health checks excluded, like SGLang"
    missing = [n for n in dashboard.SGLANG_METRICS if n not in scraped]
    assert not missing, f"SGLang does not export {missing}"


def traffic(srv: ServerProcess, stop: threading.Event) -> None:
    """Requests from each role over one shared prefix with a fresh tail, until `stop`."""
    rng = random.Random(0)
    prefix = [rng.randrange(*VOCAB) for _ in range(PREFIX_TOKENS)]
    sampling = {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True}
    while not stop.is_set():
        for role in ROLES:
            tail = [rng.randrange(*VOCAB) for _ in range(8)]
            try:
                srv.generate(input_ids=prefix + tail, lora_path=role, sampling_params=sampling)
            except requests.RequestException:
                if not stop.is_set():
                    raise


def role_lines_seen(seen: set[str]) -> Callable[[str, dict[str, Any]], bool]:
    """Done once the page is ready with SGLang's metrics and every role's LR-hit line has
    shown a hit (`seen` collects them across reads: under traffic a line has gaps)."""

    def done(ready: str, summary: dict[str, Any]) -> bool:
        lines = summary.get("latest", {}).get("lr_hit_rate", {})
        seen.update(r for r in ROLES if (lines.get(r) or 0) > 0)
        return ready == "1" and summary.get("samples", 0) >= 4 and summary.get("sglang") == "on" and seen >= set(ROLES)

    return done


@pytest.mark.e2e
@pytest.mark.slow
def test_dashboard_against_server_under_traffic(lr_server):
    chromium()
    srv = lr_server
    stop = threading.Event()
    worker = threading.Thread(target=traffic, args=(srv, stop), daemon=True)
    worker.start()
    seen: set[str] = set()
    try:
        ready, summary = page_state(srv.url + dashboard.ROUTE, "dashboard.png", role_lines_seen(seen), timeout=240)
    finally:
        stop.set()
        worker.join(timeout=60)
    assert ready == "1", (summary, srv.log_tail())
    assert summary["scheme"] == "base-lr-shared" and summary["adapters"] == len(ROLES)
    assert set(ROLES) <= set(summary["per_adapter"]), "one line per role, not one shared-lr line"
    assert seen == set(ROLES), f"LR-hit lines with data: {seen}"
    assert summary["lr_keys"] == ["shared-lr"]
    unavailable = {p for p, v in summary["panels"].items() if v == "n/a"}
    assert unavailable == {"host_tier"} | RANK_PANELS, "one scheduler, no host tier: " + str(summary)
    assert all(summary["panels"][p] > 0 for p in PANELS - unavailable), summary
    assert summary["panels"]["adapter_table"] >= len(ROLES)
    assert summary["sglang"] == "on" and summary["sg"]["prompt"] > 0 and summary["sg"]["generated"] > 0
    assert all(v is not None for v in summary["latest"]["sglang_requests"].values()), summary["latest"]

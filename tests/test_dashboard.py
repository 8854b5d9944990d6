"""The live dashboard in a real headless Chromium: first against canned stats of 20
adapters (top-N + "others"), then against the real CPU server (base-lr-shared, three
shared-A role adapters) under traffic. The page marks `data-ready` and writes a JSON
summary into the DOM once every panel has points; Chromium's `--dump-dom` reads it back.
Screenshots are kept under `artifacts/`.
"""

from __future__ import annotations

import http.server
import json
import random
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests

from lragent_sglang import dashboard
from lragent_sglang.adapters import make_role_adapters
from lragent_sglang.server_process import ServerProcess

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
PANELS = {"base_hit_rate", "lr_hit_rate", "lr_reprefill", "evictions", "memory", "unshared_memory", "unshared_prefill"}
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1400,1300",
]


def chromium() -> str:
    """Debian's chromium, or skip: scripts/bootstrap.sh installs it where it may (root or CI)."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("chromium not installed (scripts/bootstrap.sh runs `apt-get install chromium` as root or in CI)")
    return path


def run_chromium(url: str, budget_ms: int, *args: str) -> str:
    """One headless run with virtual time (timers jump ahead, fetches still wait for the server)."""
    with tempfile.TemporaryDirectory(prefix="lragent-chromium-") as profile:
        proc = subprocess.run(
            [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}", *args, url],
            capture_output=True, text=True, timeout=120,
        )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def page_state(url: str, budget_ms: int) -> tuple[str, dict[str, Any]]:
    """(body's data-ready, the page's JSON summary) after `budget_ms` of virtual time."""
    dom = run_chromium(url, budget_ms, "--dump-dom")
    ready = re.search(r'<body[^>]*data-ready="(\d)"', dom)
    summary = re.search(r'<script id="lragent-summary" type="application/json">(.*?)</script>', dom, re.S)
    assert ready and summary, dom[:2000]
    return ready.group(1), json.loads(summary.group(1))


def screenshot(url: str, budget_ms: int, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    run_chromium(url, budget_ms, f"--screenshot={path}")
    assert path.stat().st_size > 10_000
    return path


def test_page_is_self_contained():
    html = dashboard.page()
    assert "<svg" in html and 'fetch("/lragent/stats"' in html
    assert not re.search(r'(src|href)\s*=\s*"https?:', html), "the page must not load anything from outside"


# ---- canned stats: 20 adapters -------------------------------------------------------

def canned_stats(elapsed: float, adapters: int) -> dict[str, Any]:
    """Counters that grow with time, adapter i busier than i-1."""
    per = {}
    for i in range(adapters):
        req = int(elapsed * 100 * (i + 1))
        per[f"role{i}"] = {
            "requested_tokens": req, "base_hit_tokens": req * 8 // 10, "lr_hit_tokens": req * (30 + i) // 100,
            "lr_gap_tokens": req // 2, "lr_inserted_tokens": req, "lr_evicted_tokens": req // 10,
            "lr_tokens": 500 + 10 * i, "lr_bytes": (500 + 10 * i) * 64,
        }
    return {"schedulers": [{
        "scheme": "base-shared",
        "base": {"tokens": 2000, "bytes": 2000 * 1024, "inserted_tokens": int(elapsed * 300), "evicted_tokens": int(elapsed * 50)},
        "lr": {"tokens": 5000, "bytes": 5000 * 64, "inserted_tokens": int(elapsed * 300), "evicted_tokens": int(elapsed * 30)},
        "per_lr_key": per, "lr_pool_size": 10000, "lr_pool_available": 4000,
    }]}


@pytest.fixture
def canned_server() -> Iterator[str]:
    """The page served by `dashboard.make_handler`, forwarding to a canned-stats upstream."""
    start = time.monotonic()

    class Upstream(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.startswith("/server_info"):
                body = {"lora_paths": [f"role{i}" for i in range(20)]}
            else:
                body = canned_stats(time.monotonic() - start, 20)
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
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


@pytest.mark.slow
def test_twenty_adapters_top_n_and_others(canned_server):
    ready, summary = page_state(canned_server, 8000)
    assert ready == "1", summary
    assert set(summary["panels"]) == PANELS and all(summary["panels"][p] > 0 for p in PANELS), summary
    assert summary["adapters"] == 20 and len(summary["shown"]) == 8 and summary["others"] == 12
    assert summary["shown"][0] == "role19", "the busiest adapters are drawn"
    assert "others (12)" in summary["latest"]["base_hit_rate"]
    assert summary["latest"]["base_hit_rate"]["role19"] == pytest.approx(80, abs=1)
    screenshot(canned_server, 8000, "dashboard-20-adapters.png")


# ---- the real server under traffic -------------------------------------------------------

PREFIX_TOKENS = 64
VOCAB = (1000, 40000)


def traffic(srv: ServerProcess, roles: list[str], stop: threading.Event) -> None:
    """Requests from each role over one shared prefix with a fresh tail, until `stop`."""
    rng = random.Random(0)
    prefix = [rng.randrange(*VOCAB) for _ in range(PREFIX_TOKENS)]
    sampling = {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True}
    while not stop.is_set():
        for role in roles:
            tail = [rng.randrange(*VOCAB) for _ in range(8)]
            try:
                srv.generate(input_ids=prefix + tail, lora_path=role, sampling_params=sampling)
            except requests.RequestException:
                if not stop.is_set():
                    raise


@pytest.mark.e2e
@pytest.mark.slow
def test_dashboard_against_server_under_traffic(smollm2, tmp_path):
    chromium()
    adapters = make_role_adapters(smollm2, tmp_path / "adapters", shared_v_a=True)
    args = [
        "--model-path", str(smollm2), "--dtype", "float32", "--enable-lora",
        "--lora-paths", *[f"{r}={p}" for r, p in adapters.items()],
        "--max-loras-per-batch", str(len(adapters)), "--max-lora-rank", "8",
        "--lragent-scheme", "base-lr-shared",
    ]
    stop = threading.Event()
    with ServerProcess(args, log_path=tmp_path / "server.log") as srv:
        roles = list(adapters)
        worker = threading.Thread(target=traffic, args=(srv, roles, stop), daemon=True)
        worker.start()
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                state = requests.get(srv.url + "/lragent/stats", timeout=30).json()["schedulers"][0]
                if sum(e["requested_tokens"] for e in state.get("per_lr_key", {}).values()) > 0:
                    break
                time.sleep(0.5)
            url = srv.url + dashboard.ROUTE
            ready, summary = page_state(url, 20000)
            shot = screenshot(url, 20000, "dashboard.png")
        finally:
            stop.set()
            worker.join(timeout=60)
    assert ready == "1", (summary, srv.log_tail())
    assert summary["scheme"] == "base-lr-shared" and summary["adapters"] == len(adapters)
    assert "shared-lr" in summary["lr_keys"]
    assert all(summary["panels"][p] > 0 for p in PANELS), summary
    hit = summary["latest"]["base_hit_rate"]["shared-lr"]
    assert hit is None or hit > 0, "the shared prefix hits"
    assert shot.exists()

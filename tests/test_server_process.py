"""ServerProcess's start-up on a port another socket took first (what failed the CI: the
ephemeral port chosen for the server became some connection's local port before SGLang
listened, uvicorn could not bind, and SGLang hung in shutdown until the 300 s timeout).
A fake server module stands in for SGLang, so this takes seconds.
"""

from __future__ import annotations

import functools
import socket
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from lragent_sglang.agents import cluster, server_process
from lragent_sglang.agents.server_process import BIND_FAILED, ServerProcess, free_port

FAKE_SERVER = f'''
import http.server, json, sys, time
port = int(sys.argv[sys.argv.index("--port") + 1])

class AnyGet(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # /health for us, the model and server info for the router
        body = json.dumps({{"model_path": "fake", "is_generation": True}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

try:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), AnyGet)
except OSError:
    print("ERROR:    [Errno 98] {BIND_FAILED} ('127.0.0.1', %d): address already in use" % port, flush=True)
    time.sleep(3600)  # as SGLang does: it waits in shutdown instead of exiting
server.serve_forever()
'''


def test_free_port_is_below_the_ephemeral_range_and_free():
    low = int(server_process.LOCAL_PORT_RANGE.read_text().split()[0])
    for _ in range(20):
        port = free_port()
        assert 10000 <= port < low
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", port))


@pytest.fixture
def taken_first(tmp_path: Path, monkeypatch) -> Iterator[int]:
    """The fake server importable as `fake_sglang`, and free_port() answering first with a
    port another socket holds (as an outgoing connection's local port would)."""
    (tmp_path / "fake_sglang.py").write_text(textwrap.dedent(FAKE_SERVER))
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        answers = iter([port])
        monkeypatch.setattr(server_process, "free_port", lambda: next(answers, None) or free_port())
        yield port


@pytest.mark.skipif(sys.platform != "linux", reason="the fake server's bind error text is Linux's")
def test_a_port_taken_before_the_server_listens_is_replaced(tmp_path: Path, taken_first: int):
    srv = ServerProcess([], startup_timeout=20, env={"PYTHONPATH": str(tmp_path)}, module="fake_sglang",
                        log_path=tmp_path / "server.log")
    with srv:
        assert srv.port != taken_first
        assert srv.args[-2:] == ["--port", str(srv.port)]
        assert requests.get(srv.url + "/health", timeout=5).status_code == 200


@pytest.mark.skipif(sys.platform != "linux", reason="the fake server's bind error text is Linux's")
def test_the_router_gets_the_ports_the_workers_ended_up_on(tmp_path: Path, taken_first: int, monkeypatch):
    """Worker 0's first port is taken; the real router must route to where it listens."""
    monkeypatch.setattr(cluster, "ServerProcess", functools.partial(ServerProcess, module="fake_sglang"))
    with cluster.Cluster([], 2, "round_robin", env={"PYTHONPATH": str(tmp_path)}, startup_timeout=20,
                         log_dir=tmp_path) as c:
        urls = {w.url for w in c.workers}
        assert f"http://127.0.0.1:{taken_first}" not in urls
        assert c.router is not None and c.router.healthy_workers() == urls


def test_free_port_falls_back_to_any_port_when_the_ephemeral_range_starts_low(tmp_path: Path, monkeypatch):
    """Hosts tuned for many connections set ip_local_port_range to 1024-65535."""
    fake_range = tmp_path / "ip_local_port_range"
    fake_range.write_text("1024\t65535\n")
    monkeypatch.setattr(server_process, "LOCAL_PORT_RANGE", fake_range)
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))

"""ServerProcess's start-up on a port another socket took first (what failed the CI: the
ephemeral port chosen for the server became some connection's local port before SGLang
listened, uvicorn could not bind, and SGLang hung in shutdown until the 300 s timeout).
A fake server module stands in for SGLang, so this takes seconds.
"""

from __future__ import annotations

import socket
import sys
import textwrap
from pathlib import Path

import pytest
import requests

from lragent_sglang.agents import server_process
from lragent_sglang.agents.server_process import BIND_FAILED, ServerProcess, free_port

FAKE_SERVER = f'''
import http.server, sys, time
port = int(sys.argv[sys.argv.index("--port") + 1])

class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()

try:
    server = http.server.HTTPServer(("127.0.0.1", port), Health)
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


@pytest.mark.skipif(sys.platform != "linux", reason="the fake server's bind error text is Linux's")
def test_a_port_taken_before_the_server_listens_is_replaced(tmp_path: Path, monkeypatch):
    (tmp_path / "fake_sglang.py").write_text(textwrap.dedent(FAKE_SERVER))
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken_port = taken.getsockname()[1]
        ports = iter([taken_port, free_port()])
        monkeypatch.setattr(server_process, "free_port", lambda: next(ports))
        srv = ServerProcess([], startup_timeout=20, env={"PYTHONPATH": str(tmp_path)}, module="fake_sglang",
                            log_path=tmp_path / "server.log")
        with srv:
            assert srv.port != taken_port
            assert srv.args[-2:] == ["--port", str(srv.port)]
            assert requests.get(srv.url + "/health", timeout=5).status_code == 200

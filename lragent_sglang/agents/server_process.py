"""Start our launcher as a child process, wait until it serves, and always stop it.

Used by the README demo, the tests and notebooks. The server runs in its own process
group on 127.0.0.1 on a free port, so stopping it kills SGLang's scheduler and
detokenizer processes too, whatever state they are in.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

logger = logging.getLogger(__name__)


LOCAL_PORT_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
# What uvicorn logs when the port was taken between free_port() and its bind; SGLang then
# hangs in shutdown instead of exiting, so the log is the only quick sign.
BIND_FAILED = "error while attempting to bind on address"
START_ATTEMPTS = 3
MIN_PORT = 10000


class ServerError(RuntimeError):
    """The server exited or never became healthy; the message holds its log's tail."""


class PortTaken(ServerError):
    """Another socket took the chosen port before the server could listen on it."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now, below the kernel's ephemeral range.

    A port from the ephemeral range (what bind(0) gives) can be taken as the local port of
    any outgoing connection during the seconds SGLang needs before it listens; the CI saw
    exactly that. Ports below the range are only ever taken by an explicit bind.
    """
    low = int(LOCAL_PORT_RANGE.read_text().split()[0]) if LOCAL_PORT_RANGE.exists() else 32768
    candidates = [0] if low < MIN_PORT + 1000 else random.Random(os.urandom(8)).sample(range(MIN_PORT, low), 200)
    for port in candidates:  # [0]: the range starts too low to avoid; the start-up retry covers it
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise ServerError(f"no free TCP port on 127.0.0.1 in {MIN_PORT}..{low - 1}")


class ServerProcess:
    """`with ServerProcess(["--model-path", m, ...]) as srv: requests.post(srv.url + ...)`.

    `args` are launcher flags (ours and SGLang's); host and port are chosen here.
    """

    def __init__(
        self,
        args: list[str],
        startup_timeout: float = 300.0,
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
        module: str = "lragent_sglang.server.launch_server",
    ) -> None:
        self.launch_args = list(args)
        self.startup_timeout = startup_timeout
        self.env = {**os.environ, **(env or {})}
        self.module = module
        self.log_path = log_path or Path(tempfile.mkstemp(prefix="lragent-server-", suffix=".log")[1])
        self.proc: subprocess.Popen[bytes] | None = None
        self._pick_port()

    def _pick_port(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [*self.launch_args, "--host", "127.0.0.1", "--port", str(self.port)]

    def start(self) -> "ServerProcess":
        """Launch and wait for /health; a port lost to another socket gets a new one."""
        for _ in range(START_ATTEMPTS - 1):
            try:
                return self._launch()
            except PortTaken:
                logger.warning("port %d was taken before the server listened; retrying", self.port)
                self._pick_port()
        return self._launch()

    def _launch(self) -> "ServerProcess":
        logger.info("starting %s on %s (log: %s)", self.module, self.url, self.log_path)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", self.module, *self.args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                start_new_session=True,
            )
        self._wait_healthy()
        return self

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                tail = self.log_tail()
                self.stop()
                raise ServerError(f"server exited with code {self.proc.returncode}:\n{tail}")
            tail = self.log_tail()
            if BIND_FAILED in tail:
                self.stop()
                raise PortTaken(f"port {self.port} was taken before the server listened:\n{tail}")
            try:
                if requests.get(self.url + "/health", timeout=5).status_code == 200:
                    logger.info("server ready on %s", self.url)
                    return
            except requests.RequestException:
                pass
            time.sleep(1.0)
        tail = self.log_tail()
        self.stop()
        raise ServerError(f"server not healthy after {self.startup_timeout:.0f} s:\n{tail}")

    def stop(self) -> None:
        """Kill the whole process group (SIGTERM, then SIGKILL after 15 s)."""
        if self.proc is None or self.proc.returncode is not None and not self._group_alive():
            return
        for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and self._group_alive():
                time.sleep(0.2)
            if not self._group_alive():
                break
        if self.proc.poll() is None:
            self.proc.wait(timeout=5)

    def _group_alive(self) -> bool:
        assert self.proc is not None
        self.proc.poll()
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def generate(self, **payload: Any) -> dict[str, Any]:
        """POST /generate and return the JSON body (raises on HTTP errors)."""
        resp = requests.post(self.url + "/generate", json=payload, timeout=600)
        resp.raise_for_status()
        return resp.json()

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

"""Start our launcher as a child process, wait until it serves, and always stop it.

Used by the README demo, the tests and notebooks. The server runs in its own process
group on 127.0.0.1 with an ephemeral port, so stopping it kills SGLang's scheduler and
detokenizer processes too, whatever state they are in.
"""

from __future__ import annotations

import logging
import os
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


def free_port() -> int:
    """An ephemeral TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerError(RuntimeError):
    """The server exited or never became healthy; the message holds its log's tail."""


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
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [*args, "--host", "127.0.0.1", "--port", str(self.port)]
        self.startup_timeout = startup_timeout
        self.env = {**os.environ, **(env or {})}
        self.module = module
        self.log_path = log_path or Path(tempfile.mkstemp(prefix="lragent-server-", suffix=".log")[1])
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> "ServerProcess":
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

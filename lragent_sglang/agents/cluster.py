"""N workers (our launcher) behind SGLang's router (`sglang_router.launch_router`), started
and stopped together: the scale-out recipe of README "Scaling out", for tests, the router
benchmark and `scripts/serve_router.py`.

Each worker is a `ServerProcess`; the router is the PyPI package `sglang-router` (its Rust
gateway) in its own process group, started once every worker serves and ready once it
lists them all as healthy. `policy="manual"` routes by the `X-SMG-Routing-Key` header
(`LRAgentEndpoint` sends one key per trajectory) and assigns a key seen first to the
worker with the fewest keys in flight (`--assignment-mode min_group`).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import requests

from lragent_sglang.agents.server_process import ServerError, ServerProcess, free_port

logger = logging.getLogger(__name__)

POLICIES = ("manual", "cache_aware", "round_robin", "random", "power_of_two")
# Router flags per policy: new routing keys go to the worker with the fewest keys in flight.
POLICY_FLAGS: dict[str, tuple[str, ...]] = {"manual": ("--assignment-mode", "min_group")}


def check_policy(policy: str) -> None:
    if policy not in POLICIES:
        raise ValueError(f"router policy must be one of {', '.join(POLICIES)}, got {policy!r}")


class RouterProcess:
    """`python -m sglang_router.launch_router` on 127.0.0.1 over `worker_urls`."""

    def __init__(self, worker_urls: Sequence[str], policy: str, extra: Sequence[str] = (),
                 startup_timeout: float = 180.0, log_path: Path | None = None) -> None:
        check_policy(policy)
        self.worker_urls = list(worker_urls)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = ["--host", "127.0.0.1", "--port", str(self.port), "--worker-urls", *self.worker_urls,
                     "--policy", policy, *POLICY_FLAGS.get(policy, ()), *extra]
        self.startup_timeout = startup_timeout
        self.log_path = log_path or Path(tempfile.mkstemp(prefix="lragent-router-", suffix=".log")[1])
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> "RouterProcess":
        logger.info("starting sglang_router on %s over %s (log: %s)", self.url, self.worker_urls, self.log_path)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "sglang_router.launch_router", *self.args],
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        self._wait_ready()
        return self

    def healthy_workers(self) -> set[str]:
        body = requests.get(self.url + "/workers", timeout=5).json()
        return {w["url"] for w in body.get("workers", []) if w.get("is_healthy")}

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise ServerError(f"router exited with code {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if set(self.worker_urls) <= self.healthy_workers():
                    logger.info("router ready on %s", self.url)
                    return
            except (requests.RequestException, ValueError):
                pass
            time.sleep(1.0)
        self.stop()
        raise ServerError(f"router not ready after {self.startup_timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)
        except ProcessLookupError:
            pass


class Cluster:
    """`with Cluster(worker_args, n=2, policy="manual") as c: requests.post(c.url + ...)`.

    `worker_args` are launcher flags for every worker (`per_worker[i]` appended for worker
    i); workers start one after another (each loads the model), then the router.
    """

    def __init__(self, worker_args: Sequence[str], n: int, policy: str, router_args: Sequence[str] = (),
                 per_worker: Sequence[Sequence[str]] = (), log_dir: Path | None = None,
                 startup_timeout: float = 600.0, env: dict[str, str] | None = None) -> None:
        if n < 1:
            raise ValueError(f"a cluster needs at least one worker, got {n}")
        check_policy(policy)
        log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="lragent-cluster-"))
        log_dir.mkdir(parents=True, exist_ok=True)
        self.workers = [
            ServerProcess([*worker_args, *(per_worker[i] if i < len(per_worker) else ())], startup_timeout,
                          env=env, log_path=log_dir / f"worker{i}.log")
            for i in range(n)
        ]
        self.policy, self.router_args, self.log_dir = policy, tuple(router_args), log_dir
        self.router: RouterProcess | None = None
        self.url = ""

    def start(self) -> "Cluster":
        """Workers first (a worker may move to another port while starting), then the router."""
        try:
            for worker in self.workers:
                worker.start()
            self.router = RouterProcess([w.url for w in self.workers], self.policy, self.router_args,
                                        log_path=self.log_dir / "router.log")
            self.url = self.router.url
            self.router.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.router is not None:
            self.router.stop()
        for worker in self.workers:
            worker.stop()

    def __enter__(self) -> "Cluster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

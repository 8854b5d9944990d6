"""Start N workers (our launcher) and SGLang's router over them, and serve until Ctrl-C:
the scale-out recipe of README "Scaling out" in one command.

    python scripts/serve_router.py --workers 2 [--policy manual] -- \
        --model-path M --enable-lora --lora-paths plan=P action=P reflect=P \
        --lragent-scheme base-lr-shared --mem-fraction-static 0.4

Everything after `--` goes to every worker; `--policy manual` (the default) routes by the
`X-SMG-Routing-Key` header that `LRAgentEndpoint` sends per trajectory. Prints the router's
address (point `LRAgentEndpoint` there) and each worker's (its dashboard and statistics).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from lragent_sglang.agents.cluster import POLICIES, Cluster


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--policy", choices=POLICIES, default="manual")
    parser.add_argument("--log-dir", type=Path, default=Path("artifacts/cluster"))
    parser.add_argument("worker_flags", nargs=argparse.REMAINDER, help="after --: flags for every worker")
    args = parser.parse_args(argv)
    flags = [f for f in args.worker_flags if f != "--"]
    if "--model-path" not in flags:
        parser.error("give the workers' flags after --, --model-path at least")
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with Cluster(flags, args.workers, args.policy, log_dir=args.log_dir) as cluster:
        print(f"router ({args.policy}): {cluster.url}")
        for i, worker in enumerate(cluster.workers):
            print(f"worker {i}: {worker.url} (dashboard {worker.url}/lragent/dashboard)")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

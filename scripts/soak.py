"""A soak of the real server (issue 17): many agent trajectories at once for minutes, with
streamed and plain requests, clients that leave mid-stream, bad requests, and an adapter
unloaded and loaded again under the same name with other weights while it runs.

One server per scheme. Before the soak: the greedy outputs of a fixed probe set (a few
prompts, each without an adapter and with every role), cache flushed before it. Then
`--duration` seconds of `--concurrency` trajectories: each grows a random trajectory to a
random length in `--context MIN MAX` in random steps, every step a request with a random
role (or none), streamed or not; some clients close the stream after a few tokens; some
requests are bad on purpose (ids outside the vocabulary, wrong JSON types, unknown
adapters, empty or mis-shaped inputs) and must get a 4xx; requests with the churned
adapter may get a 4xx while it is unloaded. A churn thread unloads `--churn-name` and loads
it again, cycling its weights through the role folders. After the soak:

- reload check: one fresh prompt is cached with the churned adapter, the adapter reloaded
  with the next folder's weights, the prompt sent with that folder's role and then with the
  churned adapter; the two outputs must be equal (LR / V rows keyed by content, not name);
- every good request succeeded, every bad one got a 4xx, the server is healthy;
- after /flush_cache the KV pool and the LR pool are whole again;
- the probe set's outputs are identical to those before the soak.

Prints a table, writes JSON; exit status 1 if any check failed.

    python scripts/soak.py --model-path M --lora-paths plan=P action=P reflect=P \
        --schemes base-lr-shared base-shared --duration 600 --concurrency 64 \
        --context 1024 16384 [--out F] [-- extra SGLang flags]
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import requests
from tqdm import tqdm

from lragent_sglang.agents.server_process import ServerProcess
from lragent_sglang.scheme import Scheme

logger = logging.getLogger(__name__)

#: tokens a probe generates; prompts per probe set
PROBE_GEN, PROBE_PROMPTS = 16, 3
#: share of the good requests that are streamed
P_STREAM = 0.5


def bad_requests(vocab: int, context_len: int) -> list[tuple[str, dict]]:
    """(what, body) of requests the server must answer with a 4xx and survive."""
    ids = [100, 101, 102]
    return [
        ("id above the vocabulary", {"input_ids": [999999999], "lora_path": "plan"}),
        ("id = vocabulary size", {"input_ids": [*ids, vocab]}),
        ("negative id", {"input_ids": [-1]}),
        ("unknown adapter", {"input_ids": ids, "lora_path": "no-such-adapter"}),
        ("empty input", {"input_ids": []}),
        ("lora_path list for one prompt", {"input_ids": ids, "lora_path": ["plan", "action"]}),
        ("float max_new_tokens", {"input_ids": ids, "sampling_params": {"max_new_tokens": 3.7}}),
        ("string temperature", {"input_ids": ids, "sampling_params": {"temperature": "hot"}}),
        ("unknown sampling field", {"input_ids": ids, "sampling_params": {"bogus": 1}}),
        ("prompt longer than the context", {"input_ids": [100] * (context_len + 1)}),
    ]


class Soak:
    """Counters of one soak, shared by its client threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.failures: list[str] = []

    def add(self, **counts: int) -> None:
        with self.lock:
            self.counts.update(counts)

    def fail(self, what: str) -> None:
        with self.lock:
            self.counts["failed"] += 1
            if len(self.failures) < 20:
                self.failures.append(what[:300])


def generate(url: str, ids: list[int], role: str | None, n_gen: int, stream: bool,
             leave_after: int | None = None) -> tuple[int, list[int], int]:
    """(HTTP status, output ids, cached tokens) of one greedy request; a stream the client
    leaves after `leave_after` chunks returns what arrived until then."""
    payload: dict = {"input_ids": ids, "stream": stream,
                     "sampling_params": {"max_new_tokens": n_gen, "temperature": 0, "ignore_eos": True}}
    if role:
        payload["lora_path"] = role
    with requests.post(url + "/generate", json=payload, stream=stream, timeout=1800) as resp:
        if resp.status_code != 200:
            logger.info("role %s: %d %s", role, resp.status_code, resp.text[:200])
            return resp.status_code, [], 0
        if not stream:
            out = resp.json()
            return 200, out["output_ids"], out["meta_info"]["cached_tokens"]
        last: dict = {"output_ids": [], "meta_info": {"cached_tokens": 0}}
        chunks = 0
        for line in resp.iter_lines():
            if not line.startswith(b"data:") or line.strip() == b"data: [DONE]":
                continue
            last = json.loads(line[5:])
            if "error" in last:  # SGLang's error event (a refusal after the stream began)
                logger.info("role %s: streamed error %s", role, last["error"])
                error = last["error"]
                return int(error.get("code", 500)) if isinstance(error, dict) else 500, [], 0
            chunks += 1
            if leave_after is not None and chunks >= leave_after:
                break  # closing the connection is the client leaving
        return 200, last["output_ids"], last["meta_info"]["cached_tokens"]


def client(url: str, seed: int, args: argparse.Namespace, roles: list[str], deadline: float,
           soak: Soak, bar: tqdm) -> None:
    """Trajectories one after another until the deadline."""
    rng = random.Random(seed)
    bad = bad_requests(args.vocab_size, args.context_len)
    while time.monotonic() < deadline:
        target = rng.randint(*args.context)
        traj = [rng.randrange(100, args.vocab) for _ in range(rng.randint(16, 512))]
        soak.add(trajectories=1)
        while len(traj) < target and time.monotonic() < deadline:
            traj += [rng.randrange(100, args.vocab) for _ in range(rng.randint(8, max(8, target // 4)))]
            draw = rng.random()
            try:
                if draw < args.bad_share:
                    what, body = rng.choice(bad)
                    status = requests.post(url + "/generate", json=body, timeout=300).status_code
                    soak.add(bad=1, bad_4xx=int(400 <= status < 500))
                    if not 400 <= status < 500:
                        soak.fail(f"bad request '{what}' got {status}")
                    continue
                role = rng.choice([None, *roles, args.churn_name])
                leave = rng.randint(1, 3) if draw < args.bad_share + args.leave_share else None
                stream = leave is not None or rng.random() < P_STREAM
                n_gen = rng.choice([8, 16, 32, 64])
                status, out, cached = generate(url, traj, role, n_gen, stream, leave)
            except requests.RequestException as exc:
                soak.fail(f"{type(exc).__name__}: {exc}")
                continue
            churned = role == args.churn_name
            if status != 200:
                if churned and 400 <= status < 500:
                    soak.add(churn_refused=1)  # asked while it was unloaded
                else:
                    soak.fail(f"role {role} ({len(traj)} tokens, stream {stream}) got {status}")
                continue
            soak.add(requests=1, left=int(leave is not None), prompt_tokens=len(traj), cached_tokens=cached,
                     generated=len(out))
            if leave is None:
                traj += out
            bar.update(1)


def churn(url: str, name: str, folders: list[str], deadline: float, period: float, soak: Soak,
          state: dict) -> None:
    """Unload `name` and load it with the next folder's weights every `period` seconds."""
    while time.monotonic() + period < deadline:
        time.sleep(period)
        state["index"] = (state["index"] + 1) % len(folders)
        if not reload(url, name, folders[state["index"]], soak):
            return


def reload(url: str, name: str, folder: str, soak: Soak) -> bool:
    """Unload then load adapter `name` from `folder`; False (a failure) if either is refused.
    A request naming `name` between the two gets a 400 (it is not loaded), so the load must
    land: stock SGLang loaded the old weights again for such a request and the new load
    answered "already loaded"."""
    for path, body in (("/unload_lora_adapter", {"lora_name": name}),
                       ("/load_lora_adapter", {"lora_name": name, "lora_path": folder})):
        try:
            resp = requests.post(url + path, json=body, timeout=600)
        except requests.RequestException as exc:
            soak.fail(f"{path}: {exc}")
            return False
        if resp.status_code != 200:
            soak.fail(f"{path} {name}: {resp.status_code} {resp.text[:200]}")
            return False
    soak.add(reloads=1)
    return True


def probe_set(url: str, roles: list[str], vocab: int) -> list[list[int]]:
    """Greedy outputs of fixed prompts, each without an adapter and with every role, one at a time."""
    rng = random.Random(7)
    prompts = [[rng.randrange(100, vocab) for _ in range(n)] for n in (64, 300, 1000)[:PROBE_PROMPTS]]
    outputs = []
    for ids in prompts:
        for role in [None, *roles]:
            status, out, _ = generate(url, ids, role, PROBE_GEN, stream=False)
            if status != 200:
                raise RuntimeError(f"probe with role {role} got {status}")
            outputs.append(out)
    return outputs


def pools_whole(url: str, timeout: float = 120.0) -> dict:
    """Flush the cache (retried while aborted requests drain) and compare the pools with
    their capacity; {'whole': bool, ...} with the figures."""
    deadline = time.monotonic() + timeout
    while True:
        flushed = requests.post(url + "/flush_cache", timeout=60).status_code == 200
        info = requests.get(url + "/server_info", timeout=60).json()
        stats = info["internal_states"][0]["lragent"]
        figures = {"kv_capacity": info["max_total_num_tokens"], "kv_available": stats["kv_pool_available"],
                   "lr_size": stats["lr_pool_size"], "lr_available": stats["lr_pool_available"]}
        whole = flushed and figures["kv_available"] == figures["kv_capacity"] \
            and figures["lr_available"] == figures["lr_size"]
        if whole or time.monotonic() > deadline:
            return {"whole": whole, **figures}
        time.sleep(2)


def reload_check(url: str, args: argparse.Namespace, roles: list[str], folders: list[str], state: dict,
                 soak: Soak) -> bool:
    """A prompt cached under the churned adapter's current weights, the adapter reloaded with
    the next folder's: its output must equal the output of that folder's own role."""
    rng = random.Random(11)
    ids = [rng.randrange(100, args.vocab) for _ in range(512)]
    generate(url, ids, args.churn_name, 1, stream=False)
    state["index"] = (state["index"] + 1) % len(folders)
    if not reload(url, args.churn_name, folders[state["index"]], soak):
        return False
    twin = generate(url, ids, roles[state["index"]], PROBE_GEN, stream=False)
    churned = generate(url, ids, args.churn_name, PROBE_GEN, stream=False)
    return twin[0] == churned[0] == 200 and twin[1] == churned[1]


def run_scheme(scheme: str, args: argparse.Namespace, extra: list[str]) -> dict:
    roles = [pair.split("=", 1)[0] for pair in args.lora_paths]
    folders = [pair.split("=", 1)[1] for pair in args.lora_paths]
    flags = ["--model-path", args.model_path, "--enable-lora",
             "--lora-paths", *args.lora_paths, f"{args.churn_name}={folders[0]}",
             "--lragent-scheme", scheme, *extra]
    soak, state = Soak(), {"index": 0}
    log = args.out.with_suffix(f".{scheme}.log")
    with ServerProcess(flags, log_path=log) as srv:
        info = requests.get(srv.url + "/server_info", timeout=60).json()
        args.context_len = info["max_req_input_len"]
        requests.post(srv.url + "/flush_cache", timeout=60).raise_for_status()
        before = probe_set(srv.url, roles, args.vocab)
        start = time.monotonic()
        deadline = start + args.duration
        bar = tqdm(desc=f"soak {scheme}", unit="req", mininterval=10)
        threads = [threading.Thread(target=client, args=(srv.url, 1000 + i, args, roles, deadline, soak, bar))
                   for i in range(args.concurrency)]
        threads.append(threading.Thread(target=churn, args=(srv.url, args.churn_name, folders, deadline,
                                                            args.churn_period, soak, state)))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        bar.close()
        wall = time.monotonic() - start
        reloaded = reload_check(srv.url, args, roles, folders, state, soak)
        healthy = requests.get(srv.url + "/health", timeout=60).status_code == 200
        pools = pools_whole(srv.url)
        after = probe_set(srv.url, roles, args.vocab)
    counts = dict(soak.counts)
    result = {"scheme": scheme, "wall_s": wall, **counts, "failures": soak.failures, "healthy": healthy,
              "pools": pools, "reload_equal": reloaded, "probes": len(before),
              "probes_equal": sum(a == b for a, b in zip(before, after))}
    result["ok"] = (counts.get("failed", 0) == 0 and healthy and pools["whole"] and reloaded
                    and result["probes_equal"] == len(before) and counts.get("bad", 0) == counts.get("bad_4xx", 0))
    return result


def print_table(args: argparse.Namespace, results: list[dict]) -> None:
    print(f"\nsoak: {args.concurrency} concurrent trajectories, context {args.context[0]}-{args.context[1]}, "
          f"{args.duration:.0f} s, adapter '{args.churn_name}' reloaded every {args.churn_period:.0f} s")
    head = (f"{'scheme':16s} {'min':>5s} {'traj':>6s} {'good req':>8s} {'failed':>6s} {'bad 4xx':>9s} "
            f"{'left':>5s} {'reloads':>7s} {'refused':>7s} {'gen tok':>9s} {'cached':>6s} {'pools':>6s} {'reload':>6s} "
            f"{'probes':>7s} {'ok':>3s}")
    print(head)
    for r in results:
        bad = f"{r.get('bad_4xx', 0)}/{r.get('bad', 0)}"
        cached = r.get("cached_tokens", 0) / r["prompt_tokens"] if r.get("prompt_tokens") else 0.0
        print(f"{r['scheme']:16s} {r['wall_s'] / 60:5.1f} {r.get('trajectories', 0):6d} {r.get('requests', 0):8d} "
              f"{r.get('failed', 0):6d} {bad:>9s} {r.get('left', 0):5d} {r.get('reloads', 0):7d} "
              f"{r.get('churn_refused', 0):7d} "
              f"{r.get('generated', 0):9d} {cached:6.2f} {'whole' if r['pools']['whole'] else 'HELD':>6s} "
              f"{'equal' if r['reload_equal'] else 'DIFF':>6s} {r['probes_equal']:>3d}/{r['probes']:<3d} "
              f"{'yes' if r['ok'] else 'NO':>3s}")
        for failure in r["failures"]:
            print(f"  failure: {failure}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--lora-paths", nargs="+", required=True, help="plan=DIR action=DIR reflect=DIR")
    parser.add_argument("--schemes", nargs="+", default=[str(Scheme.BASE_LR_SHARED), str(Scheme.BASE_SHARED)],
                        choices=[str(s) for s in Scheme if s.shares_base])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of soak per scheme")
    parser.add_argument("--concurrency", type=int, default=64, help="trajectories at once")
    parser.add_argument("--context", type=int, nargs=2, default=[1024, 16384], metavar=("MIN", "MAX"),
                        help="range of trajectory lengths in tokens")
    parser.add_argument("--churn-name", default="spare", help="adapter unloaded and loaded during the soak")
    parser.add_argument("--churn-period", type=float, default=30.0, help="seconds between its reloads")
    parser.add_argument("--bad-share", type=float, default=0.05, help="share of requests that are bad")
    parser.add_argument("--leave-share", type=float, default=0.05, help="share of streams the client leaves")
    parser.add_argument("--vocab", type=int, default=32000, help="token ids drawn below this")
    parser.add_argument("--out", type=Path, default=Path("artifacts/soak.json"))
    parser.add_argument("server_flags", nargs=argparse.REMAINDER, help="after --: extra SGLang flags")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    extra = [f for f in args.server_flags if f != "--"]
    args.vocab_size = json.loads((Path(args.model_path) / "config.json").read_text())["vocab_size"]
    args.vocab = min(args.vocab, args.vocab_size)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results = []
    for scheme in args.schemes:
        results.append(run_scheme(scheme, args, extra))
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                       indent=2))
    print_table(args, results)
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

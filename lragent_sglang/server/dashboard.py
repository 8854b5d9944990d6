"""The live radix-cache dashboard: one static page that polls `/lragent/stats` and, when
the server runs with `--enable-metrics`, SGLang's own `/metrics`.

The page (`dashboard.html`, self-contained: no CDN, the servers it runs next to often
have no internet) is served by our launcher at `GET /lragent/dashboard`. For a server
started by the stock launcher, `python -m lragent_sglang.server.dashboard URL` serves the same
page locally and forwards its reads (FORWARDED) to URL.
"""

from __future__ import annotations

import argparse
import http.server
import urllib.error
import urllib.request
from importlib import resources

PAGE_NAME = "dashboard.html"
ROUTE = "/lragent/dashboard"
FORWARDED = ("/lragent/stats", "/server_info", "/metrics")
# SGLang's own metrics that the page and dashboards/grafana-lragent.json read, as its
# 0.5.17 server exports them (the tests check the page, the Grafana JSON and a live server).
SGLANG_METRICS = (
    "sglang:prompt_tokens_total",
    "sglang:cached_tokens_total",
    "sglang:generation_tokens_total",
    "sglang:num_running_reqs",
    "sglang:num_queue_reqs",
    "sglang:gen_throughput",
    "sglang:token_usage",
    "sglang:cache_hit_rate",
)


def page() -> str:
    """The dashboard's HTML, read from the package (it ships as package data)."""
    return resources.files(__package__).joinpath(PAGE_NAME).read_text(encoding="utf-8")


def add_dashboard_route() -> None:
    """`GET /lragent/dashboard` on SGLang's app, next to `/lragent/stats`."""
    from fastapi.responses import HTMLResponse
    from sglang.srt.entrypoints import http_server

    async def lragent_dashboard() -> HTMLResponse:
        return HTMLResponse(page())

    http_server.app.get(ROUTE)(lragent_dashboard)


def make_handler(upstream: str) -> type[http.server.BaseHTTPRequestHandler]:
    """A handler serving the page at `/` and ROUTE, forwarding FORWARDED paths to `upstream`."""
    html = page().encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path in ("/", ROUTE):
                self.reply(200, "text/html; charset=utf-8", html)
            elif path in FORWARDED:
                self.forward(path)
            else:
                self.reply(404, "text/plain", b"not found")

        def forward(self, path: str) -> None:
            """Pass the upstream's answer on, errors included: a server without
            --enable-metrics answers /metrics with an error, which the page shows as such."""
            try:
                with urllib.request.urlopen(upstream.rstrip("/") + path, timeout=30) as resp:
                    self.reply(resp.status, resp.headers.get("Content-Type", "application/json"), resp.read())
            except urllib.error.HTTPError as exc:
                self.reply(exc.code, exc.headers.get("Content-Type", "text/plain"), exc.read())
            except OSError as exc:
                self.reply(502, "text/plain", f"upstream {upstream}: {exc}".encode())

        def reply(self, status: int, ctype: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    return Handler


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m lragent_sglang.server.dashboard",
        description="Serve the LRAgent radix-cache dashboard for a running server.",
    )
    parser.add_argument("url", help="the server, e.g. http://127.0.0.1:30000")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args(argv)
    server = http.server.ThreadingHTTPServer((args.host, args.port), make_handler(args.url))
    print(f"dashboard for {args.url}: http://{args.host}:{args.port}/", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()

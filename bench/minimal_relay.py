"""The floor for lrproxy's overhead: the least an aiohttp relay can do (bench/run.py).

One aiohttp server and one ClientSession: the request body goes to the upstream at the
same path with its Content-Type and Authorization, and the answer comes back, whole
when the upstream sent a Content-Length, else byte for byte as it arrives (SSE). No
auth, JSON, routing, metrics or logging. Runs on uvloop when it is installed, like
`lrproxy serve`, unless `--loop asyncio`. With `--processes N`, N such relays share the
port (SO_REUSEPORT) under this process, as lrproxy's `server.workers` does: the workers
scenario's reference.

    python bench/minimal_relay.py --listen 127.0.0.1:8181 --upstream http://127.0.0.1:9000
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)


async def relay(request: web.Request) -> web.StreamResponse:
    headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
    if auth := request.headers.get("Authorization"):
        headers["Authorization"] = auth
    url = request.app[UPSTREAM] + request.path_qs
    # content.read(), not request.read(): the request would keep a copy for its lifetime
    async with request.app[SESSION].post(url, data=await request.content.read(),
                                         headers=headers) as up:
        ctype = up.headers.get("Content-Type", "application/octet-stream")
        if up.content_length is not None:
            return web.Response(status=up.status, body=await up.read(),
                                headers={"Content-Type": ctype})
        resp = web.StreamResponse(status=up.status, headers={"Content-Type": ctype})
        await resp.prepare(request)
        async for data in up.content.iter_any():
            await resp.write(data)
        await resp.write_eof()
        return resp


async def _session(app: web.Application) -> AsyncIterator[None]:
    app[SESSION] = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), auto_decompress=False,
        timeout=aiohttp.ClientTimeout(total=None),
    )
    yield
    await app[SESSION].close()


def supervise(n: int) -> None:
    """n relays on the port, each its own process; a SIGTERM here ends them all."""
    argv = [sys.executable, __file__, *sys.argv[1:], "--processes", "1", "--reuse-port"]
    kids = [subprocess.Popen(argv) for _ in range(n)]
    signal.signal(signal.SIGTERM, lambda *_: [k.terminate() for k in kids])
    for k in kids:
        k.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen", default="127.0.0.1:8181", help="HOST:PORT")
    ap.add_argument("--upstream", required=True, help="http://HOST:PORT of the upstream")
    ap.add_argument("--loop", choices=("auto", "asyncio"), default="auto")
    ap.add_argument("--processes", type=int, default=1,
                    help="N relays sharing the port (SO_REUSEPORT), as server.workers")
    ap.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.processes > 1:
        return supervise(args.processes)
    host, _, port = args.listen.rpartition(":")
    app = web.Application(client_max_size=8 * 1024 * 1024)
    app[UPSTREAM] = args.upstream.rstrip("/")
    app.router.add_route("*", "/{tail:.*}", relay)
    app.cleanup_ctx.append(_session)
    loop = None
    if args.loop == "auto":
        try:
            import uvloop
            loop = uvloop.new_event_loop()
        except ImportError:
            pass
    web.run_app(app, host=host, port=int(port), access_log=None, print=None,
                handler_cancellation=True, backlog=1024, loop=loop,
                reuse_port=args.reuse_port or None)


if __name__ == "__main__":
    main()

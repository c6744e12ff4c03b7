"""The bot's HTTP server: probes for a load balancer, Prometheus metrics, and the features
that need the web (the Telegram webhook, the upload page).

It listens on WEB_HOST:WEB_PORT in plain HTTP behind a TLS reverse proxy; the runtime
(`bot.polling.serve`) starts it in webhook mode, and in polling mode when WEB_PORT is set.

    GET /healthz   200 while the process serves (liveness)
    GET /readyz    200, or 503 with what failed: database, Redis, master key, stopping
    GET /metrics   Prometheus text (adapters.metrics)

Adding a feature: build it as its own `aiohttp.web.Application` and pass it in `sub_apps`
under its prefix, where the runtime builds the server (`bot.polling.web_app`), e.g.
`sub_apps={"/upload/": upload.build_app(...)}`. Its routes then live under that prefix and
its on_startup/on_cleanup run with the server's. Mind that the request body limit
(`client_max_size`, 1 MiB) is the root application's: a feature taking big bodies reads
them as a stream (`request.content`), not with `request.read()` or `post()`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.asyncio import Redis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from adapters import metrics
from adapters.keys import load_or_create_master_key

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 2.0  # a dependency slower than this is as good as down for a balancer
STOP_TIMEOUT_S = 10.0  # how long requests in flight may take when the server stops


@dataclass
class Readiness:
    """What /readyz checks. `stopping` is set on SIGTERM, so the balancer stops sending
    here while the work in flight finishes."""

    engine: AsyncEngine
    key_file: Path
    redis_url: str | None = None
    stopping: bool = False
    _redis: Redis | None = field(default=None, init=False, repr=False)

    async def failures(self) -> dict[str, str]:
        """Each failed check with a short reason (an error's class name, never its text:
        that could hold a connection string)."""
        checks: dict[str, Awaitable[object]] = {
            "database": self._database(),
            "master_key": asyncio.to_thread(load_or_create_master_key, self.key_file, create=False),
        }
        if self.redis_url:
            checks["redis"] = self._redis_ping(self.redis_url)
        results = await asyncio.gather(
            *(asyncio.wait_for(check, PROBE_TIMEOUT_S) for check in checks.values()),
            return_exceptions=True,
        )
        failed = {
            name: "timeout" if isinstance(result, TimeoutError) else type(result).__name__
            for name, result in zip(checks, results, strict=True)
            if isinstance(result, BaseException)
        }
        if self.stopping:
            failed["stopping"] = "SIGTERM"
        return failed

    async def _database(self) -> None:
        async with self.engine.connect() as connection:
            await connection.execute(text("SELECT 1"))

    async def _redis_ping(self, url: str) -> None:
        if self._redis is None:  # one client, its connections kept between probes
            self._redis = Redis.from_url(url, socket_connect_timeout=PROBE_TIMEOUT_S)
        await self._redis.ping()

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()


def build_web_app(
    readiness: Readiness,
    refresh_gauges: Callable[[], Awaitable[None]],
    *,
    routes: Iterable[web.RouteDef] = (),
    sub_apps: Mapping[str, web.Application] | None = None,
) -> web.Application:
    """The server's application: the probes and /metrics, plus the features' `routes` (the
    webhook) and `sub_apps` (prefix -> application, see the module's docstring)."""

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def readyz(_: web.Request) -> web.Response:
        failed = await readiness.failures()
        if failed:
            log.warning("not ready: %s", ", ".join(sorted(failed)))
            return web.json_response({"ok": False, "failed": failed}, status=503)
        return web.json_response({"ok": True})

    async def metrics_text(_: web.Request) -> web.Response:
        try:
            await refresh_gauges()
        except Exception as exc:  # the counters are still worth a scrape; /readyz says why
            log.warning("metrics: gauges not refreshed (%s)", type(exc).__name__)
        body = await asyncio.to_thread(generate_latest, metrics.REGISTRY)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def close_probes(_: web.Application) -> None:
        await readiness.close()

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_text)
    app.router.add_routes(list(routes))
    for prefix, sub_app in (sub_apps or {}).items():
        app.add_subapp(prefix, sub_app)
    app.on_cleanup.append(close_probes)
    return app


async def start_server(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Listen on host:port; `await runner.cleanup()` stops it (requests in flight finish).

    No access log: paths and addresses say who talks to the bot, and logs carry ids only."""
    runner = web.AppRunner(
        app, access_log=None, handle_signals=False, shutdown_timeout=STOP_TIMEOUT_S
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError:
        await runner.cleanup()
        raise
    log.info("web server listening on %s:%s", host, port)
    return runner

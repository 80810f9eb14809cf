"""The console's HTTP server (aiohttp): the page, its static files, and the JSON API it polls.

    GET  /                                         the page (static/index.html)
    GET  /api/dag                                  repos, pipelines (state, lag, workers), edges
    GET  /api/jobs[?pipeline=P]                    jobs, newest first, with counts and progress
    GET  /api/jobs/P/J                             one job with its datums (failed first, slowest)
    GET  /api/jobs/P/J/datums/D/log                the end of a datum's log, as text
    GET  /api/workers[?pipeline=P]                 lag, desired and running workers over time
    GET  /api/repos/R/commits[?branch=B]           a branch's commits, newest first, provenance
    GET  /api/repos/R/commits/C/files              a commit's files
    POST /api/jobs/P/J/rerun                       rerun the job's failed datums (token required)

Reading follows datumflow.console.auth; errors come as JSON `{"error": ...}` with 404 for what
does not exist, 503 when the broker or the store does not answer (or no planner took a rerun in
time), 400 for any other refusal.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from datumflow.console import auth
from datumflow.console.samples import Sampler
from datumflow.console.views import Views
from datumflow.errors import DatumflowError, NotFound, TemporaryError

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
PAGE_FILES = {"console.js": "text/javascript", "console.css": "text/css"}

VIEWS = web.AppKey("views", Views)
SAMPLER = web.AppKey("sampler", Sampler)
TOKEN = web.AppKey("token", str)
LOOPBACK = web.AppKey("loopback", bool)


@web.middleware
async def _guard(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    app = request.app
    if not auth.may_read(
        loopback=app[LOOPBACK],
        token=app[TOKEN],
        headers=request.headers,
        query=request.query,
        cookies=request.cookies,
    ):
        return _error(401, "this console needs its token: open the URL `datumflow up` printed")
    try:
        return await handler(request)
    except NotFound as exc:
        return _error(404, str(exc))
    except TemporaryError as exc:  # the broker or the store, or no planner took a rerun in time
        return _error(503, str(exc))
    except DatumflowError as exc:
        return _error(400, str(exc))


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


PAGE_HEADERS = {
    "Cache-Control": "no-store",
    # The page runs only its own script (no inline code), loads nothing from elsewhere, and never
    # sends its URL, which may carry the token, to another site.
    "Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline';"
    " frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}


async def _page(request: web.Request) -> web.StreamResponse:
    response = web.FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)
    given = request.query.get(auth.TOKEN_QUERY, "")
    if auth.same(given, request.app[TOKEN]):
        # The page's own requests then carry it without it staying in the address bar.
        response.set_cookie(auth.TOKEN_COOKIE, given, httponly=True, samesite="Strict")
    return response


async def _static(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    if name not in PAGE_FILES:
        raise web.HTTPNotFound()
    return web.FileResponse(
        STATIC / name, headers={"Content-Type": PAGE_FILES[name], "Cache-Control": "no-cache"}
    )


async def _dag(request: web.Request) -> web.Response:
    return web.json_response(await request.app[VIEWS].dag(request.app[SAMPLER].latest()))


async def _jobs(request: web.Request) -> web.Response:
    pipeline = request.query.get("pipeline", "")
    return web.json_response({"jobs": await request.app[VIEWS].jobs(pipeline)})


async def _job(request: web.Request) -> web.Response:
    m = request.match_info
    return web.json_response(await request.app[VIEWS].job(m["pipeline"], m["job"]))


async def _log(request: web.Request) -> web.Response:
    m = request.match_info
    text = await request.app[VIEWS].datum_log(m["pipeline"], m["job"], m["datum"])
    return web.Response(text=text, content_type="text/plain")


async def _workers(request: web.Request) -> web.Response:
    sampler = request.app[SAMPLER]
    pipeline = request.query.get("pipeline", "")
    return web.json_response({"period": sampler.period, "series": sampler.series(pipeline)})


async def _commits(request: web.Request) -> web.Response:
    branch = request.query.get("branch", "master")
    return web.json_response(await request.app[VIEWS].commits(request.match_info["repo"], branch))


async def _files(request: web.Request) -> web.Response:
    m = request.match_info
    return web.json_response(await request.app[VIEWS].files(m["repo"], m["commit"]))


async def _rerun(request: web.Request) -> web.Response:
    if not auth.may_act(token=request.app[TOKEN], headers=request.headers):
        return _error(401, f"rerunning needs the console's token in the {auth.TOKEN_HEADER} header")
    m = request.match_info
    return web.json_response(await request.app[VIEWS].rerun(m["pipeline"], m["job"]))


def make_app(
    *,
    views: Views,
    sampler: Sampler,
    token: str,
    loopback: bool,
) -> web.Application:
    """The console's application: `token` guards it as datumflow.console.auth says."""
    if not token:
        raise ValueError("the console needs a token (for its one action, at least)")
    app = web.Application(middlewares=[_guard])
    app[VIEWS] = views
    app[SAMPLER] = sampler
    app[TOKEN] = token
    app[LOOPBACK] = loopback
    app.router.add_get("/", _page)
    app.router.add_get("/static/{name}", _static)
    app.router.add_get("/api/dag", _dag)
    app.router.add_get("/api/jobs", _jobs)
    app.router.add_get("/api/jobs/{pipeline}/{job}", _job)
    app.router.add_get("/api/jobs/{pipeline}/{job}/datums/{datum}/log", _log)
    app.router.add_post("/api/jobs/{pipeline}/{job}/rerun", _rerun)
    app.router.add_get("/api/workers", _workers)
    app.router.add_get("/api/repos/{repo}/commits", _commits)
    app.router.add_get("/api/repos/{repo}/commits/{commit}/files", _files)
    return app


async def start_site(
    app: web.Application, *, host: str, port: int, fallback: bool
) -> tuple[web.AppRunner, int]:
    """Serve `app` on host:port; with `fallback`, on a free port when that one is taken (a second
    `datumflow up` on the machine). The runner and the port bound."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            if not fallback or exc.errno != errno.EADDRINUSE:
                raise DatumflowError(
                    f"the console cannot listen on {host}:{port}: {exc.strerror}; choose"
                    " another with --address or DATUMFLOW_CONSOLE_ADDRESS"
                ) from None
            log.warning("console: %s:%d is taken; listening on a free port instead", host, port)
            site = web.TCPSite(runner, host, 0)
            await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound = next(a for a in runner.addresses if isinstance(a, tuple))
    return runner, int(bound[1])


async def serve_until(app: web.Application, runner: web.AppRunner, stop: asyncio.Event) -> None:
    """Sample workers until `stop`, then close the server."""
    sampler = app[SAMPLER]
    try:
        await sampler.run(stop)
    finally:
        await runner.cleanup()

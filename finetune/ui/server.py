"""The web UI's server: a Starlette app with one static page, a JSON API, a server-sent-events stream per run,
and the files of the output root. `create_app` builds it (the tests drive it with Starlette's TestClient);
`main` serves it with uvicorn.

    GET  /                     the page (the token of this launch embedded in it)
    GET  /api/runs             run folders under the root, each with its state; the configs a run may start from
    GET  /api/events?run=NAME  server-sent events: metrics, status, pictures, evaluation, settings
    GET  /files/PATH           a picture, JSON or text file under the root
    POST /api/start            {"config": NAME, "overrides": ["section.key=value", ...]}
    POST /api/stop, /api/resume               {"run": NAME}
    POST /api/sample           {"run": NAME, "prompt", "num_inference_steps", "guidance_scale", "seed", "scheduler",
                                "num_images_per_prompt"};  GET /api/sample: the job's progress and images
"""

import html
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from . import runs
from .launcher import Launcher, Refused, config_files
from .sampling import Busy, Sampler, SampleRequest
from .security import LOCAL_HOSTS, TOKEN_HEADER, host_allowed, inside, servable, token_matches
from .watch import FolderChanges

STATIC = Path(__file__).resolve().parent / "static"
# A stream reads its run folder when the folder changes (watch.py), at most once every GAP_SECONDS (a run logging
# at every step writes many lines a second), and otherwise every LIVE_SECONDS (a run killed while holding its lock
# changes no file). Without inotify: metrics.jsonl every POLL_SECONDS (the live view's delay is about half of it),
# the rest of the folder (status, pictures, evaluation, settings) every FULL_POLLS-th poll.
LIVE_SECONDS = 2.0
GAP_SECONDS = 0.25
POLL_SECONDS = 0.25
FULL_POLLS = 4
KEEPALIVE_SECONDS = 15
COOKIE = "finetune_ui_token"
# The page loads nothing from elsewhere and runs no inline script.
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
                               "connect-src 'self'; frame-ancestors 'none'; form-action 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


@dataclass
class Settings:
    """What every request needs: the folders, the token, the names this server answers to, and whether reads need
    the token too (when the server listens beyond this machine)."""

    root: Path
    configs: Path
    token: str
    port: int
    hosts: set[str]
    remote: bool


class Guard:
    """ASGI middleware in front of every route: a Host header that is not this server's is refused (a page from
    another site whose name was pointed here, DNS rebinding), and so is a POST without the token in its
    X-Finetune-Token header or not sent as JSON; with `remote`, so is every request without the token (header,
    cookie, or `?token=` on the page itself, which then sets the cookie)."""

    def __init__(self, app, settings: Settings):
        self.app, self.settings = app, settings

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            problem = self.problem(Request(scope))
            if problem:
                return await JSONResponse({"error": problem}, status_code=403, headers=HEADERS)(scope, receive, send)
        await self.app(scope, receive, send)

    def problem(self, request: Request) -> str | None:
        settings = self.settings
        host = request.headers.get("host")
        if not host_allowed(host, settings.hosts, settings.port):
            return (f"Host {host!r} is not this server's name ({', '.join(sorted(settings.hosts))}): open "
                    f"http://127.0.0.1:{settings.port}/, or start the server with --allowed-host NAME")
        token = request.headers.get(TOKEN_HEADER)
        if request.method == "POST":
            if not token_matches(token, settings.token):
                return f"missing or wrong {TOKEN_HEADER} header: reload the page (each server launch has a new token)"
            if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
                return "send the request body as application/json"
        elif settings.remote and not any(token_matches(given, settings.token) for given in
                                         (token, request.cookies.get(COOKIE), request.query_params.get("token"))):
            return "this server listens beyond this machine: open it with the ?token=... URL it printed at start"
        return None


def create_app(root: str | Path, configs: str | Path = "configs", token: str = "", port: int = 7860,
               hosts: set[str] = frozenset(LOCAL_HOSTS), remote: bool = False, env: dict | None = None) -> Starlette:
    """The web UI for the runs under `root`, starting runs from the YAML files in `configs`. `token` guards every
    POST (and with `remote` every request); `hosts` and `port` are what Host headers may name. `env` is added to
    the environment of the runs it launches."""
    settings = Settings(Path(root), Path(configs), token, port, set(hosts), remote)
    app = Starlette(routes=[
        Route("/", page),
        Route("/static/{name}", static),
        Route("/api/runs", list_runs),
        Route("/api/events", events),
        Route("/files/{path:path}", files),
        Route("/api/start", start, methods=["POST"]),
        Route("/api/stop", stop, methods=["POST"]),
        Route("/api/resume", resume, methods=["POST"]),
        Route("/api/sample", sample, methods=["GET", "POST"]),
    ])
    app.state.settings = settings
    app.state.launcher = Launcher(settings.root, settings.configs, env)
    app.state.sampler = Sampler(settings.root)
    app.add_middleware(Guard, settings=settings)
    return app


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _error(message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=HEADERS)


def run_folder(request: Request, name) -> Path | None:
    """The run folder `name` (relative to the root) when it lies under the root and is a run, else None."""
    root = _settings(request).root
    folder = inside(root, name) if isinstance(name, str) else None
    return folder if folder is not None and folder != root.resolve() and runs.is_run(folder) else None


async def page(request: Request) -> Response:
    settings = _settings(request)
    text = (STATIC / "index.html").read_text().replace("{{token}}", html.escape(settings.token, quote=True))
    response = HTMLResponse(text, headers={**HEADERS, "Cache-Control": "no-store"})
    if settings.remote and token_matches(request.query_params.get("token"), settings.token):
        response.set_cookie(COOKIE, settings.token, httponly=True, samesite="strict")
    return response


async def static(request: Request) -> Response:
    """The page's own script and style sheet (the static folder's files, by exact name)."""
    name = request.path_params["name"]
    types = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}
    if name not in {p.name for p in STATIC.iterdir()} or Path(name).suffix not in types:
        return _error(f"no static file {name!r}", 404)
    return FileResponse(STATIC / name, media_type=types[Path(name).suffix],
                        headers={**HEADERS, "Cache-Control": "no-cache"})


async def list_runs(request: Request) -> Response:
    settings = _settings(request)

    def read():
        found = []
        for name in runs.list_runs(settings.root):
            folder = settings.root / name
            found.append({"name": name, **runs.status(folder), "samplable": runs.samplable(folder)})
        return found

    return JSONResponse({"root": str(settings.root), "runs": await anyio.to_thread.run_sync(read),
                         "configs": config_files(settings.configs)}, headers=HEADERS)


async def events(request: Request) -> Response:
    """The live view of one run as server-sent events, from what its folder holds (runs.RunWatcher)."""
    folder = run_folder(request, request.query_params.get("run"))
    if folder is None:
        return _error(f"no run {request.query_params.get('run')!r} under {_settings(request).root}", 404)
    watcher = runs.RunWatcher(_settings(request).root, folder)
    return StreamingResponse(stream(watcher), media_type="text/event-stream",
                             headers={**HEADERS, "Cache-Control": "no-store", "X-Accel-Buffering": "no"})


async def stream(watcher: runs.RunWatcher):
    """Read the run folder whenever it changed; send what is new, and a comment now and then so a closed page is
    noticed."""
    quiet_since, polls, polled = time.monotonic(), 0, -math.inf
    changes = FolderChanges(watcher.folder, ignore={runs.LAUNCH_LOG})  # (the launched run's output: not news)
    try:
        while True:
            await anyio.sleep(max(0.0, polled + GAP_SECONDS - time.monotonic()))  # (no more often than that)
            changes.arm()  # (before reading: what is written from here on wakes the wait below)
            polled = time.monotonic()
            events = await anyio.to_thread.run_sync(watcher.poll, changes.live or polls % FULL_POLLS == 0)
            polls += 1
            for name, data in events:
                yield f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"
            if events or time.monotonic() - quiet_since >= KEEPALIVE_SECONDS:
                if not events:
                    yield ": keep-alive\n\n"
                quiet_since = time.monotonic()
            await changes.wait(LIVE_SECONDS if changes.live else POLL_SECONDS)
    finally:
        changes.close()


async def files(request: Request) -> Response:
    """A file under the root: pictures, JSON and text only; anything else, or outside the root, is not found."""
    found = servable(_settings(request).root, request.path_params["path"])
    if found is None:
        return _error("not found (only pictures, JSON and text files under the output root are served)", 404)
    path, media_type = found
    return FileResponse(path, media_type=media_type, headers={**HEADERS, "Cache-Control": "no-cache"})


async def _body(request: Request) -> dict:
    try:
        body = await request.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise Refused("the request body must be a JSON object")
    return body


async def start(request: Request) -> Response:
    try:
        body = await _body(request)
        folder = await anyio.to_thread.run_sync(request.app.state.launcher.start, body.get("config"),
                                                body.get("overrides", []))
    except Refused as error:
        return _error(str(error), 409 if "in use" in str(error) else 400)
    return JSONResponse({"run": folder.relative_to(_settings(request).root.resolve()).as_posix()}, headers=HEADERS)


async def stop(request: Request) -> Response:
    return await _on_run(request, lambda launcher, folder: {"message": launcher.stop(folder)})


async def resume(request: Request) -> Response:
    root = _settings(request).root.resolve()
    return await _on_run(request,
                         lambda launcher, folder: {"run": launcher.resume(folder).relative_to(root).as_posix()})


async def _on_run(request: Request, action) -> Response:
    """Do `action(launcher, folder)` for the run the JSON body names; a refusal is the page's message."""
    try:
        body = await _body(request)
    except Refused as error:
        return _error(str(error), 400)
    folder = run_folder(request, body.get("run"))
    if folder is None:
        return _error(f"no run {body.get('run')!r} under {_settings(request).root}", 404)
    try:
        result = await anyio.to_thread.run_sync(action, request.app.state.launcher, folder)
    except Refused as error:
        return _error(str(error), 409)
    return JSONResponse(result, headers=HEADERS)


async def sample(request: Request) -> Response:
    """POST: start drawing images from a run's result; GET: the current job (state, step of total, images)."""
    sampler = request.app.state.sampler
    if request.method == "GET":
        return JSONResponse(sampler.state(), headers={**HEADERS, "Cache-Control": "no-store"})
    try:
        body = await _body(request)
        sample_request = SampleRequest.from_json(body)
    except (Refused, ValueError) as error:
        return _error(str(error), 400)
    folder = run_folder(request, body.get("run"))
    if folder is None:
        return _error(f"no run {body.get('run')!r} under {_settings(request).root}", 404)
    try:
        job = sampler.start(folder, sample_request)
    except Busy as error:
        return _error(str(error), 409)
    except ValueError as error:
        return _error(str(error), 400)
    return JSONResponse(job, headers=HEADERS)


class QuietServer(uvicorn.Server):
    """uvicorn's server, looking for a shutdown once a second instead of ten times: each look wakes the process, and
    on a machine whose cores a run keeps busy every wake-up costs the run more than its own CPU time (watch.py). A
    stop (Ctrl-C, SIGTERM) is seen within a second; the Date header is refreshed once a second either way."""

    async def main_loop(self) -> None:
        counter, should_exit = 0, await self.on_tick(0)
        while not should_exit:
            counter = (counter + 10) % 864000  # (a multiple of 10: uvicorn refreshes its headers at those)
            await anyio.sleep(1.0)
            should_exit = await self.on_tick(counter)

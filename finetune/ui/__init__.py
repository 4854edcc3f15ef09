"""A local web page to start, watch and sample training runs.

    python -m finetune.ui [--root outputs] [--configs configs] [--port 7860]      (or: finetune-ui ...)

It reads what runs already write into their folders under `--root` (the lock, metrics.jsonl, sample grids,
process strips, evaluation.json), so runs started from the command line show too, and a restarted server shows
each run as it is. It starts runs from the YAML files in `--configs` with `section.key=value` overrides (checked
by the trainer's own config loader), stops them with SIGTERM (the trainer writes a checkpoint and exits), resumes
them, and draws images from finished ones.

Security: it listens on 127.0.0.1 only, unless given --host with --allow-remote and a --token; requests whose Host
header is not this server's name are refused (DNS rebinding); every POST needs the random token of this launch,
which the page carries; only pictures, JSON and text files under the root are served (paths resolved first, then
checked to lie under it); nothing is uploaded, and no shell runs anything. Needs the `ui` extra:
pip install -e ".[ui]".
"""

import os

from ..cli import ToolParser, UserError, run

TOKEN_ENV = "FINETUNE_UI_TOKEN"
LOCAL = ("127.0.0.1", "localhost", "::1")


def parse_args(argv: list[str] | None):
    parser = ToolParser(prog="python -m finetune.ui", description=__doc__)
    parser.add_argument("--root", default="outputs", help="the folder whose run folders the page shows and writes")
    parser.add_argument("--configs", default="configs", help="the folder of YAML configs a run may start from")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (another than this machine's "
                                                            "needs --allow-remote and --token)")
    parser.add_argument("--port", type=int, default=7860, help="port to listen on")
    parser.add_argument("--allow-remote", action="store_true",
                        help="allow --host to be an address other machines reach (every request then needs the token)")
    parser.add_argument("--token", default=os.environ.get(TOKEN_ENV),
                        help=f"the token requests must carry (default: ${TOKEN_ENV}, else a random one per launch); "
                             "needed with --allow-remote")
    parser.add_argument("--allowed-host", action="append", default=[],
                        help="a further name the page may be opened by (the Host header), e.g. the machine's name")
    return parser, parser.parse_args(argv)


def check_exposure(host: str, allow_remote: bool, token: str | None) -> None:
    """Listening beyond this machine needs both the explicit flag and a token of at least 16 characters."""
    if host in LOCAL:
        return
    if not allow_remote:
        raise UserError(f"--host {host} would let other machines reach the page, which can start runs: add "
                        "--allow-remote and --token TOKEN, or keep the default 127.0.0.1 (and use an SSH tunnel)")
    if not token or len(token) < 16:
        raise UserError(f"--host {host} with --allow-remote needs --token (or ${TOKEN_ENV}) of at least 16 "
                        "characters, e.g. python -c 'import secrets; print(secrets.token_urlsafe())'")


def serve(argv: list[str] | None = None) -> None:
    parser, args = parse_args(argv)
    check_exposure(args.host, args.allow_remote, args.token)
    try:
        import uvicorn

        from .security import LOCAL_HOSTS, new_token
        from .server import QuietServer, create_app
    except ImportError as error:
        raise UserError(f"the web UI needs starlette and uvicorn ({error.name} is not installed): "
                        "pip install -e \".[ui]\"") from error
    remote = args.host not in LOCAL
    token = args.token or new_token()
    hosts = {*LOCAL_HOSTS, *(name.lower() for name in args.allowed_host)}
    if remote and args.host not in ("0.0.0.0", "::"):
        hosts.add(f"[{args.host}]" if ":" in args.host else args.host.lower())
    app = create_app(args.root, args.configs, token=token, port=args.port, hosts=hosts, remote=remote)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"finetune UI on http://{shown}:{args.port}/{f'?token={token}' if remote else ''}  (runs under "
          f"{os.path.abspath(args.root)}, configs in {os.path.abspath(args.configs)}; Ctrl-C stops the page, not "
          "the runs)", flush=True)
    server = QuietServer(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                        timeout_graceful_shutdown=2))
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    except SystemExit:  # (uvicorn's own exit when it cannot listen)
        if server.started:
            raise
    if not server.started:  # (uvicorn has logged why: the port taken, an address this machine lacks)
        raise UserError(f"could not listen on {shown}:{args.port}; choose another --port, or --host")


def main(argv: list[str] | None = None) -> None:
    run(serve, argv)

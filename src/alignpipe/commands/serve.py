"""`alignpipe serve runs/<name>/<stage> [more stages] [--host H --allow-remote] [--port P]`: an
OpenAI-compatible server (see alignpipe.serving), each stage served under the name `<run>/<stage>`."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_KEY_ENV = "ALIGNPIPE_SERVE_API_KEY"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve stages over an OpenAI-compatible HTTP API")
    p.add_argument("stage_dirs", nargs="+", help="stage folders, runs/<recipe name>/<stage>; served as <recipe>/<stage>")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, loopback)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free one, printed)")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow a non-loopback --host; needs an API key (see --api-key-env)")
    p.add_argument("--api-key-env", default=DEFAULT_KEY_ENV, metavar="VAR",
                   help=f"environment variable holding the API key (default {DEFAULT_KEY_ENV}); when set, every "
                        "request must send Authorization: Bearer <key>, on loopback too")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    from alignpipe.errors import RunError
    from alignpipe.serving import access

    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise RunError(f"alignpipe serve needs {' and '.join(missing)}, which is not installed", key="serve",
                       fix="pip install -e '.[serve]'")
    api_key = os.environ.get(args.api_key_env) or None
    access.check_bind(args.host, args.allow_remote, api_key, args.api_key_env)
    from alignpipe.runtime.threads import set_threads
    from alignpipe.serving import engine, server

    set_threads()
    names = [engine.model_name(Path(d)) for d in args.stage_dirs]
    if len(set(names)) < len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise RunError(f"two stage folders would both be served as {twice}", key="stage_dirs",
                       fix="serve stages whose <run>/<stage> names differ")
    models = [engine.load_served(Path(d)) for d in args.stage_dirs]
    try:
        server.run(models, args.host, args.port, api_key)
    except KeyboardInterrupt:
        pass
    return 0

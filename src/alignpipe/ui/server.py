"""`alignpipe ui`: a local web page over the run folders under RUNS_DIR (ui/page.py), read-only.

Python's ThreadingHTTPServer (nothing to install), on 127.0.0.1 unless told otherwise (another address needs
`--allow-remote`). Every request, on loopback too, follows local_http's rules, as the labelling page's do: the
random access token in the printed address, a `Host` that names this server, no other site's `Origin`, JSON
bodies of bounded size. The only thing the page can start is the labelling page of a human-labelled label
stage (labelling/server.py, on another port with a token of its own), which writes that stage's labels.

    GET  /                                  the page
    GET  /api/runs                          every run and its lineage (ui/runs.py)
    GET  /api/stage?run=R&stage=S           one stage (ui/stage.py)
    GET  /api/samples?run=R&stage=S         its samples beside its parent's
    GET  /api/compare?target=R/S&target=... two or more stages or runs (report/compare.py)
    POST /api/labelling {"run", "stage"}    the address of that stage's labelling page
    POST /api/chat {"run", "stage", "messages", "max_tokens", "temperature", "seed"}
                                            the stage's answer, streamed as JSON lines (ui/chat.py)
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from alignpipe.errors import AlignpipeError
from alignpipe.labelling import server as labelling
from alignpipe.labelling.queue import queue_folder
from alignpipe.local_http import SECURITY_HEADERS, Refused, Rules, bind, is_loopback, rules_for, url_host
from alignpipe.ui import page
from alignpipe.ui.chat import Chats, read_request
from alignpipe.ui.runs import NotFound, RunsDir, run_writer, runs_view
from alignpipe.ui.stage import is_human_label_stage, samples_view, stage_view
from alignpipe.ui.targets import comparison

MAX_TARGETS = 8


class UI:
    """What the handler answers: the runs under one folder, the labelling pages started from the page, and the
    models loaded for chat."""

    def __init__(self, root: Path, host: str, allow_remote: bool) -> None:
        self.runs = RunsDir(root)
        self.host, self.allow_remote = host, allow_remote
        self._labelling: dict[Path, tuple[int, str]] = {}  # queue folder -> (port, token)
        self._lock = threading.Lock()
        self.chats = Chats()

    def runs_page(self) -> dict:
        return runs_view(self.runs)

    def stage(self, run: str, stage: str) -> dict:
        run_dir = self.runs.run(run)
        return stage_view(run_dir, self.runs.stage(run, stage), run_writer(run_dir) is not None)

    def samples(self, run: str, stage: str) -> dict:
        return samples_view(self.runs.stage(run, stage))

    def compare(self, targets: list[str]) -> dict:
        if not 2 <= len(targets) <= MAX_TARGETS:
            raise ValueError(f"compare needs 2 to {MAX_TARGETS} targets, got {len(targets)}")
        return comparison(self.runs, targets)

    def chat(self, run: str, stage: str, body: dict):
        """The stage's streamed answer to the conversation in `body` (ui/chat.py)."""
        return self.chats.answer(self.runs.stage(run, stage), read_request(body))

    def labelling_page(self, run: str, stage: str, request_host: str) -> dict:
        """The address of the stage's labelling page, started on first use (then kept while the UI runs)."""
        folder = queue_folder(self.runs.stage(run, stage))
        if not is_human_label_stage(folder):
            raise ValueError(f"stage {stage!r} is not labelled by people")
        with self._lock:
            if folder not in self._labelling:
                server, url = labelling.start(folder, self.host, 0, self.allow_remote, labelling.target_of(folder))
                threading.Thread(target=server.serve_forever, daemon=True, name=f"labelling {stage}").start()
                self._labelling[folder] = (server.server_address[1], url.rsplit("token=", 1)[1])
            port, token = self._labelling[folder]
        name = request_host if request_host.endswith("]") or ":" not in request_host else request_host.rsplit(":", 1)[0]
        return {"url": f"http://{name}:{port}/?token={token}"}


def _not_found() -> dict:
    raise NotFound("not found")


def _prepend(first: dict, rest):
    """`first`, then the rest of the generator `rest`; closing it closes `rest`."""
    def chunks():
        try:
            yield first
            yield from rest
        finally:
            rest.close()

    return chunks()


def _one(query: dict, key: str) -> str:
    values = query.get(key) or [""]
    return values[0]


class Handler(BaseHTTPRequestHandler):
    """The page's requests; `make_handler` binds the app and the rules."""

    app: UI
    rules: Rules
    timeout = 60  # seconds a connection may sit silent: an idle or trickling client does not hold a thread

    def log_message(self, fmt, *args):  # one quiet server: no line per request
        pass

    def _send(self, code: int, body: bytes, kind: str = "application/json") -> None:
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        for name, value in SECURITY_HEADERS.items():
            self.send_header(name, value)
        if code >= 400:
            self.send_header("Connection", "close")  # a refused body is never read: do not reuse
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def _json(self, data: dict, code: int = 200) -> None:
        self._send(code, json.dumps(data, default=str).encode())

    def _answer(self, work) -> None:
        self._answer_with(work, self._json)

    def _answer_with(self, work, deliver) -> None:
        try:
            self.rules.check_request(self)
            return deliver(work())
        except Refused as no:
            return self._json({"error": no.reason}, no.status)
        except NotFound as err:
            return self._json({"error": str(err)}, 404)
        except (ValueError, AlignpipeError) as err:
            return self._json({"error": err.one_line() if isinstance(err, AlignpipeError) else str(err)}, 400)

    def do_GET(self):
        url = urlparse(self.path)
        query = parse_qs(url.query)
        routes = {"/api/runs": self.app.runs_page,
                  "/api/stage": lambda: self.app.stage(_one(query, "run"), _one(query, "stage")),
                  "/api/samples": lambda: self.app.samples(_one(query, "run"), _one(query, "stage")),
                  "/api/compare": lambda: self.app.compare(query.get("target") or [])}
        if url.path == "/":
            try:
                self.rules.check_request(self)
            except Refused as no:
                return self._json({"error": no.reason}, no.status)
            return self._send(200, page.html().encode(), "text/html; charset=utf-8")
        if url.path not in routes:
            return self._answer(_not_found)
        return self._answer(routes[url.path])

    def _stream(self, chunks) -> None:
        """JSON lines as they come (HTTP/1.0: no length, the end of the answer is the end of the connection)."""
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        for name, value in SECURITY_HEADERS.items():
            self.send_header(name, value)
        self.end_headers()
        try:
            for chunk in chunks:
                self.wfile.write((json.dumps(chunk) + "\n").encode())
                self.wfile.flush()
        except OSError:  # the page went away: stop generating (the generator's finally)
            pass
        finally:
            chunks.close()
            self.close_connection = True

    def do_POST(self):
        route = urlparse(self.path).path
        if route not in ("/api/labelling", "/api/chat"):
            return self._answer(_not_found)
        if route == "/api/labelling":
            def start():
                body = self.rules.read_json_object(self)
                return self.app.labelling_page(str(body.get("run")), str(body.get("stage")),
                                          self.headers.get("Host", ""))

            return self._answer(start)
        chunks = None

        def first():  # the checks, the model's load and the first piece: any failure is a plain answer
            nonlocal chunks
            body = self.rules.read_json_object(self)
            chunks = self.app.chat(str(body.get("run")), str(body.get("stage")), body)
            return next(chunks)

        head = []
        self._answer_with(first, head.append)
        if head:
            self._stream(_prepend(head[0], chunks))


def make_handler(app: UI, rules: Rules) -> type:
    return type("UIHandler", (Handler,), {"app": app, "rules": rules})


def serve(root: Path, host: str = "127.0.0.1", port: int = 8770, allow_remote: bool = False) -> None:
    """Serve the page until interrupted; prints the address, which carries the access token."""
    if not is_loopback(host) and not allow_remote:
        raise AlignpipeError(f"--host {host} is not a loopback address", key="--host",
                             fix="add --allow-remote to serve other machines (every request then needs the printed "
                                 "access token), or use 127.0.0.1")
    if not Path(root).is_dir():
        raise AlignpipeError("no such folder", where=str(root), fix="give the folder `alignpipe run` writes runs "
                             "into (runs_dir of the recipe; default runs/)")
    server = bind(host, port, None)
    rules = rules_for(host, server.server_address[1], allow_remote)
    server.RequestHandlerClass = make_handler(UI(Path(root), host, allow_remote), rules)
    url = f"http://{url_host(host)}:{server.server_address[1]}/?token={rules.token}"
    print(f"alignpipe ui over {root}: open {url}", flush=True)
    print("the address carries the access token: every request needs it; do not share it", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()

"""The labelling page: a local web server over a label stage's queue (`alignpipe label <stage folder>`).

Python's ThreadingHTTPServer, on 127.0.0.1 unless told otherwise (another address needs `--allow-remote`).
Every request, on loopback too, follows local_http's rules: the random access token in the printed address,
a `Host` that names this server, no other site's `Origin`, JSON bodies of bounded size. Items are shown
under random handles made at start, not their queue ids, so a page cannot name one it was not shown.
Each verdict is appended to `labels.jsonl` and fsynced before the page is answered (labelling/queue.py), so a
closed browser or a killed server loses nothing; a restarted server shows the first item still unlabelled.

    GET  /             the page (labelling/page.py)
    GET  /api/state    {"item": the next unlabelled item or null, "labelled", "total", "target"}
    POST /api/label    {"id": the item's handle, "verdict": a | b | tie | both_bad} -> the state
    POST /api/undo     withdraws the caller's own latest standing verdict -> the state

The caller is the page that sent the request (`X-Alignpipe-Client`, a random name each page makes), so two
people labelling one queue each undo their own verdicts.
"""

from __future__ import annotations

import json
import re
import secrets
from pathlib import Path
from urllib.parse import urlparse

from alignpipe.errors import AlignpipeError
from alignpipe.labelling.labellers import HUMAN, VERDICTS
from alignpipe.labelling.page import HTML
from alignpipe.labelling.queue import LabelLog, current, latest_own_verdict, read_log, read_queue
from alignpipe.local_http import SECURITY_HEADERS, Refused, Rules, bind, is_loopback, rules_for, url_host
from alignpipe.runfolder.manifests import read_manifest

CLIENT_HEADER = "X-Alignpipe-Client"
_CLIENT = re.compile(r"[A-Za-z0-9_-]{1,64}")


class Labelling:
    """The queue, the log and who is labelling; what the handler answers."""

    def __init__(self, folder: Path, target: int = 0, labeller: str = HUMAN) -> None:
        self.folder, self.labeller = Path(folder), labeller
        self.items = read_queue(self.folder)
        self.ids = {it["id"] for it in self.items}
        # the page sees each item under a random handle, never its (guessable) queue id
        self.handle_of = {it["id"]: secrets.token_urlsafe(16) for it in self.items}
        self.id_of = {h: i for i, h in self.handle_of.items()}
        self.target = min(target or len(self.items), len(self.items))
        self.log = LabelLog(self.folder)

    def standing(self) -> dict[str, str]:
        return {i: v for i, v in current(read_log(self.folder), self.labeller).items() if i in self.ids}

    def state(self) -> dict:
        done = self.standing()
        nxt = next((it for it in self.items if it["id"] not in done), None)
        item = None if nxt is None else {"id": self.handle_of[nxt["id"]], **{k: nxt[k] for k in ("prompt", "a", "b")}}
        return {"item": item, "labelled": len(done), "total": len(self.items), "target": self.target}

    def label(self, handle: str, verdict: str, client: str = "") -> dict:
        item_id = self.id_of.get(handle)
        if item_id is None or verdict not in VERDICTS:
            raise ValueError(f"unknown item or verdict {verdict!r}")
        self.log.append({"id": item_id, "verdict": verdict, "labeller": self.labeller, "client": client,
                         "vid": secrets.token_hex(8)})
        return self.state()

    def undo(self, client: str = "") -> dict:
        """Withdraw this client's latest verdict that still stands (none left: nothing changes)."""
        with self.log.lock:
            own = latest_own_verdict(read_log(self.folder), self.labeller, client)
            if own is not None:
                self.log.append({"undo": own["id"], "of": own["vid"], "labeller": self.labeller, "client": client})
        return self.state()


def make_handler(app: Labelling, rules: Rules):
    from http.server import BaseHTTPRequestHandler

    class Handler(BaseHTTPRequestHandler):
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
            self._send(code, json.dumps(data).encode())

        def _client(self) -> str:
            name = self.headers.get(CLIENT_HEADER) or ""
            return name if _CLIENT.fullmatch(name) else ""

        def do_GET(self):
            try:
                rules.check_request(self)
            except Refused as no:
                return self._json({"error": no.reason}, no.status)
            route = urlparse(self.path).path
            if route == "/":
                return self._send(200, HTML.encode(), "text/html; charset=utf-8")
            if route == "/api/state":
                return self._json(app.state())
            return self._json({"error": "not found"}, 404)

        def do_POST(self):
            try:
                rules.check_request(self)
                route = urlparse(self.path).path
                if route not in ("/api/label", "/api/undo"):
                    return self._json({"error": "not found"}, 404)
                body = rules.read_json_object(self)
                if route == "/api/label":
                    return self._json(app.label(str(body.get("id")), str(body.get("verdict")), self._client()))
                return self._json(app.undo(self._client()))
            except Refused as no:
                return self._json({"error": no.reason}, no.status)
            except ValueError as err:
                return self._json({"error": str(err)}, 400)

    return Handler


def target_of(folder: Path) -> int:
    """The labels the stage waits for (its `min_labels`), 0 when its manifest names none."""
    manifest = read_manifest(folder) or {}
    wanted = (manifest.get("resolved_config") or {}).get("min_labels") or 0
    return wanted if isinstance(wanted, int) and not isinstance(wanted, bool) and wanted > 0 else 0


def start(folder: Path, host: str = "127.0.0.1", port: int = 8765, allow_remote: bool = False,
          target: int = 0):
    """The labelling server, listening but not yet serving, and its address with the access token."""
    if not is_loopback(host) and not allow_remote:
        raise AlignpipeError(f"--host {host} is not a loopback address", key="--host",
                             fix="add --allow-remote to serve other machines (every request then needs the printed "
                                 "access token), or use 127.0.0.1")
    app = Labelling(folder, target)
    server = bind(host, port, None)
    rules = rules_for(host, server.server_address[1], allow_remote)
    server.RequestHandlerClass = make_handler(app, rules)
    server.labelling = app
    return server, f"http://{url_host(host)}:{server.server_address[1]}/?token={rules.token}"


def serve(folder: Path, host: str = "127.0.0.1", port: int = 8765, allow_remote: bool = False,
          target: int = 0) -> None:
    """Serve the page until interrupted; prints the address, which carries the access token."""
    server, url = start(folder, host, port, allow_remote, target)
    state = server.labelling.state()
    print(f"labelling {folder}: {state['labelled']} of {state['total']} labelled; open {url}", flush=True)
    print("the address carries the access token: every request needs it; do not share it", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()

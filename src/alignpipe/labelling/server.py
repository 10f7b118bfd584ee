"""The labelling page: a local web server over a label stage's queue (`alignpipe label <stage folder>`).

Python's ThreadingHTTPServer, on 127.0.0.1 unless told otherwise. Another address needs `--allow-remote`, and then
every request must carry the random access token printed at start (`?token=` or the `X-Alignpipe-Token` header).
Each verdict is appended to `labels.jsonl` and fsynced before the page is answered (labelling/queue.py), so a
closed browser or a killed server loses nothing; a restarted server shows the first item still unlabelled.

    GET  /             the page (labelling/page.py)
    GET  /api/state    {"item": the next unlabelled item or null, "labelled", "total", "target"}
    POST /api/label    {"id", "verdict": a | b | tie | both_bad} -> the state
    POST /api/undo     withdraws the latest standing verdict -> the state (that item is shown again)
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import secrets
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from alignpipe.errors import AlignpipeError
from alignpipe.labelling.labellers import HUMAN, VERDICTS
from alignpipe.labelling.page import HTML
from alignpipe.labelling.queue import LabelLog, current, read_log, read_queue


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Labelling:
    """The queue, the log and who is labelling; what the handler answers."""

    def __init__(self, folder: Path, target: int = 0, labeller: str = HUMAN) -> None:
        self.folder, self.labeller = Path(folder), labeller
        self.items = read_queue(self.folder)
        self.ids = {it["id"] for it in self.items}
        self.target = min(target or len(self.items), len(self.items))
        self.log = LabelLog(self.folder)

    def standing(self) -> dict[str, str]:
        return {i: v for i, v in current(read_log(self.folder), self.labeller).items() if i in self.ids}

    def state(self) -> dict:
        done = self.standing()
        nxt = next((it for it in self.items if it["id"] not in done), None)
        item = None if nxt is None else {k: nxt[k] for k in ("id", "prompt", "a", "b")}
        return {"item": item, "labelled": len(done), "total": len(self.items), "target": self.target}

    def label(self, item_id: str, verdict: str) -> dict:
        if item_id not in self.ids or verdict not in VERDICTS:
            raise ValueError(f"unknown item {item_id!r} or verdict {verdict!r}")
        self.log.append({"id": item_id, "verdict": verdict, "labeller": self.labeller})
        return self.state()

    def undo(self) -> dict:
        done = self.standing()
        if done:
            self.log.append({"undo": list(done)[-1], "labeller": self.labeller})
        return self.state()


def make_handler(app: Labelling, token: str | None):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt, *args):  # one quiet server: no line per request
            pass

        def _allowed(self) -> bool:
            if token is None:
                return True
            given = self.headers.get("X-Alignpipe-Token") or parse_qs(urlparse(self.path).query).get("token", [""])[0]
            return hmac.compare_digest(given.encode(), token.encode())

        def _send(self, code: int, body: bytes, kind: str = "application/json") -> None:
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, data: dict, code: int = 200) -> None:
            self._send(code, json.dumps(data).encode())

        def do_GET(self):
            if not self._allowed():
                return self._json({"error": "access token missing or wrong"}, 403)
            route = urlparse(self.path).path
            if route == "/":
                return self._send(200, HTML.encode(), "text/html; charset=utf-8")
            if route == "/api/state":
                return self._json(app.state())
            return self._json({"error": "not found"}, 404)

        def do_POST(self):
            if not self._allowed():
                return self._json({"error": "access token missing or wrong"}, 403)
            route = urlparse(self.path).path
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                if route == "/api/label":
                    return self._json(app.label(str(body.get("id")), str(body.get("verdict"))))
                if route == "/api/undo":
                    return self._json(app.undo())
            except (ValueError, json.JSONDecodeError) as err:
                return self._json({"error": str(err)}, 400)
            return self._json({"error": "not found"}, 404)

    return Handler


def serve(folder: Path, host: str = "127.0.0.1", port: int = 8765, allow_remote: bool = False,
          target: int = 0) -> None:
    """Serve the page until interrupted; prints the address (and the token, off loopback)."""
    if not is_loopback(host) and not allow_remote:
        raise AlignpipeError(f"--host {host} is not a loopback address", key="--host",
                             fix="add --allow-remote to serve other machines (every request then needs the printed "
                                 "access token), or use 127.0.0.1")
    app = Labelling(folder, target)
    token = None if is_loopback(host) else secrets.token_urlsafe(18)
    server = ThreadingHTTPServer((host, port), make_handler(app, token))
    url = f"http://{host}:{server.server_address[1]}/" + (f"?token={token}" if token else "")
    state = app.state()
    print(f"labelling {folder}: {state['labelled']} of {state['total']} labelled; open {url}", flush=True)
    if token:
        print(f"access token (every request must carry it): {token}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()

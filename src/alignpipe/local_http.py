"""The rules every local web page or server that alignpipe starts follows (today the labelling page).

A server on 127.0.0.1 is still reachable by any web page open in the same browser: a page on another site
can POST to it (a "simple" request, e.g. `Content-Type: text/plain`, needs no permission from the server),
and a page whose own name is re-pointed at 127.0.0.1 (DNS rebinding) can even read its answers. So, on
loopback as much as off it:

- every request carries a random access token (`?token=` in the printed address, or `X-Alignpipe-Token`);
- the `Host` header must name this server (127.0.0.1, localhost or [::1] with its port) unless it serves
  other machines (`allow_remote`), which defeats rebinding: a rebound page sends its own name as `Host`;
- a request with an `Origin` header must come from this server's own origin;
- a body is JSON (`Content-Type: application/json`, which a cross-site page cannot send without asking),
  of a declared length no larger than `MAX_BODY`, and a JSON object.

Each check answers with an HTTP status and a short reason instead of a traceback. `bind` opens the socket
(IPv4 or IPv6) and turns "address in use" into one line.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import secrets
import socket
from http.server import ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from alignpipe.errors import AlignpipeError

MAX_BODY = 64 * 1024  # bytes: a label is ~100; nothing a local page sends is near this
TOKEN_HEADER = "X-Alignpipe-Token"
# what every answer carries: no sniffing of types, no framing by other pages, the token never sent onwards
# in a Referer, nothing loaded from elsewhere (the pages are one document with inline script and style)
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "Content-Security-Policy": ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                                "img-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'"),
}


class Refused(Exception):
    """A request that breaks one of the rules: the HTTP status to answer and why."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


def new_token() -> str:
    return secrets.token_urlsafe(18)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def url_host(host: str) -> str:
    """`host` as it stands in a URL (IPv6 addresses in brackets)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def loopback_names(port: int) -> set[str]:
    """The `Host` values a loopback server answers to."""
    return {f"{name}:{port}" for name in ("127.0.0.1", "localhost", "[::1]")}


class Rules:
    """The checks of one server: its token, the `Host` names it answers to (None: any), its body limit."""

    def __init__(self, token: str, hosts: set[str] | None, max_body: int = MAX_BODY) -> None:
        self.token, self.hosts, self.max_body = token, hosts, max_body

    def check_request(self, handler) -> None:
        """Host, Origin and token of a request (any method); raises Refused."""
        host = (handler.headers.get("Host") or "").strip().lower()
        if self.hosts is not None and host not in self.hosts:
            raise Refused(421, f"this server does not answer to Host {host[:80]!r}")
        origin = handler.headers.get("Origin")
        if origin is not None and origin.lower() != f"http://{host}":
            raise Refused(403, f"requests from another origin ({origin[:80]!r}) are refused")
        given = handler.headers.get(TOKEN_HEADER) or parse_qs(urlparse(handler.path).query).get("token", [""])[0]
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            raise Refused(403, "access token missing or wrong: open the address the server printed")

    def read_json_object(self, handler) -> dict:
        """The request's body: a JSON object of at most `max_body` bytes, sent as application/json."""
        kind = (handler.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if kind != "application/json":
            raise Refused(415, "the body must be sent as Content-Type: application/json")
        raw = handler.headers.get("Content-Length")
        if raw is None or not raw.strip().isdigit():
            raise Refused(411, "a body needs a Content-Length of 0 or more bytes")
        length = int(raw)
        if length > self.max_body:
            raise Refused(413, f"the body is larger than {self.max_body} bytes")
        data = handler.rfile.read(length) if length else b"{}"
        try:
            body = json.loads(data)
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
            raise Refused(400, "the body is not JSON") from None
        if not isinstance(body, dict):
            raise Refused(400, "the body must be a JSON object")
        return body


def rules_for(host: str, port: int, allow_remote: bool, token: str | None = None) -> Rules:
    """A loopback server answers only to its loopback names; one serving other machines to any name."""
    hosts = None if (allow_remote and not is_loopback(host)) else loopback_names(port)
    return Rules(token or new_token(), hosts)


def bind(host: str, port: int, handler_class, what: str = "--host/--port") -> ThreadingHTTPServer:
    """A threading HTTP server on `host` (IPv4 or IPv6), or one line saying why it cannot listen there."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET

    class Server(ThreadingHTTPServer):
        address_family = family
        daemon_threads = True

    try:
        return Server((host.strip("[]"), port), handler_class)
    except OSError as err:
        reason = "the port is in use (another server runs there)" if err.errno in (98, 48, 10048) else \
            (err.strerror or str(err))
        raise AlignpipeError(f"cannot listen on {url_host(host)}:{port}: {reason}", key=what,
                             fix="give another --port (0 picks a free one), or stop the other server") from None

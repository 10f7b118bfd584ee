"""Who may talk to `alignpipe serve`: loopback by default, where the Host header must name a loopback
host (a page on another site that rebinds its DNS name to 127.0.0.1 sends its own name); any other
address only with `--allow-remote` and an API key, which every request must then carry as
`Authorization: Bearer <key>`. A key given on loopback is required there too.

(The labelling page has rules of its own, issue 32; the two are to be unified.)
"""

from __future__ import annotations

import hmac
import ipaddress

from alignpipe.errors import AlignpipeError

LOOPBACK_NAMES = {"localhost", "localhost.", "ip6-localhost"}


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address, IPv6 with or without brackets) is a loopback host."""
    host = host.strip("[]").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, allow_remote: bool, api_key: str | None, key_env: str) -> None:
    """Refuse, in one line, to listen off loopback without --allow-remote and a key."""
    if is_loopback(host):
        return
    if not allow_remote:
        raise AlignpipeError(f"--host {host} is not a loopback address", key="--host",
                             fix="add --allow-remote (and set an API key) to serve other machines, or use 127.0.0.1")
    if not api_key:
        raise AlignpipeError(f"serving on {host} needs an API key, and {key_env} is not set", key="--api-key-env",
                             fix=f"export {key_env}=<a long random key>; clients send it as Authorization: Bearer")


def host_name(header: str) -> str:
    """The host part of a Host header value ('127.0.0.1:8000' -> '127.0.0.1', '[::1]:80' -> '::1')."""
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def refusal(bound_host: str, api_key: str | None, host_header: str | None,
            authorization: str | None) -> tuple[int, str] | None:
    """(HTTP status, message) when a request must be refused, else None."""
    if is_loopback(bound_host) and not is_loopback(host_name(host_header or "")):
        return 403, f"Host {host_header!r} is not a loopback name: this server only answers on loopback"
    if api_key is not None:
        given = (authorization or "")
        token = given[7:] if given[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode(), api_key.encode()):
            return 401, "missing or wrong API key: send Authorization: Bearer <key>"
    return None

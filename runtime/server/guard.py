"""Who may talk to the server: Host check, same-origin policy, API key. A pure ASGI middleware.

Why each check:
- Host: a web page can point its own domain name at 127.0.0.1 (DNS rebinding) and so become
  "same-origin" with a local server. When the server listens on loopback only, requests must
  name a loopback host, which a rebinding page cannot do.
- Origin: browsers attach it to cross-site fetches. Even a request whose response the browser
  would hide from the page (a "simple" text/plain POST) would still make the model work, so a
  foreign Origin is refused outright (403) unless it was explicitly allowed, and preflights get
  no CORS grant. Clients that are not browsers send no Origin and are unaffected.
- API key: `Authorization: Bearer <key>`, compared in constant time. The page itself and
  /health stay open so the web UI can load and ask for the key.
"""
from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import os
from collections.abc import Iterable

from starlette.datastructures import Headers

from ggufile.runtime.errors import DEBUG_ENV, printable_line

logger = logging.getLogger("ggufile.server")

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
OPEN_PATHS = frozenset({"/", "/index.html", "/health", "/favicon.ico"})
CORS_METHODS = "GET, POST, OPTIONS"
CORS_HEADERS = "Authorization, Content-Type"


def is_loopback(host: str) -> bool:
    """Exactly a loopback name or address: '127.0.0.1.evil.example' is not one."""
    if host.lower() in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def log_unexpected(what: str, err: BaseException) -> None:
    """One log line for an error nobody foresaw; the traceback only with GGUFILE_DEBUG=1."""
    debug = bool(os.environ.get(DEBUG_ENV))
    logger.error("%s: %s", what, printable_line(f"{type(err).__name__}: {err}"), exc_info=err if debug else None)


def _hostname(host_header: str) -> str:
    """'127.0.0.1:8080' -> '127.0.0.1'; '[::1]:8080' -> '::1'."""
    if host_header.startswith("["):
        return host_header[1:].split("]", 1)[0]
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


class Guard:
    def __init__(self, app, api_key: str | None = None, allowed_hosts: Iterable[str] | None = LOOPBACK_HOSTS,
                 allowed_origins: Iterable[str] = ()):
        self.app = app
        self.api_key = api_key.encode("utf-8") if api_key else None
        self.allowed_hosts = None if allowed_hosts is None else {h.lower() for h in allowed_hosts}
        self.allowed_origins = {o.rstrip("/").lower() for o in allowed_origins}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        host = headers.get("host", "")
        if self.allowed_hosts is not None and not self._host_ok(host):
            return await _deny(send, 403, "this server only answers requests addressed to localhost",
                               "permission_error", "invalid_host")
        origin = headers.get("origin")
        cross = origin is not None and origin.lower() != f"{scope.get('scheme', 'http')}://{host}".lower()
        granted = cross and origin.rstrip("/").lower() in self.allowed_origins
        if cross and not granted:
            return await _deny(send, 403, "cross-origin requests are not allowed (see --cors-origin)",
                               "permission_error", "origin_not_allowed")
        if scope["method"] == "OPTIONS":
            return await _preflight(send, origin if granted else None)
        if self.api_key and scope["path"] not in OPEN_PATHS and not self._key_ok(headers):
            return await _deny(send, 401, _key_message(headers), "invalid_request_error", "invalid_api_key",
                               extra=[(b"www-authenticate", b"Bearer")])
        if granted:
            send = _with_cors(send, origin)
        return await _answered(self.app, scope, receive, send)

    def _host_ok(self, host: str) -> bool:
        name = _hostname(host).lower()
        return name in self.allowed_hosts or is_loopback(name)

    def _key_ok(self, headers: Headers) -> bool:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode("utf-8"), self.api_key)


async def _answered(app, scope, receive, send) -> None:
    """Run the app; an exception that escapes it ends here instead of in uvicorn's traceback log.
    Starlette re-raises every exception after its 500 handler (app.internal_error) has logged
    it in one line and answered, so here only a 500 is sent if nothing was sent yet."""
    started = False

    async def tracked(message):
        nonlocal started
        started = started or message["type"] == "http.response.start"
        await send(message)
    try:
        await app(scope, receive, tracked)
    except Exception:  # noqa: BLE001 -- the last stop before uvicorn's traceback logging
        if not started:
            await _deny(send, 500, "internal server error", "server_error", "internal_error")


def _key_message(headers: Headers) -> str:
    if "authorization" not in headers:
        return "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'."
    return "Incorrect API key provided."


async def _deny(send, status: int, message: str, type: str, code: str, extra=()):
    body = json.dumps({"error": {"message": message, "type": type, "param": None, "code": code}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers + list(extra)})
    await send({"type": "http.response.body", "body": body})


async def _preflight(send, origin: str | None):
    headers = [(b"content-length", b"0")]
    if origin:
        headers += _cors_headers(origin) + [(b"access-control-allow-methods", CORS_METHODS.encode()),
                                            (b"access-control-allow-headers", CORS_HEADERS.encode()),
                                            (b"access-control-max-age", b"600")]
    await send({"type": "http.response.start", "status": 204, "headers": headers})
    await send({"type": "http.response.body", "body": b""})


def _cors_headers(origin: str) -> list[tuple[bytes, bytes]]:
    return [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]


def _with_cors(send, origin: str):
    async def wrapped(message):
        if message["type"] == "http.response.start":
            message = dict(message, headers=list(message.get("headers", [])) + _cors_headers(origin))
        await send(message)
    return wrapped

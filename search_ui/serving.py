"""Cross-site rules for everything ``serve`` answers: the page, Gradio's routes and the JSON API.

A web page on another origin can make a browser send requests to this server (a form post, a
``fetch``), and the browser's CORS check then decides whether the page may *read* the answer; what
the request *did* is done. Gradio's own CORS middleware approves any origin when the server is
reached under a host name other than localhost (``--host 0.0.0.0`` reached as ``myserver.lan``):
preflights echoed with credentials allowed, so a page anywhere could delete a selection.
:class:`CrossSiteGuard`, the outermost layer of the server, replaces that policy:

* **No cross-origin approval unless configured**: a CORS preflight is answered only for an origin
  given with ``serve --cors-origin ORIGIN`` (then with that origin, credentials, GET/POST/DELETE);
  any other preflight gets 403 and no CORS header. ``Access-Control-*`` headers set further in
  (Gradio's) are removed from every answer to another origin.
* **Cross-site requests change nothing**: a browser request from another origin (``Sec-Fetch-Site``
  ``cross-site`` / ``same-site``, or an ``Origin`` other than the server's own, or ``null``) with a
  method other than GET / HEAD / OPTIONS is refused with 403 and one sentence before it reaches a
  route: POST / DELETE on ``/api/v1``, Gradio's events and uploads (adding to a selection from the
  page is a POST). So is a WebSocket opened from another origin. Requests without ``Origin`` and
  ``Sec-Fetch-Site`` (curl, ``requests``, ``gradio_client``) are no browser's, and pass.
* **DNS rebinding**: a server listening on a loopback address answers only requests whose ``Host`` is
  a loopback name (``localhost``, ``127.0.0.1``, ``[::1]``), so a page whose own host name was made
  to resolve to 127.0.0.1 cannot reach it as "same origin".
"""

from __future__ import annotations

import ipaddress
import logging
from urllib.parse import urlsplit

from indexer.errors import UserError

log = logging.getLogger(__name__)

#: Methods that read: a cross-site browser request may still make these (it cannot read the answer).
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def normalise_origin(origin: str) -> str | None:
    """``scheme://host[:port]`` lower-cased with the default port dropped; None when ``origin`` is
    not one (``null``, a path, another scheme)."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    if scheme not in ("http", "https") or not host or parts.path not in ("", "/") or parts.query or parts.username:
        return None
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}" + (f":{port}" if port and port != _DEFAULT_PORTS[scheme] else "")


def parse_cors_origins(origins) -> tuple[str, ...]:
    """``--cors-origin`` values -> normalised origins; refuses anything but ``http(s)://host[:port]``."""
    out = []
    for o in origins or ():
        norm = normalise_origin(str(o))
        if norm is None:
            raise UserError(f"--cors-origin {o!r} is not an origin; pass a scheme, host and optional port "
                            "like --cors-origin https://dashboard.example.com:8443 (no path, no `*`).")
        out.append(norm)
    return tuple(dict.fromkeys(out))


def is_loopback(host: str) -> bool:
    """True for a loopback listening address or host name (``127.0.0.1``, ``::1``, ``localhost``)."""
    host = host.strip("[]").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_name(host_header: str) -> str:
    host_header = host_header.strip().lower()
    if host_header.startswith("["):
        return host_header[1:host_header.find("]")] if "]" in host_header else host_header
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


async def _refuse(scope, receive, send, msg: str) -> None:
    import orjson
    from starlette.responses import Response

    log.warning("refused %s %s: %s", scope.get("method", "WEBSOCKET"), scope.get("path"), msg)
    await Response(orjson.dumps({"error": msg + "."}), status_code=403, media_type="application/json")(scope, receive, send)


class CrossSiteGuard:
    """ASGI middleware enforcing the module's rules. ``origins``: normalised origins allowed to make
    cross-origin requests (:func:`parse_cors_origins`); ``loopback``: the server listens on a loopback
    address only (then ``Host`` must be a loopback name)."""

    def __init__(self, app, origins: tuple[str, ...] = (), loopback: bool = False):
        self.app = app
        self.origins = frozenset(origins)
        self.loopback = loopback

    def _foreign(self, scope, headers, origin: str | None) -> bool:
        """Whether a browser sent this request from another origin than the server's own."""
        site = headers.get("sec-fetch-site")
        if site in ("same-origin", "none"):  # set by the browser itself; a page cannot forge it
            return False
        if site is not None:
            return True
        if origin is None:
            return False  # no browser's cross-origin request (those carry Origin or Sec-Fetch-Site)
        own = normalise_origin(f"{scope.get('scheme', 'http')}://{headers.get('host', '')}")
        return normalise_origin(origin) != own

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        from starlette.datastructures import Headers

        headers = Headers(scope=scope)
        if self.loopback and not is_loopback(_host_name(headers.get("host", "localhost"))):
            return await self._deny(scope, receive, send, f"this server answers only as localhost, not as "
                                    f"{headers.get('host', '')!r} (a page cannot reach it through another host name)")
        origin = headers.get("origin")
        allowed = origin is not None and normalise_origin(origin) in self.origins
        foreign = self._foreign(scope, headers, origin) and not allowed
        method = scope.get("method", "GET")
        if scope["type"] == "websocket":
            if foreign:
                return await self._deny(scope, receive, send, f"a WebSocket from the origin {origin!r} is refused")
            return await self.app(scope, receive, send)
        if method == "OPTIONS" and "access-control-request-method" in headers:
            if allowed:
                return await self._preflight(scope, receive, send, normalise_origin(origin), headers)
            return await _refuse(scope, receive, send, f"cross-origin requests from {origin!r} are not allowed; start "
                                 "the server with --cors-origin ORIGIN to allow a page of that origin")
        if foreign and method not in SAFE_METHODS:
            return await _refuse(scope, receive, send, f"a {method} request from the web page at {origin or 'another site'!r} "
                                 "is refused: cross-site requests change nothing here; send it from the page itself, "
                                 "a script (no Origin header), or an origin given with --cors-origin")
        if origin is None:
            return await self.app(scope, receive, send)
        cors = allowed

        async def send_checked(message):
            if message["type"] == "http.response.start":
                kept = [(k, v) for k, v in message.get("headers", []) if not k.lower().startswith(b"access-control-")]
                if cors:
                    kept += [(b"access-control-allow-origin", normalise_origin(origin).encode("latin-1")),
                             (b"access-control-allow-credentials", b"true"), (b"vary", b"Origin")]
                message = {**message, "headers": kept}
            await send(message)

        return await self.app(scope, receive, send_checked)

    async def _deny(self, scope, receive, send, msg: str) -> None:
        if scope["type"] == "websocket":
            log.warning("refused a WebSocket to %s: %s", scope.get("path"), msg)
            await send({"type": "websocket.close", "code": 1008})
            return
        await _refuse(scope, receive, send, msg)

    @staticmethod
    async def _preflight(scope, receive, send, origin: str, headers) -> None:
        from starlette.responses import Response

        answer = {"Access-Control-Allow-Origin": origin, "Access-Control-Allow-Credentials": "true",
                  "Access-Control-Allow-Methods": "GET, POST, DELETE, HEAD, OPTIONS",
                  "Access-Control-Max-Age": "600", "Vary": "Origin"}
        asked = headers.get("access-control-request-headers")
        if asked:
            answer["Access-Control-Allow-Headers"] = asked
        await Response(status_code=204, headers=answer)(scope, receive, send)

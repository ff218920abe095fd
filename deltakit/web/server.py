"""A small local web server for one page and its JSON API, safe by default (standard library only).

* Bound to ``127.0.0.1`` on a port the system picks; another interface only when asked explicitly (with a warning).
* A random token (``secrets``) in the URL of the page and in a header of every API call, compared in constant time
  (``hmac.compare_digest``); without it every request is refused (403).
* The ``Host`` header must name this server (``127.0.0.1:PORT`` / ``localhost:PORT``): a DNS-rebinding page that
  made ``evil.example`` resolve to 127.0.0.1 is refused. A browser's ``Origin`` (and ``Sec-Fetch-Site``) must be this
  server's own, and API calls must be ``application/json`` POSTs (a cross-site form cannot send them).
* Request bodies need a ``Content-Length`` of at most :data:`MAX_BODY` bytes; each connection has a socket timeout
  (a client that stalls is dropped) and request lines and headers are bounded by ``http.server``.
* :meth:`LocalServer.stop` always ends the serving thread.
"""

from __future__ import annotations

import hmac
import http.server
import ipaddress
import json
import logging
import secrets
import socket
import threading
import warnings
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

from ..errors import DeltaError

logger = logging.getLogger(__name__)

#: Largest request body accepted (a selection of every module of a 70B model is well below it).
MAX_BODY = 4 * 1024 * 1024
#: Seconds a connection may stay silent before it is dropped.
SOCKET_TIMEOUT = 10.0
TOKEN_HEADER = "X-Deltakit-Token"
LOOPBACK = "127.0.0.1"

Handler = Callable[[dict[str, Any]], dict[str, Any]]


class RequestError(DeltaError):
    """A request the server refuses; ``status`` is the HTTP status sent back with the message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_names(host: str) -> set[str]:
    """Names the ``Host`` header may use for a server bound to ``host``."""
    names = {"127.0.0.1", "localhost"} if _is_loopback(host) or host == LOOPBACK else set()
    if host in ("0.0.0.0", "::", ""):  # every interface: this machine's names and addresses
        names |= {"127.0.0.1", "localhost", socket.gethostname().lower(), socket.getfqdn().lower()}
        try:
            names |= {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)}
        except OSError:
            pass
    names.add(host.lower())
    return {f"[{n}]" if ":" in n else n for n in names}


class _HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True  # a stalled client never keeps the process alive; it times out anyway
    app: LocalServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.debug("error while serving %s", client_address, exc_info=True)


class _RequestHandler(http.server.BaseHTTPRequestHandler):
    server: _HTTPServer
    timeout = SOCKET_TIMEOUT
    server_version = "deltakit"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        logger.debug("%s " + format, self.address_string(), *args)

    # -- answers
    def _send(self, status: int, body: bytes, content_type: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("X-Frame-Options", "DENY")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Cross-Origin-Resource-Policy", "same-origin")
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, status: int, payload: dict[str, Any]) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json; charset=utf-8")

    def _refuse(self, exc: RequestError) -> None:
        self.close_connection = True
        self._send_json(exc.status, {"error": str(exc)})

    # -- checks shared by every request
    def _check_host(self) -> None:
        host = (self.headers.get("Host") or "").strip().lower()
        if host not in self.server.app.allowed_hosts:
            raise RequestError(403, f"Host header {host[:100]!r} does not name this server (DNS rebinding?).")

    def _check_token(self, given: str | None) -> None:
        expected = self.server.app.token.encode()
        if given is None or not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected):
            raise RequestError(403, "missing or wrong token: open the URL deltakit printed, with its ?token=...")

    def _check_origin(self) -> None:
        origin = self.headers.get("Origin")
        if origin is not None and origin.lower() not in self.server.app.allowed_origins:
            raise RequestError(403, f"cross-origin request from {origin[:100]!r} refused.")
        site = self.headers.get("Sec-Fetch-Site")
        if site is not None and site not in ("same-origin", "none"):
            raise RequestError(403, f"cross-site request (Sec-Fetch-Site: {site[:40]}) refused.")

    # -- methods
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        try:
            self._check_host()
            url = urlsplit(self.path)
            tokens = parse_qs(url.query).get("token")
            self._check_token(tokens[0] if tokens and len(tokens) == 1 else None)
            self._check_origin()
            if url.path != "/":
                raise RequestError(404 if not url.path.startswith("/api/") else 405,
                                   "not found" if not url.path.startswith("/api/") else "API calls are POST only")
            nonce = secrets.token_urlsafe(16)
            body = self.server.app.page(nonce)
            csp = (f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
                   f"connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
                   f"frame-ancestors 'none'")
            self._send(200, body, "text/html; charset=utf-8", {"Content-Security-Policy": csp})
        except RequestError as exc:
            self._refuse(exc)

    def do_HEAD(self) -> None:  # noqa: N802
        self.do_GET()

    def do_POST(self) -> None:  # noqa: N802
        try:
            self._check_host()
            self._check_token(self.headers.get(TOKEN_HEADER))
            self._check_origin()
            path = urlsplit(self.path).path
            handler = self.server.app.api.get(path)
            if handler is None:
                raise RequestError(404, f"no API call {path[:100]!r}")
            body = self._read_json()
            try:
                answer = handler(body)
            except RequestError:
                raise
            except DeltaError as exc:  # the library refused the request: a message for the page
                raise RequestError(422, str(exc)) from None
            self._send_json(200, answer)
        except RequestError as exc:
            self._refuse(exc)
        except Exception:  # noqa: BLE001 - never leave the browser without an answer; the log has the traceback
            logger.exception("picker API call failed")
            self._send_json(500, {"error": "internal error (see the Python log)"})

    def _read_json(self) -> dict[str, Any]:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            raise RequestError(411, "chunked bodies are not accepted: send Content-Length")
        content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise RequestError(415, "API calls take a JSON body (Content-Type: application/json)")
        length_text = self.headers.get("Content-Length")
        if length_text is None:
            raise RequestError(411, "Content-Length required")
        if not length_text.strip().isdigit():
            raise RequestError(400, f"bad Content-Length {length_text[:40]!r}")
        length = int(length_text)
        if length > MAX_BODY:
            raise RequestError(413, f"request body of {length:,} bytes is over the limit of {MAX_BODY:,}")
        data = self.rfile.read(length)
        if len(data) != length:
            raise RequestError(400, "request body ended early")

        def no_constant(name: str) -> Any:
            raise ValueError(f"{name} is not JSON")

        try:
            body = json.loads(data.decode("utf-8"), parse_constant=no_constant)
        except (UnicodeDecodeError, ValueError) as exc:
            raise RequestError(400, f"malformed JSON body: {exc}") from None
        if not isinstance(body, dict):
            raise RequestError(400, "the JSON body must be an object")
        return body

    def _no_method(self) -> None:
        try:
            self._check_host()
            raise RequestError(405, f"method {self.command} not allowed (the page is GET, API calls are POST)")
        except RequestError as exc:
            self._refuse(exc)

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = _no_method  # noqa: N815


class LocalServer:
    """Serve one page (``GET /?token=...``) and JSON calls (``POST /api/<name>``) on a background thread.

    Args:
        page: ``page(nonce) -> HTML bytes``; inline scripts and styles must carry ``nonce`` (the page's
            Content-Security-Policy allows nothing else).
        api: ``{"/api/name": handler(body dict) -> answer dict}``. A handler raising
            :class:`~deltakit.errors.DeltaError` answers 422 with the message.
        host: Interface to bind (default loopback). Any other interface is reachable from other machines: it is
            only used when passed explicitly, and warns.
        port: TCP port (0: one the system picks).
        allowed_hosts: Extra names the ``Host`` header may use (e.g. a machine name behind ``host="0.0.0.0"``).
    """

    def __init__(
        self,
        page: Callable[[str], bytes],
        api: dict[str, Handler],
        *,
        host: str = LOOPBACK,
        port: int = 0,
        allowed_hosts: tuple[str, ...] = (),
    ) -> None:
        if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
            raise DeltaError(f"port must be an integer from 0 (any free port) to 65535, got {port!r}.")
        if not isinstance(host, str) or not host:
            raise DeltaError(f"host must be an interface address such as '127.0.0.1', got {host!r}.")
        self.page = page
        self.api = dict(api)
        self.host = host
        self.port = port
        self.extra_hosts = tuple(h.lower() for h in allowed_hosts)
        self.token = secrets.token_urlsafe(32)
        self.allowed_hosts: set[str] = set()
        self.allowed_origins: set[str] = set()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> LocalServer:
        """Bind and serve on a daemon thread; returns self. The URL is :attr:`url`."""
        if self._httpd is not None:
            raise DeltaError("This server is already started; stop() it first or create another one.")
        if not _is_loopback(self.host):
            warnings.warn(
                f"Serving on {self.host!r}, not only on this machine: anyone who can reach this interface and learns "
                f"the token (sent in clear over HTTP) can use the page. Use the default 127.0.0.1 unless you need it.",
                stacklevel=3,
            )
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        server_class = type("_Server", (_HTTPServer,), {"address_family": family})
        try:
            httpd = server_class((self.host, self.port), _RequestHandler)
        except OSError as exc:
            raise DeltaError(f"Cannot serve on {self.host}:{self.port}: {exc}. Pass another port (0: any free one).") \
                from None
        httpd.app = self
        self.port = httpd.server_address[1]
        names = _host_names(self.host) | set(self.extra_hosts)
        self.allowed_hosts = {f"{n}:{self.port}" for n in names}
        self.allowed_origins = {f"http://{h}" for h in self.allowed_hosts}
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"deltakit-web-{self.port}", daemon=True)
        self._thread.start()
        return self

    @property
    def url(self) -> str:
        """The page's URL, token included (print it for the user; it is the key to the page)."""
        if self._httpd is None:
            raise DeltaError("The server is not started: call start() first.")
        host = self.host if self.host not in ("0.0.0.0", "::") else "127.0.0.1"
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{self.port}/?token={self.token}"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        """Stop serving, close the socket and end the thread (idempotent)."""
        httpd, thread = self._httpd, self._thread
        self._httpd = self._thread = None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if thread is not None:
            thread.join()

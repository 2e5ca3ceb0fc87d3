"""Cross-site request refusal for state-changing requests, token or not.

A browser sends a cross-site form post or a "simple" `fetch` (text/plain, no preflight)
and only blocks reading the answer. So every POST/PUT/PATCH/DELETE must come from this
server's own origin (or one listed in LAKESYNC_ALLOWED_ORIGINS) by its `Origin` and
`Sec-Fetch-Site` headers (403 otherwise), and its body must be `application/json` (415
otherwise), which a page cannot send cross-site without a CORS preflight that we never
grant. Requests without those headers (curl, scripts, the CLI) are not from a browser.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from lakesync.api.hosts import split_host

STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
#: Sec-Fetch-Site values of a request from this origin, or typed in by the user; any other
#: (cross-site, same-site, or a value no browser sends) is refused
SAFE_SITES = frozenset({"same-origin", "none"})
DEFAULT_PORTS = {"http": "80", "https": "443"}
CROSS_SITE = (
    "Cross-site request refused: state-changing requests must come from this server's own "
    "page (Origin {origin}, Sec-Fetch-Site {site}). To let a page on another origin start or "
    """cancel jobs, list it in LAKESYNC_ALLOWED_ORIGINS, e.g. '["https://ops.example.com"]'."""
)
NOT_JSON = (
    "State-changing requests take a JSON body only: send 'Content-Type: application/json' "
    """(got {given}), e.g. {{"operation": "copy-taskdetail", "options": {{}}}}."""
)


def _origin_key(origin: str) -> tuple[str, str, str]:
    parts = urlsplit(origin.strip().lower())
    port = str(parts.port) if parts.port else DEFAULT_PORTS.get(parts.scheme, "")
    name = parts.hostname or ""
    return parts.scheme, name[:-1] if name.endswith(".") else name, port


def same_origin(origin: str, host: str, scheme: str = "http") -> bool:
    """Whether `origin` names the server the request was sent to: the same scheme as the
    request's (`https` behind a TLS proxy that says so), the Host header's name and port
    (the scheme's default port when the Host has none)."""
    try:
        given, name, port = _origin_key(origin)
    except ValueError:
        return False
    host_name, host_port = split_host(host)
    host_name = host_name.strip("[]")
    scheme = scheme.lower()
    return (
        bool(name)
        and given == scheme
        and name == host_name
        and port == (host_port or DEFAULT_PORTS.get(scheme))
    )


def refusal(
    headers: Headers, allowed_origins: list[str], scheme: str = "http"
) -> tuple[int, str] | None:
    """(status, message) when a state-changing request must be refused, else None."""
    origin = headers.get("origin")
    site = headers.get("sec-fetch-site")
    site = None if site is None else site.strip().lower()  # header values: any case
    listed = origin is not None and origin.strip().lower().rstrip("/") in {
        o.strip().lower().rstrip("/") for o in allowed_origins
    }
    host = headers.get("host", "")
    foreign = origin is not None and not listed and not same_origin(origin, host, scheme)
    if foreign or (site is not None and site not in SAFE_SITES and not listed):
        return 403, CROSS_SITE.format(origin=repr((origin or "none")[:100]), site=site or "none")
    ctype = headers.get("content-type")
    has_body = headers.get("content-length", "0").strip() != "0" or "transfer-encoding" in headers
    if ctype is None and not has_body:
        return None  # e.g. POST .../cancel: nothing to parse
    media = (ctype or "").split(";")[0].strip().lower()
    if media != "application/json":
        return 415, NOT_JSON.format(given=repr(ctype[:100]) if ctype else "no Content-Type")
    return None


class CrossSiteGuard:
    """Refuse cross-site (403) and non-JSON (415) state-changing requests before the app."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in STATE_CHANGING:
            allowed: list[str] = scope["app"].state.runtime.settings.allowed_origins
            refused = refusal(Headers(scope=scope), allowed, scope.get("scheme", "http"))
            if refused is not None:
                status, error = refused
                await JSONResponse({"error": error}, status_code=status)(scope, receive, send)
                return
        await self.app(scope, receive, send)

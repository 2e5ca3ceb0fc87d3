"""Host allow-list: a DNS-rebinding page reaches lakesync under its own name, so only the
names in LAKESYNC_ALLOWED_HOSTS (loopback names by default) are served; others get 400.
The probes `/healthz` and `/readyz` answer any Host: load balancers and orchestrators call
them by address, and they tell nothing a page could use."""

from __future__ import annotations

import ipaddress

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

PROBES = frozenset({"/healthz", "/readyz"})


def split_host(value: str) -> tuple[str, str | None]:
    """A Host header as (name, port): lower case, IPv6 in brackets, without the one trailing
    dot of an absolute name ("localhost." is localhost; "localhost.." is no name)."""
    value = value.strip().lower()
    if value.startswith("["):
        name, _, rest = value.partition("]")
        name += "]"
        port = rest[1:] or None
        if rest and not (rest.startswith(":") and rest[1:].isdigit()):
            return "", None  # garbage after the address
    else:
        name, colon, port_text = value.rpartition(":")
        if not colon or not port_text.isdigit() or ":" in name:
            name, port_text = value, ""
        port = port_text or None
    name = name[:-1] if name.endswith(".") and not name.startswith("[") else name
    if not name or name.endswith(".") or ".." in name or name.startswith("."):
        return "", None
    return name, port


def normalise(entry: str) -> str:
    """An allow-list entry in Host-header form: bare IPv6 literals get their brackets."""
    entry = entry.strip().lower()
    try:
        if ipaddress.ip_address(entry).version == 6:
            return f"[{entry}]"
    except ValueError:
        pass
    return entry


def host_allowed(value: str, allowed: list[str]) -> bool:
    """Whether a Host header matches an entry: `name` (any port), `name:port`, `*.domain`
    (its subdomains) or `*` (anything)."""
    name, port = split_host(value)
    if not name:
        return False
    for entry in map(normalise, allowed):
        if entry == "*" or entry == name or (port is not None and entry == f"{name}:{port}"):
            return True
        if entry.startswith("*.") and name.endswith(entry[1:]):
            return True
    return False


class HostGuard:
    """Answer 400 to a request whose Host header is not in LAKESYNC_ALLOWED_HOSTS."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and scope["path"] not in PROBES:
            allowed: list[str] = scope["app"].state.runtime.settings.allowed_hosts
            host = Headers(scope=scope).get("host", "")
            if not host_allowed(host, allowed):
                shown = host[:100] or "(none)"
                error = (
                    f"Host {shown!r} is not served here: lakesync answers only the names in "
                    "LAKESYNC_ALLOWED_HOSTS (by default localhost, 127.0.0.1 and [::1]), "
                    "which keeps DNS-rebinding pages out. If clients use this name, add it, "
                    """e.g. LAKESYNC_ALLOWED_HOSTS='["lakesync.example.com"]'."""
                )
                await JSONResponse({"error": error}, status_code=400)(scope, receive, send)
                return
        await self.app(scope, receive, send)

"""Who may read the console, and who may act through it.

- Bound to a loopback address (127.0.0.0/8, ::1, localhost), reading needs no token: whoever can
  reach it is on this machine. The request must then name a loopback host (its Host header): a
  page of another site whose name was made to resolve to 127.0.0.1 (DNS rebinding) names its own
  and is refused without the token.
- Bound to any other address, every request needs the token, else 401.
- The one action (rerun a job's failed datums) always needs the token, in a header: a cookie alone
  does not do, so another site cannot make a browser act with it.

The token comes as the `X-Datumflow-Token` header, `Authorization: Bearer <token>`, the `token`
query parameter (the URL `up` prints carries it) or the cookie the page sets from that parameter.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
from collections.abc import Mapping

TOKEN_HEADER = "X-Datumflow-Token"
TOKEN_COOKIE = "datumflow_token"
TOKEN_QUERY = "token"


def new_token() -> str:
    return secrets.token_urlsafe(24)


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or a name the console binds to) is reachable from this machine
    only. An empty host or a wildcard (0.0.0.0, ::) binds every address: not loopback."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def same(given: str, token: str) -> bool:
    return bool(token) and hmac.compare_digest(given.encode(), token.encode())


def header_token(headers: Mapping[str, str]) -> str:
    """The token a request carries in its headers (never a cookie)."""
    given = headers.get(TOKEN_HEADER, "")
    if not given:
        scheme, _, value = headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            given = value.strip()
    return given


def request_token(
    headers: Mapping[str, str], query: Mapping[str, str], cookies: Mapping[str, str]
) -> str:
    """The token a request carries anywhere it may: headers, query, cookie."""
    return header_token(headers) or query.get(TOKEN_QUERY, "") or cookies.get(TOKEN_COOKIE, "")


def names_loopback(host_header: str) -> bool:
    """Whether a Host header (`name[:port]`, `[v6][:port]`) names this machine's loopback."""
    value = host_header.strip().lower()
    if value.startswith("["):
        name = value[1 : value.find("]")] if "]" in value else ""
    else:
        name = value.rpartition(":")[0] if ":" in value else value
    return bool(name) and is_loopback(name)


def may_read(
    *,
    loopback: bool,
    token: str,
    headers: Mapping[str, str],
    query: Mapping[str, str],
    cookies: Mapping[str, str],
) -> bool:
    if same(request_token(headers, query, cookies), token):
        return True
    return loopback and names_loopback(headers.get("Host", ""))


def may_act(*, token: str, headers: Mapping[str, str]) -> bool:
    return same(header_token(headers), token)

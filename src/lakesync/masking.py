"""Secrets never shown: the one masker of URI passwords, AWS keys and tokens.

Log lines, API error bodies, job errors, webhook payloads and storage messages all go
through `masked`, so a secret is hidden the same way wherever it would appear.
"""

from __future__ import annotations

import re
from typing import Any, overload

#: passwords of the configured MongoDB and broker URIs (config.Settings adds them), masked
#: wherever they show up: a malformed URI's password may appear on its own in a driver's error
URI_SECRETS: set[str] = set()

#: user:password@ of a URI; the password runs to the last "@" before the host, so one with
#: an unescaped "@" (a common mistake pymongo then rejects) is still masked whole
_PASSWORD = re.compile(
    r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:@/\s]*):(?P<pw>[^/\s]*)@", re.I
)
#: the same in a malformed URI: `mongodb:/u:pw@h`, `u:pw@h` (no scheme), a "/" in the password
_MALFORMED = re.compile(
    r"(?P<scheme>(?:[a-z][a-z0-9+.-]*:/{0,3})?)(?P<user>[^:@/\s'\"=]*):(?P<pw>[^\s'\"]*)@", re.I
)
#: `scheme://user:password` with no host at all: a "port" that is not a number (at least
#: one slash after the scheme: a time such as `T06:34:30.479Z` is no URI)
_NO_HOST = re.compile(
    r"(?P<scheme>[a-z][a-z0-9+.-]*:/{1,3})(?P<user>[^:@/\s'\"]*):"
    r"(?P<pw>[^\s'\"/@]*[^\d\s'\"/@*][^\s'\"/@]*)(?=[\s'\"/]|$)",
    re.I,
)
#: AWS access key ids (their prefix kept), and secret-looking `key=value` / `key: value`
#: (not the user name of a URI: `mongodb://token:***@host` keeps its host)
_AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA|AROA|AIDA)[A-Z0-9]{12,}\b")
_SECRET_VALUE = re.compile(
    r"(?i)(?<!//)\b(credential|signature|x-amz-security-token|secret[_a-z]*|token)"
    r"(\s*[=:]\s*)[^\s,;&\"'<]+"
)


def _mask_text(text: str) -> str:
    text = _PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)
    text = _MALFORMED.sub(
        lambda m: m[0] if m["pw"] == "***" else f"{m['scheme']}{m['user']}:***@", text
    )
    text = _NO_HOST.sub(lambda m: f"{m['scheme']}{m['user']}:***", text)
    text = _AWS_KEY_ID.sub(r"\1****", text)
    text = _SECRET_VALUE.sub(r"\1\2***", text)
    for secret in sorted(URI_SECRETS, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


@overload
def masked(value: str) -> str: ...
@overload
def masked(value: Any) -> Any: ...
def masked(value: Any) -> Any:
    """``value`` with every secret masked: the password of every URI in it (well-formed or
    not, the user name kept), AWS access key ids, signatures and tokens, and the password of
    a configured URI wherever it appears on its own; in every string however deeply nested."""
    if isinstance(value, str):
        return _mask_text(value)
    if isinstance(value, dict):
        return {k: masked(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [masked(v) for v in value]
    return value

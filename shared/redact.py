"""Credentials out of what is logged: one helper for every URL that reaches a log line or an error.

Broker URLs (``mqtt://user:secret@host``), database URLs (``postgresql+psycopg2://u:secret@db/x``),
Redis URLs (``redis://:secret@redis:6379/0``) and the like may carry a password. Whatever logs or
prints such a URL passes it through ``redact_url`` (one URL) or ``redact_text`` (free text that may
contain URLs, e.g. an exception message from a client library). The password becomes ``***``; the
user name, host, port and path stay, so the line still says where. Query parameters named like a
secret (``password=``, ``token=``, ...) are masked too. Standard library only: ``shared`` is installed
on devices.
"""

from __future__ import annotations

import re
from typing import Final
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK: Final = "***"
# Query parameters whose value is a secret (compared lower-case).
SECRET_PARAMS: Final = frozenset(
    {"password", "passwd", "pass", "pwd", "secret", "token", "access_token", "api_key", "apikey", "key"}
)

# scheme://user:password@ inside free text; the user part stops at ':', '/', '@' or whitespace.
_USERINFO_RE: Final = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@]*):(?P<secret>[^\s@]*)@")
# ?password=... / &token=... inside free text.
_PARAM_RE: Final = re.compile(
    r"(?P<head>[?&](?:" + "|".join(sorted(SECRET_PARAMS, key=len, reverse=True)) + r")=)(?P<secret>[^&\s#]*)",
    re.IGNORECASE,
)


def redact_url(url: str | None) -> str:
    """``url`` with its password (and secret-named query parameters) replaced by ``***``.

    ``None`` gives ``""``; text that does not parse as a URL goes through ``redact_text``."""
    if not url:
        return ""
    try:
        parts = urlsplit(url)
        _ = parts.port  # a malformed port raises ValueError
    except ValueError:
        return redact_text(url)
    if not parts.scheme or not parts.netloc:
        return redact_text(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user, colon, _password = userinfo.partition(":")
        netloc = f"{user}:{MASK}@{hostport}" if colon else netloc
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(name.lower() in SECRET_PARAMS for name, _ in pairs):
            query = urlencode(
                [(name, MASK if name.lower() in SECRET_PARAMS else value) for name, value in pairs],
                safe="*",
            )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@`` in it, and the value of every
    secret-named query parameter, replaced by ``***``."""
    text = _USERINFO_RE.sub(lambda m: f"{m.group('head')}:{MASK}@", text)
    return _PARAM_RE.sub(lambda m: f"{m.group('head')}{MASK}", text)

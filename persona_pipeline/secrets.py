"""Credentials masked out of URLs and of text that shows URLs. Pure, standard library only, so any
module (the CLI's error lines, resources, stores) can use it before anything is shown or logged."""

from __future__ import annotations

import re

MASK = "***"

_WORD = r"[A-Za-z0-9_.-]*"
# Query parameters whose value is a credential (`?key=` too, as some services name their API key).
_SECRET_QUERY_PARAMETER = re.compile(
    rf"(?i)(?P<name>(?<![A-Za-z0-9_.-]){_WORD}(?:key|token|secret|passw(?:or)?d|pwd|credential|signature|auth)"
    rf"{_WORD})=(?P<value>[^&#;\s'\"]*)"
)
# Outside URLs (libpq `password=...`, `api_key=...` in a message) a bare `key=` names a feature key.
_SECRET_TEXT_SETTING = re.compile(
    rf"(?i)(?P<name>(?<![A-Za-z0-9_.-]){_WORD}(?:api[_-]?key|access[_-]?key|token|secret|passw(?:or)?d|pwd|"
    rf"credential){_WORD})=(?P<value>[^&#;,\s'\"]*)"
)
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
# `user:pa/ss@host`: a password with an unescaped slash (which may hide a host's `:port/path@...`;
# masking both is the safe reading).
_SLASHED_PASSWORD = re.compile(r"[^:/?#@]*:[^?#]*/[^?#]*@[^/?#@]*")
# Schemes where a user name alone is an account name, not a token (`postgresql://postgres@host`).
_DATABASE_SCHEME = re.compile(r"(?i)^(postgres(ql)?|mysql|mariadb|sqlite|oracle|mssql)(\+[a-z0-9_]+)?$")


def mask_url(url: str) -> str:
    """`url` with its credentials replaced by `***`: the userinfo's password (and a user name standing
    alone outside database URLs, as in `https://token@host`) and the values of query parameters named
    like key, token, secret, password, api_key. Also takes a line of text and masks every URL in it,
    and `password=...`-style settings outside URLs, so error messages can go through it whole."""
    if not isinstance(url, str) or not url:
        return url
    masked = _URL.sub(lambda match: _mask_one_url(match.group(0)), url)
    return _SECRET_TEXT_SETTING.sub(_masked_setting, masked)


def _mask_one_url(url: str) -> str:
    """Rebuilt by hand, not with urllib's urlunsplit, which turns `sqlite:////abs/path` into `sqlite://abs/path`."""
    scheme, _, rest = url.partition("://")
    authority_end = next((i for i, char in enumerate(rest) if char in "/?#"), len(rest))
    slashed_password = _SLASHED_PASSWORD.match(rest)
    if slashed_password:
        authority_end = slashed_password.end()
    authority, remainder = rest[:authority_end], rest[authority_end:]
    return f"{scheme}://{_masked_authority(scheme, authority)}{_mask_parameters(remainder)}"


def _masked_authority(scheme: str, authority: str) -> str:
    userinfo, at, host = authority.rpartition("@")
    if not at:
        return authority
    user, colon, _password = userinfo.partition(":")
    if colon:
        return f"{user}:{MASK}@{host}"
    if _DATABASE_SCHEME.match(scheme):
        return authority
    return f"{MASK}@{host}"


def _mask_parameters(text: str) -> str:
    return _SECRET_QUERY_PARAMETER.sub(_masked_setting, text)


def _masked_setting(match: re.Match[str]) -> str:
    return f"{match.group('name')}={MASK}"

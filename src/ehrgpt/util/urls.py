"""The one URL masker: credentials never reach a message, a log or a file.

>>> mask_url("postgresql://ann:s3cret@db.example:5432/omop?schema=cdm")
'postgresql://ann:***@db.example:5432/omop?schema=cdm'
>>> mask_url("postgresql://ann@db/omop?schema=cdm&password=s3cret")
'postgresql://ann@db/omop?schema=cdm&password=***'
>>> mask_url("postgresql://db/omop?sslpassword=x&passfile=/p")
'postgresql://db/omop?sslpassword=***&passfile=***'
>>> mask_url("host=db password=s3cret dbname=x")
'host=db password=*** dbname=x'
>>> mask_url("postgresql://postgres@127.0.0.1:1/x")
'postgresql://postgres@127.0.0.1:1/x'
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

#: Query or keyword parameters whose values are secrets.
SECRET_KEYS = frozenset({"password", "sslpassword", "passfile", "sslkey", "token", "secret"})

_KEYWORD = re.compile(r"\b(" + "|".join(sorted(SECRET_KEYS)) + r")\s*=\s*('[^']*'|\S+)", re.I)


def mask_url(url: str) -> str:
    """``url`` with every credential (user password, secret query parameters) as ``***``."""
    text = str(url)
    if "://" not in text:
        return _KEYWORD.sub(lambda m: f"{m.group(1)}=***", text)
    try:
        parts = urlsplit(text)
    except ValueError:
        masked = re.sub(r"(//[^:/@]*:)[^@/]*@", r"\1***@", text)
        return _KEYWORD.sub(lambda m: f"{m.group(1)}=***", masked)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, hostinfo = netloc.rsplit("@", 1)
        if ":" in userinfo:
            userinfo = userinfo.split(":", 1)[0] + ":***"
        netloc = f"{userinfo}@{hostinfo}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode(
            [(k, "***" if k.lower() in SECRET_KEYS else v) for k, v in pairs], safe="*/:"
        )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def mask_secrets(text: str, url: str) -> str:
    """``text`` with any credential of ``url`` (its password, secret parameters) masked.

    For messages from drivers that may echo the connection string.

    >>> mask_secrets("failed for postgresql://a:pw1@h/db", "postgresql://a:pw1@h/db")
    'failed for postgresql://a:***@h/db'
    """
    secrets = set()
    try:
        parts = urlsplit(url)
        if parts.password:
            secrets.add(parts.password)
        for k, v in parse_qsl(parts.query, keep_blank_values=True):
            if k.lower() in SECRET_KEYS and v:
                secrets.add(v)
    except ValueError:
        pass
    text = text.replace(url, mask_url(url))
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, "***")
    return _KEYWORD.sub(lambda m: f"{m.group(1)}=***", text)

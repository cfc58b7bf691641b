"""Secret redaction: the one gate every log line, event and error text goes through.

Three layers, because a secret can reach text in three ways:

- values the process knows are secret (the OAuth client secret, access tokens) are
  registered once and masked wherever they appear, also URL- and JSON-encoded;
- values under a key that names a credential (``secretAccessKey``, ``client_secret``,
  ``password``, ...) are masked whatever they are, in data (``redact``) and in text that
  looks like ``key: value``, ``"key": "value"`` or ``key=value`` (``redact_text``);
- shapes that are credentials by form: the password of a URL (``amqp://user:pass@host``),
  ``Bearer``/``Basic`` authorization values, and JWTs;
- the data PostgreSQL quotes back in its errors (``CONTEXT: JSON data, line 1: ...``,
  a statement's parameter, a failing row, a key): masked whole, whatever it holds. The
  server cuts an excerpt out of the middle of a value, so the key naming a credential is
  often not in it (a job's ``secretAccessKey`` reached an ERROR line this way).
"""

from __future__ import annotations

import functools
import json
import logging
import re
import threading
from collections.abc import Iterable
from collections.abc import Set as AbstractSet
from typing import Any
from urllib.parse import quote, quote_plus

REDACTED = "***"

# Normalised (lower case, no "_" or "-") names of keys whose values are credentials.
# iamRoleARN is deliberately absent: a role ARN names a role, it grants nothing by itself.
SECRET_KEYS = frozenset(
    {
        "accesskey",
        "secretaccesskey",
        "sessiontoken",
        "clientsecret",
        "accesstoken",
        "refreshtoken",
        "idtoken",
        "token",
        "password",
        "passwd",
        "authorization",
        "credentials",
        "secret",
        "apikey",
    }
)

_KEY_NAMES = (
    r"access[_-]?key|secret[_-]?access[_-]?key|session[_-]?token|client[_-]?secret"
    r"|access[_-]?token|refresh[_-]?token|id[_-]?token|token|password|passwd"
    r"|authorization|credentials|secret|api[_-]?key"
)
# key, optional closing quote, separator, then a quoted or a bare value.
_KEY_VALUE = re.compile(
    r"""(?ix)
    (?<![A-Za-z0-9])
    (?P<key>["']?(?:"""
    + _KEY_NAMES
    + r""")["']?)
    (?P<sep>\s*[:=]\s*)
    (?P<value>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|(?:Bearer|Basic)\s+[^\s,;&'"}\]]+|[^\s,;&'"}\]]+)
    """
)
# Greedy up to the last "@" before the path: a password may itself contain "@".
# "secretAccessKey wJalr..." in prose: only a credential-looking value (long, no spaces)
# is masked, so "accessKey and secretAccessKey go together" stays readable.
_KEY_PROSE = re.compile(
    r"(?i)(?<![A-Za-z0-9])(?P<key>" + _KEY_NAMES + r")(?P<sep>\s+)[A-Za-z0-9/+=._~-]{16,}"
)
_AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b")
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@'\"]*:)[^\s/'\"]*(?=@)")
_AUTH_SCHEME = re.compile(r"(?i)\b(?P<scheme>Bearer|Basic)\s+[A-Za-z0-9._~+/=-]+")
# What PostgreSQL quotes back of the data in an error's text (psycopg puts the DETAIL and
# CONTEXT fields in the exception's message): the excerpt, never the words around it.
_DATABASE_ECHO = re.compile(
    r"(?P<head>JSON data, line \d+: )[^\n]*"
    r"|(?P<param>parameter \$\d+ = )'(?:[^']|'')*'"
    r"|(?P<row>Failing row contains )\(.*\)"
    r"|(?P<key>Key \([^)\n]*\)=)\(.*?\)(?= already exists| is (?:not present|still referenced)"
    r"|\s+conflicts)"
    r"|(?P<syntax>invalid input (?:syntax|value) for (?:type )?[\w ]+: )\"(?:[^\"\\]|\\.)*\""
    r"|(?P<token>Token )\"(?:[^\"\\]|\\.)*\"(?= is invalid)"
)
_MAY_ECHO_DATA = re.compile(r"JSON data|parameter \$|Failing row|Key \(|invalid input|Token \"")


def _mask_echo(match: re.Match[str]) -> str:
    for group in ("head", "param", "row", "key", "syntax", "token"):
        if match.group(group) is not None:
            masked = f"({REDACTED})" if group in ("row", "key") else REDACTED
            return match.group(group) + masked
    return REDACTED  # pragma: no cover


_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
# Each pattern above needs one of these in the text (case aside): every key name holds
# key, token, secret, pass, authorization or credentials. Text with none of them (job ids,
# names, most messages) skips the six passes.
_MAY_HOLD_A_FORM = re.compile(
    r"(?i)key|token|secret|pass|authorization|credentials|akia|asia|://|bearer|basic|eyj"
)


class _Registry:
    """The exact values to mask, compiled into one pattern (rebuilt only when they change)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: set[str] = set()
        self.pattern: re.Pattern[str] | None = None

    def update(
        self, add: AbstractSet[str] = frozenset(), remove: AbstractSet[str] = frozenset()
    ) -> None:
        with self._lock:
            values = (self._values | add) - remove
            if values == self._values:
                return
            self._values = values
            # Longest first, so a secret that contains another is masked whole.
            ordered = sorted(values, key=len, reverse=True)
            self.pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None


_registry = _Registry()


def _encodings(value: str) -> set[str]:
    """The forms a secret takes in text: raw, URL-encoded (form bodies), JSON-escaped."""
    return {value, quote(value, safe=""), quote_plus(value), json.dumps(value)[1:-1]}


def register_secret(value: str) -> None:
    """Mask this exact value (and its URL/JSON encodings) in every redacted text."""
    if value:
        _registry.update(add=_encodings(value))


def forget_secret(value: str) -> None:
    """Stop masking a value (an access token that was replaced), so the set stays small."""
    if value:
        _registry.update(remove=_encodings(value))


def _mask_key_value(match: re.Match[str]) -> str:
    value = match.group("value")
    if value[:1] in {'"', "'"}:
        masked = f"{value[0]}{REDACTED}{value[0]}"
    elif value.lower().startswith(("bearer", "basic")):
        masked = f"{value.split()[0]} {REDACTED}"
    else:
        masked = REDACTED
    return f"{match.group('key')}{match.group('sep')}{masked}"


def redact_text(text: str) -> str:
    """The text with registered secrets, credential values, URL passwords and tokens masked."""
    pattern = _registry.pattern
    if pattern is not None:
        text = pattern.sub(REDACTED, text)
    if _MAY_ECHO_DATA.search(text):
        text = _DATABASE_ECHO.sub(_mask_echo, text)
    if not _MAY_HOLD_A_FORM.search(text):
        return text
    return _redact_forms(text)


def _redact_forms(text: str) -> str:
    text = _URL_PASSWORD.sub(lambda m: m.group("head") + REDACTED, text)
    text = _AUTH_SCHEME.sub(lambda m: f"{m.group('scheme')} {REDACTED}", text)
    text = _JWT.sub(REDACTED, text)
    text = _AWS_KEY_ID.sub(REDACTED, text)
    text = _KEY_PROSE.sub(lambda m: m.group("key") + m.group("sep") + REDACTED, text)
    return _KEY_VALUE.sub(_mask_key_value, text)


def is_secret_key(key: object) -> bool:
    """Whether a mapping key names a credential (``secretAccessKey``, ``credentials``...)."""
    return _is_secret_key(key)


def _is_secret_key(key: object) -> bool:
    return isinstance(key, str) and _names_a_secret(key)


# Events and logs ask about the same few dozen keys all day; a bounded memo spares the
# normalising of each (a producer's own keys cannot grow it past its size).
@functools.lru_cache(maxsize=4096)
def _names_a_secret(key: str) -> bool:
    return key.lower().replace("_", "").replace("-", "") in SECRET_KEYS


def redact(obj: Any) -> Any:
    """A deep copy of JSON-like data with credential values masked and strings redacted.

    Dicts, lists and tuples are copied (tuples become lists, as JSON would have them);
    other scalars are returned as they are.
    """
    if isinstance(obj, dict):
        out: dict[Any, Any] = {}
        for key, value in obj.items():
            if value is None:
                out[key] = None
            elif _is_secret_key(key):
                out[key] = REDACTED  # whatever the value, a number included
            elif type(value) in _SCALARS:
                out[key] = value  # numbers and booleans hold no text to redact
            else:
                out[key] = redact(value)
        return out
    if isinstance(obj, list | tuple):
        return [redact(item) for item in obj]
    if isinstance(obj, str):
        return redact_text(obj)
    return obj


_SCALARS = frozenset({int, float, bool})


class RedactingFilter(logging.Filter):
    """Redacts a record's message (and its traceback) in place; never drops a record.

    On a logger it covers records made on that very logger (third-party loggers that log
    request bodies); on a handler it covers everything the handler emits.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            message = str(record.msg)
        record.msg = redact_text(message)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        if record.stack_info:
            record.stack_info = redact_text(record.stack_info)
        return True


_FILTER = RedactingFilter()


def install_log_filter(logger_names: Iterable[str]) -> None:
    """Put the redacting filter on these loggers (idempotent)."""
    for name in logger_names:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)

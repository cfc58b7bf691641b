"""Logging for the whole process: JSON lines for machines, text for people, no secrets.

``setup_logging`` installs one handler on the root logger. Every record goes through
redaction (``worker.redact``) before it is formatted: its message and arguments, the
structured extras (``extra={"job_id": ..., "batch_request_id": ...}``), the traceback and
the stack. Formatting happens after redaction, so a secret cannot slip out through an
encoding the redaction did not see.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, TextIO

from worker.redact import RedactingFilter, redact

# Attributes every LogRecord has; anything else on a record came in through ``extra``.
_RECORD_ATTRIBUTES = frozenset(
    vars(logging.LogRecord("", logging.INFO, "", 0, "", None, None)).keys()
) | {"message", "asctime", "taskName"}

# Chatty at INFO (a line per HTTP connection, per AMQP channel): WARNING unless debugging.
NOISY_LOGGERS = ("botocore", "boto3", "s3transfer", "urllib3", "amqp", "kombu", "pika")

_HANDLER_NAME = "batch-worker"


def extras(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields a record was given through ``extra=``."""
    return {
        key: value
        for key, value in vars(record).items()
        if key not in _RECORD_ATTRIBUTES and not key.startswith("_")
    }


class RedactingRecordFilter(RedactingFilter):
    """``worker.redact.RedactingFilter`` (message, args, traceback, stack) plus the extras."""

    def filter(self, record: logging.LogRecord) -> bool:
        super().filter(record)
        for key, value in extras(record).items():
            setattr(record, key, redact(value))
        return True


def rfc3339(timestamp: float) -> str:
    """``2026-11-25T21:30:00.123Z``: UTC, milliseconds, the form the events use."""
    moment = datetime.fromtimestamp(timestamp, tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, ``fields``, extras, exception.

    ``fields`` go on every line (the daemon's ``worker``: which process wrote it, where
    several write to one collector).
    """

    def __init__(self, fields: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self._fields = dict(fields or {})

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": rfc3339(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **self._fields,
        }
        for key, value in extras(record).items():
            # A field named like one of ours must not overwrite it.
            entry.setdefault(key, value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """``2026-11-25 21:30:00,123 INFO  worker.daemon.engine: started job_id=corsica``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        fields = extras(record)
        if fields:
            line += " " + " ".join(f"{key}={value}" for key, value in fields.items())
        return line


def _wants_json(fmt: str, stream: TextIO) -> bool:
    if fmt == "auto":
        isatty = getattr(stream, "isatty", None)
        return not (callable(isatty) and isatty())
    return fmt == "json"


def setup_logging(
    level: str,
    fmt: str = "auto",
    stream: TextIO | None = None,
    *,
    wire: bool = False,
    fields: Mapping[str, str] | None = None,
) -> None:
    """Configure the root logger. Calling it again replaces what an earlier call set up.

    ``fmt``: ``json``, ``text``, or ``auto`` (JSON lines unless ``stream`` is a terminal).
    ``stream`` defaults to standard output (CONTRACT.md "Configuration": ``LOG_FORMAT``).
    The libraries' wire logging (``NOISY_LOGGERS``: every HTTP request, every AMQP frame)
    stays at WARNING whatever ``level`` says, unless ``wire`` asks for it (``LOG_WIRE``).
    ``fields`` are written on every JSON line; text lines, read by a person at one
    process's terminal, go without them.
    """
    if fmt not in ("auto", "json", "text"):
        raise ValueError(f"log format must be auto, json or text, not {fmt!r}")
    numeric_level = logging.getLevelName(level.upper())
    if not isinstance(numeric_level, int):
        raise ValueError(f"unknown log level {level!r}")
    target = stream if stream is not None else sys.stdout

    handler = logging.StreamHandler(target)
    handler.set_name(_HANDLER_NAME)
    handler.addFilter(RedactingRecordFilter())
    formatter = JsonFormatter(fields) if _wants_json(fmt, target) else TextFormatter()
    handler.setFormatter(formatter)

    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(numeric_level)

    noisy_level = logging.NOTSET if wire else logging.WARNING
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(noisy_level)
    # Library warnings (deprecations, TLS) are log records too, and pass the same redaction.
    logging.captureWarnings(True)

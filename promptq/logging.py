"""Logs as JSON lines that say which job they are about, and never show a secret.

`promptq api`, `worker` and `beat` log to stderr, one JSON object per line
(PROMPTQ_LOG_FORMAT=json, the default) or as plain text (`text`), at PROMPTQ_LOG_LEVEL:

    {"ts": "2026-11-26T10:00:00.123Z", "level": "INFO", "logger": "promptq.jobs.runner",
     "message": "job job_01... attempt 1: succeeded ...", "job_id": "job_01...", "attempt": 1}

Fields passed with `extra=` (or set for a block with `log_context`) become fields of their
own; an exception is one string field, `exception`. The JSON itself comes from
python-json-logger, a small, maintained and widely used formatter, rather than a hand-rolled
one: it already serializes whatever a library puts in `extra` (datetimes, exceptions,
dataclasses, bytes) without ever failing a log call; only promptq's field names are set here.

Every record goes through `RedactingFilter` before it is formatted, whatever the format: the
upstream key, the admin token, the other secrets of the settings, and anything shaped like a
client key (`pq_...`), a webhook secret (`whsec_...`) or a bearer token are masked in the
message, the extra fields and the exception text. Nothing in promptq logs a secret on
purpose; this is the safety net for the day something does (an exception that quotes a
header, a library logging a request at DEBUG).
"""

from __future__ import annotations

import contextlib
import logging
import logging.config
import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from contextvars import ContextVar
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from pydantic import SecretStr
from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter as LibraryJsonFormatter

from promptq.config import Settings, get_settings
from promptq.redis_roles import passwords

REDACTED = "[redacted]"
# Shorter configured values are not masked: replacing a short, common string everywhere it
# appears would garble the logs and protect nothing a real credential needs.
MIN_SECRET_LENGTH = 8
_SHAPED_SECRETS = (
    (re.compile(r"(?<![A-Za-z0-9])pq_[A-Za-z0-9_-]{4,}"), f"pq_{REDACTED}"),
    (re.compile(r"(?<![A-Za-z0-9])whsec_[A-Za-z0-9+/=_-]{4,}"), f"whsec_{REDACTED}"),
    (re.compile(r"\b(Bearer)\s+[^\s\"',;]+", re.IGNORECASE), rf"\1 {REDACTED}"),
)
# What a LogRecord carries of its own; anything else on it came from `extra=`.
_RECORD_ATTRS = frozenset(
    [*logging.LogRecord("", 0, "", 0, "", (), None).__dict__, "message", "asctime", "taskName"]
)
# Extras that only repeat the message: uvicorn adds an ANSI-coloured copy of it.
_NOISE_EXTRAS = ("color_message",)
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_context: ContextVar[Mapping[str, Any]] = ContextVar(
    "promptq_log_context", default=MappingProxyType({})
)


@contextlib.contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Add `fields` (job_id=..., task=...) to every record logged in this block, by this
    thread, whichever logger logs it."""
    token = _context.set({**_context.get(), **fields})
    try:
        yield
    finally:
        _context.reset(token)


class ContextFilter(logging.Filter):
    """Copies the fields of the enclosing `log_context` onto each record; a field passed
    with `extra=` wins."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _context.get().items():
            if key not in record.__dict__:
                record.__dict__[key] = value
        return True


class Redactor:
    """Masks known secret values and secret-shaped strings in text and nested values."""

    def __init__(self, secrets: Iterable[str | None] = ()) -> None:
        # Longest first, so that a secret containing another is masked whole.
        values = {s for s in secrets if s and len(s) >= MIN_SECRET_LENGTH}
        self._secrets = sorted(values, key=len, reverse=True)

    def text(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        for pattern, replacement in _SHAPED_SECRETS:
            text = pattern.sub(replacement, text)
        return text

    def value(self, value: Any) -> Any:
        """A copy of `value` with every string in it masked (the caller's objects are left
        as they are); an object of another kind is masked as the text it would print as."""
        if value is None or isinstance(value, bool | int | float):
            return value
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, Mapping):
            return {key: self.value(item) for key, item in value.items()}
        if isinstance(value, list | tuple | set | frozenset):
            return [self.value(item) for item in value]
        return self.text(str(value))


def settings_secrets(settings: Settings) -> list[str]:
    """Every secret the settings hold: each SecretStr field (the upstream key, the admin
    token, Flower's login and password, a client's API key) and the passwords of the
    database URL and of every Redis URL (a Sentinel group's two)."""
    found: list[str] = []
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if isinstance(value, SecretStr):
            secret = value.get_secret_value()
            found.append(secret)
            if name == "flower_basic_auth" and ":" in secret:
                found.append(secret.split(":", 1)[1])
    with contextlib.suppress(ValueError):
        password = urlsplit(settings.database_url).password
        if password:
            found.append(password)
    # Every Redis role's URL, a Sentinel group's two passwords included.
    for url in {settings.redis_url, *settings.redis_urls().values()}:
        found.extend(passwords(url))
    return found


class RedactingFilter(logging.Filter):
    """Masks secrets in a record's message, extra fields, exception and stack text.

    Attach it to handlers, not loggers: a handler's filters see the records of every logger
    that propagates to it. It rewrites the record in place (the message is formatted once,
    here), so every handler after it, whatever its formatter, sees only the masked text.
    """

    def __init__(self, secrets: Iterable[str | None] | None = None) -> None:
        super().__init__()
        # Built from the settings when not given, so that a logging config dict (uvicorn
        # hands one to each of its worker processes) never has to carry the secrets.
        self._redactor = Redactor(settings_secrets(get_settings()) if secrets is None else secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        redact = self._redactor
        try:
            message = record.getMessage()
        except Exception:
            return True  # a broken logging call: logging reports it, with its own text
        record.msg, record.args = redact.text(message), ()
        for key, value in list(record.__dict__.items()):
            if key not in _RECORD_ATTRS and not key.startswith("_"):
                record.__dict__[key] = redact.value(value)
        if record.exc_info:
            # Formatters print exc_text when exc_info is gone; python-json-logger would
            # otherwise format exc_info afresh, unmasked.
            record.exc_text = redact.text(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        elif record.exc_text:
            record.exc_text = redact.text(record.exc_text)
        if record.stack_info:
            record.stack_info = redact.text(record.stack_info)
        return True


def _timestamp(created: float) -> str:
    """ISO 8601 in UTC to the millisecond, the form log pipelines parse without help."""
    moment = datetime.fromtimestamp(created, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


class JsonFormatter(LibraryJsonFormatter):
    """One JSON object per line: ts, level, logger, message, then any extra fields
    (job_id, task, attempt, ...), and `exception` as a string when there is one."""

    def __init__(self) -> None:
        super().__init__(
            "%(levelname)s %(name)s %(message)s",
            rename_fields={
                "levelname": "level",
                "name": "logger",
                "exc_info": "exception",
                "stack_info": "stack",
            },
            reserved_attrs=[*RESERVED_ATTRS, "taskName", *_NOISE_EXTRAS],
        )

    def add_fields(
        self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        log_data["ts"] = _timestamp(record.created)  # first, where a reader looks for it
        super().add_fields(log_data, record, message_dict)


class TextFormatter(logging.Formatter):
    """The classic one-line format, with the job (or delivery) a record is about."""

    SHOWN_EXTRAS = ("job_id", "delivery_id", "attempt")

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        shown = [
            f"{key}={record.__dict__[key]}" for key in self.SHOWN_EXTRAS if key in record.__dict__
        ]
        return f"{line} [{' '.join(shown)}]" if shown else line


# Celery's two lines for every task that went well ("received", "succeeded in"): at a
# hundred jobs a second they cost the worker more CPU than running the job's own code does
# (each is a JSON line through every filter), and promptq logs each attempt's outcome
# itself. Shown again with PROMPTQ_LOG_LEVEL=DEBUG; Celery's warnings, errors and retries
# stay at every level.
PER_TASK_LOGGER = "celery.worker.strategy"
TRACE_LOGGER = "celery.app.trace"


# The start of celery.app.trace.LOG_SUCCESS, the format of that record.
TASK_SUCCESS_FORMAT = "Task %(name)s[%(id)s] succeeded"


class TaskSuccessFilter(logging.Filter):
    """Drops Celery's "Task X succeeded in N s" records."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith(TASK_SUCCESS_FORMAT))


class HandedBackFilter(logging.Filter):
    """Celery's record of a task that put its message back on its queue (a `Reject` with
    requeue: a standby job when its worker begins to stop, worker.tasks.jobs) as one INFO
    line. Celery logs it as a WARNING with the traceback twice over (the exception, and again
    in its `data` field), for every standby job at every restart, though nothing failed and
    nothing is lost: warnings an operator learns to ignore hide the ones that matter."""

    def filter(self, record: logging.LogRecord) -> bool:
        # Looked up rather than imported: importing Celery costs every CLI command a fifth
        # of a second, and a process that has not imported it has no Reject to log.
        exceptions = sys.modules.get("celery.exceptions")
        error = record.exc_info[1] if record.exc_info else None
        if exceptions is None or not isinstance(error, exceptions.Reject) or not error.requeue:
            return True
        if not logging.getLogger(record.name).isEnabledFor(logging.INFO):
            return False  # created as a WARNING, under a level that would not show it now
        record.levelno, record.levelname = logging.INFO, logging.getLevelName(logging.INFO)
        record.exc_info, record.exc_text = None, None
        data = record.__dict__.get("data")
        if isinstance(data, dict):
            record.__dict__["data"] = {k: v for k, v in data.items() if k != "traceback"}
        return True


def logging_config(settings: Settings) -> dict[str, Any]:
    """The logging configuration of a promptq service, as a `logging.config.dictConfig`
    dict (uvicorn takes one as `log_config` and applies it in each of its processes)."""
    formatter = "JsonFormatter" if settings.log_format == "json" else "TextFormatter"
    return {
        "version": 1,
        # Loggers created at import time (Celery's, uvicorn's, promptq's) must keep working.
        "disable_existing_loggers": False,
        "filters": {
            "context": {"()": f"{__name__}.ContextFilter"},
            "redact": {"()": f"{__name__}.RedactingFilter"},
            "task_success": {"()": f"{__name__}.TaskSuccessFilter"},
            "handed_back": {"()": f"{__name__}.HandedBackFilter"},
        },
        "formatters": {"promptq": {"()": f"{__name__}.{formatter}"}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "formatter": "promptq",
                # Context first, so that what it adds is masked too.
                "filters": ["context", "redact"],
            }
        },
        "root": {"level": settings.log_level, "handlers": ["stderr"]},
        "loggers": _celery_loggers(quiet=settings.log_level != "DEBUG"),
    }


def _celery_loggers(quiet: bool) -> dict[str, Any]:
    """Celery's per-task lines (dropped unless at DEBUG) and its handed-back messages."""
    if not quiet:
        return {TRACE_LOGGER: {"filters": ["handed_back"]}}
    return {
        PER_TASK_LOGGER: {"level": "WARNING"},
        TRACE_LOGGER: {"filters": ["task_success", "handed_back"]},
    }


def configure_logging(settings: Settings | None = None) -> None:
    """Send this process's logs (every logger's, through the root) to stderr in the
    configured format; safe to call again."""
    logging.config.dictConfig(logging_config(settings or get_settings()))
    # Python warnings would otherwise go to stderr as bare text lines between the JSON.
    logging.captureWarnings(True)

"""Logging setup: the level (``--log-level``, ``CLOVISOR_LOG_LEVEL``, ``-v``) and the format.

``text`` is one human line per record; ``json`` is one JSON object per line
(``time``, ``level``, ``logger``, ``message``, and ``exception`` when there
is one), for log pipelines that parse what they collect.

The level applies to Clovisor's own loggers. Libraries (the Kubernetes and
Redis clients, urllib3, gRPC) log at INFO and above whatever the level, so
``--log-level debug`` shows what the agent does, not every HTTP connection
its clients open.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Final, Literal, TextIO

from .specs import SpecError

__all__ = ["FORMATS", "LEVELS", "JsonFormatter", "notice", "parse_level", "setup"]

LEVELS: Final = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
FORMATS: Final = ("text", "json")
LogFormat = Literal["text", "json"]

_TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_OWN: Final = "clovisor"

_handler: logging.Handler | None = None


def parse_level(text: str) -> int:
    level = LEVELS.get(text.strip().lower())
    if level is None:
        raise SpecError(f"log level {text!r} is not one of {', '.join(LEVELS)}")
    return level


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines in messages are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": _iso(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


def _iso(created: float) -> str:
    seconds = int(created)
    millis = int((created - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


def setup(level: int, fmt: LogFormat = "text", stream: TextIO | None = None) -> None:
    """Send log records to ``stream`` (stderr) in ``fmt``; Clovisor's at ``level``."""
    global _handler
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(_TEXT_FORMAT))
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    root.addHandler(handler)
    root.setLevel(max(level, logging.INFO))
    logging.getLogger(_OWN).setLevel(level)
    _handler = handler


def notice(text: str) -> None:
    """A line the user always sees (start and totals lines), whatever the level:
    ``clovisor: text`` in text format, an ``info`` record in JSON format."""
    handler = _handler
    if handler is None or not isinstance(handler.formatter, JsonFormatter):
        print(f"clovisor: {text}", file=sys.stderr, flush=True)
        return
    record = logging.LogRecord(_OWN, logging.INFO, __file__, 0, text, None, None)
    handler.handle(record)

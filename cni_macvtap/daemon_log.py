"""The macvtap daemon's log: ``--log-level`` and ``--log-format text|json`` (stderr).

``text`` keeps the daemon's one line per event (``<time> <LEVEL> macvtap-daemon: <message>``).
``json`` is one JSON object per line with ``time`` (RFC 3339, UTC, milliseconds), ``level``,
``logger``, ``message`` and the event's fields (``command``, ``container_id``, ``ifname``, ``ms``,
``exit_code`` for a call), passed with ``extra=``. Only the daemon loads this: the
plugin's client path never logs.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("text", "json")
LOGGER = "macvtap-daemon"

log = logging.getLogger(LOGGER)

_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


def rfc3339(created: float) -> str:
    """``2025-01-02T03:04:05.678Z`` for a record's ``created`` timestamp."""
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{seconds}.{int(created % 1 * 1000):03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message and the record's extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": rfc3339(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in doc:
                doc[key] = value
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str, ensure_ascii=False)


def configure(level: str = "info", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Send the daemon's records at ``level`` and above to ``stream`` (stderr) in ``fmt``."""
    if level not in LEVELS or fmt not in FORMATS:
        raise ValueError(f"log level {level!r} / format {fmt!r}: use one of {LEVELS} / {FORMATS}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S")
        )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())

"""The service's structured logs: every line of the process one JSON object on stderr."""

import json
import logging
import sys
import traceback
from datetime import datetime, timezone

from ..errors import BadExpertError
from ..jsonable import to_jsonable

LOGGER = "badexpert.serve"
log = logging.getLogger(LOGGER)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, event and the record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        event = getattr(record, "event", None)
        if event is None:  # uvicorn's, other libraries' and Python warnings' lines
            event = "warning" if record.name == "py.warnings" else "server"
        doc = {"ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
               "level": record.levelname, "event": event}
        if not hasattr(record, "event"):
            try:
                message = record.getMessage()
            except Exception:  # a library's malformed call (arguments that do not fit): its raw parts
                message = f"{record.msg} {record.args!r}"
            doc["message"] = str(message).strip()
            doc["logger"] = record.name
        doc.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            doc["error"] = "".join(traceback.format_exception_only(*record.exc_info[:2])).strip().splitlines()[-1]
            doc["traceback"] = "".join(traceback.format_exception(*record.exc_info))
        return json.dumps(to_jsonable(doc), default=str, allow_nan=False)  # NaN, inf: null


#: The loggers the service's JSON handler is put on; "" is the root logger, which every other
#: library's logger (fastapi, starlette, asyncio, python-multipart) and Python's warnings reach.
LOG_TARGETS = (LOGGER, "uvicorn", "uvicorn.error", "")


def configure_logging(level: str = "info", stream=None) -> logging.Handler:
    """Send every log line of the process to ``stream`` (stderr) as one JSON object per line: the
    service's and uvicorn's from ``level``, other libraries' and Python warnings (captured through
    :func:`logging.captureWarnings`) from ``warning`` or ``level`` if higher. Returns the handler;
    :func:`restore_logging` undoes it all."""
    lvl = getattr(logging, str(level).upper(), None)
    if not isinstance(lvl, int):
        raise BadExpertError(f"unknown log level '{level}'; choose debug, info, warning or error")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.saved = []  # (logger, level, propagate) before, for restore_logging
    for name in LOG_TARGETS:
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            if isinstance(h.formatter, JsonFormatter):
                lg.removeHandler(h)
        handler.saved.append((lg, lg.level, lg.propagate))
        lg.addHandler(handler)
        if name:
            lg.setLevel(lvl)
            lg.propagate = False
        else:  # other libraries: their warnings and errors, not their chatter
            lg.setLevel(max(lvl, logging.WARNING))
    logging.captureWarnings(True)
    return handler


def restore_logging(handler: logging.Handler) -> None:
    """Undo :func:`configure_logging`: the handler removed, levels and propagation as they were."""
    handler.flush()
    logging.captureWarnings(False)
    for lg, level, propagate in getattr(handler, "saved", ()):
        lg.removeHandler(handler)
        lg.setLevel(level)
        lg.propagate = propagate


def log_event(level: int, event: str, exc_info=None, **fields) -> None:
    """Log one service event (a JSON line with ``fields`` once :func:`configure_logging` is on)."""
    log.log(level, event, extra={"event": event, "fields": fields}, exc_info=exc_info)


__all__ = ["LOGGER", "LOG_TARGETS", "JsonFormatter", "configure_logging", "log_event", "restore_logging"]

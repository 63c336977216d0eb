"""Request ids in every log line about a request, and the JSON log format.

``Gateway.handle`` sets ``REQUEST_ID`` for the request's task (it is reset when the
request ends: Sanic serves a keep-alive connection's requests in one task), and
``RequestIdFilter`` on every handler copies it onto each record, so any module's log
line written while serving a request carries the id without being passed it.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import re
import threading
import time
from contextvars import ContextVar
from typing import Any

REQUEST_ID: ContextVar[str | None] = ContextVar("vllm_gateway_request_id", default=None)
_CLIENT_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
ACCESS_LOGGER = "vllm_gateway.access"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Sanic's loggers carry their own handlers; in JSON mode their lines go through ours.
SANIC_LOGGERS = ("sanic.root", "sanic.error", "sanic.access", "sanic.server",
                 "sanic.websockets")


def request_id(sent: str | None) -> str:
    """The client's X-Request-ID if it is 1-128 letters, digits, '.', '_' or '-';
    otherwise (absent or anything else) 32 fresh random hex digits (as a uuid4's hex,
    without building a UUID object per request)."""
    if sent and _CLIENT_ID.fullmatch(sent):
        return sent
    return os.urandom(16).hex()


class RequestIdFilter(logging.Filter):
    """Copies the current request's id onto the record (None outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = REQUEST_ID.get()
        return True


class TextFormatter(logging.Formatter):
    """The classic one-line format, with `` request_id=...`` appended when known (an
    access line has it in its message already)."""

    _second = -1
    _stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """``logging``'s own format, its strftime done once per second, not per line."""
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        return self._asctime(record.created, record.msecs)

    def _asctime(self, created: float, msecs: float) -> str:
        second = int(created)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime(self.default_time_format, self.converter(created))
        return self.default_msec_format % (self._stamp, msecs)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        rid = getattr(record, "request_id", None)
        return f"{line} request_id={rid}" if rid and not hasattr(record, "access") else line

    def access_line(self, created: float, message: str, rid: str | None) -> str:
        """What ``format`` makes of an INFO access record (TEXT_FORMAT), without one."""
        msecs = int((created - int(created)) * 1000) + 0.0  # as LogRecord computes it
        return f"{self._asctime(created, msecs)} INFO {ACCESS_LOGGER}: {message}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id when known,
    the fields of an access line (``extra={"access": {...}}``) and any traceback."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": _iso(record.created), "level": record.levelname, "logger": record.name,
               "message": record.getMessage()}
        rid = getattr(record, "request_id", None)
        if rid:
            out["request_id"] = rid
        access = getattr(record, "access", None)
        if access:
            out.update(access)
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)

    def access_line(self, created: float, message: str, rid: str | None,
                    fields: dict[str, Any]) -> str:
        """What ``format`` makes of an INFO access record, without one."""
        out = {"time": _iso(created), "level": "INFO", "logger": ACCESS_LOGGER,
               "message": message}
        if rid:
            out["request_id"] = rid
        out.update(fields)
        return json.dumps(out, ensure_ascii=False, default=str)


def _iso(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + \
        f".{int(created % 1 * 1000):03d}Z"


class BatchedStreamHandler(logging.StreamHandler):
    """For the access log: lines are written in batches (at most every ``interval_s``,
    or at once past ``batch`` lines), not one write syscall per request. A line reaches
    the stream at most ``interval_s`` late; ``flush()`` (and logging's shutdown) writes
    whatever is pending."""

    def __init__(self, stream, interval_s: float = 0.2, batch: int = 256) -> None:
        super().__init__(stream)
        self._pending: list[str] = []
        self._batch = batch
        self._thread = threading.Thread(target=self._run, args=(interval_s,),
                                        name="access-log-flush", daemon=True)
        self._thread.start()
        # Not left to logging.shutdown: Sanic's dictConfig drops handlers from its list.
        atexit.register(self.flush)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self.write_line(line)  # the handler's lock is an RLock: taking it again is fine

    def write_line(self, line: str) -> None:
        """Queue a formatted line (also the access log's fast path: no LogRecord)."""
        with self.lock:  # type: ignore[union-attr]  # as emit() is called: see flush()
            self._pending.append(line)
        if len(self._pending) >= self._batch:
            self.flush()

    def flush(self) -> None:
        # Under the handler's lock, as emit() is (Handler.handle holds it): a line
        # appended while the flusher thread swaps the list would otherwise be lost.
        self.acquire()
        try:
            pending, self._pending = self._pending, []
            if not pending:
                return
            self.stream.write("\n".join(pending) + "\n")
            self.stream.flush()
        except Exception:
            pass
        finally:
            self.release()

    def _run(self, interval_s: float) -> None:
        while True:
            time.sleep(interval_s)
            self.flush()

    def close(self) -> None:
        """Write what is pending. The flusher keeps running: Sanic's logging set-up
        (``dictConfig``) closes every handler that exists, then keeps using this one."""
        self.flush()
        super().close()


def configure_logging(fmt: str) -> None:
    """Give every root handler the chosen formatter and the request-id filter (call
    after ``logging.basicConfig``, and again once the Sanic app exists); in JSON mode
    Sanic's own handlers are removed, so its lines come through ours. Idempotent."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO)
    # The logging HOWTO's "Optimization" knobs: no format here shows the caller, thread or
    # process, so each record need not walk the stack or ask for them (the access log
    # writes one record per request).
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    formatter: logging.Formatter = JsonFormatter() if fmt == "json" else TextFormatter(TEXT_FORMAT)
    for handler in root.handlers:
        handler.setFormatter(formatter)
        if not any(isinstance(f, RequestIdFilter) for f in handler.filters):
            handler.addFilter(RequestIdFilter())
    access = logging.getLogger(ACCESS_LOGGER)
    stream = next((h.stream for h in root.handlers if isinstance(h, logging.StreamHandler)),
                  None)
    batched = next((h for h in access.handlers if isinstance(h, BatchedStreamHandler)), None)
    if stream is not None and batched is None:
        batched = BatchedStreamHandler(stream)
        batched.addFilter(RequestIdFilter())
        access.addHandler(batched)
        access.propagate = False  # its lines go out in batches, not through root's handler
    if batched is not None:
        batched.setFormatter(formatter)
    if fmt == "json":
        for name in SANIC_LOGGERS:
            logger = logging.getLogger(name)
            for handler in list(logger.handlers):
                logger.removeHandler(handler)
            logger.propagate = True


class AccessLog:
    """One line per proxied request, on logger ``vllm_gateway.access``.

    Where that logger writes only through the gateway's own batched handler (as
    ``configure_logging`` sets it up), the line is formatted and queued directly: a
    LogRecord and logging's call chain cost more than the rest of the line's work (about
    5% of a streamed request's CPU), and the text format needs no field dict at all. Any
    other set-up (more handlers, filters, another formatter) gets an ordinary record, so
    what an operator configures still applies. Levels are honoured either way."""

    def __init__(self) -> None:
        self.logger = logging.getLogger(ACCESS_LOGGER)

    def write(self, method: str, path: str, status: int, model: str, key: str,
              duration_ms: float, queue_ms: float, rid: str | None) -> None:
        logger = self.logger
        if not logger.isEnabledFor(logging.INFO):
            return
        message = (f"{method} {path} {status} model={model or '-'} key={key or '-'} "
                   f"duration_ms={duration_ms:.1f} queue_ms={queue_ms:.1f} request_id={rid}")
        handler = self._direct_handler()
        formatter = handler.formatter if handler is not None else None
        if type(formatter) is TextFormatter:
            handler.write_line(formatter.access_line(time.time(), message, rid))  # type: ignore[union-attr]
            return
        fields = {"method": method, "path": path, "model": model, "key": key,
                  "status": status, "duration_ms": round(duration_ms, 1),
                  "queue_ms": round(queue_ms, 1)}
        if type(formatter) is JsonFormatter:
            handler.write_line(formatter.access_line(time.time(), message, rid, fields))  # type: ignore[union-attr]
            return
        logger.info("%s", message, extra={"access": fields, "request_id": rid})

    def _direct_handler(self) -> BatchedStreamHandler | None:
        """The one handler a line may skip logging for, or None: the gateway's own, alone
        on the logger, at INFO or below, with no filter but the request-id one."""
        logger = self.logger
        handlers = logger.handlers
        if len(handlers) != 1 or logger.filters:
            return None
        handler = handlers[0]
        if type(handler) is not BatchedStreamHandler or handler.level > logging.INFO:
            return None
        filters = handler.filters
        if filters and (len(filters) > 1 or type(filters[0]) is not RequestIdFilter):
            return None
        return handler


async def tag_request_id(request, response) -> None:
    """Response middleware for the operator blueprints and the error handlers: every
    answer carries X-Request-ID (proxied answers set their own, used in their logs and
    spans). Not app-wide: an app-level response middleware costs the proxy path ~15%."""
    if response is not None and "x-request-id" not in response.headers:
        response.headers["X-Request-ID"] = request_id(request.headers.get("x-request-id"))

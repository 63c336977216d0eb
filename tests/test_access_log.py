"""The access log's direct path writes exactly the line logging itself would write."""
from __future__ import annotations

import io
import json
import logging
import re

import pytest

from gateway.logging_setup import (
    ACCESS_LOGGER,
    TEXT_FORMAT,
    AccessLog,
    BatchedStreamHandler,
    JsonFormatter,
    RequestIdFilter,
    TextFormatter,
)

FIELDS = {"method": "POST", "path": "/v1/chat/completions", "model": "m", "key": "team-a",
          "status": 200, "duration_ms": 1.5, "queue_ms": 0.0}
MESSAGE = "POST /v1/chat/completions 200 model=m key=team-a duration_ms=1.5 queue_ms=0.0 " \
          "request_id=r1"


@pytest.fixture
def access_logger():
    logger = logging.getLogger(ACCESS_LOGGER)
    saved = (logger.handlers[:], logger.filters[:], logger.propagate, logger.level)
    logger.handlers.clear()
    logger.filters.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO)
    yield logger
    logger.handlers[:], logger.filters[:], logger.propagate, logger.level = \
        saved[0], saved[1], saved[2], saved[3]


def _lines(logger: logging.Logger, formatter: logging.Formatter, direct: bool) -> list[str]:
    out = io.StringIO()
    handler = BatchedStreamHandler(out, interval_s=60)
    handler.setFormatter(formatter)
    handler.addFilter(RequestIdFilter())
    logger.handlers[:] = [handler]
    if not direct:  # any filter on the logger sends lines through logging's records
        logger.addFilter(lambda record: True)
    made = []
    factory = logging.getLogRecordFactory()
    logging.setLogRecordFactory(lambda *a, **k: made.append(1) or factory(*a, **k))
    try:
        # 1.46 ms and 0.04 ms: the line and the fields show them rounded to 0.1 ms
        AccessLog().write("POST", "/v1/chat/completions", 200, "m", "team-a", 1.46, 0.04, "r1")
    finally:
        logging.setLogRecordFactory(factory)
    handler.flush()
    logger.filters.clear()
    lines = out.getvalue().splitlines()
    assert len(made) == (0 if direct or not lines else 1), "direct path not taken (or taken)"
    return lines


def _untimed(line: str) -> str:
    return re.sub(r"^\S+ \S+ |\"time\": \"[^\"]+\"", "T ", line)


@pytest.mark.parametrize("formatter", [TextFormatter(TEXT_FORMAT), JsonFormatter()],
                         ids=["text", "json"])
def test_direct_line_equals_the_logging_line(access_logger, formatter):
    direct = _lines(access_logger, formatter, direct=True)
    through_logging = _lines(access_logger, formatter, direct=False)
    assert len(direct) == len(through_logging) == 1
    assert _untimed(direct[0]) == _untimed(through_logging[0])
    if isinstance(formatter, JsonFormatter):
        record = json.loads(direct[0])
        assert record["request_id"] == "r1" and record["message"] == MESSAGE
        assert {k: record[k] for k in FIELDS} == FIELDS
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record["time"])
    else:
        assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO vllm_gateway\.access: "
                        + re.escape(MESSAGE) + "$", direct[0])


def test_levels_are_honoured(access_logger):
    access_logger.setLevel(logging.WARNING)
    assert _lines(access_logger, TextFormatter(TEXT_FORMAT), direct=True) == []


def test_another_filter_on_the_handler_gets_records(access_logger):
    """A filter an operator adds to the gateway's own handler still sees every line."""
    out = io.StringIO()
    handler = BatchedStreamHandler(out, interval_s=60)
    handler.setFormatter(TextFormatter(TEXT_FORMAT))
    handler.addFilter(RequestIdFilter())
    seen = []
    handler.addFilter(lambda record: seen.append(record.getMessage()) or False)  # drops all
    access_logger.handlers[:] = [handler]
    AccessLog().write("POST", "/v1/chat/completions", 200, "m", "team-a", 1.46, 0.04, "r1")
    handler.flush()
    assert seen == [MESSAGE] and out.getvalue() == ""

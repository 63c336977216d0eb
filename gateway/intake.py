"""Reading a client request, bounded and validated, before it may take a slot.

Everything a client controls is checked here, once, before admission: the raw path
against the allow-list (gateway/paths.py), header values, the body (read under its own
deadline, apart from the lifted response timeout, and within a memory budget shared by
all requests), the JSON (depth included) and the fields the gateway acts on. A bad
request costs no slot, no queue place and no cold start.
"""
from __future__ import annotations

import asyncio
import json
from collections import deque
from dataclasses import dataclass
from typing import Any

from sanic.request import Request
from sanic.response import HTTPResponse

from gateway.config import Limits
from gateway.errors import error_response
from gateway.paths import PathPolicy
from gateway.upstream import bad_header_value

SMALL_BODY = 65_536  # bodies up to this size skip the shared budget: too small to matter


class BodyBudget:
    """Bytes of request bodies held at once, all requests together.

    A body that would pass the cap waits (FIFO) until others are released; one body may
    always be held, so a single large request never waits on an empty budget.
    """

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.used = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    async def take(self, n: int) -> None:
        """Reserve ``n`` bytes, waiting for room; the caller bounds the wait."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((n, fut))
        self._grant()
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.give(n)  # granted just as we gave up
            else:
                self._waiters.remove((n, fut))
                self._grant()
            raise

    def give(self, n: int) -> None:
        self.used -= n
        self._grant()

    def _grant(self) -> None:
        while self._waiters:
            n, fut = self._waiters[0]
            if fut.done():  # cancelled; its owner removes it
                return
            if self.used and self.used + n > self.cap:
                return
            self._waiters.popleft()
            self.used += n
            fut.set_result(None)


@dataclass(slots=True)
class Intake:
    """A request that passed every check: what the rest of the pipeline works from."""

    path: str  # the allow-listed constant, never the client's spelling
    body: bytes
    payload: dict[str, Any]
    model: str
    stream: bool
    held_bytes: int = 0  # reserved in the BodyBudget; released when the request ends


class RequestReader:
    def __init__(self, limits: Limits, policy: PathPolicy) -> None:
        self.limits = limits
        self.policy = policy
        self.budget = BodyBudget(limits.max_body_buffer_bytes)

    def release(self, intake: Intake | HTTPResponse | None) -> None:
        if isinstance(intake, Intake) and intake.held_bytes:
            self.budget.give(intake.held_bytes)
            intake.held_bytes = 0

    async def read(self, request: Request) -> Intake | HTTPResponse:
        path, status, message = self.policy.check(_raw_path(request))
        if path is None:
            return error_response(status, message, "invalid_path" if status == 400 else "not_found")
        bad = bad_header_value(request.headers)
        if bad is not None:
            return error_response(400, f"header {bad!r} has a value with control or non-ASCII "
                                  "characters", "invalid_header")
        held = 0
        try:
            body, held = await self._read_body(request)
        except _BodyProblem as problem:
            request.stream.keep_alive = False  # the rest of the body is never read
            return problem.response
        try:
            parsed = _parse(body)
        except BaseException:
            self.budget.give(held)
            raise
        if isinstance(parsed, HTTPResponse):
            self.budget.give(held)
            return parsed
        payload, model, stream = parsed
        return Intake(path, body, payload, model, stream, held)

    async def _read_body(self, request: Request) -> tuple[bytes, int]:
        limit = self.limits.max_request_bytes
        declared = request.headers.get("content-length")
        length = int(declared) if declared and declared.isdigit() else None
        if length is not None and length > limit:
            raise _BodyProblem(error_response(413, f"request body exceeds {limit} bytes "
                                              "(limits.max_request_bytes)", "request_too_large"))
        stream = request.stream
        if stream is None or not getattr(stream, "request_body", None):
            return request.body or b"", 0
        held = 0
        try:
            if length is not None and length <= SMALL_BODY and _received(stream) >= length:
                # The whole body came with the headers (the usual small POST): no read
                # can wait, so it needs no deadline (a timer per request costs ~3%).
                return await self._collect(stream, length, limit)
            async with asyncio.timeout(self.limits.body_timeout_s):
                if length is not None and length > SMALL_BODY:
                    await self.budget.take(length)
                    held = length
                body, taken = await self._collect(stream, length, limit)
                return body, held + taken
        except TimeoutError:
            self.budget.give(held)
            raise _BodyProblem(error_response(
                408, f"request body not received within {self.limits.body_timeout_s:g}s "
                "(limits.body_timeout_s)", "request_timeout")) from None
        except BaseException:
            self.budget.give(held)
            raise

    async def _collect(self, stream: Any, length: int | None,
                       limit: int) -> tuple[bytes, int]:
        """Read the body to its end, bounded by ``limit``. A body of unknown length takes
        budget as it grows past SMALL_BODY: what it took comes back with the body, or is
        given back if the read fails."""
        parts: list[bytes] = []
        size = taken = 0
        try:
            while True:
                chunk = await stream.read()
                if chunk is None:
                    break
                size += len(chunk)
                if size > limit:
                    raise _BodyProblem(error_response(
                        413, f"request body exceeds {limit} bytes (limits.max_request_bytes)",
                        "request_too_large"))
                if length is None and size > SMALL_BODY + taken:
                    await self.budget.take(size - taken)
                    taken = size
                parts.append(chunk)
        except BaseException:
            self.budget.give(taken)
            raise
        return b"".join(parts), taken


def _received(stream: Any) -> int:
    """Body bytes of a Content-Length request already in Sanic's receive buffer (0 when
    unknown, e.g. chunked): Http.recv_buffer is a public attribute of Sanic's HTTP/1."""
    if stream.request_body is not True:
        return 0
    return len(getattr(stream, "recv_buffer", b""))


class _BodyProblem(Exception):
    def __init__(self, response: HTTPResponse) -> None:
        self.response = response


def _raw_path(request: Request) -> str:
    """The path exactly as the client sent it: no percent-decoding, no dot removal."""
    return request.raw_url.split(b"?", 1)[0].decode("latin-1")


def _parse(body: bytes) -> tuple[dict[str, Any], str, bool] | HTTPResponse:
    try:
        payload = json.loads(body or b"")
    except RecursionError:
        return error_response(400, "request body is nested too deeply", "invalid_json")
    except (ValueError, UnicodeDecodeError) as exc:
        return error_response(400, f"request body is not valid JSON: {exc}"[:300], "invalid_json")
    if not isinstance(payload, dict):
        return error_response(400, "request body must be a JSON object", "invalid_request")
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        return error_response(400, "`model` is required and must be a string", "missing_model")
    stream = payload.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        return error_response(400, f"`stream` must be a boolean (got {json.dumps(stream)[:40]})",
                              "invalid_type")
    options = payload.get("stream_options")
    if options is not None and not isinstance(options, dict):
        return error_response(400, "`stream_options` must be an object", "invalid_type")
    return payload, model, stream

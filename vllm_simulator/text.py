"""Pure helpers for the vLLM simulator: deterministic text, token counting, vectors, request
validation, response bodies and option parsing.

Nothing here touches the network or the clock, so it is cheap to call per token and easy to
test. Token ``i`` of every completion is ``WORDS[(i * 7) % len(WORDS)]``; the completion text
is those words joined by single spaces, so the word count of the output equals its tokens.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import json
import math
import struct
import zlib
from typing import Any

MAX_MODEL_LEN = 4096
EMBEDDING_DIM = 8
VOCAB_SIZE = 32_000
# vLLM's buckets for vllm:time_to_first_token_seconds and vllm:e2e_request_latency_seconds.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)

# 64 words: 7 is coprime with 64, so (i * 7) % 64 visits every word before repeating.
WORDS = (
    "the quick brown fox jumps over a lazy dog while seven silver owls watch from "
    "tall pine trees near quiet rivers under bright morning light as gentle winds carry "
    "old songs across green hills toward distant blue mountains where small villages "
    "keep warm fires and tell stories about brave sailors who crossed wide oceans long ago "
    "beneath golden autumn skies filled with soft rain"
).split()
assert len(WORDS) == 64

ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    409: "ConflictError",
    413: "RequestEntityTooLarge",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
    500: "InternalServerError",
    501: "NotImplementedError",
    502: "BadGatewayError",
    503: "ServiceUnavailableError",
    504: "GatewayTimeoutError",
}


def dumps(obj: Any) -> str:
    """Compact JSON, as vLLM's pydantic ``model_dump_json`` writes it."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


# vLLM answers a request that fails its pydantic schema (not JSON, a missing or mistyped
# field, stream_options without stream) with type "Bad Request" (the HTTP phrase), and the
# errors it raises while serving (max_tokens, context length, wrong model) with the
# exception's type name. Both carry ``param`` (the field) and the status as integer ``code``.
SCHEMA_ERROR = "Bad Request"


def error_body(message: str, status: int, param: str | None = None,
               err_type: str | None = None) -> str:
    """vLLM's ``ErrorResponse`` body: ``{"error": {"message", "type", "param", "code"}}``."""
    if err_type is None:
        fallback = "InternalServerError" if status >= 500 else "BadRequestError"
        err_type = ERROR_TYPES.get(status, fallback)
    return dumps({"error": {"message": message, "type": err_type, "param": param,
                            "code": status}})


def token_text(i: int) -> str:
    """Text of output token ``i``: a word, preceded by a space except for the first."""
    word = WORDS[(i * 7) % len(WORDS)]
    return word if i == 0 else " " + word


def completion_text(n: int, start: int = 0) -> str:
    """Text of output tokens ``start`` .. ``start + n - 1``."""
    return "".join(token_text(i) for i in range(start, start + n))


def event_sizes(n: int, merge_every: int) -> list[int]:
    """Tokens per content event of an ``n``-token stream: every ``merge_every``-th event
    carries two tokens (0: never), the last one whatever is left. 6 tokens, every 4th:
    ``[1, 1, 1, 2, 1]`` (5 events), as vLLM merges tokens under load."""
    sizes: list[int] = []
    left = n
    while left > 0:
        size = 2 if merge_every and (len(sizes) + 1) % merge_every == 0 and left > 1 else 1
        sizes.append(size)
        left -= size
    return sizes


def count_words(text: str) -> int:
    return len(text.split())


def _content_text(content: Any) -> str:
    """Text of a chat message's ``content``: a string or a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            p.get("text") or "" for p in content if isinstance(p, dict) and p.get("type") == "text"
        )
    return ""


def messages_text(messages: list) -> str:
    return " ".join(_content_text(m.get("content")) for m in messages if isinstance(m, dict))


def prompt_tokens_of(prompt: Any) -> int | None:
    """Prompt tokens of a completions ``prompt``; None when its type is not an accepted one.

    Accepted like the OpenAI API: a string, a list of strings, a list of token ids, or a
    list of lists of token ids. Strings count one token per whitespace-separated word.
    """
    if isinstance(prompt, str):
        return count_words(prompt)
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return sum(count_words(p) for p in prompt)
        if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
            return len(prompt)
        if all(isinstance(p, list) and all(isinstance(t, int) for t in p) for p in prompt):
            return sum(len(p) for p in prompt)
    return None


def token_ids(text: str) -> list[int]:
    """Deterministic ids for ``/tokenize``: one per word, stable across processes."""
    return [zlib.crc32(w.encode()) % VOCAB_SIZE for w in text.split()]


def embedding(item: Any) -> list[float]:
    """A unit vector of EMBEDDING_DIM floats derived from a SHA-256 of the input."""
    raw = item if isinstance(item, str) else dumps(item)
    digest = hashlib.sha256(raw.encode()).digest()
    vals = [(x / 2**31) - 1.0 for x in struct.unpack("<8I", digest)]
    norm = math.sqrt(sum(v * v for v in vals)) or 1.0
    return [v / norm for v in vals]


def embedding_b64(vec: list[float]) -> str:
    """OpenAI's ``encoding_format: base64``: little-endian float32 bytes, base64-encoded."""
    return base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()


class SimError(Exception):
    """A request the simulator refuses, answered with vLLM's error body and ``status``;
    ``param`` names the offending field, ``err_type`` overrides the type for the status."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 err_type: str | None = None):
        super().__init__(message)
        self.message, self.status, self.param, self.err_type = message, status, param, err_type

    def body(self) -> str:
        return error_body(self.message, self.status, self.param, self.err_type)


def schema_error(message: str, param: str) -> SimError:
    """A 400 as vLLM's request-validation handler writes it (type "Bad Request")."""
    return SimError(message, 400, param, SCHEMA_ERROR)


def _load(raw: bytes | None, served: str) -> dict:
    """The JSON object body; 400 if not JSON or not an object, 404 for another model."""
    try:
        body = json.loads(raw or b"")
    except ValueError as e:
        pos = getattr(e, "pos", 0)
        raise schema_error(f"JSON decode error: {e}", f"body.{pos}") from None
    if not isinstance(body, dict):
        raise schema_error("Input should be a valid dictionary or object to extract fields "
                           "from.", "body")
    model = body.get("model")
    if model is not None and model != served:
        raise SimError(f"The model `{model}` does not exist. Valid aliases: {served}.", 404,
                       "model", "NotFoundError")
    return body


def parse_generation(raw: bytes | None, served: str, chat: bool) -> dict:
    """Validate a chat/completions request like vLLM 0.32; returns what generation needs.

    ``max_tokens`` (chat: ``max_completion_tokens`` first) above the context length is a
    400; a prompt that fills the context is a 400; otherwise the limit is clamped to what
    the context leaves, as vLLM does. Without a limit a completion is 16 tokens, "stop".
    """
    body = _load(raw, served)
    if chat:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
            raise schema_error("`messages` must be a non-empty list of message objects.",
                               "body.messages")
        prompt_tokens = count_words(messages_text(msgs))
        limit_param = ("max_completion_tokens" if body.get("max_completion_tokens") is not None
                       else "max_tokens")
    else:
        prompt_tokens = prompt_tokens_of(body.get("prompt"))
        if prompt_tokens is None:
            raise schema_error("`prompt` must be a string, a list of strings or token ids.",
                               "body.prompt")
        limit_param = "max_tokens"
    limit = body.get(limit_param)
    prompt_tokens = max(1, prompt_tokens)
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool)):
        raise schema_error("Input should be a valid integer.", f"body.{limit_param}")
    if limit is not None and limit < 1:
        raise SimError(f"max_tokens must be at least 1, got {limit}.", 400, "max_tokens")
    if limit is not None and limit > MAX_MODEL_LEN:
        raise SimError(f"{limit_param}={limit} cannot be greater than max_model_len="
                       f"{MAX_MODEL_LEN}. Please request fewer output tokens.", 400,
                       limit_param)
    if prompt_tokens >= MAX_MODEL_LEN:
        raise SimError(
            f"This model's maximum context length is {MAX_MODEL_LEN} tokens. However, your "
            f"prompt contains {prompt_tokens} input tokens, which exceeds this limit even "
            "without any output tokens. Please reduce the length of the input prompt.", 400,
            "input_tokens")
    room = MAX_MODEL_LEN - prompt_tokens
    n = min(16 if limit is None else limit, room)
    stream = bool(body.get("stream"))
    opts = body.get("stream_options")
    if opts and not stream:
        raise schema_error("Stream options can only be defined when `stream=True`.",
                           "stream_options")
    return {"model": body.get("model"), "prompt_tokens": prompt_tokens, "n": n,
            "stream": stream, "reason": "stop" if limit is None and n == 16 else "length",
            "include_usage": stream and isinstance(opts, dict) and bool(opts.get("include_usage"))}


def parse_embeddings(raw: bytes | None, served: str) -> tuple[Any, list, int, bool]:
    """Returns (model, inputs, prompt_tokens, base64?) for an embeddings request."""
    body = _load(raw, served)
    inp = body.get("input")
    token_list = isinstance(inp, list) and inp and all(isinstance(t, int) for t in inp)
    items = [inp] if isinstance(inp, str) or token_list else inp
    if not isinstance(items, list) or not items or not all(
            isinstance(i, (str, list)) for i in items):
        raise schema_error("`input` must be a string, a list of strings or token ids.",
                           "body.input")
    tokens = sum(max(1, count_words(i) if isinstance(i, str) else len(i)) for i in items)
    return body.get("model"), items, tokens, body.get("encoding_format") == "base64"


def parse_tokenize(raw: bytes | None, served: str) -> str:
    """The text to tokenize: ``prompt`` or the ``messages`` contents."""
    body = _load(raw, served)
    if isinstance(body.get("prompt"), str):
        return body["prompt"]
    if isinstance(body.get("messages"), list):
        return messages_text(body["messages"])
    raise schema_error("Either `prompt` (string) or `messages` (list) is required.", "body")


# Server-sent events, written by hand (one f-string per token is the hot path).
def chunk_head(rid: str, chat: bool, created: int, model: str) -> str:
    obj = "chat.completion.chunk" if chat else "text_completion"
    return f'data: {{"id":"{rid}","object":"{obj}","created":{created},"model":{dumps(model)},' \
           '"choices":'


def role_event(head: str) -> str:
    return head + '[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,' \
                  '"finish_reason":null}]}\n\n'


def token_event(head: str, chat: bool, i: int, size: int = 1) -> str:
    """A content event carrying output tokens ``i`` .. ``i + size - 1``; no finish_reason
    (vLLM sends that in a final event of its own, see ``finish_event``)."""
    text = dumps(token_text(i) if size == 1 else completion_text(size, i))
    choice = f'{{"index":0,"delta":{{"content":{text}}},' if chat else f'{{"index":0,"text":{text},'
    return f'{head}[{choice}"logprobs":null,"finish_reason":null,"stop_reason":null}}]}}\n\n'


def finish_event(head: str, chat: bool, finish_reason: str) -> str:
    """vLLM's last choice event: empty content, the finish_reason and stop_reason."""
    choice = '{"index":0,"delta":{"content":""},' if chat else '{"index":0,"text":"",'
    return f'{head}[{choice}"logprobs":null,"finish_reason":{dumps(finish_reason)},' \
           '"stop_reason":null}]}\n\n'


def usage_event(head: str, usage: dict) -> str:
    return f'{head}[],"usage":{dumps(usage)}}}\n\n'


def completion_body(rid: str, chat: bool, created: int, model: str, n: int, reason: str,
                    usage: dict) -> dict:
    """A non-stream chat.completion / text_completion body as vLLM returns it."""
    text = completion_text(n)
    choice = ({"index": 0, "message": {"role": "assistant", "content": text, "tool_calls": []}}
              if chat else {"index": 0, "text": text})
    choice.update(logprobs=None, finish_reason=reason, stop_reason=None)
    return {"id": rid, "object": "chat.completion" if chat else "text_completion",
            "created": created, "model": model, "choices": [choice], "usage": usage,
            "prompt_logprobs": None}


def header_number(headers: Any, name: str) -> float | None:
    """A fault-knob header as a finite number >= 0; None when absent, 400 when malformed."""
    value = headers.get(name)
    if value is None:
        return None
    try:
        num = float(value)
    except ValueError:
        num = -1.0
    if not 0 <= num < math.inf:
        raise SimError(f"Invalid {name} header: {value!r}")
    return num


def arg_number(kind: type, low: float, high: float = math.inf):
    """An argparse ``type`` for a bounded number: argparse turns its errors into
    ``parser.error`` messages that name the option."""
    def parse(value: str):
        try:
            v = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
        if not (low <= v <= high) or math.isinf(v):
            what = "must not be negative" if low == 0 else f"must be at least {low}" \
                if high == math.inf else f"must be between {low} and {high}"
            raise argparse.ArgumentTypeError(f"{what}, got {value}")
        return v
    return parse

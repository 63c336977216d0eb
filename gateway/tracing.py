"""OpenTelemetry traces: off by default and free when off.

When enabled (``tracing.otlp_endpoint`` / OTEL_EXPORTER_OTLP_ENDPOINT, or an exporter
passed in by tests), each request gets a SERVER span ``gateway.request`` with GenAI
semantic-convention attributes, child spans for admission, queue wait, cold start and
each upstream attempt, and W3C trace context continued from the client and injected
into the request to the model server.
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

_NULL = contextlib.nullcontext()


class Tracing:
    def __init__(self, endpoint: str | None = None, service_name: str = "vllm-gateway",
                 exporter: Any = None) -> None:
        self.enabled = bool(endpoint or exporter)
        self._tracer = None
        self._provider = None
        if not self.enabled:
            return
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

        self._provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        if exporter is not None:
            self._provider.add_span_processor(SimpleSpanProcessor(exporter))
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            url = endpoint.rstrip("/")
            if not url.endswith("/v1/traces"):
                url += "/v1/traces"
            self._provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url)))
        self._tracer = self._provider.get_tracer("vllm_gateway")

    def request_span(self, name: str, headers: Mapping[str, str], attributes: dict[str, Any]):
        """The SERVER span, continuing the client's traceparent if it sent one."""
        if self._tracer is None:
            return _NULL
        from opentelemetry.propagate import extract
        from opentelemetry.trace import SpanKind
        return self._tracer.start_as_current_span(name, context=extract(dict(headers)),
                                                  kind=SpanKind.SERVER, attributes=attributes)

    def span(self, name: str, attributes: dict[str, Any] | None = None, client: bool = False):
        if self._tracer is None:
            return _NULL
        from opentelemetry.trace import SpanKind
        return self._tracer.start_as_current_span(
            name, kind=SpanKind.CLIENT if client else SpanKind.INTERNAL, attributes=attributes)

    def inject(self, headers: dict[str, str]) -> None:
        """Put the current span's traceparent on an outgoing request."""
        if self._tracer is None:
            return
        from opentelemetry.propagate import inject
        inject(headers)

    @staticmethod
    def current():
        from opentelemetry import trace
        return trace.get_current_span()

    def set_attributes(self, attrs: dict[str, Any]) -> None:
        if self._tracer is not None:
            self.current().set_attributes(attrs)

    def event(self, name: str, attrs: dict[str, Any] | None = None) -> None:
        if self._tracer is not None:
            self.current().add_event(name, attrs or {})

    def record_error(self, exc: BaseException) -> None:
        if self._tracer is not None:
            from opentelemetry.trace import Status, StatusCode
            span = self.current()
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, str(exc)))

    def shutdown(self) -> None:
        if self._provider is not None:
            self._provider.shutdown()

"""The OpenAI-compatible HTTP gateway: chat completions over Kafka, for any OpenAI client."""

from stages.gateway.app import create_app, main, run_gateway, serve, sse_body

__all__ = ["create_app", "main", "run_gateway", "serve", "sse_body"]

"""The producer client: publish prompts, route answers back to whoever asked."""

from pipeline.client.client import (
    AnswerError,
    AnswerRouter,
    ClientStopped,
    Prepared,
    Prompt,
    PublishError,
    Reply,
    RouterStats,
    SluiceClient,
    prepare,
)

__all__ = [
    "AnswerError",
    "AnswerRouter",
    "ClientStopped",
    "Prepared",
    "Prompt",
    "PublishError",
    "Reply",
    "RouterStats",
    "SluiceClient",
    "prepare",
]

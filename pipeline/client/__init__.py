"""The producer client: publish prompts, route answers back to whoever asked."""

from pipeline.client.client import (
    ClientStopped,
    Prepared,
    Prompt,
    PublishError,
    SluiceClient,
    prepare,
)
from pipeline.client.routing import AnswerError, AnswerRouter, Reply, RouterStats

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

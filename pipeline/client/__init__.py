"""The producer client: publish prompts, route answers and deltas back to whoever asked."""

from pipeline.client.client import ClientStopped, SluiceClient
from pipeline.client.prompts import Prepared, Prompt, prepare, refusal
from pipeline.client.publish import PublishError, PublishTimeout
from pipeline.client.routing import AnswerError, AnswerRouter, Reply, RouterStats
from pipeline.client.stream import ReplyStream

__all__ = [
    "AnswerError",
    "AnswerRouter",
    "ClientStopped",
    "Prepared",
    "Prompt",
    "PublishError",
    "PublishTimeout",
    "Reply",
    "ReplyStream",
    "RouterStats",
    "SluiceClient",
    "prepare",
    "refusal",
]

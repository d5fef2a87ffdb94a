"""The bodies of the gateway's own routes; answers are the pipeline's (``schemas.messages``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from schemas.messages import PromptMessage

INT64_MAX = 2**63 - 1
INT32_MAX = 2**31 - 1


class StreamOptions(BaseModel):
    include_usage: bool | None = None


class ChatCompletionRequest(PromptMessage):
    """The body of ``POST /v1/chat/completions``: a prompt, with the gateway's own bounds.

    ``seed`` and ``top_k`` are bounded to what the engine takes (int64, int32).
    """

    seed: int | None = Field(default=None, ge=0, le=INT64_MAX)
    top_k: int | None = Field(default=None, ge=0, le=INT32_MAX)
    id: Any = Field(default=None, description="Ignored: the gateway assigns every request its id.")
    stream_options: StreamOptions | None = None

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk (``stream_options.include_usage``)."""
        return self.stream_options is not None and bool(self.stream_options.include_usage)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "sluice"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Probe(BaseModel):
    ok: bool
    detail: str

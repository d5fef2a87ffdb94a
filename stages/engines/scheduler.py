"""The small interface between the ONNX engine's thread and what it drives: a scheduler.

A scheduler holds the requests added to it, admits them into its batch as room allows and, on
each ``step()``, runs one forward pass over the batch and says what came of it (:class:`Step`):
the requests that ended, with their answer or their error; the requests that got a new token;
and whether the step made progress (what the stall watchdog measures). It knows nothing of
threads or the event loop: ``stages/engines/onnx.py`` calls it from the engine thread, a unit
test from its own. Two of them, one file each: ``continuous.ContinuousScheduler`` (og.Engine,
requests join and leave the running batch) and ``static.StaticScheduler`` (og.Generator
batches).

A scheduler's og objects belong to the thread that made them: build it on the thread that
steps it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from pipeline.errors import InvalidInput, SluiceError
from stages.engines.base import Generation, GenerationRequest


@dataclass(eq=False)
class Job:
    """One request inside a scheduler, and what it has generated so far."""

    request: GenerationRequest
    submitted: float = field(default_factory=time.monotonic)
    started: float = 0.0  # when it was admitted into a batch
    first_token: float = 0.0
    tokens: list[int] = field(default_factory=list)  # only ever appended to
    stream: Any = None  # incremental detokenizer, only where stop strings are watched here
    text: str = ""  # ... and the text it has decoded so far
    stopped: bool = False  # a stop string ended it
    # Streaming, kept by the engine thread: how many tokens its listener was last told of, when.
    told: int = 0
    told_at: float = float("-inf")  # never: the first token is told at once

    def abandoned(self) -> bool:
        """True once nobody waits for this job's outcome any more (failed or cancelled by its
        owner): a scheduler does not admit it, and stops reading its row of a static batch."""
        return False

    def cost(self) -> int:
        """Tokens it may hold in the KV cache: its prompt plus its new-token limit."""
        return len(self.request.input_ids) + (self.request.sampling.max_tokens or 0)

    def hit_stop(self, token: int) -> bool:
        """Decode ``token`` incrementally; True once the text holds one of the stop strings."""
        assert self.stream is not None
        self.text += self.stream.decode(token)
        if any(stop in self.text for stop in self.request.sampling.stop):
            self.stopped = True
        return self.stopped

    def generation(self, reason: str, now: float) -> Generation:
        """The answer, ended at ``now`` for ``reason`` (an og finish reason, or ``length``)."""
        finish: Literal["stop", "length"] = (
            "length"
            if reason in ("MAX_GENERATED_TOKENS", "MAX_SESSION_TOKENS", "length")
            else "stop"
        )
        first = self.first_token or now
        return Generation(
            output_ids=list(self.tokens),
            finish_reason=finish,
            ttft_s=first - self.submitted,
            compute_s=now - self.started,
            queue_s=self.started - self.submitted,
        )


Outcome = Generation | SluiceError

# How onnxruntime (CPU and CUDA allocators) and og word an allocation that failed.
_OOM_WORDS = (
    "out of memory",
    "failed to allocate",
    "bad_alloc",
    "cudaerrormemoryallocation",
    "cuda_error_out_of_memory",
)


def out_of_memory(exc: BaseException) -> bool:
    """True when ``exc`` is an allocation that failed: an engine death, never a bad request."""
    if isinstance(exc, MemoryError):
        return True
    text = str(exc).lower()
    return any(word in text for word in _OOM_WORDS)


def check_top_k(job: Job, vocab: int) -> InvalidInput | None:
    """og fails a whole step on ``top_k`` above the vocabulary ("top_k must be <= vocab_size"):
    such a request is refused at admission, naming the parameter."""
    top_k = job.request.sampling.top_k
    if top_k is None or top_k <= vocab:
        return None
    return InvalidInput(
        f"top_k must be at most the model's vocabulary size {vocab}; got {top_k}",
        reason="schema",
        param="top_k",
    )


@dataclass(eq=False, slots=True)
class Step:
    """What one step did."""

    # Jobs that ended this step, each once: an answer, or the error it failed with. A job
    # cancelled through the scheduler is not reported.
    finished: list[tuple[Job, Outcome]] = field(default_factory=list)
    # Jobs whose ``tokens`` grew this step, once per new token (those that ended, too): where a
    # token stream reads from. ``Job.tokens`` only grows, so a reader elsewhere may take
    # ``tokens[sent:]`` at any time.
    advanced: list[Job] = field(default_factory=list)
    # A token was made or a request ended (a step that yields nothing is not progress).
    progressed: bool = False


class Scheduler(Protocol):
    """What the engine thread needs of a scheduler."""

    capacity: int  # requests that may run at once

    @property
    def running(self) -> int:
        """Requests in the batch (the ones a step advances)."""
        ...

    @property
    def waiting(self) -> int:
        """Requests added but not yet admitted."""
        ...

    @property
    def has_work(self) -> bool:
        """Anything running or waiting: ``step()`` has something to do."""
        ...

    def add(self, job: Job) -> None:
        """Queue ``job``; a later step admits it when there is room."""
        ...

    def cancel(self, job: Job) -> None:
        """Drop ``job`` if it waits, end its generation if it runs; a no-op once it ended."""
        ...

    def step(self) -> Step:
        """Admit what fits, run one forward pass, report what came of it."""
        ...

    def describe(self) -> str:
        """One line for the log: which og path, and its batch limits."""
        ...


@dataclass(frozen=True)
class LoadedModel:
    """A model folder loaded for generation, with what its ``genai_config.json`` says."""

    path: Path
    og: Any  # the onnxruntime_genai module, imported only once a model is loaded
    model: Any  # og.Model
    tokenizer: Any  # og.Tokenizer
    eos: frozenset[int]
    pad: int  # the token static batches pad prompts with
    context: int  # the model's context length
    vocab: int  # the model's vocabulary (its logits), what og checks top_k against
    dynamic: bool  # built with paged attention: og.Engine batches, and takes stops and seeds


def load_model(path: Path, threads: int = 0) -> LoadedModel:
    """Load the model in ``path`` (``threads``: onnxruntime intra-op threads, 0 for its own
    choice). Raises what og raises (RuntimeError, OSError, ValueError) for a folder without a
    usable model (and may raise anything else for a broken installation: the engine thread
    catches every load error)."""
    import onnxruntime_genai as og

    config = og.Config(str(path))
    if threads:
        overlay = {"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}
        config.overlay(json.dumps(overlay))
    model = og.Model(config)
    genai = json.loads((path / "genai_config.json").read_text())
    listed = genai["model"].get("eos_token_id", [])
    eos = set(listed if isinstance(listed, list) else [listed])
    pad = genai["model"].get("pad_token_id", next(iter(eos), 0))
    return LoadedModel(
        path=path,
        og=og,
        model=model,
        tokenizer=og.Tokenizer(model),
        eos=frozenset(eos),
        pad=int(pad[0] if isinstance(pad, list) else pad),
        context=int(genai["model"].get("context_length", 2048)),
        vocab=int(genai["model"].get("vocab_size") or 2**31 - 1),
        dynamic="dynamic_batching" in genai.get("engine", {}),
    )

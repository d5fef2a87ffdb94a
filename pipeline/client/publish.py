"""Publishing that outlives a broker outage: retry until the request's own deadline.

A broker restart or a network cut makes ``send`` fail with retriable errors (a timeout waiting
for metadata, no connection, no leader) for as long as it lasts. Giving up on the first such
error turned a 60 s outage into thousands of failed requests whose timeouts had not run out.
:func:`publish_until` retries those errors with a capped exponential backoff until the
deadline the request carries (``sluice-deadline``), and only then gives up with
:class:`PublishTimeout`, which the client answers as a ``timeout`` error. An error no retry can
fix (a record too large, a closed producer) is a :class:`PublishError` at once.

Publishing again after an error whose outcome is unknown may publish a prompt twice; the
pipeline is at-least-once and de-duplicates by request id, and the client keeps one answer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiokafka.errors import KafkaError, KafkaTimeoutError

from pipeline.errors import TransientError

log = logging.getLogger(__name__)

FIRST_BACKOFF_S = 0.1


class PublishError(TransientError):
    """Kafka did not take the prompt, and retrying would not help (or the client is stopped)."""

    reason = "publish-failed"


class PublishTimeout(TransientError):
    """Kafka did not take the prompt before the request's deadline (the broker unreachable)."""

    reason = "publish-timeout"


class ProducerReplaced(KafkaError):  # type: ignore[misc]
    """The producer had died (its sender failed for good) and a new one took its place: the
    send is worth another attempt on the new one."""

    retriable = True


def retriable(exc: KafkaError) -> bool:
    """Worth another attempt: Kafka says so, or the send timed out waiting for the broker."""
    return bool(exc.retriable) or isinstance(exc, KafkaTimeoutError)


async def publish_until(
    attempt: Callable[[], Awaitable[None]],
    deadline: float,
    *,
    what: str,
    backoff_max_s: float,
    on_retry: Callable[[KafkaError], None] | None = None,
) -> int:
    """Run ``attempt`` (send and await the acknowledgements) until it succeeds; returns the
    number of attempts made.

    ``deadline`` is on the event loop's clock. Raises ``PublishTimeout`` once it has passed
    (an attempt in progress is abandoned at the deadline), ``PublishError`` for an error that
    is not retriable.
    """
    loop = asyncio.get_running_loop()
    backoff = FIRST_BACKOFF_S
    attempts = 0
    last = "no attempt"
    while True:
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise PublishTimeout(f"{what} not published before its deadline (last: {last})")
        attempts += 1
        try:
            await asyncio.wait_for(attempt(), remaining)
        except TimeoutError as exc:
            raise PublishTimeout(f"{what} not published before its deadline") from exc
        except KafkaError as exc:
            if not retriable(exc):
                raise PublishError(f"publishing {what} failed: {type(exc).__name__}") from exc
            last = type(exc).__name__
            if on_retry is not None:
                on_retry(exc)
            if attempts == 1:
                log.warning("publishing %s failed (%s); retrying until its deadline", what, last)
            else:
                log.debug("publishing %s failed again (%s, attempt %d)", what, last, attempts)
            await asyncio.sleep(min(backoff, max(0.0, deadline - loop.time())))
            backoff = min(backoff * 2, backoff_max_s)
            continue
        if attempts > 1:
            log.info("published %s after %d attempts", what, attempts)
        return attempts

"""The circuit breaker (closed / open / half-open with one probe) and the response cache."""

from __future__ import annotations

import base64
from pathlib import Path

import orjson
import pytest

from pipeline.runtime.batch import Output
from pipeline.runtime.breaker import BreakerState, CircuitBreaker, ResponseCache


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _breaker(
    threshold: int = 3, cooldown_s: float = 10.0
) -> tuple[CircuitBreaker, FakeClock, list[BreakerState]]:
    clock = FakeClock()
    changes: list[BreakerState] = []
    breaker = CircuitBreaker(threshold, cooldown_s, clock=clock, on_change=changes.append)
    return breaker, clock, changes


def _state(breaker: CircuitBreaker) -> BreakerState:
    """The state, read through a call so that mypy does not narrow it between assertions."""
    return breaker.state


def _open(breaker: CircuitBreaker) -> None:
    for _ in range(breaker.threshold):
        breaker.fault()
    assert _state(breaker) == BreakerState.OPEN


# --- CircuitBreaker --------------------------------------------------------------------------


def test_a_new_breaker_is_closed_and_admits() -> None:
    breaker, _, changes = _breaker()
    assert _state(breaker) == BreakerState.CLOSED
    assert all(breaker.admit() for _ in range(10))
    assert not breaker.probing
    assert changes == []


@pytest.mark.parametrize("threshold", [1, 3, 5])
def test_opens_after_exactly_threshold_consecutive_faults(threshold: int) -> None:
    breaker, _, changes = _breaker(threshold=threshold)
    for _ in range(threshold - 1):
        breaker.fault()
        assert _state(breaker) == BreakerState.CLOSED
        assert breaker.admit()
    breaker.fault()
    assert _state(breaker) == BreakerState.OPEN
    assert breaker.consecutive_faults == threshold
    assert not breaker.admit()
    assert changes == [BreakerState.OPEN]


def test_a_success_resets_the_run_of_faults() -> None:
    breaker, _, _ = _breaker(threshold=3)
    breaker.fault()
    breaker.fault()
    breaker.success()
    assert breaker.consecutive_faults == 0
    breaker.fault()
    breaker.fault()
    assert _state(breaker) == BreakerState.CLOSED
    breaker.fault()
    assert _state(breaker) == BreakerState.OPEN


def test_open_refuses_until_the_cooldown_has_passed() -> None:
    breaker, clock, _ = _breaker(cooldown_s=10.0)
    _open(breaker)
    clock.now += 9.99
    assert not breaker.admit()
    assert _state(breaker) == BreakerState.OPEN
    assert not breaker.probing


def test_half_open_after_cooldown_lets_exactly_one_probe_through() -> None:
    breaker, clock, changes = _breaker(cooldown_s=10.0)
    _open(breaker)
    clock.now += 10.0
    assert breaker.admit() is True
    assert _state(breaker) == BreakerState.HALF_OPEN
    assert breaker.probing
    assert [breaker.admit() for _ in range(5)] == [False] * 5  # probe not resolved yet
    clock.now += 100.0
    assert breaker.admit() is False  # more time does not let a second probe out
    assert changes == [BreakerState.OPEN, BreakerState.HALF_OPEN]


def test_probe_success_closes() -> None:
    breaker, clock, changes = _breaker()
    _open(breaker)
    clock.now += 10.0
    assert breaker.admit()
    breaker.success()
    assert _state(breaker) == BreakerState.CLOSED
    assert breaker.consecutive_faults == 0
    assert not breaker.probing
    assert all(breaker.admit() for _ in range(5))
    assert changes == [BreakerState.OPEN, BreakerState.HALF_OPEN, BreakerState.CLOSED]


def test_probe_fault_reopens_for_a_new_cooldown() -> None:
    breaker, clock, changes = _breaker(cooldown_s=10.0)
    _open(breaker)
    clock.now += 10.0
    assert breaker.admit()
    clock.now += 3.0  # the probe takes a while to fail
    breaker.fault()
    assert _state(breaker) == BreakerState.OPEN
    clock.now += 9.99  # measured from the probe's fault, not the first opening
    assert not breaker.admit()
    clock.now += 0.01
    assert breaker.admit()
    assert _state(breaker) == BreakerState.HALF_OPEN
    assert not breaker.admit()
    assert changes == [
        BreakerState.OPEN,
        BreakerState.HALF_OPEN,
        BreakerState.OPEN,
        BreakerState.HALF_OPEN,
    ]


def test_one_probe_fault_reopens_even_with_a_high_threshold() -> None:
    breaker, clock, _ = _breaker(threshold=5)
    _open(breaker)
    breaker.success()  # a late success from work admitted before the opening
    assert _state(breaker) == BreakerState.CLOSED
    _open(breaker)
    clock.now += 10.0
    assert breaker.admit()
    breaker.fault()
    assert _state(breaker) == BreakerState.OPEN


def test_release_probe_lets_another_probe_through() -> None:
    breaker, clock, _ = _breaker()
    _open(breaker)
    clock.now += 10.0
    assert breaker.admit()
    assert not breaker.admit()
    breaker.release_probe()  # the probe was bad input: it proved nothing
    assert _state(breaker) == BreakerState.HALF_OPEN
    assert breaker.admit()
    assert not breaker.admit()
    breaker.success()
    assert _state(breaker) == BreakerState.CLOSED


def test_release_probe_while_closed_changes_nothing() -> None:
    breaker, _, changes = _breaker()
    breaker.release_probe()
    assert _state(breaker) == BreakerState.CLOSED
    assert breaker.admit()
    assert changes == []


def test_on_change_is_called_once_per_transition() -> None:
    breaker, clock, changes = _breaker(threshold=2)
    breaker.fault()
    breaker.fault()
    breaker.fault()  # already open: no second notification
    clock.now += 10.0
    breaker.admit()
    breaker.admit()
    breaker.fault()
    clock.now += 10.0
    breaker.admit()
    breaker.success()
    breaker.success()  # already closed
    assert changes == [
        BreakerState.OPEN,
        BreakerState.HALF_OPEN,
        BreakerState.OPEN,
        BreakerState.HALF_OPEN,
        BreakerState.CLOSED,
    ]
    assert _state(breaker) == BreakerState.CLOSED


def test_works_without_on_change() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(threshold=1, cooldown_s=1.0, clock=clock)
    breaker.fault()
    clock.now += 1.0
    assert breaker.admit()
    breaker.success()
    assert _state(breaker) == BreakerState.CLOSED


# --- ResponseCache ---------------------------------------------------------------------------


def _out(n: int) -> list[Output]:
    return [Output(topic="t.tokenized", key=b"k", value=f"v{n}".encode(), headers=[])]


def test_cache_get_of_a_missing_fingerprint_is_none() -> None:
    cache = ResponseCache(4)
    assert cache.get("nope") is None
    assert len(cache) == 0
    assert not cache.dirty


def test_cache_is_lru_bounded() -> None:
    cache = ResponseCache(2)
    cache.put("a", _out(1))
    cache.put("b", _out(2))
    cache.put("c", _out(3))
    assert len(cache) == 2
    assert cache.get("a") is None
    assert cache.get("b") == _out(2)
    assert cache.get("c") == _out(3)
    assert cache.dirty


def test_cache_get_moves_to_the_end() -> None:
    cache = ResponseCache(2)
    cache.put("a", _out(1))
    cache.put("b", _out(2))
    assert cache.get("a") == _out(1)  # now "b" is the least recently used
    cache.put("c", _out(3))
    assert cache.get("b") is None
    assert cache.get("a") == _out(1)
    assert cache.get("c") == _out(3)


def test_cache_put_again_replaces_and_refreshes() -> None:
    cache = ResponseCache(2)
    cache.put("a", _out(1))
    cache.put("b", _out(2))
    cache.put("a", _out(9))
    cache.put("c", _out(3))
    assert len(cache) == 2
    assert cache.get("a") == _out(9)
    assert cache.get("b") is None


def test_cache_of_capacity_zero_never_stores(tmp_path: Path) -> None:
    path = tmp_path / "cache.json"
    cache = ResponseCache(0, path)
    cache.put("a", _out(1))
    assert len(cache) == 0
    assert cache.get("a") is None
    assert not cache.dirty
    cache.save()
    assert not path.exists()


def _binary_outputs() -> list[Output]:
    return [
        Output(
            topic="t.tokenized",
            key=b"\xff\xfe\x00conv",
            value=b'{"id":"x"}\x80\x81\xfe',
            headers=[
                ("sluice-request-id", b"r-1"),
                ("bin", b"\x00\xff\xc3\x28"),
                ("empty", b""),
                ("h\u00e9", "caf\u00e9".encode()),
            ],
        ),
        Output(topic="t.answers", key=None, value=b"\xc0\xc1", headers=[]),
    ]


def test_cache_save_load_round_trip_keeps_bytes_and_order(tmp_path: Path) -> None:
    path = tmp_path / "state" / "cache.json"
    cache = ResponseCache(3, path)
    cache.put("fp-old", _out(1))
    cache.put("fp-bin", _binary_outputs())
    cache.put("fp-new", _out(2))
    cache.get("fp-old")  # LRU order now: fp-bin, fp-new, fp-old
    cache.save()
    assert path.exists()
    assert not cache.dirty
    assert not path.with_suffix(".tmp").exists()

    loaded = ResponseCache(3, path)
    loaded.load()
    assert len(loaded) == 3
    assert not loaded.dirty
    loaded.put("fp-x", _out(3))  # evicts the least recently used: fp-bin
    assert loaded.get("fp-bin") is None
    assert loaded.get("fp-new") == _out(2)
    assert loaded.get("fp-old") == _out(1)

    again = ResponseCache(3, path)
    again.load()
    assert again.get("fp-bin") == _binary_outputs()


def test_cache_load_trims_to_a_smaller_capacity(tmp_path: Path) -> None:
    path = tmp_path / "cache.json"
    cache = ResponseCache(3, path)
    for n in range(3):
        cache.put(f"fp{n}", _out(n))
    cache.save()
    small = ResponseCache(1, path)
    small.load()
    assert len(small) == 1
    assert small.get("fp2") == _out(2)  # the most recently used survives


def test_cache_save_skips_when_clean_or_without_a_path(tmp_path: Path) -> None:
    path = tmp_path / "cache.json"
    ResponseCache(4, path).save()  # nothing put: not dirty
    assert not path.exists()
    memory = ResponseCache(4)
    memory.put("a", _out(1))
    memory.save()  # no path: nothing to write, no error
    assert memory.dirty


def test_cache_load_of_a_missing_file_is_empty(tmp_path: Path) -> None:
    cache = ResponseCache(4, tmp_path / "absent.json")
    cache.load()
    assert len(cache) == 0
    ResponseCache(4).load()  # no path at all


def _valid_file_bytes() -> bytes:
    return orjson.dumps(
        {
            "fp": [
                {
                    "topic": "t.tokenized",
                    "key": None,
                    "value": base64.b64encode(b"v").decode(),
                    "headers": [],
                }
            ]
        }
    )


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"\x00\xff\xfe not json at all",
        _valid_file_bytes()[:-7],  # truncated
        b"{",
    ],
    ids=["empty", "garbage", "truncated", "open-brace"],
)
def test_cache_load_of_an_unreadable_file_starts_empty(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "cache.json"
    path.write_bytes(content)
    cache = ResponseCache(4, path)
    cache.load()
    assert len(cache) == 0


@pytest.mark.parametrize(
    "content",
    [
        b"[1, 2, 3]",
        b'{"fp": [{"topic": "t.tokenized"}]}',
        b'{"fp": [{"topic": "t", "key": null, "value": "!!not base64!!", "headers": []}]}',
        b'{"fp": "not a list"}',
    ],
    ids=["json-list", "missing-fields", "bad-base64", "wrong-entry-type"],
)
def test_cache_load_of_a_json_file_of_the_wrong_shape_starts_empty(
    tmp_path: Path, content: bytes
) -> None:
    """Valid JSON of another shape (an older format, a hand edit, bad base64) must not keep
    the stage from starting: the cache starts empty."""
    path = tmp_path / "cache.json"
    path.write_bytes(content)
    cache = ResponseCache(4, path)
    cache.load()
    assert len(cache) == 0


def test_a_late_fault_while_open_does_not_extend_the_cooldown() -> None:
    breaker, clock, changes = _breaker(threshold=3, cooldown_s=10.0)
    _open(breaker)
    clock.now += 9.0
    breaker.fault()  # work admitted before it opened, finishing late
    breaker.fault()
    assert breaker.consecutive_faults == 5
    clock.now += 1.0
    assert breaker.admit()  # 10 s after opening, not after the late faults
    assert _state(breaker) == BreakerState.HALF_OPEN
    assert changes == [BreakerState.OPEN, BreakerState.HALF_OPEN]


def test_the_cache_is_saved_periodically_not_only_at_shutdown(tmp_path: Path) -> None:
    clock = FakeClock()
    path = tmp_path / "cache.json"
    cache = ResponseCache(4, path, save_every_s=30.0, clock=clock)
    assert not cache.save_if_due()  # nothing to save
    cache.put("fp", [Output("t", None, b"v", [])])
    assert not cache.save_if_due()  # not yet due
    assert not path.exists()
    clock.now += 30.0
    assert cache.save_if_due()
    assert path.exists()
    assert not cache.save_if_due()  # clean again
    cache.put("fp2", [Output("t", None, b"w", [], tombstone=True)])
    clock.now += 29.0
    assert not cache.save_if_due()
    clock.now += 1.0
    assert cache.save_if_due()
    again = ResponseCache(4, path)
    again.load()
    assert again.get("fp") == [Output("t", None, b"v", [])]
    assert again.get("fp2") == [Output("t", None, b"w", [], tombstone=True)]


def test_a_failed_periodic_save_is_retried_later_not_raised(tmp_path: Path) -> None:
    clock = FakeClock()
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cache = ResponseCache(4, blocker / "cache.json", save_every_s=5.0, clock=clock)
    cache.put("fp", [Output("t", None, b"v", [])])
    clock.now += 5.0
    assert not cache.save_if_due()
    assert cache.dirty

from __future__ import annotations

from pipeline.scaling import ScalePolicy, StageScaler


def test_desired_is_ceil_of_lag_over_threshold_clamped() -> None:
    p = ScalePolicy("compute", lag_threshold=50, min_workers=1, max_workers=4)
    assert [p.raw_desired(lag) for lag in (0, 1, 50, 51, 149, 151, 10_000)] == [1, 1, 1, 2, 3, 4, 4]


def test_waiting_tokens_can_drive_compute_higher_than_lag() -> None:
    p = ScalePolicy("compute", lag_threshold=50, token_threshold=1000, max_workers=8)
    assert p.raw_desired(10, waiting_tokens=3500) == 4


def test_max_workers_never_exceeds_the_partitions() -> None:
    p = ScalePolicy("compute", max_workers=12).bounded(partitions=3)
    assert p.max_workers == 3 and p.raw_desired(10_000) == 3


def test_one_spike_does_not_scale_up_persistent_lag_does() -> None:
    s = StageScaler(ScalePolicy("compute", scale_up_window_s=5, scale_down_window_s=30))
    assert s.observe(0, 0) is None
    assert s.observe(1, 500) is None  # a spike
    assert s.observe(2, 0) is None
    for t in range(3, 8):
        decision = s.observe(t, 200)
    assert decision is None  # 200 seen at 3..7 but the window (2..7) still holds a 0
    decision = s.observe(8, 200)
    assert decision is not None and decision.current == 1 and decision.desired == 4
    assert s.current == 4


def test_scale_down_waits_for_the_longer_window() -> None:
    s = StageScaler(ScalePolicy("compute", scale_up_window_s=2, scale_down_window_s=10), current=4)
    for t in range(0, 5):
        assert s.observe(t, 200) is None  # already at 4
    decisions = [s.observe(t, 0) for t in range(5, 16)]
    first = next(i for i, d in enumerate(decisions) if d is not None)
    assert first + 5 >= 14  # the last 200 at t=4 must leave the 10 s window first
    assert s.current == 1


def test_a_window_as_long_as_the_history_kept_still_decides() -> None:
    """The down window is the longest one: history older than it is dropped, yet it decides."""
    s = StageScaler(ScalePolicy("compute", scale_up_window_s=1, scale_down_window_s=8), current=3)
    decisions = [s.observe(t * 0.5, 0) for t in range(40)]
    assert any(d is not None and d.desired == 1 for d in decisions)
    assert s.current == 1


def test_records_a_worker_holds_in_flight_are_not_backlog() -> None:
    old = ScalePolicy("compute", lag_threshold=50, max_workers=6)
    new = ScalePolicy("compute", lag_threshold=50, in_flight_per_worker=32, max_workers=6)
    assert new.lag_per_worker == 82
    # One worker running a full batch of 32 with a short queue: one worker is enough.
    assert (old.raw_desired(75), new.raw_desired(75)) == (2, 1)
    # Three workers' batches plus a real backlog still scale out.
    assert new.raw_desired(3 * 32 + 200) == 4
    assert new.bounded(partitions=3).in_flight_per_worker == 32


def test_the_default_compute_policy_counts_in_flight_and_tokens() -> None:
    from pipeline.scaling import DEFAULT_POLICIES

    compute = next(p for p in DEFAULT_POLICIES if p.stage == "compute")
    assert compute.in_flight_per_worker > 0 and compute.token_threshold


def test_a_scale_up_on_waiting_tokens_says_so() -> None:
    s = StageScaler(ScalePolicy("compute", token_threshold=1000, scale_up_window_s=1,
                                scale_down_window_s=5))  # fmt: skip
    assert s.observe(0, 0, waiting_tokens=3000) is None
    decision = s.observe(1, 0, waiting_tokens=3000)
    assert decision is not None and decision.desired == 3
    assert "3000 waiting tokens" in decision.reason


def test_the_batch_lane_asks_for_workers_by_its_own_larger_threshold() -> None:
    policy = ScalePolicy("compute", lag_threshold=50, batch_lag_threshold=500, max_workers=6)
    assert policy.raw_desired(0, batch_lag=400) == 1  # a batch waits for spare capacity
    assert policy.raw_desired(0, batch_lag=1600) == 4
    assert policy.raw_desired(120, batch_lag=100) == 3  # the interactive lane's own count
    single = ScalePolicy("postprocess", lag_threshold=50)
    assert single.raw_desired(0, batch_lag=1600) == 1  # no batch lane: its lag is not read


def test_a_policy_with_min_zero_scales_to_zero_when_both_lanes_are_idle() -> None:
    policy = ScalePolicy("compute", lag_threshold=50, batch_lag_threshold=500, min_workers=0,
                         activation_lag=1)  # fmt: skip
    assert policy.raw_desired(0, 0, 0) == 0
    assert policy.raw_desired(0, 0, batch_lag=1) == 1  # one batch line wakes it
    assert policy.raw_desired(1, 0, 0) == 1  # so does one chat prompt
    assert policy.raw_desired(0, waiting_tokens=10) == 1
    s = StageScaler(policy, current=2)
    decisions = [s.observe(t, 0, batch_lag=0) for t in range(0, 40)]
    assert [d.desired for d in decisions if d is not None] == [0]
    woke = [s.observe(40 + t, 0, batch_lag=5) for t in range(0, 7)]
    assert [d.desired for d in woke if d is not None] == [1]

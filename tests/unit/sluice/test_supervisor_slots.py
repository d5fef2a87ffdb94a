"""The supervisor keeps a slot that was still stopping when a scale-up asked for it again."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config import Settings
from pipeline.scaling import ScalePolicy
from sluice.supervisor import StageState, Supervisor, Worker


class FakePopen:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self.terminated = False

    def poll(self) -> int | None:
        return self.returncode

    def terminate(self) -> None:
        self.terminated = True


class FakeProc:
    def __init__(self, pid: int) -> None:
        self.proc: Any = FakePopen(pid)


def _exit(worker: Worker) -> None:
    proc: Any = worker.proc.proc
    proc.returncode = 0


def _supervisor(tmp_path: Path) -> tuple[Supervisor, StageState, list[int]]:
    supervisor = Supervisor(
        Settings(state_dir=tmp_path), [ScalePolicy("preprocess", max_workers=4)], tmp_path
    )
    st = supervisor.stages["preprocess"]
    started: list[int] = []

    def start(state: StageState, slot: int) -> None:
        started.append(slot)
        state.workers[slot] = Worker(slot, FakeProc(1000 + len(started)))  # type: ignore[arg-type]

    supervisor._start = start  # type: ignore[method-assign,assignment]
    return supervisor, st, started


def test_a_slot_stopping_during_a_scale_up_is_started_again(tmp_path: Path) -> None:
    supervisor, st, started = _supervisor(tmp_path)
    st.scaler.current = 2
    supervisor._apply(st, 2)
    assert started == [0, 1]
    st.scaler.current = 1
    supervisor._apply(st, 1)  # scale-in: slot 1 gets SIGTERM and is stopping
    assert st.workers[1].stopping
    st.scaler.current = 2
    supervisor._apply(st, 2)  # scale-up while slot 1 is still stopping
    assert started == [0, 1]  # nothing to start yet: the slot is taken
    _exit(st.workers[1])  # the stopping worker exits
    supervisor._reap(st, now=0.0)
    assert started == [0, 1, 1]
    assert not st.workers[1].stopping
    assert supervisor.running("preprocess") == 2


def test_a_slot_stopped_by_a_scale_in_that_stands_stays_stopped(tmp_path: Path) -> None:
    supervisor, st, started = _supervisor(tmp_path)
    st.scaler.current = 2
    supervisor._apply(st, 2)
    st.scaler.current = 1
    supervisor._apply(st, 1)
    _exit(st.workers[1])
    supervisor._reap(st, now=0.0)
    assert started == [0, 1]
    assert 1 not in st.workers
    assert supervisor.running("preprocess") == 1

"""The shared phase model (kiapi_core.PhaseClock / StepProgress) and the host's ETA rules."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kiapi_core import PhaseClock, StepProgress, decode_fraction
from kiapi_core.jobs.context import host_eta_s
from kiapi_core.jobs.eta import QueueSnapshot, apply, slots_of
from kiapi_core.jobs.store import JobRecord


class FakeCtx:
    job_id = "job_0000000000000000"

    def __init__(self) -> None:
        self.reports: list[tuple[float | None, str | None, float | None]] = []

    def progress(
        self, fraction: float | None = None, label: str | None = None, *, eta_s: Any = None
    ) -> None:
        self.reports.append((fraction, label, eta_s))

    def report_progress(
        self, fraction: float | None = None, label: str | None = None, *, eta_s: Any = None
    ) -> bool:
        self.reports.append((fraction, label, eta_s))
        return True


def test_decode_fraction_is_linear_then_never_finishes() -> None:
    assert decode_fraction(0, 10) == 0
    assert abs(decode_fraction(5, 10) - 0.45) < 1e-9
    assert abs(decode_fraction(10, 10) - 0.9) < 1e-9
    late = [decode_fraction(t, 10) for t in (11, 15, 30, 1000)]
    assert late == sorted(late) and all(f <= 0.99 for f in late)


def test_phase_clock_persists_measurements(tmp_path: Path) -> None:
    path = tmp_path / "phases.json"
    clock = PhaseClock(path)
    assert clock.decode_per_step(512 * 512) == 20.0
    assert clock.step_s(512 * 512) is None and clock.lead_s(512 * 512) is None
    clock.record(256 * 256, step_s=0.05, decode_s=7.5, lead_s=0.4)
    again = PhaseClock(path)
    assert again.decode_per_step(256 * 256) == 150.0
    assert again.decode_per_step(512 * 512) == 150.0  # nearest measured size
    assert again.step_s(256 * 256) == pytest.approx(0.05)
    assert again.step_s(512 * 512) == pytest.approx(0.2)  # scaled by the pixel count
    assert again.lead_s(256 * 256) == pytest.approx(0.4)
    assert again.decode_s(256 * 256) == pytest.approx(7.5)
    assert again.decode_s(512 * 512) == pytest.approx(30.0)
    path.write_text("not json")
    assert PhaseClock(path, decode_steps=2.0).decode_per_step(1) == 2.0


def test_phase_clock_reads_the_plugins_older_file(tmp_path: Path) -> None:
    # What the ideogram4 and zimage plugins wrote before the clock moved into kiapi_core.
    path = tmp_path / "phases.json"
    path.write_text(json.dumps({"65536": [100.0, 200.0]}))
    clock = PhaseClock(path)
    assert clock.decode_per_step(65536) == 150.0
    assert clock.step_s(65536) is None


def test_step_progress_eta_follows_the_clock_and_leaves_out_the_first_step(
    tmp_path: Path,
) -> None:
    clock = PhaseClock(tmp_path / "phases.json")
    clock.record(4096, step_s=1.0, decode_s=10.0, lead_s=3.0)
    clock.record(4096, step_s=1.0, decode_s=10.0, lead_s=3.0)
    ctx = FakeCtx()
    progress = StepProgress(ctx, clock, steps=8, pixels=4096)  # type: ignore[arg-type]
    t0 = progress.began
    # Before step 1 ends: the lead-in left, 7 steady steps, a decode 10 steps long.
    assert progress.remaining_s(0, now=t0) == pytest.approx(3.0 + 7 + 10)
    assert progress.remaining_s(0, now=t0 + 2.0) == pytest.approx(1.0 + 7 + 10)
    # A slow first step (warm-up) does not count against the steady pace...
    progress.first_step_done = t0 + 6.0
    assert progress.step_estimate_s(1) == pytest.approx(1.0)
    # ...this run's own steps do, more as more are in: here it runs at 2 s a step.
    at_5 = progress.step_estimate_s(5, now=t0 + 6.0 + 4 * 2.0)
    assert at_5 == pytest.approx((2.0 * 4 + 1.0 * 2) / 6)
    left = progress.remaining_s(5, now=t0 + 6.0 + 4 * 2.0)
    # The decode as measured (10 s): its cost need not follow the steps'.
    assert left == pytest.approx((8 - 5) * at_5 + 10.0)


def test_step_progress_reports_fractions_and_eta_in_order(tmp_path: Path) -> None:
    clock = PhaseClock(tmp_path / "phases.json")
    ctx = FakeCtx()
    progress = StepProgress(ctx, clock, steps=4, pixels=64)  # type: ignore[arg-type]
    progress.start()
    assert ctx.reports[-1][2] is None  # nothing measured yet: the host estimates
    for done in range(1, 4):
        progress.step(done)
    progress.decoding()
    progress.finish()
    fractions = [f for f, _, _ in ctx.reports if f is not None]
    assert fractions == sorted(fractions) and fractions[-1] < 1.0
    assert [label for _, label, _ in ctx.reports][:2] == ["denoising 1/4", "denoising 2/4"]
    assert all(eta is not None and eta >= 0 for _, _, eta in ctx.reports[2:])
    # The run taught the clock: the next one has an estimate from its start.
    assert clock.step_s(64) is not None and clock.lead_s(64) is not None
    nxt = FakeCtx()
    StepProgress(nxt, clock, steps=4, pixels=64).start()  # type: ignore[arg-type]
    assert nxt.reports[-1][2] is not None


def test_host_eta_hands_over_from_history_to_the_progress_rate() -> None:
    assert host_eta_s(1.0, 0.0, None) is None
    assert host_eta_s(1.0, 0.0, 10.0) == pytest.approx(9.0)
    assert host_eta_s(5.0, 0.5, None) == pytest.approx(5.0)
    # At 10 %, both weigh the same: history says 18 s left, the rate 18 s... and 8 s here.
    assert host_eta_s(2.0, 0.1, 20.0) == pytest.approx(0.5 * 18.0 + 0.5 * 18.0)
    assert host_eta_s(2.0, 0.1, 10.0) == pytest.approx(0.5 * 8.0 + 0.5 * 18.0)
    # From 20 % on, the rate alone: another size of job in the history no longer misleads.
    assert host_eta_s(5.0, 0.5, 100.0) == pytest.approx(5.0)
    # The rate is timed from the first progress: a 10 s load before it is left out (25 %
    # took 1.5 s: 3 s left, where timing from the start would say 12 s).
    assert host_eta_s(12.0, 0.5, None, first=(10.5, 0.25)) == pytest.approx(3.0)


def _job(status: str, **fields: Any) -> JobRecord:
    return JobRecord(id="job_1", type="echo", status=status, params={}, created_at=0.0, **fields)


def test_estimated_start_counts_the_jobs_ahead_over_the_slots() -> None:
    now = 1000.0
    snapshot = QueueSnapshot(0.0, 2, [1010.0, 1030.0], {"echo": 20.0})
    queued = [_job("queued", queue_position=p) for p in (1, 2, 3, 4)]
    apply(queued, snapshot, now=now)
    assert [j.estimated_start_at for j in queued] == [1010.0, 1030.0, 1030.0, 1050.0]
    # Unknown run times: no estimate rather than a wrong one.
    blind = QueueSnapshot(0.0, 1, [None], {})
    job = _job("queued", queue_position=2)
    apply([job], blind, now=now)
    assert job.estimated_start_at is None
    running = _job("running", started_at=990.0)
    apply([running], snapshot, now=now)
    assert running.eta_at == 1010.0  # started 10 s ago, typically 20 s long
    assert running.to_json()["estimated_start_at"] is None


def test_slots_come_from_the_dispatcher() -> None:
    assert slots_of({"mode": "process", "slots": 3}, 1) == 3
    assert slots_of({"mode": "celery", "workers": [{"concurrency": 2}, {"concurrency": 1}]}, 1) == 3
    assert slots_of({"mode": "celery", "workers": []}, 2) == 2


def test_recent_run_times_are_read_without_walking_the_queue(tmp_path: Path) -> None:
    from kiapi_core.jobs.store import RECENT_DURATION, SqliteJobStore
    from kiapi_core.state.sqlite import Database

    store = SqliteJobStore(Database(tmp_path / "kiapi.db"))
    assert store.recent_duration_s("echo") is None
    plan = " ".join(
        str(row[3])
        for row in store.db.connect().execute(f"EXPLAIN QUERY PLAN {RECENT_DURATION}", ("echo",))
    )
    assert "jobs_done_type" in plan, plan


def test_the_decode_eta_follows_its_share_of_the_cpu(tmp_path: Path) -> None:
    clock = PhaseClock(tmp_path / "phases.json")
    progress = StepProgress(FakeCtx(), clock, steps=4, pixels=64)  # type: ignore[arg-type]
    # Nothing measured in CPU time: the wall-clock expectation, counting down.
    assert progress.decode_left_s(20.0, 5.0, 3.0, 1.0) == pytest.approx(15.0)
    assert progress.decode_left_s(20.0, 30.0, 3.0, 1.0) == pytest.approx(1.0)  # overdue
    clock.record(64, step_s=0.1, decode_s=20.0, decode_cpu_s=40.0)  # 2 cores' worth
    # 10 s in, 10 CPU seconds used: the other programs left it 1 core, so 30 CPU s take 30 s
    # (where the wall-clock figure would say 10).
    assert progress.decode_left_s(20.0, 10.0, 10.0, 1.0) == pytest.approx(30.0)
    # At first both count: half a second in, a quarter of the weight is the CPU's.
    assert progress.decode_left_s(20.0, 0.5, 1.0, 2.0) == pytest.approx(
        0.75 * 19.5 + 0.25 * 39.0 / 2.0
    )

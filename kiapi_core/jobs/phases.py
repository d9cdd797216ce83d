"""A step-wise generation's phase model: one source for its progress bar and its ETA.

Diffusion-style handlers share one shape: a lead-in (prompt encoding, often evaluated lazily
with the first step), N denoising steps reported by a per-step callback, a decode with no
callback of its own, then saving. ``PhaseClock`` learns, per pixel count, how long each phase
takes on this machine and keeps it across restarts; ``StepProgress`` turns a run's callbacks
into ``ctx.progress`` reports whose fractions and ``eta_s`` both come from that clock. The
first step is timed apart (the lead-in): it pays for warm-up, so steady steps are timed from
its end.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kiapi_core.jobs.context import JobContext

# Measurements kept per pixel count and quantity (the newest win).
_SAMPLES = 5
# Quantities the clock learns: decode time in steps (the bar's shares), in seconds and in CPU
# seconds of the process (the ETA: a decode's cost need not follow the transformer's, and CPU
# time holds still when other programs take the cores), seconds per steady step, seconds from
# the start of a generation to the end of its first step.
_QUANTITIES = ("decode_steps", "decode_s", "decode_cpu_s", "step_s", "lead_s")
# The span over which the decode's share of the CPU is measured, in ticks of 0.5 s: long
# enough to smooth the scheduler's swings (a 3 s span made the ETA jump by half on a busy
# machine), short enough to follow a lasting change of load.
_RATE_TICKS = 20


class PhaseClock:
    """Learns per pixel count how long a step, the lead-in and the decode take; persisted as
    JSON at ``path`` (e.g. ``ctx.data_dir / "phases.json"``) across restarts.

    ``decode_steps``: the guess of decode time in units of one step until one is measured.
    """

    def __init__(self, path: Path | None = None, *, decode_steps: float = 20.0) -> None:
        self._lock = threading.Lock()
        self._guess = decode_steps
        self._data: dict[int, dict[str, deque[float]]] = {}
        self.path = path
        if path is not None:
            try:
                self._data = _parse(json.loads(path.read_text()))
            except (OSError, ValueError, TypeError, AttributeError):
                self._data = {}

    def _nearest(self, pixels: int, quantity: str) -> tuple[int, float] | None:
        # Both phases scale roughly with the pixel count: the nearest size is a fair guess.
        known = {p: q[quantity] for p, q in self._data.items() if q.get(quantity)}
        if not known:
            return None
        size = pixels if pixels in known else min(known, key=lambda p: abs(p - pixels))
        samples = known[size]
        return size, sum(samples) / len(samples)

    def decode_per_step(self, pixels: int) -> float:
        """Decode time in units of one denoising step (``decode_steps`` until measured)."""
        with self._lock:
            found = self._nearest(pixels, "decode_steps")
        return found[1] if found else self._guess

    def step_s(self, pixels: int) -> float | None:
        """Seconds per steady denoising step at this size; None until a run measured one.
        From another size, scaled by the pixel count."""
        with self._lock:
            found = self._nearest(pixels, "step_s")
        return found[1] * pixels / found[0] if found else None

    def decode_s(self, pixels: int) -> float | None:
        """Seconds a decode takes at this size; None until measured. From another size,
        scaled by the pixel count."""
        with self._lock:
            found = self._nearest(pixels, "decode_s")
        return found[1] * pixels / found[0] if found else None

    def decode_cpu_s(self, pixels: int) -> float | None:
        """CPU seconds (of the process, all threads) a decode takes at this size; None until
        measured. From another size, scaled by the pixel count."""
        with self._lock:
            found = self._nearest(pixels, "decode_cpu_s")
        return found[1] * pixels / found[0] if found else None

    def lead_s(self, pixels: int) -> float | None:
        """Seconds from a generation's start to the end of its first step; None until measured."""
        with self._lock:
            found = self._nearest(pixels, "lead_s")
        return found[1] if found else None

    def record(
        self,
        pixels: int,
        step_s: float,
        decode_s: float,
        *,
        lead_s: float | None = None,
        decode_cpu_s: float | None = None,
    ) -> None:
        """One finished run's measurements (a non-positive one is ignored)."""
        values = {"decode_steps": decode_s / step_s if step_s > 0 and decode_s > 0 else 0.0}
        values |= {"decode_s": decode_s, "step_s": step_s, "lead_s": lead_s or 0.0}
        values |= {"decode_cpu_s": decode_cpu_s or 0.0}
        with self._lock:
            row = self._data.setdefault(pixels, {})
            for name, value in values.items():
                if value > 0:
                    row.setdefault(name, deque(maxlen=_SAMPLES)).append(value)
            snapshot = {str(p): {k: list(v) for k, v in q.items()} for p, q in self._data.items()}
        if self.path is not None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                tmp = self.path.with_suffix(".tmp")
                tmp.write_text(json.dumps(snapshot))
                tmp.replace(self.path)
            except OSError:
                pass  # only an estimate: never fail a job over it


def _parse(saved: Any) -> dict[int, dict[str, deque[float]]]:
    data: dict[int, dict[str, deque[float]]] = {}
    for size, row in saved.items():
        # Files of plugins before 0.x hold one list per size: the decode ratios.
        fields = {"decode_steps": row} if isinstance(row, list) else row
        data[int(size)] = {
            name: deque(map(float, fields[name]), maxlen=_SAMPLES)
            for name in _QUANTITIES
            if name in fields
        }
    return data


def decode_fraction(elapsed_s: float, expected_s: float) -> float:
    """Share of a phase with no callback to show: linear to 90% at the expected time, then
    creeping towards (never reaching) 99%, so an overrun never shows the phase as finished."""
    r = elapsed_s / max(expected_s, 1e-3)
    if r <= 1.0:
        return 0.9 * r
    return 0.9 + 0.09 * (1.0 - float(0.5 ** ((r - 1.0) * 4)))  # float ** float is Any to mypy


class StepProgress:
    """Progress and ETA of one step-wise generation, reported through ``ctx``.

    Call ``start()`` before the first step, ``step(done)`` as steps complete (``done`` of
    ``steps``), ``decoding()`` once they all did (a ticker thread then advances the decode
    share by its expected duration), and ``finish()`` when the decode is over (in a
    ``finally``): it stops the ticker and teaches ``clock`` this run's timings. The shares of
    the bar follow the clock too: ``start_share`` before the steps, ``save_share`` after the
    decode. Created when the generation starts: the lead-in is timed from then.
    """

    def __init__(
        self,
        ctx: JobContext,
        clock: PhaseClock,
        *,
        steps: int,
        pixels: int,
        start_share: float = 0.02,
        save_share: float = 0.03,
        name: str = "kiapi-decode-progress",
    ) -> None:
        self.ctx = ctx
        self.clock = clock
        self.steps = max(1, steps)
        self.pixels = pixels
        self.name = name
        self.save_share = save_share
        decode_units = clock.decode_per_step(pixels)
        span = 1.0 - start_share - save_share
        self.start_share = start_share
        self.denoise_share = span * self.steps / (self.steps + decode_units)
        self.decode_start = start_share + self.denoise_share
        self.decode_end = 1.0 - save_share
        self.began = time.monotonic()
        self.first_step_done = 0.0
        self.loop_ended = 0.0
        self.decode_cpu0 = 0.0
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    # -- the estimate ----------------------------------------------------------------------
    def step_estimate_s(self, done: int, now: float | None = None) -> float | None:
        """Seconds per steady step: this run's own from its second step on, leaning on the
        clock's while few steps are in."""
        learned = self.clock.step_s(self.pixels)
        if done < 2 or not self.first_step_done:
            return learned
        measured = ((now or time.monotonic()) - self.first_step_done) / (done - 1)
        if learned is None:
            return measured
        return (measured * (done - 1) + learned * 2) / (done + 1)

    def remaining_s(self, done: int, now: float | None = None) -> float | None:
        """Expected seconds left with ``done`` steps complete (None until anything is known)."""
        now = time.monotonic() if now is None else now
        step_s = self.step_estimate_s(done, now)
        if step_s is None:
            return None
        decode_s = self.expected_decode_s(step_s)
        if done >= 1:
            return (self.steps - done) * step_s + decode_s
        lead = self.clock.lead_s(self.pixels)
        if lead is None:
            lead = step_s
        return max(lead - (now - self.began), 0.0) + (self.steps - 1) * step_s + decode_s

    def expected_decode_s(self, step_s: float) -> float:
        """The decode's expected seconds: as measured at this size, else in steps of ``step_s``."""
        measured = self.clock.decode_s(self.pixels)
        return (
            measured if measured is not None else self.clock.decode_per_step(self.pixels) * step_s
        )

    def decode_left_s(
        self, expected_s: float, elapsed_s: float, cpu_used_s: float, cpu_rate: float | None
    ) -> float:
        """Seconds left of a decode ``elapsed_s`` in: by the clock's wall time at first, then,
        once the decode's share of the CPU (``cpu_rate``, CPU seconds per second) is measured,
        by the CPU seconds it still needs at that rate."""
        # Past its expected end the decode is still "almost done", never overdue by 0 s.
        by_wall = max(expected_s - elapsed_s, 0.05 * expected_s)
        cpu_total = self.clock.decode_cpu_s(self.pixels)
        if cpu_total is None or not cpu_rate or cpu_rate <= 0:
            return by_wall
        by_cpu = max(cpu_total - cpu_used_s, 0.05 * cpu_total) / cpu_rate
        weight = min(elapsed_s / 2.0, 1.0)
        return (1.0 - weight) * by_wall + weight * by_cpu

    # -- the callbacks ---------------------------------------------------------------------
    def start(self) -> None:
        self.ctx.progress(self.start_share, f"denoising 1/{self.steps}", eta_s=self.remaining_s(0))

    def step(self, done: int) -> None:
        """``done`` steps are complete; raises JobCanceled (from ``ctx.progress``) to stop."""
        now = time.monotonic()
        if done == 1:
            self.first_step_done = now
        self.ctx.progress(
            self.start_share + self.denoise_share * min(done, self.steps) / self.steps,
            f"denoising {min(done + 1, self.steps)}/{self.steps}",
            eta_s=self.remaining_s(done, now),
        )

    def steady_step_s(self) -> float:
        """This run's seconds per step, the first left out when there are others."""
        end = self.loop_ended or time.monotonic()
        if self.first_step_done and self.steps > 1:
            return (end - self.first_step_done) / (self.steps - 1)
        return (end - self.began) / self.steps

    def decoding(self) -> None:
        self.loop_ended = time.monotonic()
        self.decode_cpu0 = time.process_time()
        expected = self.expected_decode_s(self.steady_step_s())
        self.ctx.progress(self.decode_start, "decoding", eta_s=expected)
        self._ticker = threading.Thread(
            target=self._tick, args=(expected,), daemon=True, name=self.name
        )
        self._ticker.start()

    def _tick(self, expected_s: float) -> None:
        start = time.monotonic()
        window: deque[tuple[float, float]] = deque([(start, self.decode_cpu0)], _RATE_TICKS)
        cpu_total = self.clock.decode_cpu_s(self.pixels)
        while not self._stop.wait(0.5):
            now, cpu = time.monotonic(), time.process_time()
            window.append((now, cpu))
            span = now - window[0][0]
            rate = (cpu - window[0][1]) / span if span > 0.4 else None
            elapsed, used = now - start, cpu - self.decode_cpu0
            if cpu_total is not None:
                frac = decode_fraction(used, cpu_total)
            else:
                frac = decode_fraction(elapsed, expected_s)
            at = self.decode_start + (self.decode_end - self.decode_start) * frac
            left = self.decode_left_s(expected_s, elapsed, used, rate)
            # From this helper thread: a report that says stop ends the ticker, never the run
            # (the decode cannot be interrupted; the job ends canceled right after it).
            if not self.ctx.report_progress(at, None, eta_s=left):
                return

    def finish(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(2)
        if self.loop_ended:
            lead = self.first_step_done - self.began if self.first_step_done else None
            self.clock.record(
                self.pixels,
                self.steady_step_s(),
                time.monotonic() - self.loop_ended,
                lead_s=lead,
                decode_cpu_s=time.process_time() - self.decode_cpu0,
            )


_CLOCKS: dict[Path, PhaseClock] = {}
_CLOCKS_LOCK = threading.Lock()


def phase_clock(ctx: JobContext, *, decode_steps: float = 20.0) -> PhaseClock:
    """The handler's plugin's clock, kept in its data directory (one per server home)."""
    path = ctx.data_dir / "phases.json"
    with _CLOCKS_LOCK:
        if path not in _CLOCKS:
            _CLOCKS[path] = PhaseClock(path, decode_steps=decode_steps)
        return _CLOCKS[path]

"""Fast unit tests of the handler's pieces (the real mflux path is in test_generate.py)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from kiapi_ideogram4.handler import (
    Progress,
    _bound_prompt_cache,
    _detach,
    clock_for,
)
from PIL import Image

from kiapi_core import encode_image


def test_prompt_cache_is_bounded_oldest_first() -> None:
    class Model:
        prompt_cache: dict[Any, Any] = {}

    model = Model()
    model.prompt_cache = {("p", i, i): i for i in range(40)}
    _bound_prompt_cache(model, 16)
    assert len(model.prompt_cache) == 16
    assert ("p", 39, 39) in model.prompt_cache and ("p", 0, 0) not in model.prompt_cache


def test_encoding_is_deterministic_without_metadata() -> None:
    image = Image.radial_gradient("L").convert("RGB").resize((256, 256))
    for fmt in ("png", "jpeg", "webp"):
        a, b = encode_image(image, fmt, 80), encode_image(image, fmt, 80)
        assert a == b
        decoded = Image.open(io.BytesIO(a))
        assert decoded.format == fmt.upper() and decoded.size == (256, 256)
        assert not decoded.info.get("exif") and "parameters" not in decoded.info
    assert len(encode_image(image, "jpeg", 10)) < len(encode_image(image, "jpeg", 95))


class FakeCtx:
    job_id = "job_0000000000000000"

    def __init__(self, data_dir: Path) -> None:
        self.reports: list[tuple[float | None, str | None]] = []
        self.data_dir = data_dir

    def progress(
        self, fraction: float | None = None, label: str | None = None, *, eta_s: Any = None
    ) -> None:
        self.reports.append((fraction, label))

    def report_progress(
        self, fraction: float | None = None, label: str | None = None, *, eta_s: Any = None
    ) -> bool:
        self.reports.append((fraction, label))
        return True


def test_progress_reserves_the_decode_share_and_learns_it(tmp_path: Path) -> None:
    ctx = FakeCtx(tmp_path / "a")
    progress = Progress(ctx, steps=12, pixels=256 * 256)  # type: ignore[arg-type]
    progress.call_before_loop(seed=1)
    for t in range(12):
        progress.call_in_loop(t=t)
    progress.call_after_loop()
    fractions = [f for f, _ in ctx.reports if f is not None]
    assert fractions == sorted(fractions)
    assert ctx.reports[-1] == (progress.decode_start, "decoding")
    assert progress.decode_start < 0.9 and progress.decode_end < 1.0
    progress.finish()
    # Once a run measured a decode 200 steps long (the tiny checkpoint's real ratio), the
    # decode share grows to match and denoising is given less of the bar.
    other = FakeCtx(tmp_path / "b")
    clock_for(other).record(256 * 256, step_s=0.05, decode_s=10.0)  # type: ignore[arg-type]
    learned = Progress(other, steps=12, pixels=256 * 256)  # type: ignore[arg-type]
    assert learned.decode_start < progress.decode_start
    assert learned.decode_start < 0.1


def test_detach_removes_the_callback_everywhere() -> None:
    class Registry:
        def __init__(self) -> None:
            self.before_loop: list[Any] = []
            self.in_loop: list[Any] = []
            self.after_loop: list[Any] = []
            self.interrupt: list[Any] = []

    class Model:
        callbacks = Registry()

    cb = object()
    model = Model()
    model.callbacks.before_loop.append(cb)
    model.callbacks.in_loop.append(cb)
    model.callbacks.after_loop.append(cb)
    _detach(model, cb)  # type: ignore[arg-type]
    assert not (
        model.callbacks.before_loop or model.callbacks.in_loop or model.callbacks.after_loop
    )


def test_quantize_is_read_from_the_environment(monkeypatch: Any) -> None:
    # The README documents KIAPI_IDEOGRAM4_QUANTIZE; from the environment it is the string "4",
    # which the Literal of ints refused (ValidationError at the first request).
    import pydantic
    import pytest
    from kiapi_ideogram4.settings import Ideogram4Settings

    monkeypatch.setenv("KIAPI_IDEOGRAM4_QUANTIZE", "4")
    assert Ideogram4Settings().quantize == 4
    monkeypatch.setenv("KIAPI_IDEOGRAM4_QUANTIZE", "7")
    with pytest.raises(pydantic.ValidationError, match="quantize"):
        Ideogram4Settings()

"""`kiapi generate --capability ideogram4` against the warm server: one real 256x256 turbo run."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import httpx
from PIL import Image

from kiapi_core.testing import LiveServer, kiapi_command

CAPTION = {
    "high_level_description": "A red poster that says HELLO.",
    "compositional_deconstruction": {
        "background": "a plain white wall",
        "elements": [
            {"type": "text", "bbox": [100, 150, 300, 850], "text": "HELLO", "desc": "bold letters"}
        ],
    },
}


def test_generate_writes_the_png_with_progress(server: LiveServer, tmp_path: Path) -> None:
    (tmp_path / "caption.json").write_text(json.dumps(CAPTION))
    out = tmp_path / "out.png"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KIAPI_")}
    result = subprocess.run(
        kiapi_command(
            "generate", "--capability", "ideogram4", "@caption.json", "-o", str(out),
            "--preset", "V4_TURBO_12", "--size", "256x256", "--seed", "5", "--format", "png",
        ),
        env={**env, "KIAPI_URL": server.url},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    image = Image.open(out)
    assert image.format == "PNG" and image.size == (256, 256)

    job_id = re.fullmatch(r"job: (job_[0-9a-f]{16})", result.stdout.splitlines()[0]).group(1)  # type: ignore[union-attr]
    params = json.loads(result.stdout.splitlines()[2].removeprefix("params: "))
    assert params["prompt"] == CAPTION  # sent as a JSON caption, not as text
    assert (params["preset"], params["seed"], params["width"], params["format"]) == (
        "V4_TURBO_12", 5, 256, "png",
    )  # fmt: skip

    # The bar follows the job's real phases, and only ever moves forward.
    bar = [line for line in result.stderr.splitlines() if line.startswith("[")]
    labels = " ".join(bar)
    for phase in ("denoising 1/12", "denoising 12/12", "decoding", "done"):
        assert phase in labels, result.stderr
    percents = [float(re.search(r"(\d+\.\d)%", line).group(1)) for line in bar]  # type: ignore[union-attr]
    assert percents == sorted(percents) and percents[-1] == 100.0
    job = httpx.get(f"{server.url}/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded"
    assert job["result"]["image_bytes"] == out.stat().st_size

"""Give mlx's CPU backend a fast BLAS on Linux, for every mlx-based plugin (one load per process).

The ``mlx-cpu`` wheel bundles netlib's reference BLAS (~6 GFLOP/s); libmlx resolves only
``cblas_sgemm``/``cblas_dgemm``/``cblas_cgemm``, so loading OpenBLAS globally *before*
``mlx.core`` is imported makes those symbols bind to it (about 14x faster image generation).
"""

from __future__ import annotations

import ctypes
import logging
import sys
from pathlib import Path

log = logging.getLogger("kiapi.blas")

CANDIDATES = (
    "libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "libopenblas.so",
)

_chosen: str | None = None


def ensure_fast_blas(setting: str, setting_name: str = "the BLAS setting") -> str:
    """Load the configured BLAS once per process, before mlx is imported; a description for
    logs and status. ``setting``: ``auto`` (OpenBLAS if installed), ``bundled`` (mlx's own),
    or a library path; ``setting_name`` names it in messages (e.g. ``KIAPI_IDEOGRAM4_BLAS``)."""
    global _chosen
    if _chosen is not None:
        return _chosen
    if not sys.platform.startswith("linux"):
        _chosen = "platform BLAS (Accelerate/Metal or CUDA)"
        return _chosen
    if "mlx.core" in sys.modules:
        _chosen = "unchanged (mlx.core was imported before the plugin could load OpenBLAS)"
        log.warning("BLAS: %s", _chosen)
        return _chosen
    if setting == "bundled":
        _chosen = f"mlx's bundled reference BLAS ({setting_name}=bundled)"
        log.info("BLAS: %s", _chosen)
        return _chosen
    candidates = CANDIDATES if setting == "auto" else (setting,)
    for name in candidates:
        if "/" in name and not Path(name).exists():
            continue
        try:
            ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        _chosen = f"OpenBLAS ({name})"
        log.info("BLAS: %s loaded before mlx", _chosen)
        return _chosen
    if setting != "auto":
        raise RuntimeError(f"{setting_name}={setting!r} could not be loaded")
    _chosen = (
        "mlx's bundled reference BLAS (OpenBLAS not found: apt-get install libopenblas0-pthread)"
    )
    log.warning("BLAS: %s; generation will be about 14x slower", _chosen)
    return _chosen

"""Give mlx's CPU backend a fast BLAS on Linux (the same recipe as kiapi-ideogram4's: plugins
share no code but kiapi_core, and either may be the first to import mlx in a worker).

The ``mlx-cpu`` wheel bundles netlib's reference BLAS (~6 GFLOP/s); libmlx resolves only
``cblas_sgemm``/``cblas_dgemm``/``cblas_cgemm``, so loading OpenBLAS globally *before*
``mlx.core`` is imported makes those symbols bind to it (about 14x faster image generation).
"""

from __future__ import annotations

import ctypes
import logging
import sys
from pathlib import Path

log = logging.getLogger("kiapi.zimage.blas")

CANDIDATES = (
    "libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "libopenblas.so",
)

_chosen: str | None = None


def ensure_fast_blas(setting: str) -> str:
    """Load the configured BLAS once, before mlx; returns a description for logs and status."""
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
        _chosen = "mlx's bundled reference BLAS (KIAPI_ZIMAGE_BLAS=bundled)"
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
        raise RuntimeError(f"KIAPI_ZIMAGE_BLAS={setting!r} could not be loaded")
    _chosen = (
        "mlx's bundled reference BLAS (OpenBLAS not found: apt-get install libopenblas0-pthread)"
    )
    log.warning("BLAS: %s; generation will be about 14x slower", _chosen)
    return _chosen

"""Whether a narrow dtype is worth using here: bfloat16 matmuls are 3-4x faster than float32 on CPUs
with native bf16 support (AVX512-BF16, AMX) and on recent GPUs, but tens of times slower on CPUs
without it (measured: 43x on an AVX2-only EPYC). The speed options (`forward_dtype="auto"` of the
statistics, `v_autocast` of the target optimisation) ask `fast_dtype` first and run float32 where the
narrow dtype would be slow, saying so once.
"""
from __future__ import annotations

import functools
import logging
import time

import torch

log = logging.getLogger(__name__)


@functools.cache
def fast_dtype(device_type: str, dtype: torch.dtype) -> bool:
    """True when a `dtype` matmul on `device_type` is at most 1.5x slower than a float32 one (cuda: the
    device supports the dtype). Measured once per process on a CPU (a few ms where it is fast)."""
    if device_type == "cuda":
        return dtype != torch.bfloat16 or torch.cuda.is_bf16_supported()
    if device_type != "cpu":
        return True
    a = torch.randn(256, 256)
    b = a.to(dtype)

    def best(x):
        x @ x  # warm-up
        times = []
        for _ in range(3):
            start = time.perf_counter()
            x @ x
            times.append(time.perf_counter() - start)
        return min(times)

    return best(b) <= 1.5 * best(a)


def usable_autocast(name: str | None, device: torch.device) -> str | None:
    """`name` (an autocast dtype name or None), or None when that dtype is slow on `device` (logged)."""
    if name is None or fast_dtype(device.type, getattr(torch, name)):
        return name
    _warn_slow(name, device.type)
    return None


@functools.cache
def _warn_slow(name: str, device_type: str) -> None:
    log.warning("%s matmuls are slow on this %s (no native support): running in float32 instead", name, device_type)

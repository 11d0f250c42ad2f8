"""What the processor offers the backbone's numbers: is a reduced-precision dtype native here?

bfloat16 on a CPU is fast only with AVX512-BF16 or AMX; without them torch emulates it. Measured on
this project's development machine (AMD EPYC, AVX2 only, torch 2.13; docs/performance.md, "bfloat16"):
a [512, 640] x [640, 2048] matrix multiply ran at 36.6 GFLOP/s in float32 and 0.5 in bfloat16, and
Gemma 3 270M's full forward took 4.0x float32's time. A server asked for bfloat16 there refuses to
start, rather than serve several times slower.
"""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)

BFLOAT16_UNITS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of native bfloat16 matrix math


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The processor's feature flags (Linux's /proc/cpuinfo; empty elsewhere: unknown)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def bfloat16_units() -> list[str]:
    """The native bfloat16 units this CPU has (AMX first)."""
    flags = cpu_flags()
    return [unit for unit in BFLOAT16_UNITS if unit in flags]


def dtype_problem(device: str, dtype: str) -> str | None:
    """Why `dtype` would run slowly on `device` here (None when it will not, or it cannot be told)."""
    if dtype != "bfloat16" or not device.startswith("cpu"):
        return None
    if not sys.platform.startswith("linux") or bfloat16_units():
        return None
    return ("dtype 'bfloat16': this CPU has no native bfloat16 units (AVX512-BF16 or AMX), so torch would "
            "emulate it (the backbone's forward measured 4x slower than float32, docs/performance.md); use "
            "RAEE_DTYPE=float32 here")

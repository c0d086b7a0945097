"""How many bits an int8 weight may use on the CPU that runs it: the `reduce_range` option of the
ONNX Runtime quantization passes (quantize-dynamic, quantize-static, mixed-precision, qat).

x86 CPUs without VNNI (AVX2, and AVX-512 before Cascade Lake / Zen 4) multiply uint8 activations by
int8 weights with VPMADDUBSW, which adds each pair of products into a saturating int16: 2 x 255 x 127
overflows it, 2 x 255 x 64 = 32640 does not. ONNX Runtime runs int8 activations the same way (it
shifts them to uint8 on x86). There, full-range weights lose whole outputs (a 2-layer MLP: cosine
0.96 mean, 0.87 min against 0.9999 with VNNI) and 7-bit weights are exact; with VNNI (VPDPBUSD
accumulates in int32) and on ARM the eighth bit is free accuracy (MiniLM ort-int8: 0.9967 against
0.9953 with 7 bits). "auto" chooses by the CPU that builds, which is also the one whose runtime
proves the parity; a fleet of other CPUs is named with `reduce_range = true` or `false`.
"""

from __future__ import annotations

import platform
from functools import lru_cache
from pathlib import Path

CHOICES = ("auto", True, False)
VNNI_FLAGS = {"avx512_vnni", "avx_vnni"}


def saturating_cpu(machine: str | None = None, cpuinfo: str | None = None) -> bool:
    """Whether uint8 x int8 products saturate here: an x86 CPU whose flags show no VNNI (an x86 whose
    flags cannot be read counts as saturating, the safe side)."""
    machine = (machine or platform.machine()).lower()
    if machine not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return False
    if cpuinfo is None:
        cpuinfo = _cpuinfo()
        if cpuinfo is None:
            return True
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return not VNNI_FLAGS & set(flags)


@lru_cache(maxsize=1)
def _cpuinfo() -> str | None:
    """This machine's /proc/cpuinfo, read once (every pass run and stage key asks)."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return None


def resolve(value: bool | str) -> tuple[bool, str]:
    """(7-bit weights?, why) for a pass's `reduce_range` option."""
    if value != "auto":
        return bool(value), "reduce_range set"
    if saturating_cpu():
        return True, "auto: this x86 CPU has no VNNI, full-range int8 weights would saturate its int16 sums"
    return False, "auto: this CPU does not saturate int8 products (VNNI or not x86)"


def record(reduce_range: bool, why: str) -> dict[str, object]:
    """What a pass record says about its weights."""
    return {"weight_bits": 7 if reduce_range else 8, "weight_bits_why": why}

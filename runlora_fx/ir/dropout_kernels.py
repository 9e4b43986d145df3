"""CPU kernels for the products with the dropped entries S (dropout.py): one pass over the
positions each, compiled once with the C compiler Inductor uses and loaded with ctypes.

Written with torch ops, each product is half a dozen gathers, masks and a scatter over the
positions: ~0.7 ms for 13k positions × r 8 on a CPU (Inductor's code is no faster), as much as
the dense mask it replaces. In C each is one loop of r multiply-adds per position (~20 µs).
No torch headers are needed, so the build takes a second; the library is kept under the
runlora cache directory, keyed by its source. Where no compiler works, `library()` is None
and dropout.py runs the torch versions (the same results, slower); CUDA always does.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from runlora_fx.ir.compat import default_cache_dir

log = logging.getLogger("runlora_fx")

# element types x / dense may have; the LoRA-side operands (A, L) are passed as fp32
TYPES = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}

SOURCE = r"""
#include <stdint.h>
#include <string.h>

static inline float load_f32(const void* p, int64_t i) { return ((const float*)p)[i]; }
static inline void store_f32(void* p, int64_t i, float v) { ((float*)p)[i] = v; }
static inline float load_bf16(const void* p, int64_t i) {
    uint32_t bits = (uint32_t)((const uint16_t*)p)[i] << 16; float f; memcpy(&f, &bits, 4);
    return f;
}
static inline void store_bf16(void* p, int64_t i, float v) {  /* round to nearest even */
    uint32_t bits; memcpy(&bits, &v, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) { ((uint16_t*)p)[i] = (uint16_t)((bits >> 16) | 0x40); return; }
    bits += 0x7fffu + ((bits >> 16) & 1u);
    ((uint16_t*)p)[i] = (uint16_t)(bits >> 16);
}
static inline float load_f16(const void* p, int64_t i) { return (float)((const _Float16*)p)[i]; }
static inline void store_f16(void* p, int64_t i, float v) { ((_Float16*)p)[i] = (_Float16)v; }

/* Element (i, j) of a matrix M with row stride ld: M[i·ld + j]. X: x's / dense's type,
   T: the LoRA operands' (at = Aᵀ, d×r, and left, N×k, each with its own row stride: the inner
   loops run along contiguous rows, so they vectorize). */

/* out (N×r fp32, zeroed) += x[i, j]·A[:, j] per position p = i·d + j */
#define S_TIMES_AT(X, T) \
void s_times_at_##X##_##T(const void* x, int64_t ldx, const int32_t* pos, int64_t count, \
                          int64_t d, const void* a, int64_t lda, int64_t r, float* out) { \
    for (int64_t n = 0; n < count; n++) { \
        int64_t i = pos[n] / d, j = pos[n] % d; \
        float v = load_##X(x, i * ldx + j); float* o = out + i * r; \
        for (int64_t c = 0; c < r; c++) o[c] += v * load_##T(a, j * lda + c); \
    } \
}
/* out (d×k fp32, zeroed) += left[i, :]·x[i, j] per position */
#define LT_TIMES_S(X, T) \
void lt_times_s_##X##_##T(const void* left, int64_t ldl, int64_t k, const int32_t* pos, \
                          int64_t count, const void* x, int64_t ldx, int64_t d, float* out) { \
    for (int64_t n = 0; n < count; n++) { \
        int64_t i = pos[n] / d, j = pos[n] % d; \
        float v = load_##X(x, i * ldx + j); float* o = out + j * k; \
        for (int64_t c = 0; c < k; c++) o[c] += load_##T(left, i * ldl + c) * v; \
    } \
}
/* dense[i, j] = 0 per position */
#define ZERO_AT(X) \
void zero_at_##X(void* dense, int64_t ld, int64_t d, const int32_t* pos, int64_t count) { \
    for (int64_t n = 0; n < count; n++) store_##X(dense, (pos[n] / d) * ld + pos[n] % d, 0.0f); \
}
/* dense[i, j] −= factor·left[i, :]·A[:, j] per position */
#define MINUS_DOTS_AT(X, T) \
void minus_dots_at_##X##_##T(void* dense, int64_t ld, int64_t d, const int32_t* pos, \
                             int64_t count, const void* left, int64_t ldl, const void* a, \
                             int64_t lda, int64_t r, float factor) { \
    for (int64_t n = 0; n < count; n++) { \
        int64_t i = pos[n] / d, j = pos[n] % d; \
        float dot = 0.0f; \
        for (int64_t c = 0; c < r; c++) dot += load_##T(left, i * ldl + c) * load_##T(a, j * lda + c); \
        int64_t at = i * ld + j; \
        store_##X(dense, at, load_##X(dense, at) - factor * dot); \
    } \
}
/* the dropped positions from gaps g − 1 ≥ 0 (in order), after *last, below numel, appended
   to out from slot count; returns the new count, or −1 past `slots`; *last: the last position
   reached (≥ numel once the range is covered) */
int64_t fill_positions(const int64_t* gaps, int64_t n, int64_t* last, int64_t numel,
                       int32_t* out, int64_t slots, int64_t count) {
    int64_t at = *last;
    for (int64_t k = 0; k < n; k++) {
        at += gaps[k] + 1;
        if (at >= numel) { *last = at; return count; }
        if (count >= slots) { *last = at; return -1; }
        out[count++] = (int32_t)at;
    }
    *last = at;
    return count;
}

typedef float f32_t; typedef uint16_t bf16_t; typedef _Float16 f16_t;
#define PAIR(X, T) S_TIMES_AT(X, T) LT_TIMES_S(X, T) MINUS_DOTS_AT(X, T)
#define WITH(X) PAIR(X, f32) PAIR(X, bf16) PAIR(X, f16) ZERO_AT(X)
WITH(f32) WITH(bf16) WITH(f16)
"""


def _compiler() -> str | None:
    for candidate in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if candidate and shutil.which(candidate):
            return candidate
    return None


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, built on first use (then loaded from the cache); None when no C
    compiler can build them. Cached per process: the library is the same for every caller."""
    compiler = _compiler()
    if compiler is None:
        log.info("runlora: no C compiler found; sparse dropout runs its torch kernels")
        return None
    flags = ["-O3", "-march=native", "-fno-signed-zeros", "-fno-trapping-math",
             "-fassociative-math", "-shared", "-fPIC"]  # reassociation: r-long dots vectorize
    digest = hashlib.sha256(" ".join([SOURCE, compiler, *flags]).encode()).hexdigest()[:16]
    folder = default_cache_dir() / "kernels"
    path = folder / f"sparse_dropout_{digest}.so"
    try:
        if not path.exists():
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=folder) as build:
                source = Path(build) / "sparse_dropout.c"
                source.write_text(SOURCE)
                built = Path(build) / "sparse_dropout.so"
                subprocess.run([compiler, *flags, str(source), "-o", str(built)],
                               check=True, capture_output=True, timeout=120)
                os.replace(built, path)  # atomic: a concurrent builder finds it whole
        lib = ctypes.CDLL(str(path))
        lib.fill_positions.restype = ctypes.c_int64
        return lib
    except (OSError, AttributeError, subprocess.SubprocessError) as error:
        log.info("runlora: building the sparse-dropout kernels failed (%s); using torch's", error)
        return None


def usable(*tensors: torch.Tensor) -> bool:
    """The kernels apply: 2-D CPU tensors of known element types with contiguous rows, and the
    positions buffer (int32)."""
    for t in tensors:
        if t.device.type != "cpu":
            return False
        if t.dtype == torch.int32 and t.dim() == 1 and t.is_contiguous():
            continue
        if t.dtype not in TYPES or t.dim() != 2 or t.stride(1) != 1:
            return False
    return True


def _p(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def _i(value: int) -> ctypes.c_int64:
    return ctypes.c_int64(value)


def _name(op: str, *tensors: torch.Tensor) -> str:
    return "_".join([op, *(TYPES[t.dtype] for t in tensors)])


def s_times_at(lib: ctypes.CDLL, x: torch.Tensor, positions: torch.Tensor, count: int,
               a: torch.Tensor) -> torch.Tensor:
    """S·Aᵀ for A (r×d): N×r fp32."""
    out = torch.zeros(x.shape[0], a.shape[0])
    at = a.t().contiguous()  # d×r: a position's r weights side by side
    getattr(lib, _name("s_times_at", x, a))(
        _p(x), _i(x.stride(0)), _p(positions), _i(count), _i(x.shape[1]), _p(at),
        _i(at.stride(0)), _i(at.shape[1]), _p(out))
    return out


def lt_times_s(lib: ctypes.CDLL, left: torch.Tensor, positions: torch.Tensor, count: int,
               x: torch.Tensor) -> torch.Tensor:
    """Lᵀ·S for L (N×k): k×d fp32."""
    out = torch.zeros(x.shape[1], left.shape[1])
    getattr(lib, _name("lt_times_s", x, left))(
        _p(left), _i(left.stride(0)), _i(left.shape[1]), _p(positions), _i(count), _p(x),
        _i(x.stride(0)), _i(x.shape[1]), _p(out))
    return out.t().contiguous()


def zero_at_(lib: ctypes.CDLL, dense: torch.Tensor, positions: torch.Tensor,
             count: int) -> None:
    """0 at every position of `dense`, in place."""
    getattr(lib, _name("zero_at", dense))(
        _p(dense), _i(dense.stride(0)), _i(dense.shape[1]), _p(positions), _i(count))


def minus_dots_at_(lib: ctypes.CDLL, dense: torch.Tensor, positions: torch.Tensor, count: int,
                   left: torch.Tensor, a: torch.Tensor, factor: float) -> None:
    """dense −= factor·(L·A) at every position, in place."""
    at = a.t().contiguous()  # d×r
    getattr(lib, _name("minus_dots_at", dense, left))(
        _p(dense), _i(dense.stride(0)), _i(dense.shape[1]), _p(positions), _i(count),
        _p(left), _i(left.stride(0)), _p(at), _i(at.stride(0)), _i(at.shape[1]),
        ctypes.c_float(factor))


def fill_positions(lib: ctypes.CDLL, gaps: torch.Tensor, last: int, numel: int,
                   out: torch.Tensor, count: int) -> tuple[int, int]:
    """Positions from `gaps` (each g − 1, int64) into `out` (int32) from slot `count`:
    (new count, or −1 when more than out's slots; the last position reached)."""
    reached = ctypes.c_int64(last)
    count = lib.fill_positions(_p(gaps), _i(gaps.numel()), ctypes.byref(reached), _i(numel),
                               _p(out), _i(out.numel()), _i(count))
    return count, reached.value

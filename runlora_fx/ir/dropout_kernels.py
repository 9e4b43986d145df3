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
import math
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
#include <math.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>

typedef float f32_t; typedef uint16_t bf16_t; typedef _Float16 f16_t;

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
   loops run along contiguous rows, so they vectorize).

   The loops are bound by the latency of reading a cold N×d operand at scattered positions, so
   they run on torch's OpenMP threads (the runtime torch loaded: the same libgomp soname), each
   thread on whole rows of positions. The positions are sorted, so a thread walks the rows
   along with them instead of dividing each position by d (a 64-bit division costs more than
   the r multiply-adds). */
#ifdef _OPENMP
#include <omp.h>
#else
static int omp_get_max_threads(void) { return 1; }
static int omp_get_num_threads(void) { return 1; }
static int omp_get_thread_num(void) { return 0; }
#endif
#define POSITIONS_PER_THREAD 4096  /* below this a second thread costs more than it saves */

static int threads_for(int64_t count) {
    int64_t most = omp_get_max_threads(), wanted = count / POSITIONS_PER_THREAD;
    return (int)(wanted < 1 ? 1 : wanted < most ? wanted : most);
}
static int64_t first_at_least(const int32_t* pos, int64_t count, int64_t value) {
    int64_t lo = 0, hi = count;
    while (lo < hi) { int64_t mid = (lo + hi) / 2; if (pos[mid] < value) lo = mid + 1; else hi = mid; }
    return lo;
}
/* where thread t of `threads` starts: at a row's first position, so threads own whole rows */
static int64_t share_start(const int32_t* pos, int64_t count, int64_t d, int t, int threads) {
    if (t == 0) return 0;
    if (t == threads) return count;
    return first_at_least(pos, count, (int64_t)pos[count * t / threads] / d * d);
}
#define FOR_EACH_POSITION(SETUP, BODY, FINISH) \
    int wanted = threads_for(count); \
    _Pragma("omp parallel num_threads(wanted)") { \
        int t = omp_get_thread_num(), threads = omp_get_num_threads(); \
        int64_t begin = share_start(pos, count, d, t, threads); \
        int64_t end = share_start(pos, count, d, t + 1, threads); \
        int64_t i = begin < end ? pos[begin] / d : 0, row = i * d; \
        SETUP \
        for (int64_t n = begin; n < end; n++) { \
            while (pos[n] >= row + d) { i++; row += d; } \
            int64_t j = pos[n] - row; \
            BODY \
        } \
        FINISH \
    }

/* out (N×r fp32, zeroed) += x[i, j]·A[:, j] per position p = i·d + j */
#define S_TIMES_AT(X, T) \
void s_times_at_##X##_##T(const void* x, int64_t ldx, const int32_t* pos, int64_t count, \
                          int64_t d, const void* a, int64_t lda, int64_t r, float* out) { \
    FOR_EACH_POSITION(, \
        float v = load_##X(x, i * ldx + j); \
        float* restrict o = out + i * r; const T##_t* restrict w = (const T##_t*)a + j * lda; \
        for (int64_t c = 0; c < r; c++) o[c] += v * load_##T(w, c);, ) \
}
/* out (d×k fp32, zeroed) += left[i, :]·x[i, j] per position; each thread but the first sums
   into its own d×k (threads share columns j), added to out at the end */
#define LT_TIMES_S(X, T) \
void lt_times_s_##X##_##T(const void* left, int64_t ldl, int64_t k, const int32_t* pos, \
                          int64_t count, const void* x, int64_t ldx, int64_t d, float* out) { \
    FOR_EACH_POSITION( \
        float* mine = t == 0 ? out : (float*)calloc((size_t)(d * k), sizeof(float)); \
        if (mine == NULL) { _Pragma("omp critical") mine = out; }, \
        float v = load_##X(x, i * ldx + j); \
        float* restrict o = mine + j * k; const T##_t* restrict l = (const T##_t*)left + i * ldl; \
        for (int64_t c = 0; c < k; c++) o[c] += load_##T(l, c) * v;, \
        _Pragma("omp barrier") \
        if (mine != out) { \
            _Pragma("omp critical") for (int64_t e = 0; e < d * k; e++) out[e] += mine[e]; \
            free(mine); \
        }) \
}
/* dense[i, j] = 0 per position */
#define ZERO_AT(X) \
void zero_at_##X(void* dense, int64_t ld, int64_t d, const int32_t* pos, int64_t count) { \
    FOR_EACH_POSITION(, store_##X(dense, i * ld + j, 0.0f);, ) \
}
/* dense[i, j] −= factor·left[i, :]·A[:, j] per position */
#define MINUS_DOTS_AT(X, T) \
void minus_dots_at_##X##_##T(void* dense, int64_t ld, int64_t d, const int32_t* pos, \
                             int64_t count, const void* left, int64_t ldl, const void* a, \
                             int64_t lda, int64_t r, float factor) { \
    FOR_EACH_POSITION(, \
        float dot = 0.0f; \
        const T##_t* restrict l = (const T##_t*)left + i * ldl; \
        const T##_t* restrict w = (const T##_t*)a + j * lda; \
        for (int64_t c = 0; c < r; c++) dot += load_##T(l, c) * load_##T(w, c); \
        int64_t at = i * ld + j; \
        store_##X(dense, at, load_##X(dense, at) - factor * dot);, ) \
}

/* The buffer of counter_random.py's draw (dropout.device_buffer, the same steps): gap k
   (k = 1 … slots + 1) is ⌊log(1 − u_k)·inv_log_q⌋ + 1 with u_k the top 53 bits of SplitMix64
   output k of `seed`; the positions are the running sums minus one, the first `slots` of them
   kept, those below numel dropped, padding the last of them (or 0). Returns the count. */
#define DRAW_BATCH 256
#if defined(RUNLORA_MVEC) && defined(__AVX2__)
#include <immintrin.h>
__m256d _ZGVdN4v_log(__m256d);  /* glibc's libmvec: 4 logs a call, ≤ 4 ulp (scalar log: 1) */
static void logs_of(double* v) {
    for (int k = 0; k < DRAW_BATCH; k += 4) _mm256_storeu_pd(v + k, _ZGVdN4v_log(_mm256_loadu_pd(v + k)));
}
#else
static void logs_of(double* v) { for (int k = 0; k < DRAW_BATCH; k++) v[k] = log(v[k]); }
#endif
int64_t draw_positions(uint64_t seed, int64_t numel, double inv_log_q, int32_t* out,
                       int64_t slots) {
    double logs[DRAW_BATCH];
    int64_t at = -1, count = 0;
    for (int64_t first = 1; count < slots && at < numel; first += DRAW_BATCH) {
        for (int64_t k = 0; k < DRAW_BATCH; k++) {  /* independent: the loop pipelines */
            uint64_t z = seed + (uint64_t)(first + k) * 0x9E3779B97F4A7C15ull;
            z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
            z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
            z ^= z >> 31;
            logs[k] = (double)((1ull << 53) - (z >> 11)) * 0x1p-53;  /* 1 − u, exact */
        }
        logs_of(logs);
        for (int64_t k = 0; k < DRAW_BATCH && count < slots; k++) {
            double gap = logs[k] * inv_log_q;  /* ≥ 0; huge for a tiny p: compared first */
            if (gap >= (double)(numel - 1 - at)) { at = numel; break; }
            at += (int64_t)gap + 1;
            out[count++] = (int32_t)at;
        }
    }
    int32_t pad = count ? out[count - 1] : 0;
    for (int64_t n = count; n < slots; n++) out[n] = pad;
    out[slots] = (int32_t)count;
    return count;
}

#define PAIR(X, T) S_TIMES_AT(X, T) LT_TIMES_S(X, T) MINUS_DOTS_AT(X, T)
#define WITH(X) PAIR(X, f32) PAIR(X, bf16) PAIR(X, f16) ZERO_AT(X)
WITH(f32) WITH(bf16) WITH(f16)
"""


def _compiler() -> str | None:
    for candidate in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if candidate and shutil.which(candidate):
            return candidate
    return None


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return next((line for line in info if line.startswith("flags")), "")
    except OSError:
        return ""


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
    # -march=native: the CPU is part of the key, so a cache shared across machines never hands
    # one CPU another's instructions
    key = " ".join([SOURCE, compiler, *flags, _cpu_flags()])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    folder = default_cache_dir() / "kernels"
    path = folder / f"sparse_dropout_{digest}.so"
    try:
        if not path.exists():
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=folder) as build:
                source = Path(build) / "sparse_dropout.c"
                source.write_text(SOURCE)
                built = Path(build) / "sparse_dropout.so"
                _build(compiler, flags, source, built)
                os.replace(built, path)  # atomic: a concurrent builder finds it whole
        lib = ctypes.CDLL(str(path))
        lib.draw_positions.restype = ctypes.c_int64
        return lib
    except (OSError, AttributeError, subprocess.SubprocessError) as error:
        log.info("runlora: building the sparse-dropout kernels failed (%s); using torch's", error)
        return None


def _build(compiler: str, flags: list[str], source: Path, built: Path) -> None:
    """Builds with OpenMP and glibc's vector log (libmvec) where they work, else without."""
    base = [compiler, *flags, str(source), "-o", str(built)]
    for extra in (["-fopenmp", "-DRUNLORA_MVEC", "-lmvec"], ["-fopenmp"], []):
        done = subprocess.run([*base, *extra, "-lm"], capture_output=True, timeout=120)
        if done.returncode == 0:
            return
    raise subprocess.CalledProcessError(done.returncode, base, done.stdout, done.stderr)


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


def draw_positions(lib: ctypes.CDLL, seed: int, numel: int, p: float,
                   buffer: torch.Tensor) -> None:
    """Fills `buffer` (int32, slots + 1) with the draw of `seed` (dropout.device_buffer)."""
    lib.draw_positions(ctypes.c_uint64(seed % 2**64), _i(numel),
                       ctypes.c_double(1.0 / math.log1p(-p)), _p(buffer), _i(buffer.numel() - 1))

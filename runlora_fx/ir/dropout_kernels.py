"""CPU kernels for sparse dropout (dropout.py): the draw of the positions and the products
with the dropped entries S, one pass over the positions each, compiled once with the C compiler
Inductor uses and loaded with ctypes.

Written with torch ops, each product is half a dozen gathers, masks and a scatter over the
positions: ~0.7 ms for 13k positions × r 8 on a CPU (Inductor's code is no faster), as much as
the dense mask it replaces. In C each is one loop of r multiply-adds per position. No torch
headers are needed, so the build takes a second; the library is kept under the runlora cache
directory, keyed by its source, flags and CPU. Where no compiler works, `library()` is None and
dropout.py runs the torch versions (the same results, slower), as a GPU's graph does.
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
from collections.abc import Callable
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
/* Runs BODY at each position p = i·d + j of the buffer, `wanted` threads on whole rows each.
   At a large N×d the element a position reads (of x, or of dense: SCATTERED, rows LD apart)
   is in DRAM and the hardware prefetcher does not follow the geometric jumps between
   positions, so each read would wait for memory: where the rows are contiguous, the element
   PREFETCH_AHEAD positions on is requested now (its address is its position). */
#define PREFETCH_AHEAD 32
#define FOR_EACH_POSITION(SCATTERED, LD, SETUP, BODY, FINISH) \
    _Pragma("omp parallel num_threads(wanted)") { \
        int t = omp_get_thread_num(), threads = omp_get_num_threads(); \
        int64_t begin = share_start(pos, count, d, t, threads); \
        int64_t end = share_start(pos, count, d, t + 1, threads); \
        int64_t i = begin < end ? pos[begin] / d : 0, row = i * d; \
        const char* ahead = (LD) == d ? (const char*)(SCATTERED) : NULL; \
        int64_t size = (int64_t)sizeof(*(SCATTERED)); \
        SETUP \
        for (int64_t n = begin; n < end; n++) { \
            if (ahead != NULL && n + PREFETCH_AHEAD < end) \
                __builtin_prefetch(ahead + (int64_t)pos[n + PREFETCH_AHEAD] * size); \
            while (pos[n] >= row + d) { i++; row += d; } \
            int64_t j = pos[n] - row; \
            BODY \
        } \
        FINISH \
    }

/* A (r×d, A[c, j] at a[c·lda + j]) as fp32 d×r: a position's r weights side by side */
#define TRANSPOSED(T) \
static float* transposed_##T(const void* a, int64_t lda, int64_t r, int64_t d) { \
    float* at = (float*)malloc((size_t)(d * r) * sizeof(float)); \
    if (at != NULL) \
        for (int64_t c = 0; c < r; c++) \
            for (int64_t j = 0; j < d; j++) at[j * r + c] = load_##T(a, c * lda + j); \
    return at; \
}
TRANSPOSED(f32) TRANSPOSED(bf16) TRANSPOSED(f16)

/* Each product reads the count from the buffer's last slot (pos[slots]) and returns 0, or −1
   when it could not allocate its scratch. */

/* out (N×r fp32) = Σ x[i, j]·A[:, j] per position, into row i */
#define S_TIMES_AT(X, T) \
int s_times_at_##X##_##T(const void* x, int64_t ldx, int64_t rows, int64_t d, \
                         const int32_t* pos, int64_t slots, const void* a, int64_t lda, \
                         int64_t r, float* out) { \
    int64_t count = pos[slots]; \
    int wanted = threads_for(count); \
    float* at = transposed_##T(a, lda, r, d); \
    if (at == NULL) return -1; \
    memset(out, 0, (size_t)(rows * r) * sizeof(float)); \
    FOR_EACH_POSITION((const X##_t*)x, ldx, , \
        float v = load_##X(x, i * ldx + j); \
        float* restrict o = out + i * r; const float* restrict w = at + j * r; \
        for (int64_t c = 0; c < r; c++) o[c] += v * w[c];, ) \
    free(at); \
    return 0; \
}
/* out (k×d fp32) = Σ left[i, :]·x[i, j] per position, into column j: each thread sums into a
   d×k scratch of its own (threads share columns), then the sum is written transposed */
#define LT_TIMES_S(X, T) \
int lt_times_s_##X##_##T(const void* left, int64_t ldl, int64_t k, const int32_t* pos, \
                         int64_t slots, const void* x, int64_t ldx, int64_t d, float* out) { \
    int64_t count = pos[slots]; \
    int wanted = threads_for(count); \
    float* scratch = (float*)calloc((size_t)(wanted * d * k), sizeof(float)); \
    if (scratch == NULL) return -1; \
    FOR_EACH_POSITION((const X##_t*)x, ldx, float* mine = scratch + t * d * k;, \
        float v = load_##X(x, i * ldx + j); \
        float* restrict o = mine + j * k; const T##_t* restrict l = (const T##_t*)left + i * ldl; \
        for (int64_t c = 0; c < k; c++) o[c] += load_##T(l, c) * v;, ) \
    for (int u = 1; u < wanted; u++) \
        for (int64_t e = 0; e < d * k; e++) scratch[e] += scratch[u * d * k + e]; \
    for (int64_t j = 0; j < d; j++) \
        for (int64_t c = 0; c < k; c++) out[c * d + j] = scratch[j * k + c]; \
    free(scratch); \
    return 0; \
}
/* dense[i, j] = 0 per position */
#define ZERO_AT(X) \
int zero_at_##X(void* dense, int64_t ld, int64_t d, const int32_t* pos, int64_t slots) { \
    int64_t count = pos[slots]; \
    int wanted = threads_for(count); \
    FOR_EACH_POSITION((X##_t*)dense, ld, , store_##X(dense, i * ld + j, 0.0f);, ) \
    return 0; \
}
/* Σ_c l[c]·w[c]. At the usual ranks the trip count is a constant, so the dot is a few straight
   vector FMAs and one reduction; with r known only at run time every position pays a vector
   loop's set-up and remainder (r 8, 13k positions: 78 → 47 µs a call, docs/benchmarks.md). */
#define DOT_AT_RANK(T, R) case R: for (int c = 0; c < R; c++) dot += load_##T(l, c) * w[c]; break;
#define DOT(T) \
static inline float dot_##T(const T##_t* restrict l, const float* restrict w, int64_t r) { \
    float dot = 0.0f; \
    switch (r) { \
    DOT_AT_RANK(T, 4) DOT_AT_RANK(T, 8) DOT_AT_RANK(T, 16) DOT_AT_RANK(T, 32) DOT_AT_RANK(T, 64) \
    default: for (int64_t c = 0; c < r; c++) dot += load_##T(l, c) * w[c]; \
    } \
    return dot; \
}
DOT(f32) DOT(bf16) DOT(f16)
/* dense[i, j] −= factor·left[i, :]·A[:, j] per position */
#define MINUS_DOTS_AT(X, T) \
int minus_dots_at_##X##_##T(void* dense, int64_t ld, int64_t d, const int32_t* pos, \
                            int64_t slots, const void* left, int64_t ldl, const void* a, \
                            int64_t lda, int64_t r, float factor) { \
    int64_t count = pos[slots]; \
    int wanted = threads_for(count); \
    float* at = transposed_##T(a, lda, r, d); \
    if (at == NULL) return -1; \
    FOR_EACH_POSITION((X##_t*)dense, ld, , \
        float dot = dot_##T((const T##_t*)left + i * ldl, at + j * r, r); \
        int64_t at_ = i * ld + j; \
        store_##X(dense, at_, load_##X(dense, at_) - factor * dot);, ) \
    free(at); \
    return 0; \
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
/* Gaps k = first … first + n − 1, at most numel + 1 (< 2³¹: a gap past the range ends it
   whatever its length). */
static void gaps_of(uint64_t seed, int64_t first, int64_t n, int64_t numel, double inv_log_q,
                    int32_t* gaps) {
    double logs[DRAW_BATCH];
    for (int64_t done = 0; done < n; done += DRAW_BATCH) {
        int64_t batch = n - done < DRAW_BATCH ? n - done : DRAW_BATCH;
        for (int64_t k = 0; k < DRAW_BATCH; k++) {  /* independent: the loop pipelines */
            uint64_t z = seed + (uint64_t)(first + done + k) * 0x9E3779B97F4A7C15ull;
            z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
            z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
            z ^= z >> 31;
            logs[k] = (double)((1ull << 53) - (z >> 11)) * 0x1p-53;  /* 1 − u, exact */
        }
        logs_of(logs);
        for (int64_t k = 0; k < batch; k++) {
            double gap = logs[k] * inv_log_q;  /* ≥ 0; huge for a tiny p: clamped first */
            gaps[done + k] = gap >= (double)numel ? (int32_t)(numel + 1) : (int32_t)gap + 1;
        }
    }
}

/* The threads draw the gaps of their share of the slots into `out`, then turn them into
   positions in place from the sum of the shares before theirs (a two-pass scan). */
int64_t draw_positions(uint64_t seed, int64_t numel, double inv_log_q, int32_t* out,
                       int64_t slots) {
    int64_t sums[64], valid[64];
    int wanted = threads_for(slots);
    wanted = wanted < 64 ? wanted : 64;
    _Pragma("omp parallel num_threads(wanted)") {
        int t = omp_get_thread_num(), threads = omp_get_num_threads();
        int64_t begin = slots * t / threads, end = slots * (t + 1) / threads, sum = 0, inside = 0;
        gaps_of(seed, begin + 1, end - begin, numel, inv_log_q, out + begin);
        for (int64_t n = begin; n < end; n++) sum += out[n];
        sums[t] = sum;
        _Pragma("omp barrier")
        int64_t at = -1;
        for (int u = 0; u < t; u++) at += sums[u];
        for (int64_t n = begin; n < end; n++) {
            at += out[n];
            if (at >= numel) break;  /* the positions increase: none after this one is inside */
            out[n] = (int32_t)at;
            inside++;
        }
        valid[t] = inside;
    }
    int64_t count = 0;  /* the positions inside the range are a prefix: whole shares, then part */
    for (int t = 0; t < wanted && count == slots * t / wanted; t++) count += valid[t];
    int32_t pad = count ? out[count - 1] : 0;
    for (int64_t n = count; n < slots; n++) out[n] = pad;
    out[slots] = (int32_t)count;
    return count;
}

/* The draw, then S·Aᵀ at the positions it drew: one call where a site's forward does both */
#define DRAWN_S_TIMES_AT(X, T) \
int drawn_s_times_at_##X##_##T(uint64_t seed, int64_t numel, double inv_log_q, int32_t* pos, \
                               int64_t slots, const void* x, int64_t ldx, int64_t rows, \
                               int64_t d, const void* a, int64_t lda, int64_t r, float* out) { \
    draw_positions(seed, numel, inv_log_q, pos, slots); \
    return s_times_at_##X##_##T(x, ldx, rows, d, pos, slots, a, lda, r, out); \
}
#define PAIR(X, T) S_TIMES_AT(X, T) LT_TIMES_S(X, T) MINUS_DOTS_AT(X, T) DRAWN_S_TIMES_AT(X, T)
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
    # called before every kernel: is_cpu and `is` on the dtype, not device objects (~5 µs less)
    for t in tensors:
        if not t.is_cpu:
            return False
        if t.dtype is torch.int32:
            if t.dim() != 1 or not t.is_contiguous():
                return False
        elif t.dtype not in TYPES or t.dim() != 2 or t.stride(1) != 1:
            return False
    return True


_VOID, _INT, _FLOAT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
ARGUMENTS = {  # each kernel's C arguments (SOURCE), set once so a call converts plain ints
    "s_times_at": [_VOID, _INT, _INT, _INT, _VOID, _INT, _VOID, _INT, _INT, _VOID],
    "lt_times_s": [_VOID, _INT, _INT, _VOID, _INT, _VOID, _INT, _INT, _VOID],
    "zero_at": [_VOID, _INT, _INT, _VOID, _INT],
    "minus_dots_at": [_VOID, _INT, _INT, _VOID, _INT, _VOID, _INT, _VOID, _INT, _INT, _FLOAT],
    "drawn_s_times_at": [ctypes.c_uint64, _INT, ctypes.c_double, _VOID, _INT, _VOID, _INT, _INT,
                         _INT, _VOID, _INT, _INT, _VOID],
}


@functools.cache
def _kernel(lib: ctypes.CDLL, op: str, *types: torch.dtype) -> Callable[..., int]:
    function = getattr(lib, "_".join([op, *(TYPES[t] for t in types)]))
    function.argtypes, function.restype = ARGUMENTS[op], ctypes.c_int
    return function


def _run(status: int) -> None:
    if status != 0:
        raise MemoryError("runlora: a sparse-dropout kernel could not allocate its scratch")


def _slots(buffer: torch.Tensor) -> int:
    return buffer.shape[0] - 1  # the count is in the last slot, which the kernels read


def s_times_at(lib: ctypes.CDLL, x: torch.Tensor, buffer: torch.Tensor,
               a: torch.Tensor) -> torch.Tensor:
    """S·Aᵀ for A (r×d): N×r fp32."""
    out = torch.empty(x.shape[0], a.shape[0])
    _run(_kernel(lib, "s_times_at", x.dtype, a.dtype)(
        x.data_ptr(), x.stride(0), x.shape[0], x.shape[1], buffer.data_ptr(), _slots(buffer),
        a.data_ptr(), a.stride(0), a.shape[0], out.data_ptr()))
    return out


def drawn_s_times_at(lib: ctypes.CDLL, seed: int, numel: int, p: float, slots: int,
                     x: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The buffer of `seed`'s draw (as draw_positions) and S·Aᵀ at its positions, in one call."""
    buffer = torch.empty(slots + 1, dtype=torch.int32)
    out = torch.empty(x.shape[0], a.shape[0])
    _run(_kernel(lib, "drawn_s_times_at", x.dtype, a.dtype)(
        seed % 2**64, numel, 1.0 / math.log1p(-p), buffer.data_ptr(), slots, x.data_ptr(),
        x.stride(0), x.shape[0], x.shape[1], a.data_ptr(), a.stride(0), a.shape[0],
        out.data_ptr()))
    return buffer, out


def lt_times_s(lib: ctypes.CDLL, left: torch.Tensor, buffer: torch.Tensor,
               x: torch.Tensor) -> torch.Tensor:
    """Lᵀ·S for L (N×k): k×d fp32."""
    out = torch.empty(left.shape[1], x.shape[1])
    _run(_kernel(lib, "lt_times_s", x.dtype, left.dtype)(
        left.data_ptr(), left.stride(0), left.shape[1], buffer.data_ptr(), _slots(buffer),
        x.data_ptr(), x.stride(0), x.shape[1], out.data_ptr()))
    return out


def zero_at_(lib: ctypes.CDLL, dense: torch.Tensor, buffer: torch.Tensor) -> None:
    """0 at every position of `dense`, in place."""
    _run(_kernel(lib, "zero_at", dense.dtype)(
        dense.data_ptr(), dense.stride(0), dense.shape[1], buffer.data_ptr(), _slots(buffer)))


def minus_dots_at_(lib: ctypes.CDLL, dense: torch.Tensor, buffer: torch.Tensor,
                   left: torch.Tensor, a: torch.Tensor, factor: float) -> None:
    """dense −= factor·(L·A) at every position, in place."""
    _run(_kernel(lib, "minus_dots_at", dense.dtype, left.dtype)(
        dense.data_ptr(), dense.stride(0), dense.shape[1], buffer.data_ptr(), _slots(buffer),
        left.data_ptr(), left.stride(0), a.data_ptr(), a.stride(0), a.shape[0], factor))


def draw_positions(lib: ctypes.CDLL, seed: int, numel: int, p: float,
                   buffer: torch.Tensor) -> None:
    """Fills `buffer` (int32, slots + 1) with the draw of `seed` (dropout.device_buffer)."""
    lib.draw_positions(ctypes.c_uint64(seed % 2**64), _INT(numel),
                       ctypes.c_double(1.0 / math.log1p(-p)), _VOID(buffer.data_ptr()),
                       _INT(_slots(buffer)))

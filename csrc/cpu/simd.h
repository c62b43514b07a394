// Compiler hints for the CPU kernels: inlining and function multi-versioning.
//
// ASKD_CPU_CLONES compiles a function (and everything ASKD_INLINE inlined into it) three times, for AVX-512
// (x86-64-v4), AVX2 (x86-64-v3) and baseline x86-64, and the loader picks the best the running CPU supports
// (GCC target_clones, an ifunc): one build is fast on any x86-64 machine without -march=native, which would
// crash on an older CPU than the build machine's. Elsewhere the macros fall back to plain functions.

#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define ASKD_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define ASKD_CPU_CLONES
#endif

#if defined(__GNUC__)
#define ASKD_INLINE __attribute__((always_inline)) inline
#else
#define ASKD_INLINE inline
#endif

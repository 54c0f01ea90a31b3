// TANDEM_VECTOR_CLONES: compile a hot loop twice, for AVX2+FMA and for baseline x86-64, and pick at
// load time. The binaries stay portable (no -march) yet run 8-wide where the CPU allows.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define TANDEM_VECTOR_CLONES __attribute__((target_clones("arch=haswell", "default")))
#else
#define TANDEM_VECTOR_CLONES
#endif

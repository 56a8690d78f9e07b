// The kernels of kernels.h, compiled for several instruction sets without tying the binary to
// the build machine: AVX-512 and AVX2+FMA variants via `#pragma GCC target`, and a baseline
// (SSE2 on x86-64) built with the default flags. cpu_isa() (dispatch.h) picks one at run time.
// Included once per translation unit, after dispatch.h (VDPROJ_MULTI_ISA) and prelude.h: by
// cpu_ops.cpp, and by bench/kernel_phases.cpp, which times the AVX-512 variant.
#pragma once

#ifdef VDPROJ_MULTI_ISA
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c")
#define VDPROJ_ISA_NS isa_avx512
#define VDPROJ_VBYTES 64
#include "kernels.h"
#undef VDPROJ_ISA_NS
#undef VDPROJ_VBYTES
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define VDPROJ_ISA_NS isa_avx2
#define VDPROJ_VBYTES 32
#include "kernels.h"
#undef VDPROJ_ISA_NS
#undef VDPROJ_VBYTES
#pragma GCC pop_options
#endif

#define VDPROJ_ISA_NS isa_base
#define VDPROJ_VBYTES 16
#include "kernels.h"
#undef VDPROJ_ISA_NS
#undef VDPROJ_VBYTES

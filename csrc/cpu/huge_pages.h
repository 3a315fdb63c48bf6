// Large tensors of the CPU kernels' own (scratch, packed weights) on transparent huge pages.
//
// glibc maps a block of 32 MiB or more afresh for every allocation, and each of its 4 KiB pages
// then faults on first touch: packing a 4096 x 4096 bfloat16 weight took 14-16 ms on 2 threads
// with ~20 ms of CPU time in the kernel (8193 faults); in 2 MiB pages, 9-11 ms with ~4 ms (18
// faults). LLaVA-1.5-7B's bf16 training step at 8 images: 68k faults -> 42k, kernel time
// 120-240 ms -> 100-120 ms (eager: 54k faults; timing script, Intel Xeon with AMX).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace mmfast::cpu {

// From this size on: below it glibc serves a freed block again without new faults once its
// mmap threshold has risen, and the rounding to 2 MiB would waste a larger share.
constexpr int64_t kHugePageMinBytes = int64_t(8) << 20;

// at::empty(sizes, options) for a CPU tensor, from kHugePageMinBytes on in 2 MiB-aligned memory
// advised MADV_HUGEPAGE (a hint: where transparent huge pages are off, pages stay 4 KiB). The
// storage cannot be resized: for buffers a kernel fills itself and for outputs only autograd
// keeps (the projector's pre-activation h), not for what an op hands its caller.
at::Tensor empty_huge_paged(at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace mmfast::cpu

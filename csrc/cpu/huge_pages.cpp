// empty_huge_paged (declared in huge_pages.h).
#include "cpu/huge_pages.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/util/Exception.h>
#include <c10/util/accumulate.h>

#include <cstdlib>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace mmfast::cpu {

at::Tensor empty_huge_paged(at::IntArrayRef sizes, const at::TensorOptions& options) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const int64_t bytes =
      c10::multiply_integers(sizes) * static_cast<int64_t>(options.dtype().itemsize());
  if (bytes >= kHugePageMinBytes) {
    constexpr int64_t kHugePage = int64_t(2) << 20;
    const int64_t rounded = (bytes + kHugePage - 1) / kHugePage * kHugePage;
    void* p = std::aligned_alloc(kHugePage, rounded);
    TORCH_CHECK(p != nullptr, "mmfast: could not allocate ", bytes, " bytes");
    madvise(p, rounded, MADV_HUGEPAGE);  // a hint; its failure leaves 4 KiB pages
    // The huge pages are faulted in here, by this thread: faulted by the two threads of the
    // weight packing that fills the buffer, they took longer than 4 KiB pages (19-20 ms
    // against 14-15 ms for a 4096 x 4096 weight; 9-11 ms faulted here).
    for (int64_t b = 0; b < rounded; b += kHugePage) static_cast<volatile char*>(p)[b] = 0;
    return at::from_blob(p, sizes, [](void* q) { std::free(q); }, options.device(at::kCPU));
  }
#endif
  return at::empty(sizes, options);
}

}  // namespace mmfast::cpu

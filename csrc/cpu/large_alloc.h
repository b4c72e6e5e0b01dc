// Large CPU output buffers backed by transparent huge pages.
//
// On Linux with THP in "madvise" mode (the common default) a fresh multi-
// hundred-megabyte tensor is faulted in 4 KiB at a time when it is first
// written, which can cost more than the kernel that writes it. Asking for huge
// pages on our own outputs cuts the faults 512-fold without changing any
// process-wide setting (PyTorch's THP_MEM_ALLOC_ENABLE does the same for every
// allocation, if the user opts in).
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <new>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace myext {

constexpr size_t kHugePage = size_t(2) << 20;
// Below this, page faults are cheap next to the kernel and the default
// allocator's caching is worth more.
constexpr size_t kLargeBuffer = size_t(32) << 20;

inline at::Tensor empty_large(at::IntArrayRef sizes,
                              const at::TensorOptions& options) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  int64_t numel = 1;
  for (const int64_t s : sizes) numel *= s;
  const size_t nbytes = static_cast<size_t>(numel) *
                        c10::elementSize(c10::typeMetaToScalarType(options.dtype()));
  if (nbytes >= kLargeBuffer) {
    const size_t rounded = (nbytes + kHugePage - 1) / kHugePage * kHugePage;
    void* data = std::aligned_alloc(kHugePage, rounded);
    if (data == nullptr) throw std::bad_alloc();
    // Advice only: where THP is unavailable the buffer is still valid.
    madvise(data, rounded, MADV_HUGEPAGE);
    return at::from_blob(
        data, sizes, [](void* p) { std::free(p); }, options);
  }
#endif
  return at::empty(sizes, options);
}

}  // namespace myext

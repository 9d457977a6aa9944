#include "common/allocator.h"

#include <malloc.h>

namespace mat::common {

void ConfigureAllocatorForTraining() {
  mallopt(M_MMAP_MAX, 0);                       // never mmap: even > 32 MiB blocks are reused
  mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024);  // (moot with M_MMAP_MAX 0; glibc's maximum)
  mallopt(M_TRIM_THRESHOLD, 1 << 30);           // keep freed memory for the next step
  mallopt(M_TOP_PAD, 64 * 1024 * 1024);         // grow the heap in large steps
}

}  // namespace mat::common

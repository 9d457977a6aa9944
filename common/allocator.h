// Process-wide allocator tuning for LibTorch on CPU. Call once at the start of main.
//
// LibTorch's CPU allocator is plain malloc. With glibc's defaults every activation-sized tensor
// (> 128 KiB, adaptive up to 32 MiB) is an mmap/munmap pair, so each training step page-faults
// and zeroes its whole working set again (the MLM logits [M, 33279] alone are 80 MB). Serving
// every block from the heap (no mmap) and never trimming it keeps freed blocks for the next
// step; a training loop allocates the same shapes every step, so the heap stays bounded.
// Measured with mat-bench masked-backward (2 cores, one run each, same binary): backward of the
// tiny BERT 0.167 s -> 0.065 s with the mmap threshold raised to 32 MiB; of the default BERT
// 1.54 s (threshold 32 MiB) -> 1.06 s (no mmap).
#pragma once

namespace mat::common {

void ConfigureAllocatorForTraining();

}  // namespace mat::common

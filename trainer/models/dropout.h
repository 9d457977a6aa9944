// Dropout whose CPU noise comes from a counter-based hash, filled in parallel.
//
// ATen's CPU bernoulli_ draws every element serially from one mt19937 (no MKL in Debian's
// LibTorch): on the default BERT it was 20 % of the forward+backward time (256 ms of 1.25 s,
// 17 calls, ~30 M elements; measured with the autograd profiler). Here the noise of element i is
// a function of (seed, i) alone — splitmix64 of seed + i — so it is filled by all intra-op
// threads and the result does not depend on their number. The seed is one draw from LibTorch's
// default CPU generator per call, so torch::manual_seed and a checkpointed generator state
// reproduce the masks exactly as before.
//
// Semantics as F::dropout: in training, y = x · noise with noise_i = 1/(1−p) with probability
// 1 − p and 0 otherwise (p resolved to 2^-24); the gradient is grad · noise. p = 0 or not
// training: y = x. CUDA tensors use ATen's dropout (its Philox kernel is already parallel).
#pragma once

#include <torch/torch.h>

namespace mat::trainer {

// x: any shape, floating dtype. REQUIRES: 0 <= p < 1.
torch::Tensor Dropout(const torch::Tensor& x, double p, bool training);

// The noise tensor itself (shape and dtype of `like`, on the CPU) for seed `seed`; exposed for
// tests.
torch::Tensor DropoutNoise(const torch::Tensor& like, double p, uint64_t seed);

}  // namespace mat::trainer

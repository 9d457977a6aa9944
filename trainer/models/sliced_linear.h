// Linear maps whose weight is one leaf tensor per layer and whose modules are row blocks of it
// (modules as views: spectral::ParamSlice).
//
// This is how a masked-off module's weight gradient is *not computed*: a custom autograd function
// computes the map with one matmul over the blocks it is given (no copy of the weight when they
// are all of it, in order), and its backward forms the input gradient with one matmul and the
// weight (and bias) gradient rows only for the attached blocks: one matmul per run of adjacent
// attached blocks, written straight into the layer's gradient tensor. The weight's gradient is
// then a tensor of the leaf's full shape whose other rows are zero (undefined when no block is
// attached), so autograd accumulates one gradient per layer, not one per module; the optimizer
// (trainer/optim/optimizer.h) never reads the masked rows. Activations still flow through every
// block, so earlier layers keep learning.
//
// The function's backward is differentiable in the output gradient (the lanczos estimator
// differentiates it again), and under bf16 autocast it computes in bf16 and casts the weight
// gradient to the leaf's dtype once per layer.
#pragma once

#include <cstdint>
#include <vector>

#include <torch/torch.h>

namespace mat::trainer {

// Rows [begin, end) of a weight's leading axis.
struct RowBlock {
  int64_t begin = 0;
  int64_t end = 0;
};

// Row-split map: w [R, in] is the leaf (output unit r is row r), b [R] or undefined (no bias).
// y = x W_S^T + b_S: [..., Σ_i |blocks[i]|], where W_S stacks the rows of `blocks` in that order
// (every block of the layer in ascending order for the plain forward: W_S = W, no copy).
// Weight and bias gradients are formed for the blocks with attached[i] only.
// REQUIRES: blocks non-empty, disjoint, inside [0, R); attached.size() == blocks.size().
torch::Tensor RowSplitForward(const torch::Tensor& x,  // [..., in]
                              const torch::Tensor& w, const torch::Tensor& b,
                              const std::vector<RowBlock>& blocks,
                              const std::vector<bool>& attached);

// Col-split map stored transposed: w_t [R, out] holds W^T, so input unit r of the map is row r
// and a module's input units are a row block. x: [..., Σ_i |blocks[i]|] with its units in
// `blocks` order. Returns x W_S^T + b = x (w_t)_S + b: [..., out]. Weight gradients as above.
// b: [out] or undefined (no bias); it belongs to no block, so it is added in the same matmul
// (addmm) and gets its gradient whatever is attached.
torch::Tensor ColSplitForward(const torch::Tensor& x, const torch::Tensor& w_t,
                              const std::vector<RowBlock>& blocks,
                              const std::vector<bool>& attached,
                              const torch::Tensor& b = torch::Tensor());

// Per-expert maps over grouped rows (Switch experts): w [E, out, in] is the leaf, b [E, out] or
// undefined; x [N, in] holds expert 0's rows, then expert 1's, ... (counts[e] each, Σ = N).
// Returns y [N, out] with y_e = x_e w[e]^T + b[e]. Weight and bias gradients are formed for the
// experts with attached[e] only (zeros for an attached expert without rows); w's gradient is
// [E, out, in] with zeros for the others (undefined when none is attached). One matmul per
// expert with rows each way.
// REQUIRES: counts.size() == attached.size() == E, Σ counts == N.
torch::Tensor GroupedForward(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& b,
                             const std::vector<int64_t>& counts, const std::vector<bool>& attached);

// `count` equal blocks of `size` rows: [0, size), [size, 2·size), ...
std::vector<RowBlock> EqualBlocks(int64_t count, int64_t size);

}  // namespace mat::trainer

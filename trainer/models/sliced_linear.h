// Linear maps whose weight is split into module slices, each slice its own leaf tensor.
//
// This is how a masked-off module's weight gradient is *not computed*: a custom autograd function
// computes y = x W^T with one matmul over all slices (W concatenated outside autograd), and its
// backward forms the input gradient with one matmul and weight (and bias) gradients only for the
// attached slices, one matmul per component over their contiguous block. Detached slices are not
// inputs of the function, so their leaves never receive a gradient; activations still flow
// through every slice, so earlier layers keep learning.
//
// Units are reordered: the output (row-split) or input (col-split) units come in `order`
// (active slices first). Consumers must use the same order; attention heads and FFN hidden
// units are permutation-invariant as long as the producer and the consumer agree.
#pragma once

#include <vector>

#include <torch/torch.h>

namespace mat::trainer {

// Row-split map with C components: for slice s and component c the weight w[s][c] is [r, in]
// and the bias b[s][c] is [r] (b may be empty: no bias). For attention C = 3 (q, k, v).
// Returns y: [..., C * |order| * r] laid out as [component][slice in order][r].
// Slices in `order[0:num_attached]` use attached weights, the rest detached ones.
torch::Tensor RowSplitForward(const torch::Tensor& x,  // [..., in]
                              const std::vector<std::vector<torch::Tensor>>& w,
                              const std::vector<std::vector<torch::Tensor>>& b,
                              const std::vector<int>& order, size_t num_attached);

// Col-split map: slice s owns input units through w[s]: [out, c]. x: [..., |order| * c] with its
// units in `order`. Returns x W^T without bias: [..., out].
torch::Tensor ColSplitForward(const torch::Tensor& x, const std::vector<torch::Tensor>& w,
                              const std::vector<int>& order, size_t num_attached);

// `active` flags for slices → order (active first, ascending within each part) and the count
// of active ones.
std::vector<int> ActiveFirstOrder(const std::vector<bool>& active, size_t* num_active);

}  // namespace mat::trainer

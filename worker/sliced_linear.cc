#include "worker/sliced_linear.h"

namespace mat::worker {
namespace {

// Concatenates w[s][c] (or b[s][c]) over c-major, s in order[lo:hi].
torch::Tensor Gather(const std::vector<std::vector<torch::Tensor>>& parts,
                     const std::vector<int>& order, size_t lo, size_t hi, bool detach) {
  std::vector<torch::Tensor> pieces;
  const size_t comps = parts[order[lo]].size();
  pieces.reserve(comps * (hi - lo));
  for (size_t c = 0; c < comps; ++c) {
    for (size_t i = lo; i < hi; ++i) pieces.push_back(parts[order[i]][c]);
  }
  torch::Tensor t = pieces.size() == 1 ? pieces[0] : torch::cat(pieces, 0);
  return detach ? t.detach() : t;
}

}  // namespace

std::vector<int> ActiveFirstOrder(const std::vector<bool>& active, size_t* num_active) {
  std::vector<int> order;
  order.reserve(active.size());
  for (size_t s = 0; s < active.size(); ++s)
    if (active[s]) order.push_back(static_cast<int>(s));
  *num_active = order.size();
  for (size_t s = 0; s < active.size(); ++s)
    if (!active[s]) order.push_back(static_cast<int>(s));
  return order;
}

torch::Tensor RowSplitForward(const torch::Tensor& x,
                              const std::vector<std::vector<torch::Tensor>>& w,
                              const std::vector<std::vector<torch::Tensor>>& b,
                              const std::vector<int>& order, size_t num_attached) {
  const bool has_bias = !b.empty();
  std::vector<torch::Tensor> parts;  // [..., C * n_part * r] for attached, detached
  for (int part = 0; part < 2; ++part) {
    size_t lo = part == 0 ? 0 : num_attached;
    size_t hi = part == 0 ? num_attached : order.size();
    if (lo == hi) continue;
    bool detach = part == 1;
    torch::Tensor wt = Gather(w, order, lo, hi, detach);
    torch::Tensor bt = has_bias ? Gather(b, order, lo, hi, detach) : torch::Tensor();
    parts.push_back(torch::nn::functional::linear(x, wt, bt));
  }
  if (parts.size() == 1) return parts[0];
  // Interleave components: [C][attached slices] ++ [C][detached slices] -> [C][all slices].
  const int64_t comps = static_cast<int64_t>(w[order[0]].size());
  if (comps == 1) return torch::cat(parts, -1);
  std::vector<torch::Tensor> a = parts[0].chunk(comps, -1);
  std::vector<torch::Tensor> d = parts[1].chunk(comps, -1);
  std::vector<torch::Tensor> out;
  for (int64_t c = 0; c < comps; ++c) {
    out.push_back(a[c]);
    out.push_back(d[c]);
  }
  return torch::cat(out, -1);
}

torch::Tensor ColSplitForward(const torch::Tensor& x, const std::vector<torch::Tensor>& w,
                              const std::vector<int>& order, size_t num_attached) {
  const int64_t c = w[0].size(1);
  torch::Tensor y;
  for (int part = 0; part < 2; ++part) {
    size_t lo = part == 0 ? 0 : num_attached;
    size_t hi = part == 0 ? num_attached : order.size();
    if (lo == hi) continue;
    std::vector<torch::Tensor> pieces;
    for (size_t i = lo; i < hi; ++i) pieces.push_back(w[order[i]]);
    torch::Tensor wt = pieces.size() == 1 ? pieces[0] : torch::cat(pieces, 1);
    if (part == 1) wt = wt.detach();
    torch::Tensor xs = x.narrow(-1, static_cast<int64_t>(lo) * c, static_cast<int64_t>(hi - lo) * c);
    torch::Tensor p = torch::nn::functional::linear(xs, wt);
    y = y.defined() ? y + p : p;
  }
  return y;
}

}  // namespace mat::worker

#include "spectral/module_partition.h"

namespace mat::spectral {

ParamSlice::ParamSlice(torch::Tensor p) : param(std::move(p)) {
  end = param.dim() == 0 ? 1 : param.size(0);
}

bool ParamSlice::whole() const {
  return begin == 0 && end == (param.dim() == 0 ? 1 : param.size(0));
}

torch::Tensor ParamSlice::value() const {
  return whole() ? param : param.narrow(0, begin, end - begin);
}

torch::Tensor ParamSlice::grad() const {
  const torch::Tensor& g = param.grad();
  if (!g.defined() || whole()) return g;
  return g.narrow(0, begin, end - begin);
}

int64_t ParamSlice::numel() const {
  if (whole()) return param.numel();
  return param.numel() / param.size(0) * (end - begin);
}

int64_t ModuleSpec::NumParams() const {
  int64_t n = 0;
  for (const auto& p : params) n += p.numel();
  return n;
}

int ModulePartition::GroupSize(const std::string& group) const {
  int n = 0;
  for (const auto& m : modules) n += (m.group == group);
  return n;
}

int64_t ModulePartition::NumParams() const {
  int64_t n = 0;
  for (const auto& m : modules) n += m.NumParams();
  return n;
}

}  // namespace mat::spectral

#include "spectral/module_partition.h"

namespace mat::spectral {

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

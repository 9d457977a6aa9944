// MakeTask and what the tasks share (task.h).
#include "trainer/task.h"

#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <cmath>

#include "trainer/image_task.h"
#include "trainer/lm_task.h"

namespace mat::trainer {

absl::StatusOr<std::unique_ptr<Task>> MakeTask(const TaskContext& context) {
  if (context.config.model.kind == "vgg") {
    absl::StatusOr<std::unique_ptr<ImageTask>> task = ImageTask::Create(context);
    if (!task.ok()) return task.status();
    return std::unique_ptr<Task>(std::move(*task));
  }
  absl::StatusOr<std::unique_ptr<MaskedLmTask>> task = MaskedLmTask::Create(context);
  if (!task.ok()) return task.status();
  return std::unique_ptr<Task>(std::move(*task));
}

int64_t TrainPrefix(double fraction, int64_t n) {
  return std::min(n, static_cast<int64_t>(std::ceil(fraction * static_cast<double>(n))));
}

torch::Tensor ProjectOutputs(const torch::Tensor& logits, const torch::Tensor& positions,
                             int64_t seq, int64_t n, int64_t positions_per_sample, int64_t k,
                             uint64_t seed) {
  const int64_t vocab = logits.size(1);
  const int64_t P = positions_per_sample;
  torch::Tensor proj = logits;  // [m, k]
  if (k > 0) {
    auto gen = at::make_generator<at::CPUGeneratorImpl>(seed * 0x9E3779B97F4A7C15ULL + 0x70726f6aULL);
    torch::Tensor r = torch::randn({vocab, k}, gen, torch::TensorOptions().dtype(torch::kFloat64)) /
                      std::sqrt(double(vocab));
    proj = torch::mm(logits, r.to(logits.options()));
  } else {
    k = vocab;
  }
  torch::Tensor pos = positions.to(torch::kCPU, torch::kLong).contiguous();
  const int64_t* p = pos.data_ptr<int64_t>();
  std::vector<int64_t> keep, slot;  // rows of proj kept, and their row in [n·P, k]
  int64_t sample = -1, rank = 0;
  for (int64_t i = 0; i < pos.numel(); ++i) {
    const int64_t s = p[i] / seq;
    rank = s == sample ? rank + 1 : 0;
    sample = s;
    if (rank < P && s < n) {
      keep.push_back(i);
      slot.push_back(s * P + rank);
    }
  }
  auto index = [&](const std::vector<int64_t>& v) {
    return torch::tensor(v, torch::kLong).to(logits.device());
  };
  torch::Tensor out = torch::zeros({n * P, k}, proj.options());
  if (!keep.empty()) out = out.index_add(0, index(slot), proj.index_select(0, index(keep)));
  return out.reshape({n, P * k});
}

}  // namespace mat::trainer

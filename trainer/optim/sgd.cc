#include "trainer/optim/sgd.h"

#include "common/status.h"

namespace mat::trainer {

MaskedSgd::MaskedSgd(std::vector<ParamEntry> params, SgdOptions opt)
    : params_(std::move(params)), opt_(opt), buf_(params_.size()) {
  MAT_CHECK(!opt_.nesterov || (opt_.momentum > 0 && opt_.dampening == 0))
      << "Nesterov momentum requires a momentum and zero dampening";
  for (const ParamEntry& e : params_) {
    segments_.push_back(e.Segments());
    steps_.emplace_back(segments_.back().size(), 0);
  }
}

absl::Status MaskedSgd::Step(double lr, const std::vector<uint8_t>& active,
                             const std::vector<double>& lr_scale) {
  torch::NoGradGuard guard;
  // Validate first, so that an error leaves every parameter and buffer unchanged.
  if (absl::Status s = ValidateMask(params_, segments_, active, lr_scale); !s.ok()) return s;
  // Runs of adjacent active segments that are all first updates or all later ones.
  const std::vector<SegmentRun> runs =
      ActiveRuns(params_, segments_, active, lr_scale,
                 [this](size_t i, size_t s) { return steps_[i][s] == 0 ? 0 : 1; });
  for (const SegmentRun& run : runs) {
    ParamEntry& e = params_[run.entry];
    torch::Tensor p = RunRows(e.param, run);
    torch::Tensor d = RunRows(e.param.grad(), run);
    if (e.decay && opt_.weight_decay != 0) d = d.add(p, opt_.weight_decay);
    if (opt_.momentum != 0) {
      torch::Tensor& whole = buf_[run.entry];
      const bool first = steps_[run.entry][run.segments.front()] == 0;
      if (first && run.begin == 0 && (e.param.dim() == 0 || run.end == e.param.size(0))) {
        whole = torch::clone(d).detach();
      } else {
        if (!whole.defined()) whole = torch::zeros_like(e.param);
        torch::Tensor buf = RunRows(whole, run);
        if (first) {
          buf.copy_(d);
        } else {
          buf.mul_(opt_.momentum).add_(d, 1 - opt_.dampening);
        }
      }
      torch::Tensor buf = RunRows(whole, run);
      d = opt_.nesterov ? d.add(buf, opt_.momentum) : buf;
    }
    p.add_(d, -1 * lr * run.lr_scale);
    for (size_t s : run.segments) ++steps_[run.entry][s];
  }
  for (ParamEntry& e : params_) e.param.mutable_grad().reset();
  return absl::OkStatus();
}

void MaskedSgd::Save(std::map<std::string, torch::Tensor>* tensors) const {
  for (size_t i = 0; i < params_.size(); ++i) {
    const torch::Tensor buf = buf_[i].defined() ? buf_[i] : torch::zeros_like(params_[i].param);
    (*tensors)["sgd.buf." + params_[i].name] = buf.cpu();
    (*tensors)["sgd.step." + params_[i].name] =
        steps_[i].size() == 1 ? torch::tensor(steps_[i][0], torch::kLong)
                              : torch::tensor(steps_[i], torch::kLong);
  }
}

absl::Status MaskedSgd::Load(const std::map<std::string, torch::Tensor>& tensors) {
  std::vector<torch::Tensor> bufs(params_.size());
  std::vector<std::vector<int64_t>> steps(params_.size());
  for (size_t i = 0; i < params_.size(); ++i) {
    const auto b_it = tensors.find("sgd.buf." + params_[i].name);
    const auto s_it = tensors.find("sgd.step." + params_[i].name);
    if (b_it == tensors.end() || s_it == tensors.end()) {
      return absl::DataLossError("checkpoint lacks SGD state of " + params_[i].name);
    }
    if (s_it->second.numel() != int64_t(steps_[i].size())) {
      return absl::InvalidArgumentError(
          "checkpoint SGD state of " + params_[i].name + " has " +
          std::to_string(s_it->second.numel()) + " step counts; the parameter has " +
          std::to_string(steps_[i].size()) + " segments");
    }
    const torch::Tensor& b = b_it->second;
    const torch::Tensor s = s_it->second.to(torch::kLong).reshape({-1}).contiguous();
    if (!b.sizes().equals(params_[i].param.sizes())) {
      return absl::InvalidArgumentError("checkpoint SGD momentum of " + params_[i].name +
                                        " has the wrong shape");
    }
    bool updated = false;
    for (int64_t k = 0; k < s.numel(); ++k) {
      steps[i].push_back(s[k].item<int64_t>());
      updated = updated || steps[i].back() > 0;
    }
    if (updated && opt_.momentum != 0) {
      bufs[i] = b.to(params_[i].param.options()).clone();
    }
  }
  buf_ = std::move(bufs);
  steps_ = std::move(steps);
  return absl::OkStatus();
}

}  // namespace mat::trainer

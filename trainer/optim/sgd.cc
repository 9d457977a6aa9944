#include "trainer/optim/sgd.h"

#include "common/status.h"

namespace mat::trainer {

MaskedSgd::MaskedSgd(std::vector<ParamEntry> params, SgdOptions opt)
    : params_(std::move(params)), opt_(opt), buf_(params_.size()), steps_(params_.size(), 0) {
  MAT_CHECK(!opt_.nesterov || (opt_.momentum > 0 && opt_.dampening == 0))
      << "Nesterov momentum requires a momentum and zero dampening";
}

absl::Status MaskedSgd::Step(double lr, const std::vector<uint8_t>& active,
                             const std::vector<double>& lr_scale) {
  torch::NoGradGuard guard;
  // Validate first, so that an error leaves every parameter and buffer unchanged.
  for (const ParamEntry& e : params_) {
    if (e.module < 0) continue;
    if (e.module >= static_cast<int>(active.size()) ||
        (!lr_scale.empty() && e.module >= static_cast<int>(lr_scale.size()))) {
      return absl::InvalidArgumentError(
          "mask has " + std::to_string(active.size()) + " bits and " +
          std::to_string(lr_scale.size()) + " lr scales; parameter " + e.name + " is in module " +
          std::to_string(e.module));
    }
    if (!active[e.module] && e.param.grad().defined()) {
      return absl::FailedPreconditionError("parameter " + e.name +
                                           " is masked off but has a gradient");
    }
  }
  for (size_t i = 0; i < params_.size(); ++i) {
    ParamEntry& e = params_[i];
    torch::Tensor& grad = e.param.mutable_grad();
    if (!grad.defined()) continue;  // masked off, or not used this step
    const double scale = e.module >= 0 && !lr_scale.empty() ? lr_scale[e.module] : 1.0;
    torch::Tensor d = grad;
    if (e.decay && opt_.weight_decay != 0) d = d.add(e.param, opt_.weight_decay);
    if (opt_.momentum != 0) {
      if (steps_[i] == 0) {
        buf_[i] = torch::clone(d).detach();
      } else {
        buf_[i].mul_(opt_.momentum).add_(d, 1 - opt_.dampening);
      }
      d = opt_.nesterov ? d.add(buf_[i], opt_.momentum) : buf_[i];
    }
    e.param.add_(d, -1 * lr * scale);
    ++steps_[i];
    grad.reset();
  }
  return absl::OkStatus();
}

void MaskedSgd::Save(std::map<std::string, torch::Tensor>* tensors) const {
  for (size_t i = 0; i < params_.size(); ++i) {
    const torch::Tensor buf = buf_[i].defined() ? buf_[i] : torch::zeros_like(params_[i].param);
    (*tensors)["sgd.buf." + params_[i].name] = buf.cpu();
    (*tensors)["sgd.step." + params_[i].name] = torch::tensor(steps_[i], torch::kLong);
  }
}

absl::Status MaskedSgd::Load(const std::map<std::string, torch::Tensor>& tensors) {
  std::vector<torch::Tensor> bufs(params_.size());
  std::vector<int64_t> steps(params_.size());
  for (size_t i = 0; i < params_.size(); ++i) {
    const auto b_it = tensors.find("sgd.buf." + params_[i].name);
    const auto s_it = tensors.find("sgd.step." + params_[i].name);
    if (b_it == tensors.end() || s_it == tensors.end() || s_it->second.numel() != 1) {
      return absl::DataLossError("checkpoint lacks SGD state of " + params_[i].name);
    }
    const torch::Tensor& b = b_it->second;
    const torch::Tensor s = s_it->second.to(torch::kLong);
    if (!b.sizes().equals(params_[i].param.sizes())) {
      return absl::InvalidArgumentError("checkpoint SGD momentum of " + params_[i].name +
                                        " has the wrong shape");
    }
    steps[i] = s.item<int64_t>();
    if (steps[i] > 0 && opt_.momentum != 0) {
      bufs[i] = b.to(params_[i].param.options()).clone();
    }
  }
  buf_ = std::move(bufs);
  steps_ = std::move(steps);
  return absl::OkStatus();
}

}  // namespace mat::trainer

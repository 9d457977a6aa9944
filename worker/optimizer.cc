#include "worker/optimizer.h"

#include <cmath>
#include <unordered_map>

namespace mat::worker {

std::vector<ParamEntry> BuildParamEntries(torch::nn::Module& model,
                                          const spectral::ModulePartition& partition) {
  std::unordered_map<const void*, int> module_of;
  for (int m = 0; m < partition.size(); ++m)
    for (const auto& p : partition.modules[m].params) module_of[p.unsafeGetTensorImpl()] = m;
  std::vector<ParamEntry> entries;
  for (const auto& kv : model.named_parameters()) {
    auto it = module_of.find(kv.value().unsafeGetTensorImpl());
    entries.push_back({kv.key(), kv.value(), it == module_of.end() ? -1 : it->second,
                       kv.value().dim() >= 2});
  }
  return entries;
}

MaskedAdamW::MaskedAdamW(std::vector<ParamEntry> params, AdamWOptions opt)
    : params_(std::move(params)), opt_(opt) {
  for (const auto& p : params_) {
    m_.push_back(torch::zeros_like(p.param));
    v_.push_back(torch::zeros_like(p.param));
    steps_.push_back(0);
  }
}

absl::Status MaskedAdamW::Step(double lr, const std::vector<uint8_t>& active,
                               const std::vector<double>& lr_scale) {
  torch::NoGradGuard guard;
  for (size_t i = 0; i < params_.size(); ++i) {
    ParamEntry& e = params_[i];
    torch::Tensor& grad = e.param.mutable_grad();
    double scale = 1.0;
    if (e.module >= 0) {
      if (e.module >= static_cast<int>(active.size())) {
        return absl::InvalidArgumentError("mask has " + std::to_string(active.size()) +
                                          " bits; parameter " + e.name + " is in module " +
                                          std::to_string(e.module));
      }
      if (!active[e.module]) {
        if (grad.defined()) {
          return absl::FailedPreconditionError("parameter " + e.name +
                                               " is masked off but has a gradient");
        }
        continue;
      }
      if (!lr_scale.empty()) scale = lr_scale[e.module];
    }
    if (!grad.defined()) continue;  // not used this step (e.g. no gradient path)
    const double step_lr = lr * scale;
    int64_t t = ++steps_[i];
    if (e.decay && opt_.weight_decay != 0) e.param.mul_(1.0 - step_lr * opt_.weight_decay);
    m_[i].mul_(opt_.beta1).add_(grad, 1.0 - opt_.beta1);
    v_[i].mul_(opt_.beta2).addcmul_(grad, grad, 1.0 - opt_.beta2);
    const double bc1 = 1.0 - std::pow(opt_.beta1, double(t));
    const double bc2 = 1.0 - std::pow(opt_.beta2, double(t));
    torch::Tensor denom = (v_[i] / bc2).sqrt_().add_(opt_.eps);
    e.param.addcdiv_(m_[i], denom, -step_lr / bc1);
    grad.reset();
  }
  return absl::OkStatus();
}

void MaskedAdamW::Save(torch::serialize::OutputArchive& ar) const {
  for (size_t i = 0; i < params_.size(); ++i) {
    ar.write("opt.m." + params_[i].name, m_[i].cpu());
    ar.write("opt.v." + params_[i].name, v_[i].cpu());
    ar.write("opt.step." + params_[i].name, torch::tensor(steps_[i], torch::kLong));
  }
}

absl::Status MaskedAdamW::Load(torch::serialize::InputArchive& ar) {
  for (size_t i = 0; i < params_.size(); ++i) {
    torch::Tensor m, v, s;
    try {
      ar.read("opt.m." + params_[i].name, m);
      ar.read("opt.v." + params_[i].name, v);
      ar.read("opt.step." + params_[i].name, s);
    } catch (const c10::Error& e) {
      return absl::DataLossError("checkpoint lacks optimizer state of " + params_[i].name);
    }
    if (!m.sizes().equals(params_[i].param.sizes()) || !v.sizes().equals(params_[i].param.sizes())) {
      return absl::InvalidArgumentError("checkpoint optimizer state of " + params_[i].name +
                                        " has the wrong shape");
    }
    m_[i].copy_(m);
    v_[i].copy_(v);
    steps_[i] = s.item<int64_t>();
  }
  return absl::OkStatus();
}

}  // namespace mat::worker

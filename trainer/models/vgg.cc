#include "trainer/models/vgg.h"

#include <cmath>

#include "config/vgg_layout.h"
#include "trainer/models/autocast.h"
#include "trainer/models/model_io.h"

namespace mat::trainer {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The layer table and the width rule are config/vgg_layout.h's (one definition).
int64_t Scaled(int64_t channels, double width) {
  return static_cast<int64_t>(config::VggScaledChannels(channels, width));
}

// y = conv2d(x, W, stride 1, padding 1) with W the layer's kernel leaf [C_out, C_in, 3, 3].
// Kernel gradients only for the attached (active) groups' output channels, one
// convolution-backward per contiguous run of them, written into one gradient of the leaf's shape
// (zeros elsewhere; undefined when no group is attached); the input gradient with one
// convolution-backward over all channels.
class ConvSplitFunction : public torch::autograd::Function<ConvSplitFunction> {
 public:
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& x, const torch::Tensor& w,
                               std::vector<int64_t> runs) {
    const torch::Tensor wc = w.to(x.scalar_type());  // bf16 step: x was cast by the caller
    ctx->save_for_backward({x, wc});
    ctx->saved_data["runs"] = runs;
    ctx->saved_data["leaf_dtype"] = static_cast<int64_t>(w.scalar_type());
    return at::convolution(x, wc, c10::nullopt, {1, 1}, {1, 1}, {1, 1}, false, {0, 0}, 1);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    auto saved = ctx->get_saved_variables();
    const torch::Tensor& x = saved[0];
    const torch::Tensor wc = saved[1].detach();
    const std::vector<int64_t> runs = ctx->saved_data["runs"].toIntVector();
    const auto leaf = static_cast<at::ScalarType>(ctx->saved_data["leaf_dtype"].toInt());
    const torch::Tensor g = grad_out[0].contiguous();
    variable_list out(3);
    if (ctx->needs_input_grad(0)) {
      out[0] = std::get<0>(at::convolution_backward(g, x, wc, c10::nullopt, {1, 1}, {1, 1},
                                                    {1, 1}, false, {0, 0}, 1,
                                                    {true, false, false}));
    }
    if (runs.empty() || !ctx->needs_input_grad(1)) return out;  // e.g. a probe's autograd::grad
    auto kernel_grad = [&](int64_t start, int64_t len) {
      return std::get<1>(at::convolution_backward(
          g.narrow(1, start, len).contiguous(), x, wc.narrow(0, start, len), c10::nullopt,
          {1, 1}, {1, 1}, {1, 1}, false, {0, 0}, 1, {false, true, false}));
    };
    torch::Tensor gw;
    if (runs.size() == 2 && runs[0] == 0 && runs[1] == wc.size(0)) {
      gw = kernel_grad(0, wc.size(0));  // every group active
    } else {
      gw = torch::zeros(wc.sizes(), g.options());
      for (size_t r = 0; r + 1 < runs.size(); r += 2) {
        gw.narrow(0, runs[r], runs[r + 1]).copy_(kernel_grad(runs[r], runs[r + 1]));
      }
    }
    out[1] = gw.to(leaf);
    return out;
  }
};

// Low-precision activations are cast up for the batch norm (LibTorch 1.13's CPU batch_norm
// rejects a bf16 input with float32 parameters).
torch::Tensor UpIfLow(const torch::Tensor& t) {
  const auto d = t.scalar_type();
  return d == torch::kBFloat16 || d == torch::kHalf ? t.to(torch::kFloat) : t;
}

}  // namespace

absl::Status ValidateVggConfig(const VggConfig& c) {
  auto bad = [](const std::string& field, const std::string& why) {
    return absl::InvalidArgumentError("vgg." + field + ": " + why);
  };
  if (c.arch != "vgg11" && c.arch != "vgg16") {
    return bad("arch", "\"" + c.arch + "\" is not one of vgg11, vgg16");
  }
  if (!(c.width > 0) || !std::isfinite(c.width)) {
    return bad("width", std::to_string(c.width) + " is not a positive number");
  }
  if (c.in_channels < 1) return bad("in_channels", std::to_string(c.in_channels) + " < 1");
  if (c.image_size < 1) return bad("image_size", std::to_string(c.image_size) + " < 1");
  if (c.num_classes < 2) return bad("num_classes", std::to_string(c.num_classes) + " < 2");
  if (c.classifier_hidden < 0) {
    return bad("classifier_hidden", std::to_string(c.classifier_hidden) + " < 0");
  }
  if (!(c.bn_momentum >= 0 && c.bn_momentum <= 1)) {
    return bad("bn_momentum", std::to_string(c.bn_momentum) + " is outside [0, 1]");
  }
  if (!(c.bn_eps > 0)) return bad("bn_eps", std::to_string(c.bn_eps) + " is not positive");
  const int64_t narrowest = Scaled(64, c.width);
  if (c.filter_groups < 1 || c.filter_groups > narrowest) {
    return bad("filter_groups", std::to_string(c.filter_groups) +
                                    " is outside [1, " + std::to_string(narrowest) +
                                    "] (the narrowest conv layer has " +
                                    std::to_string(narrowest) + " channels at width " +
                                    std::to_string(c.width) + ")");
  }
  return absl::OkStatus();
}

std::vector<VggConvShape> VggConvShapes(const VggConfig& c) {
  std::vector<VggConvShape> shapes;
  int64_t channels = c.in_channels, size = c.image_size;
  for (int64_t item : config::VggLayout(c.arch)) {
    if (item == config::kVggPool) {
      shapes.back().pool_after = true;
      size = (size + 1) / 2;  // ceil_mode
      continue;
    }
    VggConvShape s;
    s.in_channels = channels;
    s.out_channels = Scaled(item, c.width);
    s.height = s.width = size;
    shapes.push_back(s);
    channels = s.out_channels;
  }
  return shapes;
}

std::vector<int64_t> VggGroupSizes(int64_t channels, int64_t groups) {
  std::vector<int64_t> sizes(groups, channels / groups);
  for (int64_t g = 0; g < channels % groups; ++g) ++sizes[g];
  return sizes;
}

int UpgradeVggLeafLayout(const VggConfig& c, std::map<std::string, torch::Tensor>* tensors) {
  int upgraded = 0;
  const size_t layers = VggConvShapes(c).size();
  auto upgrade = [&](const std::string& prefix, bool steps) {
    for (size_t l = 0; l < layers; ++l) {
      const std::string base = prefix + "conv" + std::to_string(l) + ".";
      for (const std::string part : {"w", "gamma", "beta"}) {
        std::vector<std::string> keys;
        for (int64_t g = 0; g < c.filter_groups; ++g) keys.push_back(base + part + std::to_string(g));
        if (auto t = TakeTensors(tensors, keys)) {
          (*tensors)[base + part] = JoinOldLeaves(*t, steps);
          upgraded += part == "w";
        }
      }
    }
  };
  for (const std::string& p : LayoutValuePrefixes()) upgrade(p, false);
  for (const std::string& p : LayoutStepPrefixes()) upgrade(p, true);
  return upgraded;
}

VggConvImpl::VggConvImpl(int64_t in_channels, int64_t out_channels, int64_t groups,
                         double bn_momentum, double bn_eps)
    : bn_momentum_(bn_momentum), bn_eps_(bn_eps) {
  // Kaiming normal, fan-out, for ReLU (torchvision's VGG): std = sqrt(2 / (C_out · 9)).
  const double std = std::sqrt(2.0 / double(out_channels * 9));
  const std::vector<int64_t> sizes = VggGroupSizes(out_channels, groups);
  std::vector<torch::Tensor> kernels;  // drawn per group, as the earlier per-group leaves
  int64_t at = 0;
  for (int64_t g = 0; g < groups; ++g) {
    kernels.push_back(torch::randn({sizes[g], in_channels, 3, 3}) * std);
    rows.push_back({at, at + sizes[g]});
    at += sizes[g];
  }
  w = register_parameter("w", torch::cat(kernels, 0));
  gamma = register_parameter("gamma", torch::ones({out_channels}));
  beta = register_parameter("beta", torch::zeros({out_channels}));
  running_mean = register_buffer("running_mean", torch::zeros({out_channels}));
  running_var = register_buffer("running_var", torch::ones({out_channels}));
}

std::vector<spectral::ParamSlice> VggConvImpl::GroupParams(int64_t g) const {
  const RowBlock r = rows[g];
  return {{w, r.begin, r.end}, {gamma, r.begin, r.end}, {beta, r.begin, r.end}};
}

void VggConvImpl::set_recorder(spectral::SiteRecorder* recorder, int first_module) {
  recorder_ = recorder;
  first_module_ = first_module;
}

torch::Tensor VggConvImpl::RecordedForward(const torch::Tensor& x) {
  TORCH_CHECK(!is_training(),
              "Vgg: a probe forward (recorder set) needs eval() mode: in training mode BatchNorm "
              "couples the samples through the batch statistics");
  const int64_t n = x.size(0), c_in = x.size(1), h = x.size(2), wd = x.size(3);
  const int64_t c_out = w.size(0);
  torch::Tensor w_all = w.reshape({c_out, c_in * 9});  // attached
  torch::Tensor xc = x;
  if (auto dtype = AutocastDtype(x.device().type())) {
    xc = x.to(*dtype);
    w_all = w_all.to(*dtype);
  }
  // Patches in unfold's (c, kh, kw) order, which is the order of w_all's columns. a stays in
  // the graph (the earlier layers need its gradient); the site records it detached.
  torch::Tensor a = torch::im2col(xc, {3, 3}, {1, 1}, {1, 1}, {1, 1})  // [n, C_in·9, H·W]
                        .transpose(1, 2)
                        .contiguous();  // [n, H·W, C_in·9]
  torch::Tensor y = torch::matmul(a, w_all.t());  // [n, H·W, C_out]
  spectral::LinearSite conv{a.detach(), y, {}};
  for (size_t g = 0; g < rows.size(); ++g) {
    conv.slices.push_back({first_module_ + int(g), spectral::SliceAxis::kRows, rows[g].begin,
                           rows[g].end, false});
  }
  recorder_->Record(std::move(conv));

  torch::Tensor yf = UpIfLow(y);
  torch::Tensor xhat = (yf - running_mean) * torch::rsqrt(running_var + bn_eps_);
  torch::Tensor z = xhat * gamma + beta;  // [n, H·W, C_out]
  spectral::ScaleShiftSite bn{xhat.detach(), z, {}};
  for (size_t g = 0; g < rows.size(); ++g) {
    bn.slices.push_back({first_module_ + int(g), rows[g].begin, rows[g].end, true, true});
  }
  recorder_->Record(std::move(bn));
  return torch::relu(z.transpose(1, 2).reshape({n, c_out, h, wd}));
}

torch::Tensor VggConvImpl::forward(const torch::Tensor& x, const std::vector<bool>& active) {
  TORCH_CHECK(active.size() == rows.size(), "VggConv: ", active.size(), " mask bits for ",
              rows.size(), " filter groups");
  if (recorder_ != nullptr) return RecordedForward(x);
  // Runs of active groups' channels ({start, length, ...}) and the BN affine vectors with the
  // masked groups' entries detached (their rows of gamma's and beta's gradients stay zero).
  std::vector<int64_t> runs;
  std::vector<torch::Tensor> gammas, betas;
  bool all_on = true;
  for (size_t g = 0; g < rows.size(); ++g) {
    const int64_t n = rows[g].end - rows[g].begin;
    if (active[g]) {
      if (!runs.empty() && runs[runs.size() - 2] + runs.back() == rows[g].begin) {
        runs.back() += n;
      } else {
        runs.push_back(rows[g].begin);
        runs.push_back(n);
      }
    }
    all_on = all_on && active[g];
    gammas.push_back(active[g] ? gamma.narrow(0, rows[g].begin, n) : gamma.narrow(0, rows[g].begin, n).detach());
    betas.push_back(active[g] ? beta.narrow(0, rows[g].begin, n) : beta.narrow(0, rows[g].begin, n).detach());
  }
  torch::Tensor xc = x;
  if (auto dtype = AutocastDtype(x.device().type())) xc = x.to(*dtype);
  // With every group masked the kernel is a constant: no autograd node unless x needs one.
  torch::Tensor y = ConvSplitFunction::apply(xc, runs.empty() ? w.detach() : w, runs);
  torch::Tensor weight = all_on ? gamma : torch::cat(gammas, 0);
  torch::Tensor bias = all_on ? beta : torch::cat(betas, 0);
  y = torch::batch_norm(UpIfLow(y), weight, bias, running_mean, running_var, is_training(),
                        bn_momentum_, bn_eps_, /*cudnn_enabled=*/true);
  return torch::relu(y);
}

VggImpl::VggImpl(const VggConfig& c) : c_(c) {
  const absl::Status ok = ValidateVggConfig(c);
  TORCH_CHECK(ok.ok(), ok.ToString());
  shapes_ = VggConvShapes(c);
  for (size_t l = 0; l < shapes_.size(); ++l) {
    convs.push_back(register_module(
        "conv" + std::to_string(l),
        VggConv(shapes_[l].in_channels, shapes_[l].out_channels, c.filter_groups, c.bn_momentum,
                c.bn_eps)));
  }
  const int64_t last = shapes_.back().out_channels;
  const int64_t hidden = c.classifier_hidden;
  fc1 = register_module("fc1", torch::nn::Linear(last, hidden > 0 ? hidden : c.num_classes));
  if (hidden > 0) fc2 = register_module("fc2", torch::nn::Linear(hidden, c.num_classes));
  {
    torch::NoGradGuard g;
    for (auto* fc : {&fc1, &fc2}) {
      if (!*fc) continue;
      (*fc)->weight.normal_(0, 0.01);
      (*fc)->bias.zero_();
    }
  }
  active_.assign(shapes_.size(), std::vector<bool>(c.filter_groups, true));
  num_modules_ = static_cast<int>(shapes_.size() * c.filter_groups);
}

torch::Tensor VggImpl::forward(const torch::Tensor& images) {
  TORCH_CHECK(images.dim() == 4 && images.size(1) == c_.in_channels, "Vgg: expected images [B, ",
              c_.in_channels, ", H, W], got ", images.sizes());
  torch::Tensor x = images;
  for (size_t l = 0; l < convs.size(); ++l) {
    x = convs[l](x, active_[l]);
    if (shapes_[l].pool_after) {
      x = torch::max_pool2d(x, {2, 2}, {2, 2}, {0, 0}, {1, 1}, /*ceil_mode=*/true);
    }
  }
  x = torch::adaptive_avg_pool2d(x, {1, 1}).flatten(1);
  x = fc1(x);
  if (fc2) x = fc2(torch::relu(x));
  return x;
}

spectral::ModulePartition VggImpl::Partition() {
  spectral::ModulePartition p;
  for (size_t l = 0; l < convs.size(); ++l) {
    for (int64_t g = 0; g < c_.filter_groups; ++g) {
      spectral::ModuleSpec m{"filters", int(l), int(g),
                             "conv" + std::to_string(l) + ".filters" + std::to_string(g), {}};
      m.params = convs[l]->GroupParams(g);
      p.modules.push_back(std::move(m));
    }
  }
  return p;
}

void VggImpl::SetRecorder(spectral::SiteRecorder* recorder) {
  for (size_t l = 0; l < convs.size(); ++l) {
    convs[l]->set_recorder(recorder, static_cast<int>(l * c_.filter_groups));
  }
}

void VggImpl::SetMask(const std::vector<uint8_t>& active) {
  TORCH_CHECK(int(active.size()) == num_modules_, "mask has ", active.size(), " bits, model has ",
              num_modules_, " modules");
  size_t i = 0;
  for (auto& layer : active_)
    for (size_t g = 0; g < layer.size(); ++g) layer[g] = active[i++] != 0;
}

int64_t CountTop1Correct(const torch::Tensor& logits, const torch::Tensor& labels) {
  return logits.argmax(1).eq(labels).sum().item<int64_t>();
}

namespace {

// Per-layer counts shared by the step and forward counters.
struct ConvFlops {
  double full = 0;                 // 2·B·H·W·C_out·C_in·9
  std::vector<double> per_group;   // weight-gradient share of each group
};

std::vector<ConvFlops> LayerFlops(const VggConfig& c, int64_t batch) {
  std::vector<ConvFlops> out;
  for (const VggConvShape& s : VggConvShapes(c)) {
    ConvFlops f;
    const double per_channel = 2.0 * double(batch) * double(s.height * s.width) *
                               double(s.in_channels) * 9.0;
    f.full = per_channel * double(s.out_channels);
    for (int64_t size : VggGroupSizes(s.out_channels, c.filter_groups))
      f.per_group.push_back(per_channel * double(size));
    out.push_back(std::move(f));
  }
  return out;
}

// The classifier's linear maps as (in, out) pairs.
std::vector<std::pair<double, double>> Classifier(const VggConfig& c) {
  const double last = double(VggConvShapes(c).back().out_channels);
  if (c.classifier_hidden > 0) {
    return {{last, double(c.classifier_hidden)},
            {double(c.classifier_hidden), double(c.num_classes)}};
  }
  return {{last, double(c.num_classes)}};
}

}  // namespace

FlopCounts VggForwardFlops(const VggConfig& c, int64_t batch) {
  FlopCounts r;
  for (const ConvFlops& f : LayerFlops(c, batch)) r.forward += f.full;
  for (const auto& [in, out] : Classifier(c)) r.forward += 2.0 * double(batch) * in * out;
  return r;
}

FlopCounts VggStepFlops(const VggConfig& c, int64_t batch, const std::vector<uint8_t>& active) {
  const std::vector<ConvFlops> layers = LayerFlops(c, batch);
  const size_t groups = static_cast<size_t>(c.filter_groups);
  TORCH_CHECK(active.empty() || active.size() == layers.size() * groups, "VggStepFlops: mask has ",
              active.size(), " bits, model has ", layers.size() * groups, " modules");
  FlopCounts r = VggForwardFlops(c, batch);
  bool any_before = false;  // some module before the current layer trains
  for (size_t l = 0; l < layers.size(); ++l) {
    if (any_before) r.activation_grad += layers[l].full;
    for (size_t g = 0; g < groups; ++g) {
      if (active.empty() || active[l * groups + g]) {
        r.weight_grad += layers[l].per_group[g];
        any_before = true;
      }
    }
  }
  const auto fcs = Classifier(c);
  for (size_t i = 0; i < fcs.size(); ++i) {
    const double f = 2.0 * double(batch) * fcs[i].first * fcs[i].second;
    r.weight_grad += f;
    if (i > 0 || any_before) r.activation_grad += f;
  }
  return r;
}

std::vector<double> VggModuleWeightGradFlops(const VggConfig& c, int64_t batch) {
  std::vector<double> out;
  for (const ConvFlops& f : LayerFlops(c, batch))
    out.insert(out.end(), f.per_group.begin(), f.per_group.end());
  return out;
}

}  // namespace mat::trainer

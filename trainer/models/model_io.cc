#include "trainer/models/model_io.h"

#include <cstring>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "safetensors/safetensors.h"

namespace mat::trainer {
namespace {

namespace st = ::mat::safetensors;

struct Pair {
  torch::ScalarType torch;
  st::DType file;
};
constexpr Pair kPairs[] = {
    {torch::kDouble, st::DType::kF64}, {torch::kFloat, st::DType::kF32},
    {torch::kHalf, st::DType::kF16},   {torch::kBFloat16, st::DType::kBF16},
    {torch::kLong, st::DType::kI64},   {torch::kInt, st::DType::kI32},
    {torch::kShort, st::DType::kI16},  {torch::kChar, st::DType::kI8},
    {torch::kByte, st::DType::kU8},    {torch::kBool, st::DType::kBool}};

std::string ShapeText(c10::IntArrayRef shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) absl::StrAppend(&s, i ? ", " : "", shape[i]);
  return s + "]";
}

// named_parameters() then named_buffers(), as (name, tensor).
std::vector<std::pair<std::string, torch::Tensor>> Named(torch::nn::Module& module) {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (const auto& kv : module.named_parameters()) out.emplace_back(kv.key(), kv.value());
  for (const auto& kv : module.named_buffers()) out.emplace_back(kv.key(), kv.value());
  return out;
}

// The safetensors name of a dtype ("F32"), or LibTorch's when safetensors has none.
std::string DTypeText(torch::ScalarType type) {
  for (const auto& p : kPairs) {
    if (p.torch == type) return std::string(st::DTypeName(p.file));
  }
  return std::string(c10::toString(type));
}

torch::ScalarType TorchType(st::DType dtype) {
  for (const auto& p : kPairs) {
    if (p.file == dtype) return p.torch;
  }
  return torch::kFloat;  // unreachable: kPairs covers every DType
}

}  // namespace

absl::StatusOr<safetensors::Tensor> ToSafetensor(const torch::Tensor& tensor) {
  const Pair* pair = nullptr;
  for (const auto& p : kPairs) {
    if (p.torch == tensor.scalar_type()) pair = &p;
  }
  if (pair == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("dtype ",
                                                   std::string(c10::toString(tensor.scalar_type())),
                                                   " cannot be held in safetensors"));
  }
  torch::Tensor t = tensor.detach().to(torch::kCPU).contiguous();
  st::Tensor out;
  out.dtype = pair->file;
  out.shape.assign(t.sizes().begin(), t.sizes().end());
  out.data.assign(static_cast<const char*>(t.data_ptr()), t.numel() * t.element_size());
  return out;
}

torch::Tensor FromSafetensor(const safetensors::Tensor& tensor) {
  torch::Tensor t = torch::empty(tensor.shape, torch::TensorOptions().dtype(TorchType(tensor.dtype)));
  if (!tensor.data.empty()) std::memcpy(t.data_ptr(), tensor.data.data(), tensor.data.size());
  return t;
}

absl::Status SaveModelSafetensors(torch::nn::Module& module, const std::string& path,
                                  const std::map<std::string, std::string>& metadata) {
  st::File file;
  file.metadata = metadata;
  for (const auto& [name, tensor] : Named(module)) {
    absl::StatusOr<st::Tensor> out = ToSafetensor(tensor);
    if (!out.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": tensor '", name, "': ", out.status().message()));
    }
    file.tensors.emplace(name, *std::move(out));
  }
  return st::WriteFile(path, file);
}

absl::Status LoadModelSafetensors(torch::nn::Module& module, const std::string& path,
                                  const TensorUpgrade& upgrade) {
  MAT_ASSIGN_OR_RETURN(st::File file, st::ReadFile(path));
  std::map<std::string, torch::Tensor> tensors;
  for (const auto& [name, t] : file.tensors) tensors.emplace(name, FromSafetensor(t));
  file.tensors.clear();
  if (upgrade) upgrade(&tensors);
  auto bad = [&](const std::string& msg) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": ", msg));
  };
  // Everything is checked before anything is copied: a refused file leaves the module as it was.
  std::vector<std::pair<torch::Tensor, torch::Tensor>> copies;  // (destination, source)
  const auto named = Named(module);
  for (const auto& [name, dest] : named) {
    auto it = tensors.find(name);
    if (it == tensors.end()) {
      return bad(absl::StrCat("no tensor '", name, "' (the model has one of shape ",
                              ShapeText(dest.sizes()), ")"));
    }
    const torch::Tensor& src = it->second;
    if (!dest.sizes().equals(src.sizes())) {
      return bad(absl::StrCat("tensor '", name, "' has shape ", ShapeText(src.sizes()),
                              "; the model's is ", ShapeText(dest.sizes())));
    }
    if (c10::isFloatingType(dest.scalar_type()) != c10::isFloatingType(src.scalar_type())) {
      return bad(absl::StrCat("tensor '", name, "' is ", DTypeText(src.scalar_type()),
                              "; the model's is ",
                              std::string(c10::toString(dest.scalar_type()))));
    }
    copies.emplace_back(dest, src);
  }
  if (tensors.size() != named.size()) {
    for (const auto& [name, t] : tensors) {
      bool known = false;
      for (const auto& kv : named) known = known || kv.first == name;
      if (!known) return bad(absl::StrCat("tensor '", name, "' is not in the model"));
    }
  }
  torch::NoGradGuard guard;
  for (auto& [dest, src] : copies) dest.copy_(src);
  return absl::OkStatus();
}

const std::vector<std::string>& LayoutValuePrefixes() {
  static const std::vector<std::string> prefixes = {"", "model.", "opt.m.", "opt.v.", "sgd.buf."};
  return prefixes;
}

const std::vector<std::string>& LayoutStepPrefixes() {
  static const std::vector<std::string> prefixes = {"opt.step.", "sgd.step."};
  return prefixes;
}

std::optional<std::vector<torch::Tensor>> TakeTensors(std::map<std::string, torch::Tensor>* tensors,
                                                      const std::vector<std::string>& keys) {
  for (const std::string& k : keys)
    if (tensors->count(k) == 0) return std::nullopt;
  std::vector<torch::Tensor> out;
  for (const std::string& k : keys) {
    out.push_back(tensors->at(k));
    tensors->erase(k);
  }
  return out;
}

torch::Tensor JoinOldLeaves(const std::vector<torch::Tensor>& leaves, bool steps, size_t per,
                            bool transpose, bool scalar) {
  std::vector<torch::Tensor> rows;
  for (size_t i = 0; i < leaves.size(); i += steps ? per : 1) {
    const torch::Tensor& t = leaves[i];
    rows.push_back(steps ? t.reshape({1}) : transpose ? t.t() : t);
  }
  torch::Tensor out = torch::cat(rows, 0).contiguous();
  return steps && scalar ? out.reshape({}) : out;
}

}  // namespace mat::trainer

// A model's weights as a safetensors file (safetensors/safetensors.h): what a run leaves for its
// user (OUT/model.safetensors: opens with Python's `safetensors.torch.load_file`), and what
// `model.init_from` starts a run from.
//
// Names are the module's own (`named_parameters()` then `named_buffers()`, e.g.
// "layer0.…", "tok_emb.weight", BatchNorm statistics too), tensors in their dtype,
// little-endian, C order, on the CPU.
#pragma once

#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "safetensors/safetensors.h"

namespace mat::trainer {

// One tensor as safetensors bytes (a CPU, contiguous copy; any device). INVALID_ARGUMENT for a
// dtype safetensors cannot hold (complex, quantized).
absl::StatusOr<safetensors::Tensor> ToSafetensor(const torch::Tensor& tensor);
// A new CPU tensor with `tensor`'s dtype, shape and bytes. REQUIRES: `tensor` is consistent
// (what safetensors::Parse returns).
torch::Tensor FromSafetensor(const safetensors::Tensor& tensor);

// Writes every parameter and buffer of `module` to `path` (atomically), with `metadata`.
// INVALID_ARGUMENT for a dtype safetensors cannot hold (complex, quantized).
absl::Status SaveModelSafetensors(torch::nn::Module& module, const std::string& path,
                                  const std::map<std::string, std::string>& metadata);

// Copies the tensors of `path` into `module`'s parameters and buffers (on their device, cast to
// their dtype; floating point only into floating point). Every parameter and buffer must be in
// the file with the same shape, and the file may hold nothing else: otherwise INVALID_ARGUMENT
// naming the file and the tensor ("model.safetensors: tensor 'layers.0.ffn.w1' has shape
// [512, 128]; the model's is [256, 128]"), and the module is left unchanged. Errors of
// safetensors::ReadFile (NOT_FOUND, DATA_LOSS for a truncated or malformed file) as they are.
// `upgrade` (optional) first rewrites the file's tensors of an earlier storage layout (e.g.
// Task::UpgradeTensors).
using TensorUpgrade = std::function<void(std::map<std::string, torch::Tensor>*)>;
absl::Status LoadModelSafetensors(torch::nn::Module& module, const std::string& path,
                                  const TensorUpgrade& upgrade = nullptr);

// Upgrades of an earlier storage layout (UpgradeLeafLayout, UpgradeVggLeafLayout). The key
// prefixes under which a model file and a checkpoint keep a parameter's values or optimizer state
// shaped as the parameter, and its update counts.
const std::vector<std::string>& LayoutValuePrefixes();  // "", "model.", "opt.m.", "opt.v.", "sgd.buf."
const std::vector<std::string>& LayoutStepPrefixes();   // "opt.step.", "sgd.step."
// Removes and returns tensors[key] for every key, in order; nothing (and removes nothing) when
// one is missing.
std::optional<std::vector<torch::Tensor>> TakeTensors(std::map<std::string, torch::Tensor>* tensors,
                                                      const std::vector<std::string>& keys);

// One tensor from the per-module leaves of an earlier layout, in order. Values: the leaves'
// rows stacked (each leaf transposed first when `transpose`). Update counts (`steps`): every
// `per`-th leaf's count (the leaves of one module share it) as one vector, or the single count
// 0-dim when `scalar`.
torch::Tensor JoinOldLeaves(const std::vector<torch::Tensor>& leaves, bool steps, size_t per = 1,
                            bool transpose = false, bool scalar = false);

}  // namespace mat::trainer

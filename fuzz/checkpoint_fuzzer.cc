// libFuzzer target: checkpoint files -> mat::trainer::ReadCheckpoint (trainer/checkpoint/checkpoint.h), what a
// worker reads back from its work dir when it resumes a job. Any input must give OK or a status
// (DATA_LOSS for a bad file), never a crash, an abort or an escaping exception.
//
// Every input is a checkpoint file (plain safetensors with the trainer's metadata and checksum):
// the mutations reach the safetensors parser, the checksum check and the tensors made from the
// file. A mutation that keeps the file well-formed is caught by the checksum, so the seeds and
// the mutations that pass carry a valid one. After a successful load the harness touches every
// tensor (sum over its elements), as a resuming trainer would.
//
// MAT_CHECKPOINT_FUZZ_WRITE_SEEDS=DIR makes the binary write its seed corpus into DIR and exit
// (how fuzz/corpus/checkpoint/ was made).
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <string>

#include <torch/torch.h>

#include "trainer/checkpoint/checkpoint.h"

namespace {

std::string g_path;

void WriteBytes(const std::string& path, const std::string& data) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(data.data(), static_cast<std::streamsize>(data.size()));
}

void WriteSeed(const std::string& dir, const std::string& name,
               const mat::trainer::Checkpoint& checkpoint) {
  if (!mat::trainer::WriteCheckpoint(dir + "/" + name + ".ckpt", checkpoint).ok()) std::exit(1);
}

void WriteSeeds(const std::string& dir) {
  torch::manual_seed(1);
  // 1. What tests/trainer/checkpoint/checkpoint_test.cc writes: a tensor and a step.
  mat::trainer::Checkpoint small;
  small.tensors["w"] = torch::arange(6, torch::kFloat32).reshape({2, 3});
  small.meta = R"({"step":7})";
  WriteSeed(dir, "small", small);
  // 2. Shaped like the trainer's: dotted names, an int64 0-dim step, a byte tensor, bf16.
  mat::trainer::Checkpoint model;
  model.tensors["model.layer0.weight"] = torch::randn({2, 4});
  model.tensors["model.layer0.bias"] = torch::zeros({2});
  model.tensors["opt.step.layer0.weight"] = torch::tensor(int64_t{3}, torch::kLong);
  model.tensors["rng.torch"] = torch::randint(0, 255, {16}, torch::kByte);
  model.tensors["half"] = torch::ones({3}, torch::kBFloat16);
  model.meta = R"({"step":123,"policy":"{}"})";
  WriteSeed(dir, "linear", model);
  // 3. No tensors.
  mat::trainer::Checkpoint empty;
  empty.meta = "{}";
  WriteSeed(dir, "empty", empty);
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  if (const char* dir = std::getenv("MAT_CHECKPOINT_FUZZ_WRITE_SEEDS")) {
    WriteSeeds(dir);
    std::exit(0);
  }
  const char* tmp = std::getenv("TMPDIR");
  g_path = std::string(tmp && *tmp ? tmp : "/tmp") + "/mat_checkpoint_fuzz." +
           std::to_string(::getpid()) + ".ckpt";
  std::atexit([] { ::unlink(g_path.c_str()); });
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  WriteBytes(g_path, std::string(reinterpret_cast<const char*>(data), size));
  absl::StatusOr<mat::trainer::Checkpoint> checkpoint = mat::trainer::ReadCheckpoint(g_path);
  if (checkpoint.ok()) {
    for (const auto& [name, t] : checkpoint->tensors) {
      (void)name;
      if (t.numel() > 0 && t.scalar_type() != torch::kBool) (void)t.sum().item<double>();
    }
  } else if (checkpoint.status().code() != absl::StatusCode::kDataLoss) {
    __builtin_trap();  // the file exists: any failure to read it is DATA_LOSS
  }
  return 0;
}

// libFuzzer target: checkpoint files -> mat::worker::ReadCheckpoint (worker/checkpoint.h), what a
// worker reads back from its work dir when it resumes a job. Any input must give OK or a status
// (DATA_LOSS for a bad file), never a crash, an abort or an escaping exception.
//
// Two modes, chosen by the first byte so that both get a seed corpus (fuzz/corpus/checkpoint/):
//   - input starting with 'M' (the "MATCKPT1" magic): the file as is; the envelope parser sees
//     every mutation of the header, length and checksum;
//   - any other input: a LibTorch archive payload, wrapped in a valid envelope (length and FNV-1a
//     computed here) so that the mutations reach LibTorch's archive reader (zip + pickle).
// ParseEnvelope (torch-free) is also run on every input as is. After a successful load the
// harness reads the keys the seeds hold ("w", "step", a Linear's "weight"/"bias"), as a resuming
// trainer would, catching LibTorch's exceptions (those are errors, not findings).
//
// Leaks inside LibTorch are suppressed (LSan, below): LibTorch 1.13's PyTorchStreamReader::init
// throws after mz_zip_reader_init on a corrupt zip, and the constructor that throws never frees
// the miniz state (~500 bytes per bad file; a LibTorch bug we cannot fix here, not a crash).
//
// LibTorch 1.13's loader crashes on some bad archives (a SEGV in its TorchScript class parser on
// a mutated annotation, an 18 GB memo from one BINPUT id, found by this fuzzer); ReadCheckpoint
// now verifies the archive first (worker/archive_check.h, compiled in here too), so no input is
// skipped: every one that passes the check reaches LibTorch.
//
// MAT_CHECKPOINT_FUZZ_WRITE_SEEDS=DIR makes the binary write its seed corpus into DIR and exit
// (how fuzz/corpus/checkpoint/ was made).
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>

#include <torch/torch.h>

#include "worker/checkpoint.h"

namespace {

std::string g_path;

void WriteBytes(const std::string& path, const std::string& data) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(data.data(), static_cast<std::streamsize>(data.size()));
}

void WriteSeeds(const std::string& dir) {
  torch::manual_seed(1);
  auto payload = [](torch::serialize::OutputArchive& ar) {
    std::ostringstream out;
    ar.save_to(out);
    return out.str();
  };
  // 1. What tests/worker/checkpoint_test.cc writes: a tensor and a step.
  torch::serialize::OutputArchive small;
  small.write("w", torch::arange(6, torch::kFloat32).reshape({2, 3}));
  small.write("step", c10::IValue(int64_t{7}));
  const std::string small_payload = payload(small);
  // 2. A tiny module (Linear 4 -> 2) and an int64 tensor, as the trainer's state.
  torch::nn::Linear linear(4, 2);
  torch::serialize::OutputArchive model;
  linear->save(model);
  model.write("step", c10::IValue(int64_t{123}));
  model.write("ids", torch::tensor({1, 2, 3}, torch::kInt64));
  const std::string model_payload = payload(model);
  // 3. An empty archive.
  torch::serialize::OutputArchive empty;
  const std::string empty_payload = payload(empty);
  WriteBytes(dir + "/small.ckpt", mat::worker::MakeEnvelope(small_payload));
  WriteBytes(dir + "/linear.ckpt", mat::worker::MakeEnvelope(model_payload));
  WriteBytes(dir + "/empty.ckpt", mat::worker::MakeEnvelope(empty_payload));
  WriteBytes(dir + "/small.payload", small_payload);
  WriteBytes(dir + "/linear.payload", model_payload);
  WriteBytes(dir + "/empty.payload", empty_payload);
}

// Reads what the seeds hold; LibTorch's exceptions are the expected errors here.
void ReadKeys(torch::serialize::InputArchive& ar) {
  try {
    torch::Tensor t;
    if (ar.try_read("w", t)) (void)t.sum().item<double>();
    c10::IValue v;
    if (ar.try_read("step", v) && v.isInt()) (void)v.toInt();
    if (ar.try_read("ids", t)) (void)t.numel();
    if (ar.try_read("weight", t)) (void)t.sum().item<double>();
    if (ar.try_read("bias", t)) (void)t.numel();
    for (const std::string& key : ar.keys()) (void)key;
  } catch (const c10::Error&) {
  } catch (const std::exception&) {
  }
}

}  // namespace

extern "C" const char* __lsan_default_suppressions() { return "leak:libtorch_cpu.so\n"; }

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
  const std::string bytes(reinterpret_cast<const char*>(data), size);
  absl::StatusOr<std::string> parsed = mat::worker::ParseEnvelope(bytes, "fuzz");
  if (!parsed.ok() && parsed.status().code() != absl::StatusCode::kDataLoss) __builtin_trap();
  const bool raw = size > 0 && data[0] == 'M';
  const std::string file = raw ? bytes : mat::worker::MakeEnvelope(bytes);
  if (!raw && !mat::worker::ParseEnvelope(file, "wrapped").ok()) __builtin_trap();
  WriteBytes(g_path, file);
  torch::serialize::InputArchive archive;
  absl::Status st = mat::worker::ReadCheckpoint(g_path, archive);
  if (st.ok()) {
    ReadKeys(archive);
  } else if (st.code() != absl::StatusCode::kDataLoss) {
    __builtin_trap();  // the file exists: any failure to read it is DATA_LOSS
  }
  return 0;
}

// libFuzzer target: job-spec YAML -> mat.v1.JobSpec (api/job_spec.h), the text every
// client submits. Any input must give OK or INVALID_ARGUMENT, never a crash; a spec that parses
// must survive the YAML round trip unchanged (JobSpecToYaml then ParseJobSpecYaml), and
// validation must not crash on it.
#include <cstddef>
#include <cstdint>
#include <string>

#include "api/job_spec.h"
#include "google/protobuf/util/message_differencer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  absl::StatusOr<mat::v1::JobSpec> spec = mat::api::ParseJobSpecYaml(text, "fuzz");
  if (!spec.ok()) {
    if (spec.status().code() != absl::StatusCode::kInvalidArgument) __builtin_trap();
    return 0;
  }
  (void)mat::api::ValidateJobSpec(*spec);
  const std::string again_text = mat::api::JobSpecToYaml(*spec);
  absl::StatusOr<mat::v1::JobSpec> again = mat::api::ParseJobSpecYaml(again_text, "again");
  if (!again.ok()) __builtin_trap();  // what we write, we must read
  google::protobuf::util::MessageDifferencer diff;
  diff.set_float_comparison(google::protobuf::util::MessageDifferencer::EXACT);
  // NaN never equals itself: compare the YAML texts instead when the spec holds one.
  if (!diff.Compare(*spec, *again) &&
      mat::api::JobSpecToYaml(*again) != again_text) {
    __builtin_trap();
  }
  return 0;
}

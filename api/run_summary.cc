#include "api/run_summary.h"

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace mat::api {

absl::StatusOr<int64_t> SummaryRanks(const nlohmann::json& summary) {
  if (!summary.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat("a summary is a JSON object, not ", summary.type_name()));
  }
  auto it = summary.find("world_size");
  if (it == summary.end()) return 1;
  if (!it->is_number_integer() || it->get<int64_t>() < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("summary's world_size is not a positive integer: ", it->dump()));
  }
  return it->get<int64_t>();
}

}  // namespace mat::api

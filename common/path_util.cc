#include "common/path_util.h"

#include <filesystem>
#include <system_error>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace mat::common {
namespace {

namespace fs = std::filesystem;

// The components of `p`, without the empty one a trailing '/' leaves.
std::vector<fs::path> Components(const fs::path& p) {
  std::vector<fs::path> parts;
  for (const fs::path& part : p) {
    if (!part.empty()) parts.push_back(part);
  }
  return parts;
}

bool IsUnder(const fs::path& path, const fs::path& root) {
  const std::vector<fs::path> p = Components(path);
  const std::vector<fs::path> r = Components(root);
  if (r.size() > p.size()) return false;
  for (size_t i = 0; i < r.size(); ++i) {
    if (p[i] != r[i]) return false;
  }
  return true;
}

// weakly_canonical, or the lexically normal form when the file system cannot tell (permissions).
fs::path Resolve(const fs::path& p) {
  std::error_code error;
  fs::path resolved = fs::weakly_canonical(p, error);
  if (error) return p.lexically_normal();
  return resolved;
}

}  // namespace

bool IsLexicallyUnder(const std::string& path, const std::string& root) {
  return IsUnder(fs::path(path).lexically_normal(), fs::path(root).lexically_normal());
}

absl::Status CheckUnderRoots(const std::string& path, const std::vector<std::string>& roots) {
  if (roots.empty()) return absl::OkStatus();
  const std::string root_list = absl::StrJoin(roots, ", ");
  for (const std::string& root : roots) {
    if (root.empty() || !fs::path(root).is_absolute()) {
      return absl::InvalidArgumentError(
          absl::StrCat("data root '", root, "' is not an absolute path"));
    }
  }
  if (path.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("the path is empty; it must be under a data root (", root_list, ")"));
  }
  const fs::path p(path);
  if (!p.is_absolute()) {
    return absl::InvalidArgumentError(
        absl::StrCat("'", path, "' is a relative path; with data roots set it must be an "
                     "absolute path under one of them (", root_list, ")"));
  }
  const fs::path resolved = Resolve(p);
  for (const std::string& root : roots) {
    const fs::path r(root);
    if (IsUnder(p.lexically_normal(), r.lexically_normal()) && IsUnder(resolved, Resolve(r))) {
      return absl::OkStatus();
    }
  }
  const bool via_link = [&] {
    for (const std::string& root : roots) {
      if (IsUnder(p.lexically_normal(), fs::path(root).lexically_normal())) return true;
    }
    return false;
  }();
  return absl::InvalidArgumentError(absl::StrCat(
      "'", path, "' is not under a data root (", root_list, ")",
      via_link ? absl::StrCat(": it resolves to '", resolved.string(), "' through a symlink")
               : ""));
}

}  // namespace mat::common

// Status helpers used across every library boundary.
//
//   MAT_RETURN_IF_ERROR(expr)        returns the absl::Status of expr when it is not OK.
//   MAT_ASSIGN_OR_RETURN(lhs, expr)  unwraps an absl::StatusOr<T> or returns its status.
//   MAT_CHECK(cond) << "message"     crashes with a message when an invariant is broken
//                                    (never for bad input: bad input gets a Status).
#pragma once

#include <cstdlib>
#include <iostream>
#include <sstream>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define MAT_STATUS_CONCAT_INNER_(a, b) a##b
#define MAT_STATUS_CONCAT_(a, b) MAT_STATUS_CONCAT_INNER_(a, b)

#define MAT_RETURN_IF_ERROR(expr)                  \
  do {                                             \
    ::absl::Status mat_status_ = (expr);           \
    if (!mat_status_.ok()) return mat_status_;     \
  } while (0)

#define MAT_ASSIGN_OR_RETURN(lhs, expr) \
  MAT_ASSIGN_OR_RETURN_IMPL_(MAT_STATUS_CONCAT_(mat_statusor_, __LINE__), lhs, expr)
#define MAT_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                               \
  if (!tmp.ok()) return tmp.status();              \
  lhs = std::move(tmp).value()

namespace mat::common {

// Collects a message and aborts when destroyed; used by MAT_CHECK only.
class CheckFailure {
 public:
  CheckFailure(const char* file, int line, const char* cond) {
    stream_ << file << ":" << line << ": MAT_CHECK(" << cond << ") failed: ";
  }
  [[noreturn]] ~CheckFailure() {
    std::cerr << stream_.str() << std::endl;
    std::abort();
  }
  std::ostream& stream() { return stream_; }

 private:
  std::ostringstream stream_;
};

}  // namespace mat::common

#define MAT_CHECK(cond) \
  if (cond) {           \
  } else                \
    ::mat::common::CheckFailure(__FILE__, __LINE__, #cond).stream()

// StatusFromTorch: runs a piece of LibTorch work and returns what it throws as an absl::Status,
// so no exception crosses the Trainer's boundary (a worker's rank thread would take the whole
// process down with it).
//   - c10::Error: its message without the backtrace; RESOURCE_EXHAUSTED when LibTorch could not
//     allocate (CPU "can't allocate memory", CUDA "out of memory"), INTERNAL otherwise;
//   - std::bad_alloc: RESOURCE_EXHAUSTED; any other std::exception: INTERNAL.
// Each message starts with what `what()` returns when it is thrown ("training at step 12").
//
// Thread-safety: stateless.
#pragma once

#include <c10/util/Exception.h>

#include <exception>
#include <new>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace mat::trainer {

inline absl::Status TorchErrorToStatus(const std::string& what, const c10::Error& e) {
  const std::string message = e.what_without_backtrace();
  const bool memory = absl::StrContains(message, "can't allocate memory") ||
                      absl::StrContains(message, "out of memory");
  const std::string text = absl::StrCat(what, " failed: ", message);
  return memory ? absl::ResourceExhaustedError(text) : absl::InternalError(text);
}

// `f` returns an absl::Status or an absl::StatusOr<T>; so does StatusFromTorch. `what` returns
// a std::string.
template <typename What, typename F>
auto StatusFromTorch(What&& what, F&& f) -> decltype(f()) {
  try {
    return std::forward<F>(f)();
  } catch (const c10::Error& e) {
    return TorchErrorToStatus(what(), e);
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError(absl::StrCat(what(), " failed: out of memory"));
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat(what(), " failed: ", e.what()));
  }
}

}  // namespace mat::trainer

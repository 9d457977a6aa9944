// FakeWorkerChannel: a coordinator::WorkerChannel for unit tests of the coordinator and its
// managers (tests/coordinator/): it records every message the coordinator sends one worker and
// whether (and with what status) it closed the session; typed views pick out one message kind.
#pragma once

#include <vector>

#include "absl/status/status.h"
#include "coordinator/session_manager.h"
#include "mat/v1/service.pb.h"

namespace mat::tests {

// Records what the Coordinator sends one worker, and whether it closed the session.
class FakeWorkerChannel : public coordinator::WorkerChannel {
 public:
  void Send(const v1::CoordinatorMessage& message) override { sent.push_back(message); }
  void Close(const absl::Status& status) override {
    closed = true;
    close_status = status;
  }

  std::vector<v1::Assign> Assigns() const {
    return Collect<v1::Assign>(&v1::CoordinatorMessage::has_assign,
                               &v1::CoordinatorMessage::assign);
  }
  std::vector<v1::MaskUpdate> Masks() const {
    return Collect<v1::MaskUpdate>(&v1::CoordinatorMessage::has_mask,
                                   &v1::CoordinatorMessage::mask);
  }
  std::vector<v1::Cancel> Cancels() const {
    return Collect<v1::Cancel>(&v1::CoordinatorMessage::has_cancel,
                               &v1::CoordinatorMessage::cancel);
  }
  std::vector<v1::Drain> Drains() const {
    return Collect<v1::Drain>(&v1::CoordinatorMessage::has_drain,
                              &v1::CoordinatorMessage::drain);
  }
  std::vector<v1::Reject> Rejects() const {
    return Collect<v1::Reject>(&v1::CoordinatorMessage::has_reject,
                               &v1::CoordinatorMessage::reject);
  }

  std::vector<v1::CoordinatorMessage> sent;
  bool closed = false;
  absl::Status close_status;

 private:
  template <typename T>
  std::vector<T> Collect(bool (v1::CoordinatorMessage::*has)() const,
                         const T& (v1::CoordinatorMessage::*get)() const) const {
    std::vector<T> out;
    for (const v1::CoordinatorMessage& m : sent) {
      if ((m.*has)()) out.push_back((m.*get)());
    }
    return out;
  }
};

}  // namespace mat::tests

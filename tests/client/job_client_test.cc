// RetryWhileUnavailable (client/job_client.h): how watch, submit --wait and logs --follow ride out
// a coordinator they lost. Driven by scripted attempts (a fake of the gRPC call), with a short
// reconnect window; each retry sleeps 500 ms.
#include "client/job_client.h"

#include <chrono>
#include <sstream>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "absl/status/status.h"

namespace mat::client {
namespace {

using ::testing::HasSubstr;

struct Step {
  int64_t new_answers;  // what this attempt received before it ended
  absl::Status status;
};

// Runs RetryWhileUnavailable over `script` (one Step per attempt; a script that runs out fails
// the test); returns the status, the attempts made and what was said on err.
struct Outcome {
  absl::Status status;
  size_t attempts = 0;
  std::string err;
};

Outcome RunScript(const std::vector<Step>& script, std::chrono::milliseconds window) {
  Outcome o;
  int64_t answers = 0;
  std::ostringstream err;
  o.status = RetryWhileUnavailable("127.0.0.1:1", err, window, [&] { return answers; }, [&] {
    if (o.attempts >= script.size()) {
      ADD_FAILURE() << "attempt " << o.attempts + 1 << " beyond the script";
      return absl::InternalError("script ran out");
    }
    const Step& s = script[o.attempts++];
    answers += s.new_answers;
    return s.status;
  });
  o.err = err.str();
  return o;
}

const absl::Status kLost = absl::UnavailableError("connection refused");

TEST(RetryWhileUnavailableTest, ACoordinatorNeverReachedIsNotRetried) {
  Outcome o = RunScript({{0, kLost}}, std::chrono::milliseconds(300));
  EXPECT_EQ(o.status.code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(o.attempts, 1u);
  EXPECT_EQ(o.err, "");
}

TEST(RetryWhileUnavailableTest, RetriesUntilTheCoordinatorIsBackAndOtherErrorsEndAtOnce) {
  Outcome back = RunScript({{1, kLost}, {0, kLost}, {2, absl::OkStatus()}},
                           std::chrono::milliseconds(5000));
  EXPECT_TRUE(back.status.ok()) << back.status;
  EXPECT_EQ(back.attempts, 3u);
  EXPECT_THAT(back.err, HasSubstr("matctl: lost the coordinator at 127.0.0.1:1 (connection "
                                  "refused); trying again for 5 s"));
  Outcome other = RunScript({{1, absl::NotFoundError("job 'j' was deleted")}},
                            std::chrono::milliseconds(5000));
  EXPECT_EQ(other.status.code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(other.attempts, 1u);
}

// The window counted from the first loss used to hold for the whole watch: once the coordinator
// came back and was lost again after the window had passed, the watch gave up at once. A loss
// after new answers is a new loss, told again, with a window of its own.
TEST(RetryWhileUnavailableTest, ALossAfterTheCoordinatorCameBackHasAWindowOfItsOwn) {
  // 300 ms windows, 500 ms between attempts: attempt 2 comes after the first window has passed,
  // but it received events first; attempt 3 received nothing, past the second window.
  Outcome o = RunScript({{1, kLost}, {1, kLost}, {0, kLost}}, std::chrono::milliseconds(300));
  EXPECT_EQ(o.status.code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(o.attempts, 3u);
  size_t told = 0;
  for (size_t at = o.err.find("lost the coordinator"); at != std::string::npos;
       at = o.err.find("lost the coordinator", at + 1)) {
    ++told;
  }
  EXPECT_EQ(told, 2u) << o.err;
}

}  // namespace
}  // namespace mat::client

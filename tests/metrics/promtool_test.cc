// `promtool check metrics` (the Prometheus project's own linter, from Debian's `prometheus`
// package, which scripts/setup installs) accepts an exposition holding every metric type, NaN and
// infinities, escaped label values, a family without series and removed series. A missing
// promtool is a failure, not a skip: setup installs it.
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>

#include <gtest/gtest.h>

#include "metrics/registry.h"

namespace mat::metrics {
namespace {

struct ToolResult {
  int exit_code = -1;
  std::string output;
};

// Runs `promtool check metrics` with `text` on stdin.
ToolResult PromtoolCheck(const std::string& text) {
  char path[] = "/tmp/mat_promtool_XXXXXX";
  const int fd = ::mkstemp(path);
  EXPECT_GE(fd, 0);
  ::close(fd);
  std::ofstream(path) << text;
  ToolResult r;
  const std::string command =
      std::string(MAT_PROMTOOL) + " check metrics < " + path + " 2>&1";
  FILE* pipe = ::popen(command.c_str(), "r");
  if (pipe == nullptr) return r;
  char buf[4096];
  size_t n = 0;
  while ((n = std::fread(buf, 1, sizeof(buf), pipe)) > 0) r.output.append(buf, n);
  const int status = ::pclose(pipe);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  std::remove(path);
  return r;
}

TEST(PromtoolTest, PromtoolIsInstalled) {
  ASSERT_TRUE(std::filesystem::exists(MAT_PROMTOOL))
      << MAT_PROMTOOL << " is missing: install Debian's `prometheus` package (scripts/setup does)";
}

TEST(PromtoolTest, AcceptsAnExpositionOfEveryMetricType) {
  ASSERT_TRUE(std::filesystem::exists(MAT_PROMTOOL)) << MAT_PROMTOOL << " is missing";
  Registry registry;
  Counter requests = registry.AddCounter("mat_test_requests_total", "Requests by code.", {"code"});
  Gauge lambda = registry.AddGauge("mat_test_lambda_max", "Largest eigenvalue, \\ and \"quotes\".",
                                   {"job", "module"});
  Gauge threshold = registry.AddGauge("mat_test_threshold", "NaN during warm-up.", {"job"});
  Gauge busy = registry.AddGauge("mat_test_busy", "1 while busy.", {});
  registry.AddGauge("mat_test_empty", "A family with no series yet.", {"job"});
  Histogram latency = registry.AddHistogram("mat_test_latency_seconds", "Latency.", {"job"},
                                            ExponentialBuckets(5e-5, 2, 15));
  Histogram plain = registry.AddHistogram("mat_test_plain_seconds", "No labels.", {}, {0.1, 1});
  requests.Inc({"OK"}, 3);
  requests.Inc({"INVALID_ARGUMENT"});
  lambda.Set({"job-1", "layer0.head\"1\"\\x\ny"}, 12.5);
  lambda.Set({"job-1", "layer0.ffn0"}, std::numeric_limits<double>::infinity());
  lambda.Set({"job-2", "layer0.ffn0"}, -std::numeric_limits<double>::infinity());
  threshold.Set({"job-1"}, std::numeric_limits<double>::quiet_NaN());
  busy.Set({}, 1);
  for (double v : {1e-5, 3e-4, 0.02, 2.0}) latency.Observe({"job-1"}, v);
  latency.Observe({"job-2"}, 0.5);
  plain.Observe({}, 0.5);
  registry.RemoveSeriesWithLabel("job", "job-2");
  const std::string text = registry.Expose();
  const ToolResult r = PromtoolCheck(text);
  EXPECT_EQ(r.exit_code, 0) << r.output << "\n--- exposition:\n" << text;
  EXPECT_EQ(r.output, "") << text;  // no lint warnings either
}

TEST(PromtoolTest, RejectsABrokenExposition) {
  // The check itself works: promtool refuses a malformed line.
  ASSERT_TRUE(std::filesystem::exists(MAT_PROMTOOL)) << MAT_PROMTOOL << " is missing";
  const ToolResult r = PromtoolCheck("# TYPE x gauge\nx{a=\"unterminated} 1\n");
  EXPECT_NE(r.exit_code, 0) << r.output;
}

}  // namespace
}  // namespace mat::metrics

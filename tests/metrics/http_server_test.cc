// HttpServer serves a Registry on /metrics with the exposition's Content-Type; JoinHostPort.
#include "metrics/http_server.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "tests/integration/probes.h"

namespace mat::metrics {
namespace {

using ::testing::HasSubstr;

TEST(HttpServerTest, ServesMetricsWithTheExpositionContentType) {
  Registry registry;
  Gauge g = registry.AddGauge("mat_test_value", "A value.", {"job"});
  g.Set({"j"}, 2);
  auto server = HttpServer::Start("127.0.0.1:0", [&](const std::string& target) {
    if (target == "/metrics") return MetricsResponse(registry);
    return HttpResponse{404, "text/plain", "not found\n"};
  });
  ASSERT_TRUE(server.ok()) << server.status();
  const probes::HttpResult r = probes::HttpGet((*server)->address(), "/metrics");
  EXPECT_EQ(r.status, 200) << r.raw;
  EXPECT_THAT(r.raw, HasSubstr("Content-Type: text/plain; version=0.0.4\r\n"));
  EXPECT_THAT(r.body, HasSubstr("mat_test_value{job=\"j\"} 2\n"));
  g.Set({"j"}, 3);  // every scrape renders anew
  EXPECT_THAT(probes::HttpGet((*server)->address(), "/metrics").body,
              HasSubstr("mat_test_value{job=\"j\"} 3\n"));
  EXPECT_EQ(probes::HttpGet((*server)->address(), "/other").status, 404);
  // A query (a Prometheus scrape config's `params:`) does not change the route: it was a 404.
  const probes::HttpResult with_query = probes::HttpGet((*server)->address(), "/metrics?x=1&y");
  EXPECT_EQ(with_query.status, 200) << with_query.raw;
  EXPECT_THAT(with_query.body, HasSubstr("mat_test_value{job=\"j\"} 3\n"));
  (*server)->Stop();
}

TEST(HttpServerTest, JoinsHostPort) {
  EXPECT_EQ(JoinHostPort("::1", 5), "[::1]:5");
  EXPECT_EQ(JoinHostPort("127.0.0.1", 5), "127.0.0.1:5");
}

}  // namespace
}  // namespace mat::metrics

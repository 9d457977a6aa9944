// Registry (over prometheus-cpp) and exposition: escaping, values read back, cumulative
// buckets, removal, the text read back, concurrent updates.
#include "metrics/registry.h"

#include <cmath>
#include <limits>
#include <thread>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "tests/metrics/exposition_parser.h"

namespace mat::metrics {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;
using testing::ParseExposition;

TEST(RegistryTest, EscapesLabelValuesAndHelp) {
  Registry registry;
  Gauge g = registry.AddGauge("x_value", "help with \\ and\nnewline", {"path"});
  g.Set({"a\\b\"c\nd"}, 1);
  const std::string text = registry.Expose();
  EXPECT_THAT(text, HasSubstr("# HELP x_value help with \\\\ and\\nnewline\n"));
  EXPECT_THAT(text, HasSubstr("x_value{path=\"a\\\\b\\\"c\\nd\"} 1\n"));
  // Read back, the value is the original.
  const auto samples = ParseExposition(text);
  EXPECT_EQ(samples.count("x_value{path=\"a\\b\"c\nd\"}"), 1u);
}

TEST(RegistryTest, SpecialAndOrdinaryValuesReadBack) {
  Registry registry;
  Gauge g = registry.AddGauge("v", "values", {"k"});
  const std::vector<double> values = {std::numeric_limits<double>::infinity(),
                                      -std::numeric_limits<double>::infinity(),
                                      3, 0.25, 5e-05, 1e15, 10, -0.5, 0.1 + 0.2};
  for (size_t i = 0; i < values.size(); ++i) g.Set({std::to_string(i)}, values[i]);
  g.Set({"nan"}, std::numeric_limits<double>::quiet_NaN());
  const std::string text = registry.Expose();
  EXPECT_THAT(text, HasSubstr("v{k=\"0\"} +Inf\n"));
  EXPECT_THAT(text, HasSubstr("v{k=\"1\"} -Inf\n"));
  const auto samples = ParseExposition(text);
  EXPECT_TRUE(std::isnan(samples.at("v{k=\"nan\"}")));
  for (size_t i = 0; i < values.size(); ++i) {
    const double got = samples.at("v{k=\"" + std::to_string(i) + "\"}");
    if (std::isinf(values[i])) {
      EXPECT_EQ(got, values[i]);
    } else {
      // prometheus-cpp writes 16 significant digits: exact for these but 0.1 + 0.2.
      EXPECT_NEAR(got, values[i], std::fabs(values[i]) * 1e-15) << i;
    }
  }
}

TEST(RegistryTest, HistogramBucketsAreCumulative) {
  Registry registry;
  Histogram h = registry.AddHistogram("lat_seconds", "latency", {"job"}, {0.1, 1, 10});
  for (double v : {0.05, 0.1, 0.5, 5.0, 50.0}) h.Observe({"j"}, v);
  const HistogramSnapshot s = h.Get({"j"});
  EXPECT_THAT(s.cumulative, ::testing::ElementsAre(2u, 3u, 4u, 5u));
  EXPECT_EQ(s.count, 5u);
  EXPECT_DOUBLE_EQ(s.sum, 55.65);
  const auto samples = ParseExposition(registry.Expose());
  EXPECT_EQ(samples.at("lat_seconds_bucket{job=\"j\",le=\"0.1\"}"), 2);
  EXPECT_EQ(samples.at("lat_seconds_bucket{job=\"j\",le=\"1\"}"), 3);
  EXPECT_EQ(samples.at("lat_seconds_bucket{job=\"j\",le=\"10\"}"), 4);
  EXPECT_EQ(samples.at("lat_seconds_bucket{job=\"j\",le=\"+Inf\"}"), 5);
  EXPECT_EQ(samples.at("lat_seconds_count{job=\"j\"}"), 5);
  EXPECT_DOUBLE_EQ(samples.at("lat_seconds_sum{job=\"j\"}"), 55.65);
}

TEST(RegistryTest, ExponentialBuckets) {
  EXPECT_THAT(ExponentialBuckets(1, 2, 4), ::testing::ElementsAre(1, 2, 4, 8));
}

TEST(RegistryTest, RemovesOneSeriesAndEverySeriesOfAJob) {
  Registry registry;
  Gauge step = registry.AddGauge("job_step", "step", {"job"});
  Gauge lambda = registry.AddGauge("lambda", "λ", {"job", "module"});
  Counter total = registry.AddCounter("things_total", "things", {});
  Histogram h = registry.AddHistogram("h_seconds", "h", {"rank", "job"}, {1});
  step.Set({"a"}, 1);
  step.Set({"b"}, 2);
  lambda.Set({"a", "m0"}, 1);
  lambda.Set({"a", "m1"}, 1);
  lambda.Set({"b", "m0"}, 1);
  h.Observe({"0", "a"}, 0.5);
  total.Inc({}, 3);
  EXPECT_EQ(registry.RemoveSeriesWithLabel("job", "a"), 4);
  EXPECT_FALSE(step.Exists({"a"}));
  EXPECT_TRUE(step.Exists({"b"}));
  EXPECT_FALSE(lambda.Exists({"a", "m1"}));
  EXPECT_TRUE(lambda.Exists({"b", "m0"}));
  EXPECT_FALSE(h.Exists({"0", "a"}));
  EXPECT_EQ(total.Value({}), 3);
  const std::string text = registry.Expose();
  EXPECT_THAT(text, Not(HasSubstr("job=\"a\"")));
  EXPECT_THAT(text, HasSubstr("job_step{job=\"b\"} 2\n"));
  step.Remove({"b"});
  EXPECT_FALSE(step.Exists({"b"}));
  // The family stays, with its HELP and TYPE.
  EXPECT_THAT(registry.Expose(), HasSubstr("# TYPE job_step gauge\n"));
  // A family without labels keeps its series (reset to 0).
  total.Remove({});
  EXPECT_TRUE(total.Exists({}));
  EXPECT_EQ(total.Value({}), 0);
}

TEST(RegistryTest, ExpositionReadsBackWithTypesAndValues) {
  Registry registry;
  Counter c = registry.AddCounter("req_total", "requests", {"code"});
  Gauge g = registry.AddGauge("temp", "temperature", {"where", "unit"});
  Gauge nan = registry.AddGauge("threshold", "maybe NaN", {"job"});
  registry.AddGauge("busy", "0/1", {});  // never set: exposed with its zero
  Histogram h = registry.AddHistogram("d_seconds", "durations", {}, {0.5});
  c.Inc({"OK"});
  c.Inc({"OK"}, 2);
  c.SetIfGreater({"NOT_FOUND"}, 7);
  c.SetIfGreater({"NOT_FOUND"}, 5);  // lower: kept at 7
  g.Set({"in", "c"}, -1.5);
  g.Add({"in", "c"}, 0.25);
  nan.Set({"j"}, std::numeric_limits<double>::quiet_NaN());
  h.Observe({}, 0.25);
  std::map<std::string, std::string> types;
  const auto s = ParseExposition(registry.Expose(), &types);
  EXPECT_EQ(types["req_total"], "counter");
  EXPECT_EQ(types["temp"], "gauge");
  EXPECT_EQ(types["d_seconds"], "histogram");
  EXPECT_EQ(s.at("req_total{code=\"OK\"}"), 3);
  EXPECT_EQ(s.at("req_total{code=\"NOT_FOUND\"}"), 7);
  EXPECT_EQ(s.at("temp{unit=\"c\",where=\"in\"}"), -1.25) << "labels in name order";
  EXPECT_TRUE(std::isnan(s.at("threshold{job=\"j\"}")));
  EXPECT_EQ(s.at("busy"), 0);
  EXPECT_EQ(s.at("d_seconds_bucket{le=\"0.5\"}"), 1);
  EXPECT_EQ(s.at("d_seconds_count"), 1);
  EXPECT_THAT(registry.Names(),
              ::testing::ElementsAre("req_total", "temp", "threshold", "busy", "d_seconds"));
}

TEST(RegistryTest, RefusesMalformedDefinitions) {
  Registry registry;
  registry.AddGauge("ok_name", "x", {"job"});
  EXPECT_DEATH(registry.AddGauge("ok_name", "again", {}), "registered twice");
  EXPECT_DEATH(registry.AddGauge("bad-name", "x", {}), "bad metric name");
  EXPECT_DEATH(registry.AddHistogram("h", "x", {"le"}, {1}), "reserved");
  EXPECT_DEATH(registry.AddHistogram("h2", "x", {}, {2, 1}), "increasing");
  Gauge g = registry.AddGauge("two", "x", {"a", "b"});
  EXPECT_DEATH(g.Set({"only one"}, 1), "has 2 labels");
}

TEST(RegistryTest, ConcurrentUpdatesAndExpositionLoseNothing) {
  Registry registry;
  Counter c = registry.AddCounter("n_total", "n", {"thread"});
  Counter shared = registry.AddCounter("shared_total", "n", {});
  Histogram h = registry.AddHistogram("v_seconds", "v", {"job"}, {0.5});
  constexpr int kThreads = 4, kIterations = 20000;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kIterations; ++i) {
        c.Inc({std::to_string(t)});
        shared.Inc({});
        h.Observe({"j"}, i % 2 == 0 ? 0.25 : 0.75);
        if (i % 1000 == 0) registry.RemoveSeriesWithLabel("job", "other");
      }
    });
  }
  std::thread reader([&] {
    for (int i = 0; i < 200; ++i) ParseExposition(registry.Expose());
  });
  for (auto& t : threads) t.join();
  reader.join();
  for (int t = 0; t < kThreads; ++t) EXPECT_EQ(c.Value({std::to_string(t)}), kIterations);
  EXPECT_EQ(shared.Value({}), kThreads * kIterations);
  const HistogramSnapshot s = h.Get({"j"});
  EXPECT_EQ(s.count, static_cast<uint64_t>(kThreads * kIterations));
  EXPECT_EQ(s.cumulative[0], static_cast<uint64_t>(kThreads * kIterations / 2));
}

}  // namespace
}  // namespace mat::metrics

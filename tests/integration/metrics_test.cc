// Metrics of the real daemons on loopback, checked by the Prometheus project's own tools: a
// mat-coordinator and one mat-worker (both with --metrics-listen 127.0.0.1:0) run a small MAT
// job; while it runs, `promtool check metrics` accepts both daemons' /metrics; then a real
// Prometheus server (Debian's /usr/bin/prometheus, installed by scripts/setup) scrapes both every
// second, and its query API must agree with the job: count(mat_module_lambda_max{job}) is the
// model's module count and sum(mat_module_active{job}) the job's active_modules (matctl status),
// compared once the job finished (the values are frozen then and stay until retention ends).
//
// A second test loads deploy/prometheus/alerts.yml into a real Prometheus evaluating every second
// and fails a job (its data.dir does not exist): MatJobFailed must fire (the /api/v1/alerts
// state and the ALERTS series), with its labels and runbook link.
//
// The MAT job id is the daemons' `mat_job` label; Prometheus' own `job` names the scrape job
// (no honor_labels), and the test checks both.
//
// Every child is killed in TearDown; the test is bounded by its ctest TIMEOUT.

#include <cstdio>
#include <ctime>

#include "common/net_util.h"
#include "nlohmann/json.hpp"
#include "tests/integration/harness.h"
#include "tests/integration/probes.h"

namespace mat {
namespace {

using json = nlohmann::json;
using testing_loopback::CommandResult;
using testing_loopback::ReadText;
using ::testing::HasSubstr;
using namespace std::chrono_literals;
namespace fs = std::filesystem;

const std::string kCorpus = std::string(MAT_SHARED_DIR) + "/data/wikitext-2";
const std::string kPromtool = "/usr/bin/promtool";
const std::string kPrometheus = "/usr/bin/prometheus";

// The service test's small BERT (2 layers × (4 heads + 2 FFN groups) = 12 modules) with a MAT
// policy that switches modules off after its warm-up; long enough to be caught running.
std::string JobYaml(int steps) {
  return "seed: 3\n"
         "model: {kind: bert, layers: 2, d_model: 64, heads: 4, d_ff: 128, ffn_groups: 2,"
         " max_seq_len: 32, dropout: 0.1}\n"
         "data: {kind: wikitext, dir: " + kCorpus + ", seq_len: 32}\n"
         "train: {steps: " + std::to_string(steps) + ", batch_size: 8, lr: 1.0e-3,"
         " warmup_steps: 5, eval_every: 100, eval_batches: 2, threads: 1}\n"
         "policy: {kind: mat, alpha: 0.5, beta: 0.0, gamma: 0.5, warmup_steps: 10,"
         " probe_every: 10, probe_samples: 2, estimator: gram, min_active_fraction: 0.25}\n"
         "resources: {workers: 1, device: cpu}\n";
}

// A TCP port free right now.
int FreePort() { return common::PickFreePort().value_or(0); }

std::string UrlEncode(const std::string& s) {
  std::string out;
  char buf[4];
  for (unsigned char c : s) {
    if (std::isalnum(c) || c == '_' || c == '-' || c == '.' || c == '~') {
      out += static_cast<char>(c);
    } else {
      std::snprintf(buf, sizeof(buf), "%%%02X", c);
      out += buf;
    }
  }
  return out;
}

class MetricsTest : public testing_loopback::LoopbackTest {
 protected:
  // `promtool check metrics` on `text` (stdin); its exit code, output in `*output`.
  int Promtool(const std::string& text, std::string* output) {
    const std::string in = root_ + "/exposition.txt";
    std::ofstream(in) << text;
    const std::string out = root_ + "/promtool.out";
    const pid_t pid = SpawnWithStdin({kPromtool, "check", "metrics"}, in, out);
    const int rc = Wait(pid, 30s);
    *output = ReadText(out);
    return rc;
  }

  pid_t SpawnWithStdin(const std::vector<std::string>& args, const std::string& in,
                       const std::string& out) {
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, 0, in.c_str(), O_RDONLY, 0);
    posix_spawn_file_actions_addopen(&actions, 1, out.c_str(), O_WRONLY | O_CREAT | O_TRUNC,
                                     0644);
    posix_spawn_file_actions_adddup2(&actions, 1, 2);
    std::vector<char*> argv;
    for (const std::string& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    pid_t pid = -1;
    const int rc = posix_spawn(&pid, argv[0], &actions, nullptr, argv.data(), environ);
    posix_spawn_file_actions_destroy(&actions);
    EXPECT_EQ(rc, 0) << "cannot start " << args[0];
    if (rc == 0) children_.insert(pid);
    return pid;
  }

  // An instant query against the Prometheus HTTP API; the result vector (empty on any error).
  json Query(const std::string& expr) {
    const probes::HttpResult r =
        probes::HttpGet(prometheus_address_, "/api/v1/query?query=" + UrlEncode(expr));
    if (r.status != 200) return json::array();
    const json body = json::parse(r.body, nullptr, false);
    if (!body.is_object() || body.value("status", "") != "success") return json::array();
    return body["data"]["result"];
  }
  // The value of a one-element query result; NaN when there is none.
  double QueryScalar(const std::string& expr) {
    const json result = Query(expr);
    if (!result.is_array() || result.size() != 1) return std::nan("");
    return std::stod(result[0]["value"][1].get<std::string>());
  }

  // A real Prometheus scraping the coordinator every second (job "mat-coordinator") and
  // evaluating deploy/prometheus/alerts.yml every second.
  void StartPrometheusWithAlerts() {
    prometheus_address_ = "127.0.0.1:" + std::to_string(FreePort());
    const std::string config = root_ + "/prometheus.yml";
    std::ofstream(config) << "global: {scrape_interval: 1s, scrape_timeout: 1s, "
                             "evaluation_interval: 1s}\n"
                             "rule_files: ['" + std::string(MAT_SOURCE_DIR) +
                                 "/deploy/prometheus/alerts.yml']\n"
                             "scrape_configs:\n"
                             "  - job_name: mat-coordinator\n"
                             "    static_configs: [{targets: ['" + metrics_address_ + "']}]\n";
    ASSERT_GT(Spawn({kPrometheus, "--config.file=" + config,
                     "--storage.tsdb.path=" + root_ + "/tsdb",
                     "--web.listen-address=" + prometheus_address_, "--log.level=warn"},
                    root_ + "/prometheus.out", root_ + "/prometheus.err"),
              0);
  }
  // Polls until `series` has at least `n` samples in the last minute, or 60 s pass; the count.
  double WaitForScrapes(const std::string& series, double n) {
    const auto deadline = std::chrono::steady_clock::now() + 60s;
    double scrapes = 0;
    while (std::chrono::steady_clock::now() < deadline) {
      scrapes = QueryScalar("count_over_time(" + series + "[1m])");
      if (scrapes >= n) break;
      std::this_thread::sleep_for(250ms);
    }
    return scrapes;
  }

  std::string Logs() {
    return "coordinator:\n" + ReadText(coordinator_log_ + ".err") + "\nw1:\n" +
           ReadText(root_ + "/w1.err") + "\nprometheus:\n" + ReadText(root_ + "/prometheus.err");
  }

  std::string prometheus_address_;
};

TEST_F(MetricsTest, PromtoolAndARealPrometheusAgreeWithTheJob) {
  ASSERT_TRUE(fs::exists(kPromtool)) << kPromtool << " missing: scripts/setup installs prometheus";
  ASSERT_TRUE(fs::exists(kPrometheus)) << kPrometheus << " missing";
  StartCoordinator();
  // The job's worker series stay 15 s after its rank ended (long enough for the checks of the
  // end below), then go.
  StartWorker("w1", {"--metrics-listen", "127.0.0.1:0", "--metrics-linger-seconds", "15"});
  const std::string worker_metrics = WaitForLine(root_ + "/w1/worker.metrics.addr", 30s);
  ASSERT_FALSE(worker_metrics.empty()) << Logs();
  EXPECT_NE(worker_metrics, "127.0.0.1:0");

  const std::string job_file = root_ + "/job.yaml";
  std::ofstream(job_file) << JobYaml(400);
  CommandResult submit = Matctl(address_, {"submit", job_file});
  ASSERT_EQ(submit.exit_code, 0) << submit.err;
  const std::string job = submit.out.substr(0, submit.out.find('\n'));

  // While it runs (past the warm-up, so the policy has switched modules off): both expositions
  // pass promtool.
  json s = WaitFor(job, [](const json& j) { return j["state"] == "RUNNING" && j["step"] >= 30; },
                   120s);
  ASSERT_EQ(s["state"], "RUNNING") << s.dump(2) << Logs();
  const probes::HttpResult coordinator = probes::HttpGet(metrics_address_, "/metrics");
  const probes::HttpResult worker = probes::HttpGet(worker_metrics, "/metrics");
  ASSERT_EQ(coordinator.status, 200) << coordinator.raw;
  ASSERT_EQ(worker.status, 200) << worker.raw;
  EXPECT_THAT(coordinator.raw, HasSubstr("Content-Type: text/plain; version=0.0.4\r\n"));
  EXPECT_THAT(worker.raw, HasSubstr("Content-Type: text/plain; version=0.0.4\r\n"));
  // prometheus-cpp writes the labels in name order: group, layer, mat_job, module.
  EXPECT_THAT(coordinator.body,
              ::testing::ContainsRegex("mat_module_lambda_max\\{[^}]*mat_job=\"" + job + "\""));
  EXPECT_THAT(coordinator.body, HasSubstr("mat_coordinator_jobs{state=\"running\"} 1\n"));
  EXPECT_THAT(worker.body, HasSubstr("mat_worker_busy 1\n"));
  EXPECT_THAT(worker.body, HasSubstr("mat_worker_step{mat_job=\"" + job + "\",rank=\"0\"}"));
  std::string output;
  EXPECT_EQ(Promtool(coordinator.body, &output), 0) << output << "\n" << coordinator.body;
  EXPECT_EQ(output, "") << "promtool lint findings on the coordinator's /metrics";
  EXPECT_EQ(Promtool(worker.body, &output), 0) << output << "\n" << worker.body;
  EXPECT_EQ(output, "") << "promtool lint findings on the worker's /metrics";
  EXPECT_EQ(Status(job)["state"], "RUNNING") << "the job ended before both scrapes";

  // A real Prometheus scraping both daemons every second.
  prometheus_address_ = "127.0.0.1:" + std::to_string(FreePort());
  const std::string config = root_ + "/prometheus.yml";
  std::ofstream(config) << "global: {scrape_interval: 1s, scrape_timeout: 1s, "
                           "evaluation_interval: 1s}\n"
                           "scrape_configs:\n"
                           "  - job_name: mat-coordinator\n"
                           "    static_configs: [{targets: ['" + metrics_address_ + "']}]\n"
                           "  - job_name: mat-worker\n"
                           "    static_configs: [{targets: ['" + worker_metrics + "']}]\n";
  const pid_t prometheus =
      Spawn({kPrometheus, "--config.file=" + config, "--storage.tsdb.path=" + root_ + "/tsdb",
             "--web.listen-address=" + prometheus_address_, "--log.level=warn"},
            root_ + "/prometheus.out", root_ + "/prometheus.err");
  ASSERT_GT(prometheus, 0);
  // Both targets scraped and up.
  auto deadline = std::chrono::steady_clock::now() + 60s;
  double up = 0;
  while (std::chrono::steady_clock::now() < deadline) {
    up = QueryScalar("sum(up)");
    if (up == 2) break;
    std::this_thread::sleep_for(250ms);
  }
  ASSERT_EQ(up, 2) << "Prometheus did not scrape both daemons\n" << Logs();

  // Once the job finished its metrics stand still: Prometheus must then show the job's numbers.
  s = WaitFor(job, [](const json& j) { return j["state"] != "RUNNING"; }, 180s);
  ASSERT_EQ(s["state"], "SUCCEEDED") << s.dump(2) << Logs();
  const int total = s["total_modules"].get<int>();
  const int active = s["active_modules"].get<int>();
  EXPECT_EQ(total, 12);
  EXPECT_GT(active, 0);
  EXPECT_LT(active, total) << "the policy switched nothing off; the test checks less";
  const std::string sel = "{mat_job=\"" + job + "\"}";
  double count = 0, sum = 0, step = 0, succeeded = 0;
  deadline = std::chrono::steady_clock::now() + 30s;
  while (std::chrono::steady_clock::now() < deadline) {
    // A scrape after the end (the worker reaches step 400 before the coordinator ends the job).
    succeeded = QueryScalar("mat_coordinator_jobs{state=\"succeeded\"}");
    count = QueryScalar("count(mat_module_lambda_max" + sel + ")");
    sum = QueryScalar("sum(mat_module_active" + sel + ")");
    step = QueryScalar("max(mat_worker_step" + sel + ")");
    if (succeeded == 1 && count == total && sum == active && step == 400) break;
    std::this_thread::sleep_for(250ms);
  }
  EXPECT_EQ(count, total) << Logs();
  EXPECT_EQ(sum, active) << Logs();
  EXPECT_EQ(step, 400);
  EXPECT_EQ(QueryScalar("mat_job_active_modules" + sel), active);
  EXPECT_EQ(QueryScalar("mat_job_step" + sel), 400);
  // Prometheus' own job label is the scrape job's name on the same series.
  EXPECT_EQ(QueryScalar("count(mat_job_step{mat_job=\"" + job + "\", job=\"mat-coordinator\"})"), 1);
  EXPECT_EQ(QueryScalar("count(mat_policy_threshold" + sel + ")"), 2);  // heads, ffn
  EXPECT_GT(QueryScalar("sum(mat_worker_step_duration_seconds_count" + sel + ")"), 0);
  EXPECT_GT(QueryScalar("sum(mat_worker_spectral_duration_seconds_count" + sel + ")"), 0);
  EXPECT_GT(QueryScalar("mat_coordinator_mask_latency_seconds_count"), 0);
  EXPECT_EQ(succeeded, 1);
  EXPECT_GT(QueryScalar("mat_job_flops_saved_total" + sel), 0);
  EXPECT_GT(QueryScalar("mat_job_flops_total" + sel), 0);
  EXPECT_EQ(QueryScalar("count(mat_job_flops_by_phase_total" + sel + ")"), 4);  // the phases

  // The coordinator counts its gRPC calls by method and code: the submit, the OK status polls
  // and, after one more, a NOT_FOUND.
  EXPECT_EQ(Matctl(address_, {"status", "job-999999"}).exit_code, 1);
  const std::string status_not_found =
      "mat_coordinator_grpc_requests_total{method=\"mat.v1.JobService/GetJob\",code=\"NOT_FOUND\"}";
  double not_found = 0;
  for (auto end = std::chrono::steady_clock::now() + 10s; std::chrono::steady_clock::now() < end;) {
    not_found = QueryScalar(status_not_found);
    if (not_found == 1) break;
    std::this_thread::sleep_for(250ms);
  }
  EXPECT_EQ(not_found, 1) << Logs();
  EXPECT_EQ(QueryScalar("mat_coordinator_grpc_requests_total{method=\"mat.v1.JobService/"
                        "SubmitJob\",code=\"OK\"}"),
            1);
  EXPECT_GT(QueryScalar("mat_coordinator_grpc_requests_total{method=\"mat.v1.JobService/"
                        "GetJob\",code=\"OK\"}"),
            1);
  // Both daemons: the standard process metrics and their build.
  for (const std::string daemon : {"mat-coordinator", "mat-worker"}) {
    const std::string j = "{job=\"" + daemon + "\"}";
    EXPECT_GT(QueryScalar("process_resident_memory_bytes" + j), 1e6) << daemon;
    EXPECT_GT(QueryScalar("process_cpu_seconds_total" + j), 0) << daemon;
    EXPECT_GT(QueryScalar("process_open_fds" + j), 3) << daemon;
    EXPECT_GT(QueryScalar("process_max_fds" + j), QueryScalar("process_open_fds" + j)) << daemon;
    const double started = QueryScalar("process_start_time_seconds" + j);
    const double now = double(std::time(nullptr));
    EXPECT_GT(started, now - 3600) << daemon;
    EXPECT_LE(started, now + 1) << daemon;
    EXPECT_EQ(QueryScalar("count(mat_build_info" + j + ")"), 1) << daemon;
  }
  EXPECT_EQ(QueryScalar("count(count by (version, commit) (mat_build_info))"), 1)
      << "both daemons report the same build";

  // The worker's series of the ended job go after the linger; the worker's own stay.
  bool gone = false;
  std::string body;
  for (auto end = std::chrono::steady_clock::now() + 60s; std::chrono::steady_clock::now() < end;) {
    body = probes::HttpGet(worker_metrics, "/metrics").body;
    if (body.find("mat_job=\"" + job + "\"") == std::string::npos) {
      gone = true;
      break;
    }
    std::this_thread::sleep_for(500ms);
  }
  EXPECT_TRUE(gone) << "the ended job's series are still on the worker's /metrics:\n" << body;
  EXPECT_THAT(body, HasSubstr("mat_worker_busy 0\n"));
  std::printf("prometheus: count(mat_module_lambda_max)=%g, sum(mat_module_active)=%g "
              "(matctl: total_modules=%d, active_modules=%d), max(mat_worker_step)=%g\n",
              count, sum, total, active, step);
}

// A worker that takes another job within the linger keeps the ended job's series until the
// linger is over (they went at once, before Prometheus had scraped the final values).
TEST_F(MetricsTest, AnEndedJobsWorkerSeriesLingerWhileTheWorkerRunsTheNextJob) {
  StartCoordinator();
  StartWorker("w1", {"--metrics-listen", "127.0.0.1:0", "--metrics-linger-seconds", "300"});
  const std::string worker_metrics = WaitForLine(root_ + "/w1/worker.metrics.addr", 30s);
  ASSERT_FALSE(worker_metrics.empty()) << Logs();
  auto submit = [this](const std::string& name) {
    std::ofstream(root_ + "/" + name) << JobYaml(20);
    CommandResult r = Matctl(address_, {"submit", root_ + "/" + name});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    return r.out.substr(0, r.out.find('\n'));
  };
  const std::string first = submit("first.yaml");
  json s = WaitFor(first, [](const json& j) { return j["state"] == "SUCCEEDED"; }, 120s);
  ASSERT_EQ(s["state"], "SUCCEEDED") << s.dump(2) << Logs();
  const std::string second = submit("second.yaml");
  std::string body;
  for (auto end = std::chrono::steady_clock::now() + 60s; std::chrono::steady_clock::now() < end;) {
    body = probes::HttpGet(worker_metrics, "/metrics").body;
    if (body.find("mat_worker_step{mat_job=\"" + second + "\"") != std::string::npos) break;
    std::this_thread::sleep_for(200ms);
  }
  ASSERT_THAT(body, HasSubstr("mat_worker_step{mat_job=\"" + second + "\"")) << Logs();
  EXPECT_THAT(body, HasSubstr("mat_worker_step{mat_job=\"" + first + "\""))
      << "the first job's series went when the worker took the second";
}

TEST_F(MetricsTest, TheJobFailedAlertFiresOnARealPrometheus) {
  ASSERT_TRUE(fs::exists(kPrometheus)) << kPrometheus << " missing";
  StartCoordinator();
  StartWorker("w1");
  StartPrometheusWithAlerts();
  // A few scrapes with no failed job first: the rule compares with the last 15 minutes' minimum.
  ASSERT_GE(WaitForScrapes("mat_coordinator_jobs{state=\"failed\"}", 3), 3) << Logs();
  EXPECT_TRUE(Query("ALERTS{alertname=\"MatJobFailed\"}").empty()) << "fired before any failure";

  std::string yaml = JobYaml(20);
  yaml.replace(yaml.find(kCorpus), kCorpus.size(), root_ + "/no-such-corpus");
  const std::string job_file = root_ + "/job.yaml";
  std::ofstream(job_file) << yaml;
  CommandResult submit = Matctl(address_, {"submit", job_file});
  ASSERT_EQ(submit.exit_code, 0) << submit.err;
  const std::string job = submit.out.substr(0, submit.out.find('\n'));
  const json s = WaitFor(job, [](const json& j) { return j["state"] == "FAILED"; }, 120s);
  ASSERT_EQ(s["state"], "FAILED") << s.dump(2) << Logs();

  json firing;
  auto deadline = std::chrono::steady_clock::now() + 60s;
  while (std::chrono::steady_clock::now() < deadline) {
    const json result = Query("ALERTS{alertname=\"MatJobFailed\", alertstate=\"firing\"}");
    if (result.is_array() && result.size() == 1) {
      firing = result[0];
      break;
    }
    std::this_thread::sleep_for(250ms);
  }
  ASSERT_TRUE(firing.is_object()) << "MatJobFailed did not fire\n" << Logs();
  EXPECT_EQ(firing["metric"].value("severity", ""), "warning");
  EXPECT_EQ(firing["metric"].value("job", ""), "mat-coordinator");
  const probes::HttpResult alerts = probes::HttpGet(prometheus_address_, "/api/v1/alerts");
  ASSERT_EQ(alerts.status, 200);
  EXPECT_THAT(alerts.body, HasSubstr("deploy/README.md#matjobfailed"));
  EXPECT_THAT(alerts.body, HasSubstr("1 MAT job(s) moved to FAILED"));
}

TEST_F(MetricsTest, AKilledWorkerFiresTheHeartbeatAlertWithinItsFor) {
  ASSERT_TRUE(fs::exists(kPrometheus)) << kPrometheus << " missing";
  StartCoordinator();
  const pid_t worker = StartWorker("w1");
  StartPrometheusWithAlerts();
  ASSERT_GE(WaitForScrapes("mat_coordinator_worker_heartbeat_age_seconds", 3), 3) << Logs();
  EXPECT_TRUE(Query("ALERTS{alertname=\"MatWorkerHeartbeatStale\"}").empty())
      << "fired while the worker was alive";

  ASSERT_EQ(::kill(worker, SIGKILL), 0);
  const auto killed = std::chrono::steady_clock::now();
  // The rule's `for: 1m`, plus the coordinator noticing the loss and a few scrape and evaluation
  // intervals: it must fire within 1m + 60 s (the Prometheus server's own timing bounds it from
  // below; only the upper bound is a property of the rule and the daemons).
  json firing;
  bool pending_seen = false;
  const auto deadline = killed + 120s;
  while (std::chrono::steady_clock::now() < deadline) {
    const json result = Query("ALERTS{alertname=\"MatWorkerHeartbeatStale\"}");
    if (result.is_array() && result.size() == 1) {
      const std::string state = result[0]["metric"].value("alertstate", "");
      pending_seen = pending_seen || state == "pending";
      if (state == "firing") {
        firing = result[0];
        break;
      }
    }
    std::this_thread::sleep_for(500ms);
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - killed)
                             .count();
  ASSERT_TRUE(firing.is_object()) << "MatWorkerHeartbeatStale did not fire within 120 s\n"
                                  << Logs();
  RecordProperty("heartbeat_alert_fired_after_seconds", std::to_string(seconds));
  EXPECT_TRUE(pending_seen) << "it fired without a pending period (for: 1m)";
  EXPECT_EQ(firing["metric"].value("worker", ""), "worker-000001");
  EXPECT_EQ(firing["metric"].value("severity", ""), "warning");
}

}  // namespace
}  // namespace mat

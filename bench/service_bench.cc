// mat-bench-service: benchmarks of the service daemons, without LibTorch (bench/run NAME).
//
//   mask-latency   starts the real mat-coordinator binary as a child process, registers N
//                  simulated workers (each its own gRPC channel, Session stream and thread),
//                  submits one N-rank job (policy mat, probe_every 1, warmup 0), lets rank 0
//                  declare M modules, then every period each rank sends a SpectraReport for the
//                  next step (M random positive λ) and waits for that step's MaskUpdate, which it
//                  acknowledges. Measured over --seconds after --warmup-seconds:
//                    latency per step: from the moment the LAST rank's report of the step was
//                      handed to gRPC to the moment that rank read the step's mask, on the
//                      client's steady clock: an upper bound on the coordinator's
//                      report-received -> mask-sent time (it adds both transport legs and the
//                      client's own scheduling);
//                    module_reports_per_second = steps × N × M / elapsed (λ values accepted);
//                    the coordinator's CPU seconds (utime + stime of /proc/PID/stat) over the
//                      window and its peak resident memory (VmHWM of /proc/PID/status).
//                  Client and coordinator share the machine's cores (host_cpus in the JSON).
//                  The coordinator's state dir lies under TMPDIR; its store commits with
//                  fdatasync, whose cost the JSON records (state_dir_fsync_median_seconds).
//
// Exit codes: 0 done (the JSON written), 1 the benchmark failed (the coordinator's log is kept and
// named), 2 bad flags.
#include <fcntl.h>
#include <netdb.h>
#include <sys/socket.h>
#include <signal.h>
#include <spawn.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <mutex>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "api/credentials.h"
#include "common/file_util.h"
#include "mat/v1/service.grpc.pb.h"
#include "nlohmann/json.hpp"

extern char** environ;

namespace mat::bench {
namespace {

// GET http://HOST:PORT/metrics with a raw socket (HTTP/1.0, read to EOF); "" on failure.
std::string ScrapeMetrics(const std::string& host_port) {
  const size_t colon = host_port.rfind(':');
  if (colon == std::string::npos) return "";
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* info = nullptr;
  if (::getaddrinfo(host_port.substr(0, colon).c_str(), host_port.substr(colon + 1).c_str(),
                    &hints, &info) != 0) {
    return "";
  }
  const int fd = ::socket(info->ai_family, info->ai_socktype, info->ai_protocol);
  const bool connected = fd >= 0 && ::connect(fd, info->ai_addr, info->ai_addrlen) == 0;
  ::freeaddrinfo(info);
  std::string raw;
  if (connected) {
    const std::string request = "GET /metrics HTTP/1.0\r\nHost: " + host_port + "\r\n\r\n";
    if (::send(fd, request.data(), request.size(), MSG_NOSIGNAL) == ssize_t(request.size())) {
      char buf[65536];
      ssize_t n = 0;
      while ((n = ::recv(fd, buf, sizeof(buf), 0)) > 0) raw.append(buf, size_t(n));
    }
  }
  if (fd >= 0) ::close(fd);
  const size_t body = raw.find("\r\n\r\n");
  return body == std::string::npos ? "" : raw.substr(body + 4);
}

// The cumulative buckets (le -> count) of histogram `name` in an exposition.
std::vector<std::pair<double, double>> HistogramBuckets(const std::string& text,
                                                        const std::string& name) {
  std::vector<std::pair<double, double>> out;
  std::istringstream in(text);
  std::string line;
  const std::string prefix = name + "_bucket{";
  while (std::getline(in, line)) {
    if (line.rfind(prefix, 0) != 0) continue;
    const size_t le = line.find("le=\"");
    const size_t close = line.find('"', le + 4);
    const size_t space = line.rfind(' ');
    if (le == std::string::npos || close == std::string::npos || space == std::string::npos) continue;
    const std::string bound = line.substr(le + 4, close - le - 4);
    const double upper = bound == "+Inf" ? INFINITY : std::stod(bound);
    out.push_back({upper, std::stod(line.substr(space + 1))});
  }
  return out;
}

// histogram_quantile over the difference of two scrapes (linear within a bucket, as PromQL).
double HistogramQuantile(const std::vector<std::pair<double, double>>& before,
                         const std::vector<std::pair<double, double>>& after, double q,
                         double* count) {
  std::vector<std::pair<double, double>> d = after;
  for (size_t i = 0; i < d.size() && i < before.size(); ++i) d[i].second -= before[i].second;
  *count = d.empty() ? 0 : d.back().second;
  if (*count <= 0) return NAN;
  const double rank = q * *count;
  double lower = 0, below = 0;
  for (const auto& [upper, cumulative] : d) {
    if (cumulative >= rank) {
      if (std::isinf(upper)) return lower;
      const double in_bucket = cumulative - below;
      return in_bucket > 0 ? lower + (upper - lower) * (rank - below) / in_bucket : upper;
    }
    lower = upper;
    below = cumulative;
  }
  return lower;
}


namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

struct MaskLatencyConfig {
  std::string coordinator = "build/bin/mat-coordinator";  // the binary to start
  std::string out = "bench/results/mask-latency.json";    // result file; "" = none
  std::string coordinator_log_level = "info";             // its --log-level
  int workers = 64;                // simulated workers = ranks of the job, count
  int modules = 1000;              // modules rank 0 declares, count
  int period_ms = 100;             // time between one rank's reports, milliseconds
  double seconds = 20;             // measured window, seconds
  double warmup_seconds = 2;       // steps before the window, seconds
  uint64_t seed = 1;               // λ values
  bool send_acks = true;           // false (diagnosis only): no MaskAck, which the protocol wants
};

// ----- the coordinator as a child process -----

class ChildProcess {
 public:
  ChildProcess() = default;
  ChildProcess(const ChildProcess&) = delete;
  ChildProcess& operator=(const ChildProcess&) = delete;
  ~ChildProcess() { Kill(); }

  // Starts argv[0] (a path) with stdout and stderr appended to `log_path`.
  bool Spawn(const std::vector<std::string>& argv, const std::string& log_path) {
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, 1, log_path.c_str(),
                                     O_WRONLY | O_CREAT | O_APPEND, 0644);
    posix_spawn_file_actions_adddup2(&actions, 1, 2);
    std::vector<char*> args;
    for (const std::string& arg : argv) args.push_back(const_cast<char*>(arg.c_str()));
    args.push_back(nullptr);
    const int rc = posix_spawn(&pid_, args[0], &actions, nullptr, args.data(), environ);
    posix_spawn_file_actions_destroy(&actions);
    if (rc != 0) pid_ = -1;
    return rc == 0;
  }

  pid_t pid() const { return pid_; }

  bool Running() {
    if (pid_ <= 0) return false;
    int status = 0;
    if (waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;
      return false;
    }
    return true;
  }

  // SIGTERM, then SIGKILL after `grace`. Returns the exit status (-1 when killed or not running).
  int Stop(std::chrono::milliseconds grace) {
    if (pid_ <= 0) return -1;
    kill(pid_, SIGTERM);
    const auto deadline = Clock::now() + grace;
    while (Clock::now() < deadline) {
      int status = 0;
      if (waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
      }
      std::this_thread::sleep_for(20ms);
    }
    Kill();
    return -1;
  }

  void Kill() {
    if (pid_ <= 0) return;
    kill(pid_, SIGKILL);
    int status = 0;
    waitpid(pid_, &status, 0);
    pid_ = -1;
  }

 private:
  pid_t pid_ = -1;
};

// utime + stime of a process, seconds.
double ProcessCpuSeconds(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  std::getline(in, line);
  const size_t paren = line.rfind(')');
  if (paren == std::string::npos) return -1;
  std::istringstream fields(line.substr(paren + 2));
  std::string field;
  long long utime = 0, stime = 0;
  // After "pid (comm) ": state is field 3; utime and stime are fields 14 and 15.
  for (int i = 3; i <= 15 && fields >> field; ++i) {
    if (i == 14) utime = std::stoll(field);
    if (i == 15) stime = std::stoll(field);
  }
  return static_cast<double>(utime + stime) / static_cast<double>(sysconf(_SC_CLK_TCK));
}

// VmHWM (peak resident set) of a process, bytes; -1 when unknown.
int64_t ProcessPeakMemoryBytes(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("VmHWM:", 0) == 0) return std::stoll(line.substr(6)) * 1024;  // kB
  }
  return -1;
}

std::string ReadText(const std::string& path) {
  std::ifstream in(path);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string CpuModel() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("model name", 0) == 0) return line.substr(line.find(':') + 2);
  }
  return "";
}

// Median time of a 4 KiB write + fdatasync in `dir`, seconds (-1 on error): the coordinator's
// store commits that way, and on a shared disk this varies tenfold from run to run.
double MedianFsyncSeconds(const std::string& dir) {
  const std::string path = dir + "/fsync-probe";
  const int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0) return -1;
  std::vector<double> times;
  const std::string block(4096, 'x');
  for (int i = 0; i < 31; ++i) {
    const auto start = Clock::now();
    if (pwrite(fd, block.data(), block.size(), 0) != static_cast<ssize_t>(block.size()) ||
        fdatasync(fd) != 0) {
      break;
    }
    times.push_back(std::chrono::duration<double>(Clock::now() - start).count());
  }
  close(fd);
  unlink(path.c_str());
  if (times.empty()) return -1;
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

// Nearest-rank percentile of sorted values.
double Percentile(const std::vector<double>& sorted, double p) {
  if (sorted.empty()) return NAN;
  const size_t rank = static_cast<size_t>(std::ceil(p * static_cast<double>(sorted.size())));
  return sorted[std::min(sorted.size() - 1, rank == 0 ? 0 : rank - 1)];
}

// ----- the simulated workers -----

// What the worker threads and the main thread share.
class Shared {
 public:
  // Counts one arrival at `counter` and wakes the main thread.
  void Arrive(int& counter) {
    std::lock_guard<std::mutex> lock(mu_);
    ++counter;
    cv_.notify_all();
  }
  // Records the first failure; every wait below returns once one happened.
  void Fail(const std::string& why) {
    std::lock_guard<std::mutex> lock(mu_);
    if (error_.empty()) error_ = why;
    cv_.notify_all();
  }
  // Waits until `counter` reaches n, a failure, or the timeout; true when reached.
  bool WaitCount(const int& counter, int n, std::chrono::milliseconds timeout) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, timeout, [&] { return counter >= n || !error_.empty(); }) &&
           error_.empty();
  }
  // Workers: waits until the main thread sets `flag` (or a failure); true when set.
  bool WaitFlag(const bool& flag) {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return flag || !error_.empty(); });
    return error_.empty();
  }
  void Set(bool& flag) {
    std::lock_guard<std::mutex> lock(mu_);
    flag = true;
    cv_.notify_all();
  }
  std::string error() {
    std::lock_guard<std::mutex> lock(mu_);
    return error_;
  }

  // Guarded by mu_ (through the methods above).
  int opened = 0;    // sessions that sent their first Heartbeat
  int assigned = 0;  // ranks that got their Assign (rank 0: and sent the ModuleList)
  int done = 0;      // ranks that got every mask
  bool go = false;   // t0 is set: start the steps
  bool release = false;  // the job is cancelled: end the sessions

  // Written before `go`, read-only afterwards.
  Clock::time_point t0;
  int64_t total_steps = 0;
  // [step * workers + rank]: report handed to gRPC / mask read, ns since t0. Each slot is
  // written by one worker thread, read by main after join.
  std::vector<int64_t> sent_ns;
  std::vector<int64_t> received_ns;

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::string error_;
};

int64_t NsSince(Clock::time_point t0) {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - t0).count();
}

void RunWorker(const MaskLatencyConfig& config, Shared& shared, v1::WorkerService::Stub& stub,
               const std::string& worker_id, const std::string& worker_secret,
               std::chrono::system_clock::time_point deadline) {
  grpc::ClientContext context;
  context.set_deadline(deadline);
  context.AddMetadata(api::kWorkerSecretMetadataKey, worker_secret);
  auto stream = stub.Session(&context);
  auto fail = [&](const std::string& why) {
    shared.Fail(absl::StrCat(worker_id, ": ", why));
    context.TryCancel();
    stream->Finish();
  };

  v1::WorkerMessage out;
  out.set_worker_id(worker_id);
  out.mutable_heartbeat()->set_sent_time_unix_ms(
      std::chrono::duration_cast<std::chrono::milliseconds>(
          std::chrono::system_clock::now().time_since_epoch())
          .count());
  if (!stream->Write(out)) return fail("the session ended at its first message");
  shared.Arrive(shared.opened);

  v1::CoordinatorMessage in;
  do {
    if (!stream->Read(&in)) return fail("the session ended before an Assign");
  } while (!in.has_assign());
  const int rank = in.assign().rank();
  const std::string job_id = in.assign().job_id();
  if (rank == 0) {
    v1::WorkerMessage modules;
    modules.set_worker_id(worker_id);
    modules.mutable_modules()->set_job_id(job_id);
    for (int i = 0; i < config.modules; ++i) {
      v1::ModuleDescriptor* module = modules.mutable_modules()->add_modules();
      module->set_name(absl::StrCat("layer", i / 100, ".head", i % 100));
      module->set_group("heads");
      module->set_layer(i / 100);
      module->set_index(i % 100);
    }
    if (!stream->Write(modules)) return fail("the session ended at the ModuleList");
  }
  shared.Arrive(shared.assigned);
  if (!shared.WaitFlag(shared.go)) return fail("stopped before the first step");

  std::mt19937_64 random(config.seed * 1000003 + static_cast<uint64_t>(rank));
  std::uniform_real_distribution<double> lambda(0.1, 10.0);
  v1::WorkerMessage report;
  report.set_worker_id(worker_id);
  report.mutable_spectra()->set_job_id(job_id);
  report.mutable_spectra()->set_rank(rank);
  for (int i = 0; i < config.modules; ++i) report.mutable_spectra()->add_lambda_max(0);
  v1::WorkerMessage ack;
  ack.set_worker_id(worker_id);
  ack.mutable_mask_ack()->set_job_id(job_id);
  ack.mutable_mask_ack()->set_rank(rank);
  const auto period = std::chrono::milliseconds(config.period_ms);
  for (int64_t step = 0; step < shared.total_steps; ++step) {
    std::this_thread::sleep_until(shared.t0 + step * period);
    report.mutable_spectra()->set_step(step);
    for (int i = 0; i < config.modules; ++i) {
      report.mutable_spectra()->set_lambda_max(i, lambda(random));
    }
    const size_t slot = static_cast<size_t>(step * config.workers + rank);
    shared.sent_ns[slot] = NsSince(shared.t0);
    if (!stream->Write(report)) return fail(absl::StrCat("the session ended at step ", step));
    while (true) {
      if (!stream->Read(&in)) return fail(absl::StrCat("the session ended at step ", step));
      if (in.has_mask() && in.mask().effective_step() == step) break;
      if (in.has_reject()) return fail(absl::StrCat("step ", step, ": Reject ", in.reject().code(),
                                                    ": ", in.reject().message()));
      if (in.has_cancel()) return fail(absl::StrCat("step ", step, ": Cancel: ",
                                                    in.cancel().reason()));
    }
    shared.received_ns[slot] = NsSince(shared.t0);
    ack.mutable_mask_ack()->set_mask_version(in.mask().mask_version());
    if (config.send_acks && !stream->Write(ack)) {
      return fail(absl::StrCat("the session ended at ack ", step));
    }
  }
  shared.Arrive(shared.done);

  // The main thread cancels the job; then the session ends from this side.
  if (!shared.WaitFlag(shared.release)) return fail("stopped after the last step");
  stream->WritesDone();
  while (stream->Read(&in)) {
  }
  stream->Finish();
}

std::unique_ptr<grpc::ClientContext> Deadline(std::chrono::seconds seconds) {
  auto context = std::make_unique<grpc::ClientContext>();
  context->set_deadline(std::chrono::system_clock::now() + seconds);
  return context;
}

int MaskLatency(const MaskLatencyConfig& config) {
  std::string tmpl = (fs::temp_directory_path() / "mat_bench_service_XXXXXX").string();
  if (mkdtemp(tmpl.data()) == nullptr) {
    std::cerr << "mat-bench-service: cannot create a temporary directory\n";
    return 1;
  }
  const std::string dir = tmpl;
  const std::string state_dir = dir + "/state";
  const std::string log_path = dir + "/coordinator.log";
  bool keep_dir = false;
  auto finish = [&](int rc) {
    if (rc != 0) keep_dir = true;
    if (!keep_dir) {
      std::error_code ec;
      fs::remove_all(dir, ec);
    }
    return rc;
  };
  auto failed = [&](const std::string& why) {
    std::cerr << "mat-bench-service: mask-latency failed: " << why
              << "\n  coordinator log: " << log_path << "\n";
    return finish(1);
  };

  // Other work on the host skews every figure; the JSON says how busy it was.
  double load_at_start = -1;
  std::ifstream("/proc/loadavg") >> load_at_start;
  const double fsync_seconds = MedianFsyncSeconds(dir);

  ChildProcess coordinator;
  if (!coordinator.Spawn({config.coordinator, "--listen", "127.0.0.1:0", "--metrics-listen",
                          "127.0.0.1:0", "--state-dir", state_dir, "--log-level",
                          config.coordinator_log_level},
                         log_path)) {
    return failed("cannot start " + config.coordinator);
  }
  const std::string addr_path = state_dir + "/coordinator.addr";
  std::string address;
  for (auto until = Clock::now() + 20s; Clock::now() < until; std::this_thread::sleep_for(20ms)) {
    if (!coordinator.Running()) return failed("the coordinator exited at start");
    address = ReadText(addr_path);
    if (!address.empty() && address.back() == '\n') break;
    address.clear();
  }
  if (address.empty()) return failed("no " + addr_path + " after 20 s");
  address.pop_back();

  // One connection per worker, as separate worker processes would have.
  auto make_channel = [&] {
    grpc::ChannelArguments args;
    args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
    args.SetMaxReceiveMessageSize(64 * 1024 * 1024);
    return grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args);
  };
  auto jobs = v1::JobService::NewStub(make_channel());
  std::vector<std::unique_ptr<v1::WorkerService::Stub>> stubs;
  std::vector<std::string> worker_ids;
  std::vector<std::string> worker_secrets;
  for (int i = 0; i < config.workers; ++i) {
    stubs.push_back(v1::WorkerService::NewStub(make_channel()));
    v1::RegisterRequest request;
    request.mutable_capabilities()->set_device("cpu");
    request.mutable_capabilities()->set_host("127.0.0.1");
    request.mutable_capabilities()->set_rendezvous_port(20000 + i);
    request.mutable_capabilities()->set_memory_bytes(int64_t{1} << 30);
    v1::RegisterReply reply;
    worker_secrets.push_back(absl::StrFormat("%064x", i + 1));  // one per worker, well formed
    std::unique_ptr<grpc::ClientContext> context = Deadline(10s);
    context->AddMetadata(api::kWorkerSecretMetadataKey, worker_secrets.back());
    grpc::Status s = stubs.back()->Register(context.get(), request, &reply);
    if (!s.ok()) return failed("Register: " + s.error_message());
    worker_ids.push_back(reply.worker_id());
  }

  Shared shared;
  const auto period = std::chrono::milliseconds(config.period_ms);
  const int64_t warmup_steps =
      static_cast<int64_t>(std::ceil(config.warmup_seconds * 1000.0 / config.period_ms));
  const int64_t measured_steps =
      std::max<int64_t>(1, static_cast<int64_t>(std::ceil(config.seconds * 1000.0 /
                                                          config.period_ms)));
  shared.total_steps = warmup_steps + measured_steps;
  shared.sent_ns.assign(static_cast<size_t>(shared.total_steps * config.workers), -1);
  shared.received_ns.assign(shared.sent_ns.size(), -1);
  // Generous: a coordinator 10x slower than the period still finishes.
  const auto stream_deadline =
      std::chrono::system_clock::now() + 60s + 10 * shared.total_steps * period;

  std::vector<std::thread> threads;
  auto stop_all = [&](const std::string& why) {
    shared.Fail(why);
    coordinator.Kill();  // breaks every stream, so every worker thread returns
    for (auto& thread : threads) thread.join();
    return failed(shared.error());
  };
  for (int i = 0; i < config.workers; ++i) {
    threads.emplace_back([&, i] {
      RunWorker(config, shared, *stubs[i], worker_ids[i], worker_secrets[i], stream_deadline);
    });
  }
  if (!shared.WaitCount(shared.opened, config.workers, 30s)) {
    return stop_all("the sessions did not open within 30 s");
  }

  v1::SubmitJobRequest submit;
  v1::JobSpec& spec = *submit.mutable_spec();
  spec.mutable_train()->set_steps(1000000000);
  spec.mutable_train()->set_batch_size(2 * config.workers);
  spec.mutable_train()->set_warmup_steps(0);
  spec.mutable_policy()->set_kind("mat");
  spec.mutable_policy()->set_probe_every(1);
  spec.mutable_policy()->set_warmup_steps(0);
  spec.mutable_policy()->set_probe_samples(2);  // <= batch_size / workers
  spec.mutable_resources()->set_workers(config.workers);
  spec.mutable_resources()->set_device("cpu");
  v1::SubmitJobReply submitted;
  grpc::Status s = jobs->SubmitJob(Deadline(10s).get(), submit, &submitted);
  if (!s.ok()) return stop_all("SubmitJob: " + s.error_message());
  if (!shared.WaitCount(shared.assigned, config.workers, 30s)) {
    return stop_all("not every rank was assigned within 30 s");
  }
  // Rank 0's ModuleList must be in before any report (the protocol's order).
  bool declared = false;
  for (auto until = Clock::now() + 30s; !declared && Clock::now() < until;) {
    v1::GetJobRequest get;
    get.set_job_id(submitted.job_id());
    v1::GetJobReply job;
    s = jobs->GetJob(Deadline(10s).get(), get, &job);
    if (!s.ok()) return stop_all("GetJob: " + s.error_message());
    declared = job.job().total_modules() == config.modules;
    if (!declared) std::this_thread::sleep_for(10ms);
  }
  if (!declared) return stop_all("the job's modules were not declared within 30 s");

  shared.t0 = Clock::now() + 200ms;
  shared.Set(shared.go);
  std::this_thread::sleep_until(shared.t0 + warmup_steps * period);
  const std::string metrics_address = [&] {
    std::string a = ReadText(state_dir + "/coordinator.metrics.addr");
    while (!a.empty() && (a.back() == '\n' || a.back() == ' ')) a.pop_back();
    return a;
  }();
  constexpr char kLatencyMetric[] = "mat_coordinator_mask_latency_seconds";
  const auto server_before = HistogramBuckets(ScrapeMetrics(metrics_address), kLatencyMetric);
  const double cpu_start = ProcessCpuSeconds(coordinator.pid());
  const auto wall_start = Clock::now();
  if (!shared.WaitCount(shared.done, config.workers,
                        std::chrono::duration_cast<std::chrono::milliseconds>(
                            30s + 10 * shared.total_steps * period))) {
    return stop_all(shared.error().empty() ? "the steps did not finish in time" : shared.error());
  }
  const auto wall_end = Clock::now();
  const double cpu_end = ProcessCpuSeconds(coordinator.pid());
  const auto server_after = HistogramBuckets(ScrapeMetrics(metrics_address), kLatencyMetric);
  double server_count = 0;
  const double server_p50 = HistogramQuantile(server_before, server_after, 0.50, &server_count);
  const double server_p99 = HistogramQuantile(server_before, server_after, 0.99, &server_count);
  const int64_t peak_memory = ProcessPeakMemoryBytes(coordinator.pid());

  v1::CancelJobRequest cancel;
  cancel.set_job_id(submitted.job_id());
  cancel.set_reason("benchmark over");
  v1::CancelJobReply cancelled;
  s = jobs->CancelJob(Deadline(10s).get(), cancel, &cancelled);
  if (!s.ok()) return stop_all("CancelJob: " + s.error_message());
  shared.Set(shared.release);
  for (auto& thread : threads) thread.join();
  const int exit_code = coordinator.Stop(15s);
  if (!shared.error().empty()) return failed(shared.error());

  // Per measured step: the rank whose report was handed over last, and when it got the mask.
  std::vector<double> last_rank, all_ranks;
  for (int64_t step = warmup_steps; step < shared.total_steps; ++step) {
    int64_t last_sent = -1, last_received = -1, latest_received = -1;
    for (int rank = 0; rank < config.workers; ++rank) {
      const size_t slot = static_cast<size_t>(step * config.workers + rank);
      if (shared.sent_ns[slot] > last_sent) {
        last_sent = shared.sent_ns[slot];
        last_received = shared.received_ns[slot];
      }
      latest_received = std::max(latest_received, shared.received_ns[slot]);
    }
    last_rank.push_back(static_cast<double>(last_received - last_sent) * 1e-9);
    all_ranks.push_back(static_cast<double>(latest_received - last_sent) * 1e-9);
  }
  std::sort(last_rank.begin(), last_rank.end());
  std::sort(all_ranks.begin(), all_ranks.end());
  double mean = 0;
  for (double v : last_rank) mean += v / static_cast<double>(last_rank.size());
  const double elapsed = std::chrono::duration<double>(wall_end - wall_start).count();
  const double cpu_seconds = cpu_end - cpu_start;
  const double reports = static_cast<double>(measured_steps) * config.workers;

  constexpr double kGoalP99Seconds = 0.002;
  constexpr double kGoalModuleReportsPerSecond = 50000;
  nlohmann::json result = {
      {"benchmark", "mask-latency"},
      {"latency_definition",
       "per probe step: from the moment the last rank's SpectraReport of the step was handed to "
       "gRPC (client steady clock) to the moment that rank read the step's MaskUpdate; an upper "
       "bound on the coordinator's report-received -> mask-sent time (includes both transport "
       "legs and client scheduling; client and coordinator share the host's cores)"},
      {"workers", config.workers},
      {"modules", config.modules},
      {"period_ms", config.period_ms},
      {"mask_acks_sent", config.send_acks},
      {"warmup_steps", warmup_steps},
      {"steps_measured", measured_steps},
      {"elapsed_seconds", elapsed},
      {"p50_seconds", Percentile(last_rank, 0.50)},
      {"p99_seconds", Percentile(last_rank, 0.99)},
      {"max_seconds", last_rank.back()},
      {"mean_seconds", mean},
      {"all_ranks_p50_seconds", Percentile(all_ranks, 0.50)},
      {"all_ranks_p99_seconds", Percentile(all_ranks, 0.99)},
      {"all_ranks_definition",
       "per probe step: from the last rank's report to the moment the LAST rank read the mask"},
      {"module_reports_per_second", reports * config.modules / elapsed},
      {"reports_per_second", reports / elapsed},
      {"coordinator_cpu_seconds", cpu_seconds},
      {"coordinator_cpu_fraction", cpu_seconds / elapsed},
      {"coordinator_peak_memory_bytes", peak_memory},
      {"coordinator_exit_code", exit_code},
      {"coordinator_log_level", config.coordinator_log_level},
      // Its SQLite store commits with fsync: the file system under it matters (TMPDIR moves it).
      {"coordinator_state_dir", state_dir},
      {"state_dir_fsync_median_seconds", fsync_seconds},
      {"goal_p99_seconds", kGoalP99Seconds},
      {"goal_module_reports_per_second", kGoalModuleReportsPerSecond},
      {"meets_p99_goal", Percentile(last_rank, 0.99) <= kGoalP99Seconds},
      {"meets_throughput_goal", reports * config.modules / elapsed >= kGoalModuleReportsPerSecond},
      {"server_p50_seconds", std::isnan(server_p50) ? nlohmann::json(nullptr) : nlohmann::json(server_p50)},
      {"server_p99_seconds", std::isnan(server_p99) ? nlohmann::json(nullptr) : nlohmann::json(server_p99)},
      {"server_decisions", server_count},
      {"server_definition",
       "the coordinator's own mat_coordinator_mask_latency_seconds histogram over the measured "
       "window (report that completes a step entering the loop -> every rank's MaskUpdate handed "
       "to gRPC), quantiles interpolated within buckets as PromQL histogram_quantile"},
      {"host_cpus", std::thread::hardware_concurrency()},
      {"host_cpu_model", CpuModel()},
      {"host_load_average_1m_at_start", load_at_start},
  };
  std::printf(
      "mask-latency: %d workers x %d modules, one report per rank every %d ms, %lld steps in "
      "%.1f s\n"
      "  latency (last rank's report -> its mask, client side): p50 %.3f ms  p99 %.3f ms  "
      "max %.3f ms  (goal p99 <= %.1f ms)\n"
      "  until every rank has the mask: p50 %.3f ms  p99 %.3f ms\n"
      "  throughput: %.0f module-reports/s, %.0f reports/s  (goal >= %.0f module-reports/s)\n"
      "  coordinator: %.2f CPU s over %.1f s (%.1f %% of one core), peak RSS %.1f MiB\n"
      "  host: %u CPUs, load %.2f at start; 4 KiB write + fdatasync in the state dir: %.2f ms\n",
      config.workers, config.modules, config.period_ms, static_cast<long long>(measured_steps),
      elapsed, Percentile(last_rank, 0.50) * 1e3, Percentile(last_rank, 0.99) * 1e3,
      last_rank.back() * 1e3, kGoalP99Seconds * 1e3, Percentile(all_ranks, 0.50) * 1e3,
      Percentile(all_ranks, 0.99) * 1e3, reports * config.modules / elapsed, reports / elapsed,
      kGoalModuleReportsPerSecond, cpu_seconds, elapsed, 100 * cpu_seconds / elapsed,
      static_cast<double>(peak_memory) / (1024.0 * 1024.0), std::thread::hardware_concurrency(),
      load_at_start, fsync_seconds * 1e3);
  std::printf("  coordinator's own histogram (report on the loop -> masks handed to gRPC): p50 %.3f ms  "
              "p99 %.3f ms over %.0f decisions\n",
              server_p50 * 1e3, server_p99 * 1e3, server_count);
  if (!config.send_acks) std::printf("  (diagnosis run: no MaskAck was sent)\n");
  if (!config.out.empty()) {
    absl::Status written = common::WriteFileAtomic(config.out, result.dump(2) + "\n");
    if (!written.ok()) {
      std::cerr << "mat-bench-service: " << written << "\n";
      return finish(1);
    }
    std::printf("  wrote %s\n", config.out.c_str());
  }
  return finish(0);
}

}  // namespace
}  // namespace mat::bench

int main(int argc, char** argv) {
  mat::bench::MaskLatencyConfig config;
  CLI::App app{"mat-bench-service: benchmarks of the service daemons (mask-latency)"};
  app.require_subcommand(1);
  CLI::App* latency = app.add_subcommand(
      "mask-latency", "report -> MaskUpdate latency and λ throughput of a real mat-coordinator");
  latency->add_option("--coordinator", config.coordinator, "the mat-coordinator binary")
      ->capture_default_str();
  latency->add_option("--out", config.out, "result JSON ('' = none)")->capture_default_str();
  latency->add_option("--workers", config.workers, "simulated workers = ranks, count")
      ->check(CLI::Range(1, 4096))
      ->capture_default_str();
  latency->add_option("--modules", config.modules, "modules rank 0 declares, count")
      ->check(CLI::Range(1, 1000000))
      ->capture_default_str();
  latency->add_option("--period-ms", config.period_ms, "time between a rank's reports, ms")
      ->check(CLI::Range(1, 60000))
      ->capture_default_str();
  latency->add_option("--seconds", config.seconds, "measured window, seconds")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  latency->add_option("--warmup-seconds", config.warmup_seconds, "steps before the window, s")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  latency->add_option("--seed", config.seed, "seed of the λ values")->capture_default_str();
  latency->add_flag("!--skip-acks", config.send_acks,
                    "diagnosis only: send no MaskAck (the protocol wants one per mask)");
  latency->add_option("--coordinator-log-level", config.coordinator_log_level,
                      "the coordinator's --log-level")
      ->check(CLI::IsMember({"trace", "debug", "info", "warn", "error"}))
      ->capture_default_str();
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
  }
  return mat::bench::MaskLatency(config);
}

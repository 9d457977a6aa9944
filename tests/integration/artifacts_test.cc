// A job's artifacts on loopback (issue 24): the real mat-coordinator, mat-worker and matctl.
//
//   - a finished job's artifacts (model.safetensors, summary.json, metrics.jsonl, masks.jsonl,
//     job_spec.yaml) come back through `matctl download` byte for byte as rank 0 wrote them, the
//     model is the one of the job's last step with the job's parameter checksum, `matctl list`
//     and `status` show their size, a second download keeps what is there, and one into a
//     directory holding a different file of the same name writes nothing unless --force;
//     `matctl delete` then removes the job's files and records (every call naming it is
//     NOT_FOUND), and a folder of it left by a stop in between goes at the next start;
//   - the coordinator SIGKILLed in the middle of the model's upload and restarted: the upload
//     resumes where the coordinator's bytes end, and the result is the same file;
//   - a job cancelled after a checkpoint: rank 0 uploads the model of its newest checkpoint; also
//     when a lost peer had made the job RESTARTING, and when rank 0's own worker was stopped
//     (SIGTERM) before;
//   - a job past its resources.max_train_seconds FAILS naming it, and its worker goes on;
//   - with --job-retention-days, a finished job and its files go once it ended that long ago;
//   - a model over --max-artifact-bytes is refused with a message naming the limit (in the job's
//     log and from `matctl download`), the job still SUCCEEDS with its summary, and the smaller
//     files are there.
#include <csignal>
#include <fstream>
#include <cstring>

#include "nlohmann/json.hpp"
#include "tests/integration/harness.h"

namespace mat {
namespace {

using json = nlohmann::json;
using testing_loopback::CommandResult;
using testing_loopback::ReadText;
namespace fs = std::filesystem;
using namespace std::chrono_literals;
using ::testing::HasSubstr;
using ::testing::Not;

const std::string kCorpus = std::string(MAT_SHARED_DIR) + "/data/wikitext-2";
const std::vector<std::string> kArtifacts = {"job_spec.yaml", "masks.jsonl", "metrics.jsonl",
                                             "model.safetensors", "summary.json"};

std::string JobYaml(int steps, const std::string& train_extra = "") {
  return "seed: 5\n"
         "model: {kind: bert, layers: 2, d_model: 64, heads: 4, d_ff: 128, max_seq_len: 32,"
         " dropout: 0.1}\n"
         "data: {kind: wikitext, dir: " + kCorpus + ", seq_len: 32}\n"
         "train: {steps: " + std::to_string(steps) + ", batch_size: 8, lr: 1.0e-3,"
         " warmup_steps: 5, eval_every: 10, eval_batches: 2, threads: 1" + train_extra + "}\n"
         "policy: {kind: mat, alpha: 0.5, warmup_steps: 10, probe_every: 10, probe_samples: 2,"
         " estimator: gram, min_active_fraction: 0.25}\n"
         "resources: {workers: 1, device: cpu}\n";
}

// The JSON header of a safetensors file (8-byte little-endian length, then JSON).
json SafetensorsHeader(const std::string& bytes) {
  if (bytes.size() < 8) return nullptr;
  uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  if (n > bytes.size() - 8) return nullptr;
  return json::parse(bytes.substr(8, n), nullptr, false);
}

class ArtifactsTest : public testing_loopback::LoopbackTest {
 protected:
  std::string Submit(int steps, const std::string& train_extra = "", int workers = 1) {
    std::string yaml = JobYaml(steps, train_extra);
    yaml.replace(yaml.find("workers: 1"), std::strlen("workers: 1"),
                 "workers: " + std::to_string(workers));
    CommandResult r = Matctl(address_, {"submit", WriteJob("job.yaml", yaml)});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    std::string id = r.out;
    while (!id.empty() && (id.back() == '\n' || id.back() == ' ')) id.pop_back();
    return id;
  }

  json WaitEnded(const std::string& job, std::chrono::milliseconds timeout) {
    return WaitFor(job, [](const json& s) {
      const std::string state = s.value("state", "");
      return state == "SUCCEEDED" || state == "FAILED" || state == "CANCELLED";
    }, timeout);
  }

  // `matctl download JOB --out OUT`, again every 200 ms for up to 60 s until the model is there
  // (rank 0 uploads it after the job ended); the last attempt.
  CommandResult DownloadOnceTheModelIsThere(const std::string& job, const std::string& out) {
    const auto deadline = std::chrono::steady_clock::now() + 60s;
    CommandResult dl;
    while (std::chrono::steady_clock::now() < deadline) {
      dl = Matctl(address_, {"download", job, "--out", out});
      if (dl.exit_code == 0 && fs::exists(out + "/model.safetensors")) break;
      std::this_thread::sleep_for(200ms);
    }
    return dl;
  }

  // Checks that `path` is a model made from a checkpoint (mat.source) at a checkpoint step >= 20
  // (checkpoint_every 10) and returns that step.
  int ExpectACheckpointsModel(const std::string& path) {
    const json header = SafetensorsHeader(ReadText(path));
    EXPECT_TRUE(header.is_object()) << path;
    if (!header.is_object()) return -1;
    EXPECT_EQ(header["__metadata__"].value("mat.source", ""), "checkpoint");
    const int step = std::stoi(header["__metadata__"].value("mat.step", "-1"));
    EXPECT_GE(step, 20);
    EXPECT_EQ(step % 10, 0) << "a checkpoint step";
    EXPECT_TRUE(header.contains("tok_emb.weight"));
    EXPECT_FALSE(header.contains("model.tok_emb.weight"));
    return step;
  }

  // A coordinator, workers w0 and w1, and a 2-rank job that checkpoints every 10 steps, past
  // its step 25.
  struct TwoRankJob {
    std::string job;
    std::string rank0_worker;  // "w0" or "w1"
    pid_t rank0_pid = -1, rank1_pid = -1;
  };
  void StartTwoRankJobPastTwoCheckpoints(TwoRankJob* j) {
    ASSERT_NO_FATAL_FAILURE(StartCoordinator());
    const pid_t w0 = StartWorker("w0"), w1 = StartWorker("w1");
    ASSERT_GT(w0, 0);
    ASSERT_GT(w1, 0);
    j->job = Submit(5000, ", checkpoint_every: 10", /*workers=*/2);
    ASSERT_FALSE(j->job.empty());
    const json running =
        WaitFor(j->job, [](const json& s) { return s.value("step", 0) >= 25; }, 300s);
    ASSERT_GE(running.value("step", 0), 25) << running.dump(2) << Logs("w0") << Logs("w1");
    const bool rank0_on_w0 = fs::exists(Rank0Dir("w0", j->job));
    ASSERT_NE(rank0_on_w0, fs::exists(Rank0Dir("w1", j->job)));
    j->rank0_worker = rank0_on_w0 ? "w0" : "w1";
    j->rank0_pid = rank0_on_w0 ? w0 : w1;
    j->rank1_pid = rank0_on_w0 ? w1 : w0;
  }

  std::string Rank0Dir(const std::string& worker, const std::string& job) {
    return root_ + "/" + worker + "/jobs/" + job + "/rank0";
  }

  std::string Logs(const std::string& worker) {
    return ReadText(root_ + "/" + worker + ".err") + ReadText(root_ + "/" + worker + ".out");
  }
};

TEST_F(ArtifactsTest, DownloadGivesBackRankZerosFilesAndTheTrainedModel) {
  ASSERT_NO_FATAL_FAILURE(StartCoordinator());
  ASSERT_GT(StartWorker("w0"), 0);
  const std::string job = Submit(30);
  ASSERT_FALSE(job.empty());
  const json status = WaitEnded(job, 300s);
  ASSERT_EQ(status.value("state", ""), "SUCCEEDED") << status.dump(2) << Logs("w0");

  const std::string rank0 = Rank0Dir("w0", job);
  int64_t total = 0;
  for (const std::string& name : kArtifacts) total += int64_t(fs::file_size(rank0 + "/" + name));
  EXPECT_EQ(status.value("artifact_bytes", int64_t{0}), total);
  CommandResult list = Matctl(address_, {"list"});
  ASSERT_EQ(list.exit_code, 0) << list.err;
  EXPECT_THAT(list.out, HasSubstr("ARTIFACTS"));
  EXPECT_THAT(list.out, HasSubstr(" MB\n")) << list.out;

  const std::string out = root_ + "/download";
  CommandResult dl = Matctl(address_, {"download", job, "--out", out});
  ASSERT_EQ(dl.exit_code, 0) << dl.err;
  EXPECT_THAT(dl.out, HasSubstr("5 files ("));
  for (const std::string& name : kArtifacts) {
    ASSERT_TRUE(fs::exists(out + "/" + name)) << name;
    EXPECT_EQ(ReadText(out + "/" + name), ReadText(rank0 + "/" + name)) << name;
  }
  EXPECT_TRUE(fs::is_empty(out) == false);
  for (const auto& entry : fs::directory_iterator(out)) {  // nothing else, no temporary files
    EXPECT_NE(std::find(kArtifacts.begin(), kArtifacts.end(), entry.path().filename().string()),
              kArtifacts.end())
        << entry.path();
  }
  // The model is the job's last step's; the summary carries the rank's checksum.
  const json header = SafetensorsHeader(ReadText(out + "/model.safetensors"));
  ASSERT_TRUE(header.is_object());
  EXPECT_EQ(header["__metadata__"].value("mat.step", ""), "30");
  EXPECT_TRUE(header.contains("tok_emb.weight")) << header.dump().substr(0, 400);
  const json summary = json::parse(ReadText(out + "/summary.json"));
  ASSERT_FALSE(status["ranks"].empty());
  EXPECT_EQ(summary.value("param_checksum", ""), status["ranks"][0].value("param_checksum", "?"));
  // The spec as accepted, defaults filled in, in the YAML `matctl submit` takes.
  const std::string spec = ReadText(out + "/job_spec.yaml");
  EXPECT_THAT(spec, HasSubstr("d_model: 64"));
  EXPECT_THAT(spec, HasSubstr("steps: 30"));
  EXPECT_THAT(spec, HasSubstr("workers: 1"));

  // Again into the same directory: kept, same bytes.
  CommandResult again = Matctl(address_, {"download", job, "--out", out});
  ASSERT_EQ(again.exit_code, 0) << again.err;
  EXPECT_EQ(ReadText(out + "/model.safetensors"), ReadText(rank0 + "/model.safetensors"));
  // A file there that differs (the user's, another job's) is not replaced, and nothing is
  // written, unless --force. It used to be overwritten silently.
  { std::ofstream(out + "/summary.json") << "{\"mine\": 1}\n"; }
  fs::remove(out + "/masks.jsonl");
  CommandResult clash = Matctl(address_, {"download", job, "--out", out});
  EXPECT_EQ(clash.exit_code, 1);
  EXPECT_THAT(clash.err, HasSubstr(out + "/summary.json exists and differs from " + job +
                                   "'s summary.json"));
  EXPECT_THAT(clash.err, HasSubstr("--force"));
  EXPECT_EQ(ReadText(out + "/summary.json"), "{\"mine\": 1}\n");
  EXPECT_FALSE(fs::exists(out + "/masks.jsonl")) << "written before the clash was found";
  CommandResult forced = Matctl(address_, {"download", job, "--out", out, "--force"});
  ASSERT_EQ(forced.exit_code, 0) << forced.err;
  EXPECT_EQ(ReadText(out + "/summary.json"), ReadText(rank0 + "/summary.json"));
  EXPECT_EQ(ReadText(out + "/masks.jsonl"), ReadText(rank0 + "/masks.jsonl"));
  // An unknown job is named.
  CommandResult unknown = Matctl(address_, {"download", "job-999999", "--out", out});
  EXPECT_EQ(unknown.exit_code, 1);
  EXPECT_THAT(unknown.err, HasSubstr("job-999999"));

  // Deleted: the coordinator's files and records of it go; the user's download stays. An unknown
  // id beside it fails alone.
  CommandResult deleted = Matctl(address_, {"delete", "job-999999", job});
  EXPECT_EQ(deleted.exit_code, 1);
  EXPECT_THAT(deleted.err, HasSubstr("NOT_FOUND: job 'job-999999' not found"));
  EXPECT_THAT(deleted.out, ::testing::MatchesRegex(job + " deleted \\([0-9.]+ MB of artifacts "
                                                         "freed\\)\n"));
  EXPECT_FALSE(fs::exists(state_dir_ + "/artifacts/" + job));
  EXPECT_TRUE(fs::exists(out + "/model.safetensors"));
  for (const std::vector<std::string>& args :
       {std::vector<std::string>{"status", job}, {"logs", job}, {"delete", job},
        {"download", job, "--out", root_ + "/again"}}) {
    CommandResult r = Matctl(address_, args);
    EXPECT_EQ(r.exit_code, 1) << args[0];
    EXPECT_THAT(r.err, HasSubstr("NOT_FOUND: job '" + job + "' was deleted")) << args[0];
  }
  EXPECT_THAT(Matctl(address_, {"list"}).out, Not(HasSubstr(job)));
  // A folder of it that outlived the delete (a coordinator stopped in between) is removed at the
  // next start.
  fs::create_directories(state_dir_ + "/artifacts/" + job);
  { std::ofstream(state_dir_ + "/artifacts/" + job + "/model.safetensors") << "left over"; }
  const std::string address = address_;
  ASSERT_EQ(::kill(coordinator_pid_, SIGTERM), 0);
  ASSERT_EQ(Wait(coordinator_pid_, 30s), 0);
  ASSERT_NO_FATAL_FAILURE(StartCoordinator({}, address));
  EXPECT_FALSE(fs::exists(state_dir_ + "/artifacts/" + job));
  EXPECT_FALSE(fs::exists(state_dir_ + "/artifacts/orphaned"));
}

// --job-retention-days: a finished job goes with its files once it ended that long ago; a
// queued one stays. (A job cancelled while queued, and a file put in its folder as rank 0's
// upload would: the daemon's timer and the artifact removal are what is tested.)
TEST_F(ArtifactsTest, AFinishedJobPastTheRetentionIsDeletedWithItsFiles) {
  ASSERT_NO_FATAL_FAILURE(StartCoordinator({"--job-retention-days", "0.00004"}));  // 3 s
  const std::string ended = Submit(10);
  const std::string queued = Submit(10);
  ASSERT_FALSE(ended.empty());
  ASSERT_FALSE(queued.empty());
  fs::create_directories(state_dir_ + "/artifacts/" + ended);
  { std::ofstream(state_dir_ + "/artifacts/" + ended + "/summary.json") << "{}"; }
  ASSERT_EQ(Matctl(address_, {"cancel", ended}).exit_code, 0);
  CommandResult status;
  const auto deadline = std::chrono::steady_clock::now() + 30s;
  while (std::chrono::steady_clock::now() < deadline) {
    status = Matctl(address_, {"status", ended});
    if (status.exit_code != 0) break;
    std::this_thread::sleep_for(200ms);
  }
  EXPECT_THAT(status.err, HasSubstr("NOT_FOUND: job '" + ended + "' was deleted"));
  for (auto until = std::chrono::steady_clock::now() + 5s;
       fs::exists(state_dir_ + "/artifacts/" + ended) && std::chrono::steady_clock::now() < until;
       std::this_thread::sleep_for(100ms)) {
  }
  EXPECT_FALSE(fs::exists(state_dir_ + "/artifacts/" + ended));
  EXPECT_EQ(Matctl(address_, {"status", queued}).exit_code, 0) << "a queued job stays";
  EXPECT_THAT(ReadText(coordinator_log_ + ".err") + ReadText(coordinator_log_ + ".out"),
              HasSubstr("job " + ended + ": deleted, finished more than 3 s ago"));
  ASSERT_EQ(Matctl(address_, {"cancel", queued}).exit_code, 0);
}

// resources.max_train_seconds on a real worker: the job FAILS once rank 0 reports more training
// time, naming the limit, and its rank stops (the worker takes the next job).
TEST_F(ArtifactsTest, AJobPastItsTrainingTimeLimitFailsNamingIt) {
  ASSERT_NO_FATAL_FAILURE(StartCoordinator());
  ASSERT_GT(StartWorker("w0"), 0);
  std::string yaml = JobYaml(100000);
  yaml.replace(yaml.find("device: cpu}"), std::strlen("device: cpu}"),
               "device: cpu, max_train_seconds: 1}");
  CommandResult r = Matctl(address_, {"submit", WriteJob("limited.yaml", yaml)});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  std::string job = r.out;
  while (!job.empty() && (job.back() == '\n' || job.back() == ' ')) job.pop_back();
  const json status = WaitEnded(job, 120s);
  ASSERT_EQ(status.value("state", ""), "FAILED") << status.dump(2) << Logs("w0");
  EXPECT_THAT(status.value("error_message", ""),
              HasSubstr("past resources.max_train_seconds (1 s)"));
  EXPECT_LT(status.value("step", int64_t{0}), 100000);
  const std::string next = Submit(10);
  EXPECT_EQ(WaitEnded(next, 120s).value("state", ""), "SUCCEEDED") << Logs("w0");
}

TEST_F(ArtifactsTest, AnUploadCutByACoordinatorKillResumesAfterItsRestart) {
  ASSERT_NO_FATAL_FAILURE(StartCoordinator());
  const std::string address = address_;
  // Small pieces: the model's upload takes hundreds of calls, time enough to cut it.
  ASSERT_GT(StartWorker("w0", {"--artifact-piece-bytes", "8192"}), 0);
  const std::string job = Submit(20);
  ASSERT_FALSE(job.empty());
  const std::string part = state_dir_ + "/artifacts/" + job + "/model.safetensors.part";
  const auto deadline = std::chrono::steady_clock::now() + 300s;
  std::error_code ec;
  int64_t cut_at = 0;
  while (std::chrono::steady_clock::now() < deadline) {
    const auto size = fs::file_size(part, ec);
    if (!ec && size >= 4 * 8192) {
      cut_at = int64_t(size);
      break;
    }
    std::this_thread::sleep_for(1ms);
  }
  ASSERT_GT(cut_at, 0) << "the model's upload never started:\n" << Logs("w0");
  ASSERT_EQ(::kill(coordinator_pid_, SIGKILL), 0);
  ASSERT_EQ(Wait(coordinator_pid_, 5s), 128 + SIGKILL);
  const int64_t kept = int64_t(fs::file_size(part, ec));
  ASSERT_FALSE(ec) << "the partial upload is gone after the kill";
  std::printf("coordinator killed with %lld bytes of the model uploaded\n",
              static_cast<long long>(kept));
  ASSERT_NO_FATAL_FAILURE(StartCoordinator({}, address));
  const json status = WaitEnded(job, 300s);
  ASSERT_EQ(status.value("state", ""), "SUCCEEDED") << status.dump(2) << Logs("w0");
  EXPECT_THAT(Logs("w0"), HasSubstr("resuming the upload of model.safetensors at byte"));

  const std::string out = root_ + "/download";
  CommandResult dl = Matctl(address_, {"download", job, "--out", out});
  ASSERT_EQ(dl.exit_code, 0) << dl.err;
  for (const std::string& name : kArtifacts) {
    EXPECT_EQ(ReadText(out + "/" + name), ReadText(Rank0Dir("w0", job) + "/" + name)) << name;
  }
  EXPECT_FALSE(fs::exists(part));
}

TEST_F(ArtifactsTest, ACancelledJobLeavesTheModelOfItsNewestCheckpoint) {
  ASSERT_NO_FATAL_FAILURE(StartCoordinator());
  ASSERT_GT(StartWorker("w0"), 0);
  const std::string job = Submit(5000, ", checkpoint_every: 10");
  ASSERT_FALSE(job.empty());
  const json running = WaitFor(job, [](const json& s) { return s.value("step", 0) >= 25; }, 300s);
  ASSERT_GE(running.value("step", 0), 25) << running.dump(2) << Logs("w0");
  CommandResult cancel = Matctl(address_, {"cancel", job});
  ASSERT_EQ(cancel.exit_code, 0) << cancel.err;

  const std::string out = root_ + "/download";
  const CommandResult dl = DownloadOnceTheModelIsThere(job, out);
  ASSERT_TRUE(fs::exists(out + "/model.safetensors")) << dl.out << dl.err << Logs("w0");
  ExpectACheckpointsModel(out + "/model.safetensors");
  EXPECT_TRUE(fs::exists(out + "/metrics.jsonl"));
  EXPECT_TRUE(fs::exists(out + "/job_spec.yaml"));
  EXPECT_EQ(Status(job).value("state", ""), "CANCELLED");

  // Cancelled before its first checkpoint: no model, and the job's log says why (the download
  // just lacked it).
  const std::string early = Submit(5000, ", checkpoint_every: 0");
  ASSERT_FALSE(early.empty());
  const json started = WaitFor(early, [](const json& s) { return s.value("step", 0) >= 2; }, 300s);
  ASSERT_GE(started.value("step", 0), 2) << started.dump(2) << Logs("w0");
  ASSERT_EQ(Matctl(address_, {"cancel", early}).exit_code, 0);
  // The rank sends these lines after its job ended: `logs --follow` waits for them (it used to
  // end at the CANCELLED state, before them).
  const CommandResult logs = Matctl(address_, {"logs", early, "--follow"}, 60s);
  ASSERT_EQ(logs.exit_code, 0) << logs.err << Logs("w0");
  EXPECT_THAT(logs.out, ::testing::HasSubstr(early + ": no checkpoint yet, so no "
                                             "model.safetensors to give back "
                                             "(train.checkpoint_every is 0)"))
      << logs.err << Logs("w0");
  EXPECT_THAT(logs.out, ::testing::HasSubstr(early + " rank 0: stopped ("));
  const CommandResult none = Matctl(address_, {"download", early, "--out", root_ + "/early"});
  EXPECT_EQ(none.exit_code, 0) << none.err;
  EXPECT_FALSE(fs::exists(root_ + "/early/model.safetensors"));
  EXPECT_THAT(none.err, HasSubstr("no model.safetensors from " + early + " (CANCELLED) yet"));
}

// A peer's worker SIGKILLed: rank 0's part ends with a failed process group and the job is
// RESTARTING; cancelled before its next attempt starts, it still gives back rank 0's model of its
// newest checkpoint (rank 0 used to upload nothing when its process group failed, and the
// coordinator refused a RESTARTING job's upload as a stale attempt).
TEST_F(ArtifactsTest, AJobCancelledWhileItRestartsLeavesRankZerosModel) {
  TwoRankJob j;
  ASSERT_NO_FATAL_FAILURE(StartTwoRankJobPastTwoCheckpoints(&j));
  const std::string& job = j.job;
  ::kill(j.rank1_pid, SIGKILL);
  const json restarting =
      WaitFor(job, [](const json& s) { return s.value("state", "") == "RESTARTING"; }, 60s);
  ASSERT_EQ(restarting.value("state", ""), "RESTARTING") << restarting.dump(2);
  CommandResult cancel = Matctl(address_, {"cancel", job});
  ASSERT_EQ(cancel.exit_code, 0) << cancel.err;

  const std::string out = root_ + "/download";
  const CommandResult dl = DownloadOnceTheModelIsThere(job, out);
  const std::string& rank0_worker = j.rank0_worker;
  ASSERT_TRUE(fs::exists(out + "/model.safetensors")) << dl.out << dl.err << Logs(rank0_worker);
  ExpectACheckpointsModel(out + "/model.safetensors");
  EXPECT_EQ(ReadText(out + "/model.safetensors"),
            ReadText(Rank0Dir(rank0_worker, job) + "/model.safetensors"));
  EXPECT_EQ(Status(job).value("state", ""), "CANCELLED");
}

// Rank 0's worker stopped on purpose (SIGTERM, as systemd or a Kubernetes eviction stops it):
// before it exits it gives back the model of its newest checkpoint, which `matctl download`
// returns once the job is cancelled. It used to abandon the upload on the way out, and the job
// had "no artifacts" although its rank 0 had checkpointed.
TEST_F(ArtifactsTest, RankZerosWorkerStoppedWithSigtermGivesBackItsNewestCheckpointsModel) {
  TwoRankJob j;
  ASSERT_NO_FATAL_FAILURE(StartTwoRankJobPastTwoCheckpoints(&j));
  const std::string& job = j.job;
  const std::string& rank0_worker = j.rank0_worker;
  ASSERT_EQ(::kill(j.rank0_pid, SIGTERM), 0);
  // It exits 0 once its upload is done (--shutdown-upload-timeout-ms bounds it: 20 s).
  EXPECT_EQ(Wait(j.rank0_pid, 60s), 0) << Logs(rank0_worker);
  EXPECT_THAT(Logs(rank0_worker),
              ::testing::ContainsRegex(job + ": [1-9][0-9]* artifacts uploaded to the "
                                             "coordinator"));
  const json restarting =
      WaitFor(job, [](const json& s) { return s.value("state", "") == "RESTARTING"; }, 10s);
  ASSERT_EQ(restarting.value("state", ""), "RESTARTING") << restarting.dump(2);
  EXPECT_THAT(restarting.value("error_message", ""),
              HasSubstr("lost: the worker is shutting down (SIGTERM)"));
  CommandResult cancel = Matctl(address_, {"cancel", job});
  ASSERT_EQ(cancel.exit_code, 0) << cancel.err;

  const std::string out = root_ + "/download";
  const CommandResult dl = Matctl(address_, {"download", job, "--out", out});
  ASSERT_EQ(dl.exit_code, 0) << dl.err << Logs(rank0_worker);
  ASSERT_TRUE(fs::exists(out + "/model.safetensors")) << dl.out << Logs(rank0_worker);
  ExpectACheckpointsModel(out + "/model.safetensors");
  EXPECT_EQ(ReadText(out + "/model.safetensors"),
            ReadText(Rank0Dir(rank0_worker, job) + "/model.safetensors"));
  EXPECT_TRUE(fs::exists(out + "/metrics.jsonl"));
  EXPECT_EQ(Status(job).value("state", ""), "CANCELLED");
}

TEST_F(ArtifactsTest, AModelOverTheLimitIsRefusedAndTheJobStillSucceeds) {
  ASSERT_NO_FATAL_FAILURE(StartCoordinator({"--max-artifact-bytes", "1000000"}));
  ASSERT_GT(StartWorker("w0"), 0);
  const std::string job = Submit(20);
  ASSERT_FALSE(job.empty());
  const json status = WaitEnded(job, 300s);
  ASSERT_EQ(status.value("state", ""), "SUCCEEDED") << status.dump(2) << Logs("w0");
  ASSERT_TRUE(status["summary"].is_object());
  EXPECT_GT(status["summary"].value("best_val_loss", 0.0), 0.0);

  const std::string out = root_ + "/download";
  CommandResult dl = Matctl(address_, {"download", job, "--out", out});
  ASSERT_EQ(dl.exit_code, 0) << dl.err;
  EXPECT_THAT(dl.err, HasSubstr("refused an artifact: model.safetensors ("));
  EXPECT_THAT(dl.err, HasSubstr("over the coordinator's --max-artifact-bytes 1000000"));
  EXPECT_FALSE(fs::exists(out + "/model.safetensors"));
  EXPECT_EQ(ReadText(out + "/summary.json"), ReadText(Rank0Dir("w0", job) + "/summary.json"));
  CommandResult logs = Matctl(address_, {"logs", job});
  ASSERT_EQ(logs.exit_code, 0) << logs.err;
  EXPECT_THAT(logs.out, HasSubstr("artifact model.safetensors not uploaded"));
  EXPECT_THAT(logs.out, HasSubstr("--max-artifact-bytes 1000000"));
}

}  // namespace
}  // namespace mat

// The whole service on loopback: the real mat-coordinator, mat-worker and matctl binaries
// (MAT_BIN_DIR), free ports, temporary state and work dirs, a small BERT on the real WikiText-2.
//
//   - a 2-worker MAT job succeeds; both ranks end with the same param_checksum; the masks the two
//     ranks applied are identical step by step; masked-off modules' gradients were not sent;
//   - a 1-worker job through the service gives exactly mat-train's losses and masks for the same
//     config and seed (the service does not change the math); so do jobs with the paper's
//     policy (output estimator, Δ_1 at the first probe, no guard, detach, a capped vocabulary)
//     for kinds mat, frozen-random and inverse;
//   - a job whose dataset is missing fails with the worker's error naming data.dir;
//   - a 2-worker VGG job on Fashion-MNIST (Debian's dataset-fashion-mnist) succeeds with equal
//     parameters AND BatchNorm running statistics on both ranks (averaged over the ranks before
//     every probe, evaluation and checkpoint), identical masks over filter groups, and top-1
//     accuracy as its test metric;
//   - `matctl logs --follow` prints a running 2-rank job's forwarded lines and ends with the job;
//     a failed job's error is its last line;
//   - `matctl compare` of a MAT job and a full job gives their summaries' numbers; a job with
//     model.init_from starts from another job's model.safetensors, a wrong shape fails naming
//     the tensor;
//   - a rand job with policy.rand_schedule_job replays a finished MAT job's per-group active
//     counts at every decision step, with other (random) modules; a replay of an unknown job is
//     refused at submission.
//
// Every child is killed in TearDown; the test is bounded by its ctest TIMEOUT.
#include <glob.h>

#include <map>

#include "nlohmann/json.hpp"
#include "tests/integration/harness.h"

namespace mat {
namespace {

using json = nlohmann::json;
using testing_loopback::CommandResult;
using testing_loopback::ReadJsonLines;
using testing_loopback::ReadText;
namespace fs = std::filesystem;
using namespace std::chrono_literals;

const std::string kCorpus = std::string(MAT_SHARED_DIR) + "/data/wikitext-2";
const std::string kMatTrain = std::string(MAT_BIN_DIR) + "/mat-train";

// A BERT small enough for seconds per job on 2 cores, with a MAT policy that switches modules
// off after its warm-up.
std::string JobYaml(int workers, int steps, const std::string& data_dir = kCorpus) {
  return "seed: 3\n"
         "model: {kind: bert, layers: 2, d_model: 64, heads: 4, d_ff: 128, ffn_groups: 2,"
         " max_seq_len: 32, dropout: 0.1}\n"
         "data: {kind: wikitext, dir: " + data_dir + ", seq_len: 32}\n"
         "train: {steps: " + std::to_string(steps) + ", batch_size: 8, lr: 1.0e-3,"
         " warmup_steps: 5, eval_every: 20, eval_batches: 2, threads: 1}\n"
         "policy: {kind: mat, alpha: 0.5, beta: 0.0, gamma: 0.5, warmup_steps: 10,"
         " probe_every: 10, probe_samples: 2, estimator: gram, min_active_fraction: 0.25}\n"
         "resources: {workers: " + std::to_string(workers) + ", device: cpu}\n";
}

std::vector<std::string> Glob(const std::string& pattern) {
  glob_t g{};
  std::vector<std::string> out;
  if (::glob(pattern.c_str(), 0, nullptr, &g) == 0) {
    for (size_t i = 0; i < g.gl_pathc; ++i) out.push_back(g.gl_pathv[i]);
  }
  ::globfree(&g);
  return out;
}

// VGG-11 at width 1/16 with 2 filter groups per conv layer (16 modules) on Fashion-MNIST.
std::string VggJobYaml(int workers, int steps) {
  return "seed: 4\n"
         "model: {kind: vgg, arch: vgg11, width: 0.0625, filter_groups: 2}\n"
         "data: {kind: fashion-mnist, dir: /usr/share/datasets/fashion-mnist, valid_size: 1000}\n"
         "train: {steps: " + std::to_string(steps) + ", batch_size: 16, optimizer: sgd, lr: 0.05,"
         " momentum: 0.9, weight_decay: 5.0e-4, warmup_steps: 5, schedule: cosine,"
         " eval_every: 10, eval_batches: 4, checkpoint_every: 10, threads: 1}\n"
         "policy: {kind: mat, alpha: 0.5, beta: 0.0, gamma: 0.5, warmup_steps: 10,"
         " probe_every: 10, probe_samples: 4, estimator: gram, min_active_fraction: 0.25}\n"
         "resources: {workers: " + std::to_string(workers) + ", device: cpu}\n";
}

class ServiceTest : public testing_loopback::LoopbackTest {
 protected:
  // Submits and waits for the end; the job id.
  std::string SubmitAndWait(const std::string& job_file, std::chrono::milliseconds timeout,
                            int expected_exit = 0) {
    CommandResult r = Matctl(address_, {"submit", job_file, "--wait", "--no-progress"}, timeout);
    EXPECT_EQ(r.exit_code, expected_exit) << r.out << r.err << "\ncoordinator:\n"
                                          << ReadText(coordinator_log_ + ".err");
    return r.out.substr(0, r.out.find('\n'));
  }

  // One worker runs `yaml` as a job; mat-train runs the same config alone: the same losses at
  // every evaluation and the same mask at every decision (the coordinator ran the same policy
  // on the same reports). Returns the masks the rank applied.
  std::vector<json> RunJobAgainstMatTrain(const std::string& yaml) {
    const std::string job = SubmitAndWait(WriteJob("job.yaml", yaml), 240s);
    EXPECT_FALSE(job.empty());

    // The same config through mat-train (its YAML has no resources section).
    std::string local = yaml;
    local = local.substr(0, local.find("resources:"));
    const std::string config = WriteJob("local.yaml", local);
    const pid_t pid = Spawn({kMatTrain, "--config", config, "--out", root_ + "/local", "--no-progress"},
                            root_ + "/local.out", root_ + "/local.err");
    EXPECT_EQ(Wait(pid, 240s), 0) << ReadText(root_ + "/local.err");

    const std::string rank0 = root_ + "/w1/jobs/" + job + "/rank0";
    std::vector<json> service = ReadJsonLines(rank0 + "/metrics.jsonl");
    std::vector<json> alone = ReadJsonLines(root_ + "/local/metrics.jsonl");
    EXPECT_EQ(service.size(), 2u) << Logs();
    EXPECT_EQ(alone.size(), service.size());
    for (size_t i = 0; i < alone.size() && i < service.size(); ++i) {
      for (const char* key : {"step", "train_loss", "val_loss", "test_loss"}) {
        EXPECT_EQ(service[i].value(key, json()), alone[i].value(key, json()))
            << key << " at evaluation " << i;
      }
    }
    std::vector<json> masks = ReadJsonLines(rank0 + "/masks.jsonl");
    std::vector<json> decisions = ReadJsonLines(root_ + "/local/decisions.jsonl");
    EXPECT_EQ(masks.size(), decisions.size());
    EXPECT_FALSE(masks.empty());
    for (size_t i = 0; i < masks.size() && i < decisions.size(); ++i) {
      EXPECT_EQ(masks[i].at("step"), decisions[i].at("step"));
      json local_mask = json::array();
      for (const json& m : decisions[i]["modules"]) local_mask.push_back(m["active"].get<bool>() ? 1 : 0);
      EXPECT_EQ(masks[i]["every_step"], local_mask) << "step " << masks[i]["step"];
    }
    EXPECT_EQ(ReadText(rank0 + "/summary.json").empty(), false);
    return masks;
  }

  std::string Logs() {
    std::string out = "coordinator:\n" + ReadText(coordinator_log_ + ".err");
    for (const char* w : {"w1", "w2"}) out += std::string("\n") + w + ":\n" + ReadText(root_ + "/" + w + ".err");
    return out;
  }
};

TEST_F(ServiceTest, TwoWorkersTrainOneMatJobWithIdenticalMasksAndEqualParameters) {
  StartCoordinator();
  StartWorker("w1");
  StartWorker("w2");
  const std::string job = SubmitAndWait(WriteJob("job.yaml", JobYaml(2, 40)), 240s);
  ASSERT_FALSE(job.empty());
  json s = Status(job);
  ASSERT_TRUE(s.is_object()) << Logs();
  EXPECT_EQ(s["state"], "SUCCEEDED") << s.dump(2) << Logs();
  ASSERT_EQ(s["ranks"].size(), 2u) << s.dump(2);
  const std::string c0 = s["ranks"][0]["param_checksum"], c1 = s["ranks"][1]["param_checksum"];
  EXPECT_EQ(c0.size(), 16u);
  EXPECT_EQ(c0, c1) << "the ranks' parameters differ";
  ASSERT_TRUE(s["summary"].is_object()) << s.dump(2);
  EXPECT_EQ(s["summary"]["steps"], 40);
  EXPECT_EQ(s["summary"]["world_size"], 2);

  // The masks each rank applied, step by step.
  const std::vector<std::string> masks = Glob(root_ + "/w*/jobs/" + job + "/rank*/masks.jsonl");
  ASSERT_EQ(masks.size(), 2u) << Logs();
  std::vector<json> m0 = ReadJsonLines(masks[0]), m1 = ReadJsonLines(masks[1]);
  ASSERT_EQ(m0.size(), 4u);  // probe steps 0, 10, 20, 30
  ASSERT_EQ(m1.size(), m0.size());
  bool some_module_off = false;
  for (size_t i = 0; i < m0.size(); ++i) {
    EXPECT_EQ(m0[i].at("step"), m1[i].at("step"));
    EXPECT_EQ(m0[i].at("every_step"), m1[i].at("every_step")) << "step " << m0[i]["step"];
    for (int bit : m0[i]["every_step"]) some_module_off |= bit == 0;
  }
  EXPECT_TRUE(some_module_off) << "the policy never switched a module off; the test checks less";
  // Gradients of masked-off modules were not all-reduced.
  EXPECT_GT(s["summary"]["allreduce_bytes"].get<double>(), 0);
  EXPECT_GT(s["summary"]["allreduce_bytes_skipped"].get<double>(), 0);
  EXPECT_EQ(s["summary"]["allreduce_steps"], 40);
  // Rank 0's summary.json (what `matctl download` gives back) says the same, all-reduce included.
  const std::vector<std::string> summaries =
      Glob(root_ + "/w*/jobs/" + job + "/rank0/summary.json");
  ASSERT_EQ(summaries.size(), 1u) << Logs();
  EXPECT_EQ(json::parse(ReadText(summaries[0])), s["summary"]);

  // The coordinator kept the λ history (averaged over the ranks).
  CommandResult spectra = Matctl(address_, {"spectra", job, "-o", "csv"});
  EXPECT_EQ(spectra.exit_code, 0) << spectra.err;
  EXPECT_THAT(spectra.out, ::testing::HasSubstr("layer1.head3"));
}

TEST_F(ServiceTest, OneWorkerJobGivesExactlyTheLossesAndMasksOfMatTrain) {
  StartCoordinator();
  StartWorker("w1");
  RunJobAgainstMatTrain(JobYaml(1, 40));
}

// The paper's policy and the controls through the service (issue 20): the output-kernel
// estimator, the temporal policy with Δ_1 at the first probe, no guard, detached masked modules,
// a capped vocabulary, and each control kind; the coordinator decides as mat-train does.
class ServicePolicyTest : public ServiceTest, public ::testing::WithParamInterface<std::string> {};

TEST_P(ServicePolicyTest, JobGivesExactlyTheLossesAndMasksOfMatTrain) {
  StartCoordinator();
  StartWorker("w1");
  std::string yaml = JobYaml(1, 40);
  const size_t from = yaml.find("policy: {"), to = yaml.find("}\n", from);
  ASSERT_NE(to, std::string::npos);
  yaml.replace(from, to + 2 - from,
               "policy: {kind: " + GetParam() + ", alpha: 0.5, beta: 0.2, gamma: 0.5,"
               " delta1: first-probe, patience: 1, warmup_steps: 10, probe_every: 10,"
               " probe_samples: 2, estimator: output, probe_projections: 2, probe_positions: 2,"
               " backward: detach, min_active_fraction: 0}\n");
  const std::string data = "seq_len: 32}";
  ASSERT_NE(yaml.find(data), std::string::npos);
  yaml.replace(yaml.find(data), data.size(), "seq_len: 32, vocab_size: 512}");
  const std::vector<json> masks = RunJobAgainstMatTrain(yaml);
  bool some_module_off = false;
  for (const json& m : masks) {
    for (int bit : m["every_step"]) some_module_off |= bit == 0;
  }
  EXPECT_TRUE(some_module_off) << "the policy never switched a module off; the test checks less";
}

INSTANTIATE_TEST_SUITE_P(Kinds, ServicePolicyTest,
                         ::testing::Values("mat", "frozen-random", "inverse"),
                         [](const auto& info) {
                           return info.param == "frozen-random" ? std::string("frozen_random")
                                                                : info.param;
                         });

TEST_F(ServiceTest, AMissingDatasetFailsTheJobWithTheWorkersError) {
  StartCoordinator();
  StartWorker("w1");
  const std::string job =
      SubmitAndWait(WriteJob("job.yaml", JobYaml(1, 10, root_ + "/no_such_corpus")), 120s, 1);
  json s = Status(job);
  EXPECT_EQ(s["state"], "FAILED") << s.dump(2);
  EXPECT_THAT(s["error_message"].get<std::string>(), ::testing::HasSubstr("no_such_corpus"));
  // The failed rank's story is in its forwarded log: the error is the last line.
  CommandResult logs = Matctl(address_, {"logs", job});
  EXPECT_EQ(logs.exit_code, 0) << logs.err;
  const std::string last = logs.out.substr(logs.out.rfind('\n', logs.out.size() - 2) + 1);
  EXPECT_THAT(last, ::testing::HasSubstr("[rank 0] error: "));
  EXPECT_THAT(last, ::testing::HasSubstr("no_such_corpus"));
  // The worker survives its job's failure and takes the next one.
  const std::string next = SubmitAndWait(WriteJob("ok.yaml", JobYaml(1, 10)), 120s);
  EXPECT_EQ(Status(next)["state"], "SUCCEEDED") << Logs();
}

TEST_F(ServiceTest, TwoWorkersTrainAVggJobWithEqualParametersAndBatchNormStatistics) {
  if (!fs::exists("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")) {
    GTEST_SKIP() << "dataset-fashion-mnist is not installed (scripts/setup installs it)";
  }
  StartCoordinator();
  StartWorker("w1");
  StartWorker("w2");
  const std::string job = SubmitAndWait(WriteJob("vgg.yaml", VggJobYaml(2, 30)), 240s);
  ASSERT_FALSE(job.empty());
  json s = Status(job);
  ASSERT_TRUE(s.is_object()) << Logs();
  EXPECT_EQ(s["state"], "SUCCEEDED") << s.dump(2) << Logs();
  ASSERT_EQ(s["ranks"].size(), 2u) << s.dump(2);
  // The checksum covers the parameters and the buffers (BatchNorm running statistics), which
  // each rank updates from its own half of the batch and the ranks average.
  const std::string c0 = s["ranks"][0]["param_checksum"], c1 = s["ranks"][1]["param_checksum"];
  EXPECT_EQ(c0.size(), 16u);
  EXPECT_EQ(c0, c1) << "the ranks' parameters or BatchNorm statistics differ";
  ASSERT_TRUE(s["summary"].is_object()) << s.dump(2);
  EXPECT_EQ(s["summary"]["steps"], 30);
  EXPECT_EQ(s["summary"]["modules"], 16);
  EXPECT_EQ(s["summary"]["test_metric_name"], "accuracy");
  const double accuracy = s["summary"]["test_accuracy_at_best"].get<double>();
  EXPECT_GT(accuracy, 0.2) << "chance is 0.1";
  EXPECT_LE(accuracy, 1.0);

  const std::vector<std::string> masks = Glob(root_ + "/w*/jobs/" + job + "/rank*/masks.jsonl");
  ASSERT_EQ(masks.size(), 2u) << Logs();
  std::vector<json> m0 = ReadJsonLines(masks[0]), m1 = ReadJsonLines(masks[1]);
  ASSERT_EQ(m0.size(), 3u);  // probe steps 0, 10, 20
  ASSERT_EQ(m1.size(), m0.size());
  bool some_group_off = false;
  for (size_t i = 0; i < m0.size(); ++i) {
    EXPECT_EQ(m0[i].at("every_step"), m1[i].at("every_step")) << "step " << m0[i]["step"];
    for (int bit : m0[i]["every_step"]) some_group_off |= bit == 0;
  }
  EXPECT_TRUE(some_group_off) << "the policy never switched a filter group off; the test checks less";
  CommandResult spectra = Matctl(address_, {"spectra", job, "-o", "csv"});
  EXPECT_EQ(spectra.exit_code, 0) << spectra.err;
  EXPECT_THAT(spectra.out, ::testing::HasSubstr("conv7.filters1"));
}

// What a user reads back (issue 24): `matctl compare` of a MAT job and a full job gives the
// numbers of their summaries; a job with model.init_from starts from another job's model, and
// one whose model has another shape fails naming the tensor.
TEST_F(ServiceTest, CompareGivesTheSummariesNumbersAndInitFromStartsFromAJobsModel) {
  StartCoordinator();
  StartWorker("w1");
  std::string full_yaml = JobYaml(1, 40);
  const std::string kind = "policy: {kind: mat,";
  ASSERT_NE(full_yaml.find(kind), std::string::npos);
  full_yaml.replace(full_yaml.find(kind), kind.size(), "policy: {kind: full,");
  const std::string mat = SubmitAndWait(WriteJob("mat.yaml", JobYaml(1, 40)), 240s);
  const std::string full = SubmitAndWait(WriteJob("full.yaml", full_yaml), 240s);
  ASSERT_FALSE(mat.empty());
  ASSERT_FALSE(full.empty());

  CommandResult r = Matctl(address_, {"compare", mat, full, "-o", "json", "--budgets", "0.5,2",
                                      "--svg", root_ + "/compare.svg"});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err << Logs();
  const json c = json::parse(r.out, nullptr, false);
  ASSERT_TRUE(c.is_object()) << r.out;
  EXPECT_EQ(c["baseline"], full);  // the full job, though named second
  ASSERT_EQ(c["runs"].size(), 2u);
  const json sm = Status(mat)["summary"], sf = Status(full)["summary"];
  ASSERT_TRUE(sm.is_object() && sf.is_object()) << Logs();
  const json& rm = c["runs"][0];
  const json& rf = c["runs"][1];
  EXPECT_EQ(rm["name"], mat);
  EXPECT_EQ(rm["mode"], "mat");
  EXPECT_EQ(rf["mode"], "full");
  for (const char* key : {"flops_total", "best_val_loss", "test_metric", "mean_active_fraction"}) {
    EXPECT_EQ(rm[key], sm[key]) << key;
    EXPECT_EQ(rf[key], sf[key]) << key;
  }
  EXPECT_DOUBLE_EQ(rm["flops_ratio"].get<double>(),
                   sm["flops_total"].get<double>() / sf["flops_total"].get<double>());
  // At twice full's FLOPs both runs read their last evaluation; at half, the last evaluation
  // each had made within that budget.
  EXPECT_EQ(rf["val_loss_at_budget"][1], sf["eval_curve"]["val_loss"].back());
  EXPECT_EQ(rm["val_loss_at_budget"][1], sm["eval_curve"]["val_loss"].back());
  const double half = 0.5 * sf["flops_total"].get<double>();
  for (const json* pair : {&rm, &rf}) {
    const json& summary = pair == &rm ? sm : sf;
    json expected = nullptr;
    for (size_t i = 0; i < summary["eval_curve"]["flops"].size(); ++i) {
      if (summary["eval_curve"]["flops"][i].get<double>() <= half) {
        expected = summary["eval_curve"]["val_loss"][i];
      }
    }
    EXPECT_EQ((*pair)["val_loss_at_budget"][0], expected) << (*pair)["name"];
  }
  EXPECT_EQ(rf.at("flops_to_baseline_best"), sf.at("flops_to_best"));
  EXPECT_THAT(ReadText(root_ + "/compare.svg"), ::testing::HasSubstr("<polyline"));
  CommandResult text = Matctl(address_, {"compare", mat, full});
  EXPECT_EQ(text.exit_code, 0) << text.err;
  EXPECT_THAT(text.out, ::testing::HasSubstr("baseline: " + full + " (full"));

  // model.init_from: the full job's model, as rank 0 wrote it.
  const std::string model = root_ + "/w1/jobs/" + full + "/rank0/model.safetensors";
  ASSERT_TRUE(fs::exists(model)) << Logs();
  std::string from_yaml = full_yaml;
  const std::string model_key = "model: {kind: bert,";
  from_yaml.replace(from_yaml.find(model_key), model_key.size(),
                    "model: {kind: bert, init_from: " + model + ",");
  const std::string from = SubmitAndWait(WriteJob("from.yaml", from_yaml), 240s);
  const json sfrom = Status(from)["summary"];
  ASSERT_TRUE(sfrom.is_object()) << Logs();
  // It starts where the full job ended: its first evaluation is below the full job's first.
  EXPECT_LT(sfrom["eval_curve"]["val_loss"][0].get<double>(),
            sf["eval_curve"]["val_loss"][0].get<double>());
  std::string wrong_yaml = from_yaml;
  const std::string d_ff = "d_ff: 128";
  ASSERT_NE(wrong_yaml.find(d_ff), std::string::npos);
  wrong_yaml.replace(wrong_yaml.find(d_ff), d_ff.size(), "d_ff: 256");
  const std::string wrong = SubmitAndWait(WriteJob("wrong.yaml", wrong_yaml), 240s, 1);
  const json sw = Status(wrong);
  EXPECT_EQ(sw["state"], "FAILED") << sw.dump(2);
  EXPECT_THAT(sw["error_message"].get<std::string>(), ::testing::HasSubstr("model.init_from"));
  EXPECT_THAT(sw["error_message"].get<std::string>(), ::testing::HasSubstr("has shape"));

  // compare of a job without a summary is refused naming it.
  CommandResult unfinished = Matctl(address_, {"compare", wrong, full});
  EXPECT_EQ(unfinished.exit_code, 1);
  EXPECT_THAT(unfinished.err, ::testing::HasSubstr(wrong + " has no summary"));
}

// `matctl logs --follow` (issue 24): started while the job runs, it prints the ranks' lines as
// they arrive and returns once the job has ended and its last line is printed.
TEST_F(ServiceTest, LogsFollowPrintsARunningJobsLinesAndEndsWithTheJob) {
  StartCoordinator();
  StartWorker("w1");
  StartWorker("w2");
  CommandResult submit = Matctl(address_, {"submit", WriteJob("job.yaml", JobYaml(2, 40))});
  ASSERT_EQ(submit.exit_code, 0) << submit.err;
  const std::string job = submit.out.substr(0, submit.out.find('\n'));
  const json before = Status(job);
  ASSERT_TRUE(before.is_object());
  EXPECT_NE(before["state"], "SUCCEEDED") << "the job ended before logs was started";
  CommandResult follow = Matctl(address_, {"logs", job, "--follow"}, 240s);
  ASSERT_EQ(follow.exit_code, 0) << follow.err << Logs();
  EXPECT_EQ(Status(job)["state"], "SUCCEEDED") << "--follow returned before the job ended";
  // Both ranks' lines, rank 0's evaluations among them, each rank's last line its finish.
  EXPECT_THAT(follow.out, ::testing::HasSubstr("[rank 0] info: step 20/40"));
  EXPECT_THAT(follow.out, ::testing::HasSubstr("[rank 0] info: " + job + " rank 0: finished 40 steps"));
  EXPECT_THAT(follow.out, ::testing::HasSubstr("[rank 1] info: " + job + " rank 1: finished 40 steps"));
  // Without --follow, the same lines; --rank keeps one rank's.
  CommandResult again = Matctl(address_, {"logs", job});
  EXPECT_EQ(again.out, follow.out);
  CommandResult one = Matctl(address_, {"logs", job, "--rank", "1"});
  EXPECT_THAT(one.out, ::testing::Not(::testing::HasSubstr("[rank 0]")));
  EXPECT_THAT(one.out, ::testing::HasSubstr("[rank 1]"));
  CommandResult unknown = Matctl(address_, {"logs", "job-000099"});
  EXPECT_EQ(unknown.exit_code, 1);
  EXPECT_THAT(unknown.err, ::testing::HasSubstr("job-000099"));
}

// The service form of the paper's "-Rand" baseline: a rand job with policy.rand_schedule_job
// trains, at every decision step, as many modules per group as the finished MAT job had active
// (the coordinator reads that job's stored decisions), but other ones: random, not a copy.
TEST_F(ServiceTest, ARandJobReplaysTheActiveCountsOfAFinishedMatJob) {
  StartCoordinator();
  StartWorker("w1");
  const std::string mat = SubmitAndWait(WriteJob("mat.yaml", JobYaml(1, 40)), 240s);
  ASSERT_FALSE(mat.empty());
  ASSERT_EQ(Status(mat)["state"], "SUCCEEDED") << Logs();

  std::string yaml = JobYaml(1, 40);
  const std::string kind = "policy: {kind: mat,";
  ASSERT_NE(yaml.find(kind), std::string::npos);
  yaml.replace(yaml.find(kind), kind.size(), "policy: {kind: rand, rand_schedule_job: " + mat + ",");
  const std::string rand = SubmitAndWait(WriteJob("rand.yaml", yaml), 240s);
  ASSERT_FALSE(rand.empty());
  json s = Status(rand);
  ASSERT_TRUE(s.is_object()) << Logs();
  EXPECT_EQ(s["state"], "SUCCEEDED") << s.dump(2) << Logs();
  EXPECT_EQ(s["spec"]["policy"]["rand_schedule_job"], mat);
  CommandResult text = Matctl(address_, {"status", rand});
  EXPECT_THAT(text.out, ::testing::HasSubstr("rand (replays " + mat + ")")) << text.out << text.err;

  // The modules' groups (rank 0's ModuleList, the same model in both jobs).
  std::vector<std::string> groups;
  std::string listed;
  for (const std::string& job : {mat, rand}) {
    CommandResult r = Matctl(address_, {"spectra", job, "-o", "json"});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    const json listing = json::parse(r.out);
    std::vector<std::string> g;
    for (const json& m : listing["modules"]) g.push_back(m["group"].get<std::string>());
    if (groups.empty()) groups = g;
    EXPECT_EQ(g, groups) << job;
    listed += r.out;
  }
  ASSERT_EQ(groups.size(), 12u) << "2 layers x (4 heads + 2 FFN slices):\n" << listed;

  // The masks the rank applied at each decision step, per job.
  auto masks_of = [&](const std::string& job) {
    return ReadJsonLines(root_ + "/w1/jobs/" + job + "/rank0/masks.jsonl");
  };
  const std::vector<json> a = masks_of(mat), b = masks_of(rand);
  ASSERT_EQ(a.size(), 4u) << Logs();  // probe steps 0, 10, 20, 30
  ASSERT_EQ(b.size(), a.size());
  auto counts = [&](const json& mask) {
    std::map<std::string, int> out;
    for (size_t i = 0; i < groups.size(); ++i) out[groups[i]] += mask["every_step"][i].get<int>();
    return out;
  };
  bool some_module_off = false, some_set_differs = false;
  for (size_t i = 0; i < a.size(); ++i) {
    ASSERT_EQ(a[i]["step"], b[i]["step"]);
    ASSERT_EQ(b[i]["every_step"].size(), groups.size());
    EXPECT_EQ(counts(b[i]), counts(a[i])) << "step " << a[i]["step"];
    for (int bit : a[i]["every_step"]) some_module_off |= bit == 0;
    some_set_differs |= a[i]["every_step"] != b[i]["every_step"];
  }
  EXPECT_TRUE(some_module_off) << "the MAT job never switched a module off; the test checks less";
  EXPECT_TRUE(some_set_differs) << "the rand job copied the MAT job's masks";

  // Replaying a job the coordinator does not have is refused at submission, naming it.
  std::string unknown = yaml;
  unknown.replace(unknown.find(mat), mat.size(), "job-000099");
  CommandResult refused = Matctl(address_, {"submit", WriteJob("unknown.yaml", unknown)});
  EXPECT_NE(refused.exit_code, 0) << refused.out;
  EXPECT_THAT(refused.err, ::testing::HasSubstr("policy.rand_schedule_job"));
  EXPECT_THAT(refused.err, ::testing::HasSubstr("job-000099"));
}

}  // namespace
}  // namespace mat

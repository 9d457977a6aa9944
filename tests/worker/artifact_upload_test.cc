// The uploader against the coordinator's real ArtifactStore behind a fake call that breaks: it
// resumes where the store's bytes end, restarts a file the store dropped, stops on a refusal, and
// the model of a failed run comes from its checkpoint.
#include "worker/artifact_upload.h"

#include <filesystem>
#include <fstream>
#include <sstream>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "api/grpc_status.h"
#include "coordinator/artifact_store.h"
#include "safetensors/safetensors.h"
#include "trainer/checkpoint/checkpoint.h"
#include "tests/testing/temp_dir.h"

namespace mat::worker {
namespace {

using ::testing::HasSubstr;

std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

class ArtifactUploadTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(tmp_.ok());
    auto store = coordinator::ArtifactStore::Open(tmp_.path() + "/store", 0);
    ASSERT_TRUE(store.ok()) << store.status();
    store_ = std::move(*store);
    identity_.set_worker_id("worker-000001");
    identity_.set_job_id("job-000001");
    options_.piece_bytes = 1000;
    options_.retry_interval = std::chrono::milliseconds(1);
    file_ = tmp_.path() + "/model.safetensors";
    std::string bytes(25000, '\0');
    for (size_t i = 0; i < bytes.size(); ++i) bytes[i] = char(i * 7919 % 256);
    std::ofstream(file_, std::ios::binary) << bytes;
  }

  // A call into the store; `fail(n)` decides whether call n breaks (UNAVAILABLE, nothing stored).
  UploadArtifactCall Call(std::function<bool(int)> fail) {
    return [this, fail](const v1::UploadArtifactRequest& r, v1::UploadArtifactReply* reply) {
      ++calls_;
      if (fail(calls_)) return grpc::Status(grpc::StatusCode::UNAVAILABLE, "connection reset");
      absl::StatusOr<v1::UploadArtifactReply> result = store_->Upload(r);
      if (result.ok()) *reply = *result;
      return api::ToGrpcStatus(result.status());
    };
  }

  absl::Status Upload(const UploadArtifactCall& call) {
    return UploadArtifactFile(call, identity_, "model.safetensors", file_, options_,
                              std::chrono::steady_clock::now() + std::chrono::seconds(30),
                              [] { return false; });
  }

  tests::TempDir tmp_{"mat_artifact_upload"};
  std::unique_ptr<coordinator::ArtifactStore> store_;
  v1::UploadArtifactRequest identity_;
  ArtifactUploadOptions options_;
  std::string file_;
  int calls_ = 0;
};

TEST_F(ArtifactUploadTest, BrokenCallsResumeAndTheStoreEndsWithTheSameFile) {
  ASSERT_TRUE(Upload(Call([](int n) { return n % 3 == 0; })).ok());
  EXPECT_EQ(ReadAll(tmp_.path() + "/store/job-000001/model.safetensors"), ReadAll(file_));
  // 1 question + 25 pieces, and every third call broke.
  EXPECT_GE(calls_, 26 + 26 / 3);
  calls_ = 0;
  ASSERT_TRUE(Upload(Call([](int) { return false; })).ok());
  EXPECT_EQ(calls_, 1) << "a file the store already holds is not sent again";
}

TEST_F(ArtifactUploadTest, AStoppedUploadResumesWhereTheStoreStopped) {
  bool stop = false;
  const UploadArtifactCall call = Call([](int) { return false; });
  const UploadArtifactCall counting = [&](const v1::UploadArtifactRequest& r,
                                          v1::UploadArtifactReply* reply) {
    const grpc::Status s = call(r, reply);
    stop = reply->committed_bytes() >= 10000;
    return s;
  };
  const absl::Status first = UploadArtifactFile(
      counting, identity_, "model.safetensors", file_, options_,
      std::chrono::steady_clock::now() + std::chrono::seconds(30), [&] { return stop; });
  EXPECT_EQ(first.code(), absl::StatusCode::kCancelled);
  calls_ = 0;
  ASSERT_TRUE(Upload(Call([](int) { return false; })).ok());
  EXPECT_EQ(calls_, 1 + 15) << "the second upload sent only the missing 15 pieces";
  EXPECT_EQ(ReadAll(tmp_.path() + "/store/job-000001/model.safetensors"), ReadAll(file_));
}

TEST_F(ArtifactUploadTest, ARefusalEndsTheFileAndNamesIt) {
  auto small = coordinator::ArtifactStore::Open(tmp_.path() + "/small", 1000);
  ASSERT_TRUE(small.ok());
  const UploadArtifactCall call = [&](const v1::UploadArtifactRequest& r,
                                      v1::UploadArtifactReply* reply) {
    absl::StatusOr<v1::UploadArtifactReply> result = (*small)->Upload(r);
    if (result.ok()) *reply = *result;
    return api::ToGrpcStatus(result.status());
  };
  const absl::Status s = Upload(call);
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(s.message()),
              HasSubstr("upload of model.safetensors: artifact model.safetensors"));
}

TEST_F(ArtifactUploadTest, AnUnreachableCoordinatorEndsAtTheDeadline) {
  const absl::Status s = UploadArtifactFile(
      Call([](int) { return true; }), identity_, "model.safetensors", file_, options_,
      std::chrono::steady_clock::now() + std::chrono::milliseconds(50), [] { return false; });
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable);
  EXPECT_GT(calls_, 2);
}

TEST_F(ArtifactUploadTest, TheModelOfAFailedRunComesFromItsCheckpoint) {
  // What the trainer writes (trainer/checkpoint/checkpoint.h): model, buffer and optimizer
  // tensors and its meta.
  trainer::Checkpoint ckpt;
  ckpt.meta = R"({"step": 40})";
  const torch::Tensor t = torch::ones({2});
  ckpt.tensors["model.layer.weight"] = t;
  ckpt.tensors["buffer.bn.running_mean"] = t;
  ckpt.tensors["adamw.m.layer.weight"] = t;
  const std::string dir = tmp_.path();
  EXPECT_EQ(ModelFromCheckpoint(dir + "/checkpoint.pt", dir + "/m.safetensors").code(),
            absl::StatusCode::kNotFound);
  ASSERT_TRUE(trainer::WriteCheckpoint(dir + "/checkpoint.pt.prev", ckpt).ok());
  std::ofstream(dir + "/checkpoint.pt") << "truncated";  // the newest is broken: .prev is used
  ASSERT_TRUE(ModelFromCheckpoint(dir + "/checkpoint.pt", dir + "/m.safetensors",
                                  {{"mat.model", "bert"}, {"mat.seed", "7"}})
                  .ok());
  absl::StatusOr<safetensors::File> model = safetensors::ReadFile(dir + "/m.safetensors");
  ASSERT_TRUE(model.ok()) << model.status();
  EXPECT_EQ(model->tensors.size(), 2u);
  EXPECT_TRUE(model->tensors.count("layer.weight"));
  EXPECT_TRUE(model->tensors.count("bn.running_mean"));
  EXPECT_EQ(model->metadata["mat.step"], "40");
  EXPECT_EQ(model->metadata["mat.source"], "checkpoint");
  // What mat-train's model.safetensors says, so that a reader need not know where it came from.
  EXPECT_EQ(model->metadata["mat.model"], "bert");
  EXPECT_EQ(model->metadata["mat.seed"], "7");
  EXPECT_EQ(model->metadata["format"], "pt");
  // A newest checkpoint with a flipped bit fails its checksum: the previous one is used.
  std::filesystem::remove(dir + "/checkpoint.pt");
  std::filesystem::remove(dir + "/checkpoint.pt.prev");
  ASSERT_TRUE(trainer::WriteCheckpoint(dir + "/checkpoint.pt", ckpt).ok());  // step 40
  ckpt.meta = R"({"step": 50})";
  ASSERT_TRUE(trainer::WriteCheckpoint(dir + "/checkpoint.pt", ckpt).ok());  // 40 -> .prev
  {
    std::fstream f(dir + "/checkpoint.pt", std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(-1, std::ios::end);
    const char last = char(f.get());
    f.seekp(-1, std::ios::end);
    f.put(char(last ^ 1));
  }
  ASSERT_TRUE(ModelFromCheckpoint(dir + "/checkpoint.pt", dir + "/m.safetensors").ok());
  EXPECT_EQ(safetensors::ReadFile(dir + "/m.safetensors")->metadata["mat.step"], "40");
}

}  // namespace
}  // namespace mat::worker

// ArtifactStore on a real directory: pieces, resume across a reopen (a coordinator restart), the
// SHA-256 check, the per-job limit, names that could escape the directory, reads.
#include "coordinator/artifact_store.h"

#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "api/artifacts.h"
#include "tests/testing/temp_dir.h"

namespace mat::coordinator {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

std::string Sha(const std::string& bytes) {
  api::Sha256 sha;
  sha.Add(bytes);
  return sha.Hex();
}

std::string Bytes(size_t n) {
  std::string s(n, '\0');
  for (size_t i = 0; i < n; ++i) s[i] = char((i * 131 + 7) % 251);
  return s;
}

std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

v1::UploadArtifactRequest Piece(const std::string& name, const std::string& file, int64_t offset,
                                int64_t size) {
  v1::UploadArtifactRequest r;
  r.set_job_id("job-000001");
  r.set_name(name);
  r.set_total_bytes(int64_t(file.size()));
  r.set_sha256(Sha(file));
  r.set_offset(offset);
  r.set_data(file.substr(size_t(offset), size_t(size)));
  return r;
}

class ArtifactStoreTest : public ::testing::Test {
 protected:
  void SetUp() override { ASSERT_TRUE(tmp_.ok()); }
  std::string Dir() const { return tmp_.path() + "/artifacts"; }
  tests::TempDir tmp_{"mat_artifact_store"};
};

TEST_F(ArtifactStoreTest, PiecesMakeTheFileAndReadsGiveItBack) {
  auto store = ArtifactStore::Open(Dir(), 0);
  ASSERT_TRUE(store.ok()) << store.status();
  const std::string file = Bytes(10000);
  int64_t at = 0;
  while (true) {
    auto reply = (*store)->Upload(Piece("model.safetensors", file, at, 3000));
    ASSERT_TRUE(reply.ok()) << reply.status();
    if (reply->complete()) break;
    ASSERT_GT(reply->committed_bytes(), at);
    at = reply->committed_bytes();
  }
  EXPECT_EQ(ReadAll(Dir() + "/job-000001/model.safetensors"), file);
  EXPECT_FALSE(fs::exists(Dir() + "/job-000001/model.safetensors.part"));
  EXPECT_EQ((*store)->JobBytes("job-000001"), 10000);
  auto list = (*store)->List("job-000001");
  ASSERT_TRUE(list.ok());
  ASSERT_EQ(list->artifacts_size(), 1);
  EXPECT_EQ(list->artifacts(0).sha256(), Sha(file));
  EXPECT_EQ(list->total_bytes(), 10000);

  std::string back;
  v1::ReadArtifactRequest read;
  read.set_job_id("job-000001");
  read.set_name("model.safetensors");
  read.set_max_bytes(4096);
  while (int64_t(back.size()) < 10000) {
    read.set_offset(int64_t(back.size()));
    auto piece = (*store)->Read(read);
    ASSERT_TRUE(piece.ok()) << piece.status();
    ASSERT_FALSE(piece->data().empty());
    EXPECT_EQ(piece->total_bytes(), 10000);
    back += piece->data();
  }
  EXPECT_EQ(back, file);
  read.set_offset(10001);
  EXPECT_EQ((*store)->Read(read).status().code(), absl::StatusCode::kOutOfRange);
  read.set_name("summary.json");
  read.set_offset(0);
  EXPECT_THAT((*store)->Read(read).status().message(),
              HasSubstr("job job-000001 has no artifact 'summary.json'"));
  // The same file again is complete at once; an empty file completes on its first call.
  auto again = (*store)->Upload(Piece("model.safetensors", file, 0, 0));
  ASSERT_TRUE(again.ok());
  EXPECT_TRUE(again->complete());
  auto empty = (*store)->Upload(Piece("empty.txt", "", 0, 0));
  ASSERT_TRUE(empty.ok()) << empty.status();
  EXPECT_TRUE(empty->complete());
}

// RemoveJob (DeleteJob): the job's folder goes, uploads in progress included, and the store
// holds nothing of it any more; another job's files stay.
TEST_F(ArtifactStoreTest, RemoveJobTakesTheJobsFilesAndReportsTheirSize) {
  auto store = ArtifactStore::Open(Dir(), 0);
  ASSERT_TRUE(store.ok()) << store.status();
  const std::string file = Bytes(5000);
  ASSERT_TRUE((*store)->Upload(Piece("model.safetensors", file, 0, 5000)).ok());
  ASSERT_TRUE((*store)->Upload(Piece("metrics.jsonl", file, 0, 1000)).ok());  // in progress
  v1::UploadArtifactRequest other = Piece("summary.json", "{}", 0, 2);
  other.set_job_id("job-000002");
  ASSERT_TRUE((*store)->Upload(other).ok());
  ASSERT_TRUE(fs::exists(Dir() + "/job-000001/metrics.jsonl.part"));

  auto freed = (*store)->RemoveJob("job-000001");
  ASSERT_TRUE(freed.ok()) << freed.status();
  // The model, the 1000 bytes of the upload in progress, and the manifest.
  EXPECT_GE(*freed, 6000);
  EXPECT_LT(*freed, 7000);
  EXPECT_FALSE(fs::exists(Dir() + "/job-000001"));
  EXPECT_EQ((*store)->JobBytes("job-000001"), 0);
  auto list = (*store)->List("job-000001");
  ASSERT_TRUE(list.ok()) << list.status();
  EXPECT_EQ(list->artifacts_size(), 0);
  v1::ReadArtifactRequest read;
  read.set_job_id("job-000001");
  read.set_name("model.safetensors");
  EXPECT_EQ((*store)->Read(read).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(*(*store)->RemoveJob("job-000001"), 0) << "nothing left to remove";
  EXPECT_EQ((*store)->RemoveJob("../job-000002").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ((*store)->JobBytes("job-000002"), 2);
  // A reopened store does not bring it back.
  store->reset();
  store = ArtifactStore::Open(Dir(), 0);
  ASSERT_TRUE(store.ok()) << store.status();
  EXPECT_EQ((*store)->JobBytes("job-000001"), 0);
  EXPECT_EQ((*store)->JobBytes("job-000002"), 2);
  // A deleted job's folder that outlived its delete goes at the next Open, never loaded; the
  // other jobs stay.
  store->reset();
  fs::create_directories(Dir() + "/job-000003");
  { std::ofstream(Dir() + "/job-000003/model.safetensors") << "left over"; }
  store = ArtifactStore::Open(Dir(), 0, [](const std::string& id) {
    return id == "job-000003" ? KnownJob::kDeleted : KnownJob::kKnown;
  });
  ASSERT_TRUE(store.ok()) << store.status();
  EXPECT_FALSE(fs::exists(Dir() + "/job-000003"));
  EXPECT_FALSE(fs::exists(Dir() + "/orphaned"));
  EXPECT_EQ((*store)->JobBytes("job-000002"), 2);
}

TEST_F(ArtifactStoreTest, AnUploadResumesAfterAReopenWhereTheBytesOnDiskEnd) {
  const std::string file = Bytes(9000);
  {
    auto store = ArtifactStore::Open(Dir(), 0);
    ASSERT_TRUE(store.ok());
    ASSERT_TRUE((*store)->Upload(Piece("metrics.jsonl", file, 0, 4000)).ok());
    // A piece at the wrong offset stores nothing and says where to go on.
    auto wrong = (*store)->Upload(Piece("metrics.jsonl", file, 1000, 1000));
    ASSERT_TRUE(wrong.ok());
    EXPECT_EQ(wrong->committed_bytes(), 4000);
  }
  auto store = ArtifactStore::Open(Dir(), 0);  // the coordinator restarted
  ASSERT_TRUE(store.ok()) << store.status();
  EXPECT_EQ((*store)->JobBytes("job-000001"), 0);  // not complete: not counted, not listed
  auto ask = (*store)->Upload(Piece("metrics.jsonl", file, 0, 0));
  ASSERT_TRUE(ask.ok());
  EXPECT_EQ(ask->committed_bytes(), 4000);
  EXPECT_FALSE(ask->complete());
  auto rest = (*store)->Upload(Piece("metrics.jsonl", file, 4000, 5000));
  ASSERT_TRUE(rest.ok()) << rest.status();
  EXPECT_TRUE(rest->complete());
  EXPECT_EQ(ReadAll(Dir() + "/job-000001/metrics.jsonl"), file);
  // And the complete one survives another restart.
  store->reset();
  auto reopened = ArtifactStore::Open(Dir(), 0);
  ASSERT_TRUE(reopened.ok());
  EXPECT_EQ((*reopened)->JobBytes("job-000001"), 9000);
}

// One job's damaged manifest kept the coordinator from starting (DATA_LOSS at Open).
TEST_F(ArtifactStoreTest, ADamagedManifestIsSetAsideAndTheOtherJobsStay) {
  const std::string file = Bytes(100);
  {
    auto store = ArtifactStore::Open(Dir(), 0);
    ASSERT_TRUE(store.ok());
    ASSERT_TRUE((*store)->Upload(Piece("metrics.jsonl", file, 0, 100)).ok());
  }
  fs::create_directories(Dir() + "/job-000002");
  { std::ofstream(Dir() + "/job-000002/MANIFEST.json") << "{\"artifacts\": {tru"; }
  auto store = ArtifactStore::Open(Dir(), 0);
  ASSERT_TRUE(store.ok()) << store.status();
  EXPECT_EQ((*store)->JobBytes("job-000001"), 100);
  auto listed = (*store)->List("job-000002");
  ASSERT_TRUE(listed.ok()) << listed.status();
  EXPECT_EQ(listed->artifacts_size(), 0);
  EXPECT_TRUE(fs::exists(Dir() + "/job-000002/MANIFEST.json.corrupt"));
  EXPECT_FALSE(fs::exists(Dir() + "/job-000002/MANIFEST.json"));
}

// A state database replaced while its artifacts folder stayed: the new job-000001 listed and
// served the old job-000001's model. Folders of jobs the state does not know are moved aside.
TEST_F(ArtifactStoreTest, AFolderOfAJobTheStateDoesNotKnowIsMovedAside) {
  const std::string file = Bytes(100);
  {
    auto store = ArtifactStore::Open(Dir(), 0);
    ASSERT_TRUE(store.ok());
    ASSERT_TRUE((*store)->Upload(Piece("metrics.jsonl", file, 0, 100)).ok());
  }
  auto store = ArtifactStore::Open(Dir(), 0, [](const std::string& id) {
    return id == "job-000001" ? KnownJob::kUnknown : KnownJob::kKnown;
  });
  ASSERT_TRUE(store.ok()) << store.status();
  EXPECT_EQ((*store)->JobBytes("job-000001"), 0);
  EXPECT_FALSE(fs::exists(Dir() + "/job-000001"));
  int moved = 0;
  for (const auto& e : fs::directory_iterator(Dir() + "/orphaned")) {
    EXPECT_EQ(e.path().filename().string().rfind("job-000001.", 0), 0u) << e.path();
    EXPECT_EQ(ReadAll(e.path().string() + "/metrics.jsonl"), file) << "the files are kept";
    ++moved;
  }
  EXPECT_EQ(moved, 1);
}

// Two coordinators on one artifacts folder served each other's files under their own job ids.
TEST_F(ArtifactStoreTest, OneStorePerFolder) {
  auto first = ArtifactStore::Open(Dir(), 0);
  ASSERT_TRUE(first.ok()) << first.status();
  auto second = ArtifactStore::Open(Dir(), 0);
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(second.status().message(), HasSubstr("is in use by another coordinator"));
  first->reset();
  EXPECT_TRUE(ArtifactStore::Open(Dir(), 0).ok()) << "the lock goes with the store";
}

TEST_F(ArtifactStoreTest, AFileWhoseBytesDoNotMatchTheChecksumIsDropped) {
  auto store = ArtifactStore::Open(Dir(), 0);
  ASSERT_TRUE(store.ok());
  const std::string file = Bytes(5000);
  v1::UploadArtifactRequest first = Piece("summary.json", file, 0, 2500);
  ASSERT_TRUE((*store)->Upload(first).ok());
  v1::UploadArtifactRequest second = Piece("summary.json", file, 2500, 2500);
  std::string flipped = second.data();
  flipped[100] = char(flipped[100] ^ 1);
  second.set_data(flipped);
  const absl::StatusOr<v1::UploadArtifactReply> reply = (*store)->Upload(second);
  EXPECT_EQ(reply.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(reply.status().message(), HasSubstr("summary.json of job-000001"));
  EXPECT_FALSE(fs::exists(Dir() + "/job-000001/summary.json"));
  EXPECT_FALSE(fs::exists(Dir() + "/job-000001/summary.json.part"));
  auto restart = (*store)->Upload(Piece("summary.json", file, 0, 0));
  ASSERT_TRUE(restart.ok());
  EXPECT_EQ(restart->committed_bytes(), 0);
}

TEST_F(ArtifactStoreTest, AnUploadOverTheJobsLimitIsRefusedAndReported) {
  auto store = ArtifactStore::Open(Dir(), 12000);
  ASSERT_TRUE(store.ok());
  const std::string small = Bytes(4000), big = Bytes(9000);
  ASSERT_TRUE((*store)->Upload(Piece("summary.json", small, 0, 4000)).ok());
  const auto refused = (*store)->Upload(Piece("model.safetensors", big, 0, 1000));
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(refused.status().message(),
              HasSubstr("model.safetensors (9000 bytes) does not fit: the job's artifacts would "
                        "take 13000 bytes, over the coordinator's --max-artifact-bytes 12000"));
  EXPECT_FALSE(fs::exists(Dir() + "/job-000001/model.safetensors.part"));
  auto list = (*store)->List("job-000001");
  ASSERT_TRUE(list.ok());
  ASSERT_EQ(list->refused_size(), 1);
  EXPECT_THAT(list->refused(0), HasSubstr("model.safetensors (9000 bytes)"));
  // Replacing a file counts its new size, not both.
  const std::string bigger = Bytes(11000);
  EXPECT_TRUE((*store)->Upload(Piece("summary.json", bigger, 0, 4000)).ok());
  // The refusal is kept across a restart.
  store->reset();
  auto reopened = ArtifactStore::Open(Dir(), 12000);
  ASSERT_TRUE(reopened.ok());
  EXPECT_EQ((*reopened)->List("job-000001")->refused_size(), 1);
}

TEST_F(ArtifactStoreTest, NamesThatCouldLeaveTheDirectoryAndBadRequestsAreRefused) {
  auto store = ArtifactStore::Open(Dir(), 0);
  ASSERT_TRUE(store.ok());
  const std::string file = Bytes(100);
  for (const std::string name : {"../x", "a/b", ".hidden", "..", "", "model.part", "a b"}) {
    const auto r = (*store)->Upload(Piece(name, file, 0, 100));
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << name;
  }
  v1::UploadArtifactRequest bad_job = Piece("ok.txt", file, 0, 100);
  bad_job.set_job_id("../job");
  EXPECT_EQ((*store)->Upload(bad_job).status().code(), absl::StatusCode::kInvalidArgument);
  v1::UploadArtifactRequest bad_sha = Piece("ok.txt", file, 0, 100);
  bad_sha.set_sha256("abc");
  EXPECT_THAT((*store)->Upload(bad_sha).status().message(), HasSubstr("not 64 lowercase hex"));
  v1::UploadArtifactRequest past_end = Piece("ok.txt", file, 0, 100);
  past_end.set_total_bytes(50);
  EXPECT_EQ((*store)->Upload(past_end).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(fs::exists(tmp_.path() + "/x"), false);
}

// An artifact named MANIFEST.json was renamed onto the store's manifest, which was then
// rewritten: the job's download failed on the checksum. The name is refused, and the job's
// artifacts stay listed and readable.
TEST_F(ArtifactStoreTest, TheManifestsNameIsRefusedAndTheJobsArtifactsStay) {
  auto store = ArtifactStore::Open(Dir(), 0);
  ASSERT_TRUE(store.ok());
  const std::string file = Bytes(100);
  ASSERT_TRUE((*store)->Upload(Piece("model.safetensors", file, 0, 100)).ok());
  for (const std::string name : {"MANIFEST.json", "MANIFEST.json.corrupt", "MANIFEST.json2"}) {
    const auto r = (*store)->Upload(Piece(name, R"({"x":1})", 0, 7));
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << name;
    EXPECT_THAT(r.status().message(), HasSubstr("the store's own file")) << name;
  }
  auto list = (*store)->List("job-000001");
  ASSERT_TRUE(list.ok()) << list.status();
  ASSERT_EQ(list->artifacts_size(), 1);
  EXPECT_EQ(list->artifacts(0).name(), "model.safetensors");
  EXPECT_EQ(list->artifacts(0).bytes(), 100);
  // Names that only contain it are fine.
  EXPECT_TRUE((*store)->Upload(Piece("my.MANIFEST.json", file, 0, 100)).ok());
}

}  // namespace
}  // namespace mat::coordinator

// CheckUnderRoots: inside, outside, `..` escapes, symlink escapes, relative paths, prefixes that
// are not parents, roots that are symlinks.
#include "common/path_util.h"

#include <unistd.h>

#include <filesystem>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace mat::common {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

class PathUtilTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/mat_path_util_XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = fs::path(tmpl);
    fs::create_directories(dir_ / "root" / "corpus");
    fs::create_directories(dir_ / "outside" / "secret");
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string Root() const { return (dir_ / "root").string(); }
  fs::path dir_;
};

TEST_F(PathUtilTest, NoRootsAdmitsEverything) {
  EXPECT_TRUE(CheckUnderRoots("/etc", {}).ok());
  EXPECT_TRUE(CheckUnderRoots("relative/dir", {}).ok());
}

TEST_F(PathUtilTest, InsideIsAccepted) {
  EXPECT_TRUE(CheckUnderRoots(Root(), {Root()}).ok());
  EXPECT_TRUE(CheckUnderRoots(Root() + "/corpus", {Root()}).ok());
  EXPECT_TRUE(CheckUnderRoots(Root() + "/corpus/", {Root() + "/"}).ok());
  EXPECT_TRUE(CheckUnderRoots(Root() + "/not/yet/there", {Root()}).ok());
  EXPECT_TRUE(CheckUnderRoots(Root() + "/corpus/../corpus/./", {Root()}).ok());
  // Any of several roots.
  EXPECT_TRUE(CheckUnderRoots(Root() + "/corpus", {"/nonexistent-root", Root()}).ok());
}

TEST_F(PathUtilTest, OutsideIsRefusedNamingPathAndRoots) {
  absl::Status s = CheckUnderRoots("/etc", {Root(), "/srv/data"});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("'/etc' is not under a data root"));
  EXPECT_THAT(s.message(), HasSubstr(Root() + ", /srv/data"));
  // A sibling that shares the root's name as a prefix is not inside it.
  EXPECT_FALSE(CheckUnderRoots(Root() + "2/corpus", {Root()}).ok());
  EXPECT_FALSE(IsLexicallyUnder("/data2", "/data"));
  EXPECT_TRUE(IsLexicallyUnder("/data/x/", "/data"));
}

TEST_F(PathUtilTest, DotDotEscapeIsRefused) {
  EXPECT_FALSE(CheckUnderRoots(Root() + "/../outside/secret", {Root()}).ok());
  EXPECT_FALSE(CheckUnderRoots(Root() + "/corpus/../../outside", {Root()}).ok());
  EXPECT_FALSE(CheckUnderRoots(Root() + "/..", {Root()}).ok());
  EXPECT_FALSE(CheckUnderRoots(Root() + "/no/such/../../../outside", {Root()}).ok());
}

TEST_F(PathUtilTest, SymlinkPointingOutsideIsRefused) {
  fs::create_directory_symlink(dir_ / "outside" / "secret", dir_ / "root" / "link");
  absl::Status s = CheckUnderRoots(Root() + "/link", {Root()});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("through a symlink"));
  EXPECT_FALSE(CheckUnderRoots(Root() + "/link/deeper", {Root()}).ok());
  // `..` after a symlink goes where the OS goes: outside/, not root/.
  EXPECT_FALSE(CheckUnderRoots(Root() + "/link/../secret", {Root()}).ok());
}

TEST_F(PathUtilTest, SymlinkInsideAndSymlinkedRootAreAccepted) {
  fs::create_directory_symlink(dir_ / "root" / "corpus", dir_ / "root" / "alias");
  EXPECT_TRUE(CheckUnderRoots(Root() + "/alias", {Root()}).ok());
  fs::create_directory_symlink(dir_ / "root", dir_ / "root-link");
  const std::string linked_root = (dir_ / "root-link").string();
  EXPECT_TRUE(CheckUnderRoots(linked_root + "/corpus", {linked_root}).ok());
}

TEST_F(PathUtilTest, RelativePathsAreRefused) {
  absl::Status s = CheckUnderRoots("corpus", {Root()});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("'corpus' is a relative path"));
  EXPECT_FALSE(CheckUnderRoots("../shared/data", {Root()}).ok());
  EXPECT_FALSE(CheckUnderRoots("", {Root()}).ok());
}

TEST_F(PathUtilTest, RelativeRootIsAConfigurationError) {
  absl::Status s = CheckUnderRoots("/data/x", {"data"});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("data root 'data' is not an absolute path"));
}

}  // namespace
}  // namespace mat::common

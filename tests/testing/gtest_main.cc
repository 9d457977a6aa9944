// The main of every mat_test binary (cmake/mat.cmake): GoogleTest's, except that a binary whose
// tests were ALL skipped (GTEST_SKIP: no GPU, a missing dataset) exits with kAllSkipped, which
// ctest reports as "Skipped" (SKIP_RETURN_CODE) instead of "Passed". A binary where some tests
// ran and passed and others were skipped passes, and says how many were skipped; any failure
// fails as usual.
#include <cstdio>

#include <gtest/gtest.h>

namespace {
constexpr int kAllSkipped = 77;  // the automake convention; cmake/mat.cmake's SKIP_RETURN_CODE
}  // namespace

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  const int result = RUN_ALL_TESTS();
  const ::testing::UnitTest& unit = *::testing::UnitTest::GetInstance();
  if (result != 0) return result;
  if (unit.skipped_test_count() > 0) {
    std::printf("%d of %d tests skipped\n", unit.skipped_test_count(), unit.test_to_run_count());
    if (unit.successful_test_count() == 0) return kAllSkipped;
  }
  return 0;
}

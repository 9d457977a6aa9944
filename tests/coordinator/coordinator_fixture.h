// The base of the Coordinator's unit fixtures: a Coordinator over a JobStore in a temporary
// directory, both on fake clocks the test moves. A subclass says how the Coordinator is
// configured (Options) and adds its own helpers.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include <gtest/gtest.h>

#include "coordinator/coordinator.h"
#include "tests/testing/temp_dir.h"

namespace mat::coordinator {

class CoordinatorFixture : public ::testing::Test {
 protected:
  // temp_prefix names the temporary directory (e.g. "mat_coordinator").
  explicit CoordinatorFixture(const char* temp_prefix) : tmp_(temp_prefix) {}

  void SetUp() override {
    ASSERT_TRUE(tmp_.ok()) << "cannot create a temporary directory";
    dir_ = tmp_.path();
    Open();
  }

  void TearDown() override { coordinator_.reset(); }

  // The Coordinator's options for every Open.
  virtual CoordinatorOptions Options() = 0;

  // (Re)opens the store (on now_) under dir_/state and a Coordinator over it with Options().
  void Open() {
    coordinator_.reset();
    JobStoreOptions store_options;
    store_options.now_unix_seconds = [this] { return now_; };
    auto store = JobStore::Open(dir_ + "/state", store_options);
    ASSERT_TRUE(store.ok()) << store.status();
    auto coordinator = Coordinator::Create(std::move(*store), Options());
    ASSERT_TRUE(coordinator.ok()) << coordinator.status();
    coordinator_ = std::move(*coordinator);
  }

  tests::TempDir tmp_;  // outlives the members below
  std::string dir_;
  int64_t now_ = 1'700'000'000;
  std::unique_ptr<Coordinator> coordinator_;
};

}  // namespace mat::coordinator

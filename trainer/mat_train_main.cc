// mat-train: MAT in one process. Parses flags into TrainConfig, runs the Trainer, prints the
// summary. Exit codes: 0 done, 2 bad input (config, data, an empty --out, an --out holding an
// earlier run without --resume or --overwrite, or with --resume but no checkpoint, a checkpoint
// --resume cannot load), 1 failure while training or --out in use by another mat-train
// (OUT/LOCK, held while it runs).
#include <unistd.h>

#include <csignal>
#include <iostream>

#include "CLI/CLI.hpp"
#include "absl/strings/str_join.h"
#include "common/allocator.h"
#include "common/file_util.h"
#include "common/logging.h"
#include "common/status.h"
#include "config/train_config.h"
#include "trainer/trainer.h"

int main(int argc, char** argv) {
  CLI::App app{"mat-train: Modular Adaptive Training of a model in one process"};
  std::string config_path, out_dir, log_level = "info";
  std::vector<std::string> sets;
  bool resume = false, overwrite = false, log_json = false, no_progress = false,
       print_config = false;
  app.add_option("--config", config_path, "job YAML (model, data, train, policy, seed)")->required();
  app.add_option("--set", sets, "override a key: --set policy.kind=full (repeatable)");
  app.add_option("--out", out_dir, "output directory (metrics.jsonl, decisions.jsonl, summary.json)")->required();
  auto* resume_flag =
      app.add_flag("--resume", resume, "continue from OUT/checkpoint.pt (OUT without an earlier run: start afresh)");
  app.add_flag("--overwrite", overwrite,
               "replace an earlier run's outputs in OUT (refused without it or --resume)")
      ->excludes(resume_flag);
  app.add_option("--log-level", log_level, "trace, debug, info, warn or error")
      ->check(CLI::IsMember({"trace", "debug", "info", "warn", "error"}))
      ->capture_default_str();
  app.add_flag("--log-json", log_json, "JSON log lines");
  app.add_flag("--no-progress", no_progress, "no progress bar even on a terminal");
  app.add_flag("--print-config", print_config, "print every key with its value and exit");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;  // --help: 0; a bad flag: 2, as a bad config
  }
  mat::common::ConfigureAllocatorForTraining();
  mat::common::InitLogging(log_level, log_json);

  auto config = mat::config::LoadTrainConfig(config_path);
  if (!config.ok()) {
    std::cerr << "mat-train: " << config.status().message() << "\n";
    return 2;
  }
  for (const auto& s : sets) {
    absl::Status st = mat::config::ApplyOverride(*config, s);
    if (!st.ok()) {
      std::cerr << "mat-train: " << st.message() << "\n";
      return 2;
    }
  }
  if (print_config) {
    // The config as it would run: one that would not run is not printed as if it would.
    if (absl::Status valid = mat::config::ValidateTrainConfig(*config); !valid.ok()) {
      std::cerr << "mat-train: " << valid.message() << "\n";
      return 2;
    }
    std::cout << mat::config::FormatConfigYaml(*config);
    return 0;
  }
  if (out_dir.empty()) {
    // An unset $OUT would train and keep nothing.
    std::cerr << "mat-train: --out is empty: name the directory for the run's outputs\n";
    return 2;
  }
  // One run per directory: two at once would interleave their logs and checkpoints.
  if (absl::Status made = mat::common::MakeDirs(out_dir); !made.ok()) {
    std::cerr << "mat-train: " << made.message() << "\n";
    return 2;
  }
  absl::StatusOr<int> lock = mat::common::LockDirectory(out_dir, "mat-train");
  if (!lock.ok()) {
    std::cerr << "mat-train: " << lock.status().message() << "\n";
    return 1;
  }
  // A mistaken rerun must not delete the run that is there: a fresh run replaces its logs,
  // checkpoints and model, so it takes --overwrite.
  if (!resume && !overwrite) {
    if (const std::vector<std::string> earlier = mat::trainer::EarlierRunOutputs(out_dir);
        !earlier.empty()) {
      std::cerr << "mat-train: " << out_dir << " holds an earlier run ("
                << absl::StrJoin(earlier, ", ")
                << "): --resume continues it, --overwrite replaces it, or choose another --out\n";
      return 2;
    }
  }
  // --resume with nothing to resume from would start afresh and replace the earlier run's files.
  if (resume && !mat::trainer::HasCheckpoint(out_dir)) {
    if (const std::vector<std::string> earlier = mat::trainer::EarlierRunOutputs(out_dir);
        !earlier.empty()) {
      std::cerr << "mat-train: " << out_dir << " holds an earlier run ("
                << absl::StrJoin(earlier, ", ")
                << ") but no checkpoint (checkpoint.pt or checkpoint.pt.prev) for --resume to "
                   "continue it from: --overwrite replaces it, or choose another --out\n";
      return 2;
    }
  }
  mat::trainer::TrainerOptions options;
  options.out_dir = out_dir;
  options.resume = resume;
  options.progress_bar = !no_progress && ::isatty(STDERR_FILENO);
  auto trainer = mat::trainer::Trainer::Create(*config, options);
  if (!trainer.ok()) {
    std::cerr << "mat-train: " << trainer.status().message() << "\n";
    return 2;
  }
  spdlog::info("mat-train: policy {} on {} modules, {} steps, out {}", config->policy.kind,
               (*trainer)->partition().size(), config->train.steps, out_dir);
  auto summary = (*trainer)->Run();
  if (!summary.ok()) {
    std::cerr << "mat-train: " << summary.status().message() << "\n";
    return (*trainer)->prepared() ? 1 : 2;  // not prepared: --out's checkpoint is unusable
  }
  std::cout << summary->dump(2) << std::endl;
  return 0;
}

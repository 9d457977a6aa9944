// Job specs as YAML (DESIGN §7): the file a user submits maps onto mat.v1.JobSpec key for key.
//
// The YAML format is mat-train's config (config/train_config.h: `seed` and the sections `model`,
// `data`, `train`, `policy`) plus the job-only keys (JobOnlyKeys): a `resources` section and
// policy.rand_schedule_job (a stored MAT job whose decisions a rand, frozen-random or inverse
// job replays):
//
//   seed: 1
//   model: {kind: bert, layers: 2, ...}
//   ...
//   resources: {workers: 2, device: cpu}
//
// The schema is the proto itself (read through protobuf reflection): a section is a message field
// of JobSpec, a key is a scalar field of that message, with its name. The trainer's keys are
// config/train_config.h's (TrainConfig), where their defaults and range checks are defined once:
// JobSpecDefaults() and ValidateJobSpec() read them from there. A key added to TrainConfig is
// added to job.proto with the same name; a test checks that the two key sets agree
// (JobSpecKeys() minus JobOnlyKeys() equals TrainConfig's keys minus TrainerOnlyKeys()).
//
// Parsing sets exactly the keys present (proto3 `optional`: unset = default), so a spec keeps
// what the user wrote; WithJobSpecDefaults fills in the rest. Errors are INVALID_ARGUMENT and name
// the key: "job.yaml: model.layres: unknown key", "job.yaml: train.steps: '2.5' is not an
// integer", "policy.alpha must be in [0,1], got 1.5".
//
// Thread-safety: pure functions; safe from any thread.
#pragma once

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "mat/v1/job.pb.h"

namespace mat::api {

// Parses job YAML text. `origin` (a file name, "request") prefixes every message. An empty
// document is an empty spec. INVALID_ARGUMENT for text that is not YAML, a top level that is not a
// mapping, an unknown key, a duplicate key, a section that is not a mapping, or a value that is
// not a scalar of the key's type (integers must be integral and in range; seed is non-negative;
// booleans are YAML booleans; a null value is an error). Range checks are ValidateJobSpec's.
absl::StatusOr<v1::JobSpec> ParseJobSpecYaml(const std::string& yaml, const std::string& origin);

// Reads and parses a job YAML file; messages start with `path`. NOT_FOUND when it cannot be read;
// INVALID_ARGUMENT for a file with no key (empty, or comments only).
absl::StatusOr<v1::JobSpec> LoadJobSpecYaml(const std::string& path);

// A spec with every field set to its default: TrainConfig's defaults (config/train_config.h),
// resources {workers: 1, device: cpu, max_train_seconds: 0 (no limit)} and
// policy.rand_schedule_job "" (no replay).
v1::JobSpec JobSpecDefaults();

// `spec` with every unset field set to its default (set fields are kept as they are).
v1::JobSpec WithJobSpecDefaults(const v1::JobSpec& spec);

// Range and cross-field checks on WithJobSpecDefaults(spec): config::ValidateTrainConfig on the
// trainer config the spec becomes (the same rules and messages a worker applies, so the
// coordinator rejects a job before a worker would: "train.lr must be a finite number, got inf"),
// and on the job-only keys:
//   - resources.workers >= 1; resources.device is "cpu" or "cuda";
//     resources.max_train_seconds is finite and >= 0;
//   - train.batch_size is a multiple of resources.workers (each rank takes
//     batch_size / workers samples per step) and policy.probe_samples <= that per-rank batch
//     (each rank probes the first samples of its own batch);
//   - policy.rand_schedule_job is "" unless policy.kind is rand, frozen-random or inverse
//     (whether the job it names exists,
//     ran policy mat and succeeded is Coordinator::SubmitJob's check: it needs the store).
// OK or INVALID_ARGUMENT naming the first bad key.
absl::Status ValidateJobSpec(const v1::JobSpec& spec);

// YAML text of the keys set in `spec` (unset keys are omitted; a present but empty section is
// written as `name: {}`). ParseJobSpecYaml(JobSpecToYaml(s)) equals s field for field, doubles
// bit for bit (shortest round-trip form; NaN and infinities as .nan, .inf, -.inf).
std::string JobSpecToYaml(const v1::JobSpec& spec);

// The same without the job-only keys (the `resources` section, policy.rand_schedule_job): the
// config text mat-train's ParseTrainConfig reads. Pass WithJobSpecDefaults(spec) to hand a
// trainer every value explicitly.
std::string JobSpecToTrainerYaml(const v1::JobSpec& spec);

// Every key of the schema as "section.key" (or "seed"), in proto field order.
std::vector<std::string> JobSpecKeys();
// The keys of JobSpecKeys() that mat-train's schema does not have (resources.*,
// policy.rand_schedule_job), in proto field order; JobSpecToTrainerYaml leaves them out.
std::vector<std::string> JobOnlyKeys();
// The TrainConfig keys a job spec does not carry: train.device (the worker's --device sets it)
// and policy.rand_schedule (a file on the trainer's machine; a job names a stored job instead,
// policy.rand_schedule_job).
std::vector<std::string> TrainerOnlyKeys();

// ----- admission limits (issue 6, "Security"; mat-coordinator's --data-root and --max-* flags) --

// The vocabulary size EstimateModelParams assumes: the vocabulary is built from the corpus on the
// worker, so the coordinator cannot know it; this bounds the corpora the service is meant for
// (WikiText-2: 33,278 types plus the specials; WikiText-103: 267,735 would need a larger limit).
inline constexpr int64_t kAssumedVocabSize = 50000;

// Parameters of the model `spec` describes (after WithJobSpecDefaults), count. bert and switch,
// for a vocabulary of `vocab_size` ids (trainer/models/bert.h: token and position embeddings, per layer
// the attention projections with biases, the FFN with biases (model.kind switch: in its Switch
// layers `experts` such FFNs and the router) and two LayerNorms, the MLM head's
// dense layer, LayerNorm and decoder bias; the decoder is tied to the token embedding). vgg
// (trainer/models/vgg.h; `vocab_size` unused): per conv layer of configuration A (vgg11) or D (vgg16)
// with max(1, round(c · width)) channels, the 3x3 kernel without bias and the BatchNorm scale and
// shift, on 1 input channel (fashion-mnist) or 3 (cifar10); then the classifier's linear
// layer(s) with biases to 10 classes. Computed in double so absurd shapes do not overflow. An
// estimate of the layout above: meant for an admission limit, not for accounting.
double EstimateModelParams(const v1::JobSpec& spec, int64_t vocab_size = kAssumedVocabSize);

struct JobSpecLimits {
  // data.dir must lie under one of these (common/path_util.h CheckUnderRoots: absolute paths
  // only, `..` and symlink escapes refused); empty = any path (a trusted single host).
  std::vector<std::string> data_roots;
  // Largest spec accepted, bytes of its serialized mat.v1.JobSpec as received; 0 = no limit.
  int64_t max_spec_bytes = 64 * 1024;
  // Largest model accepted, EstimateModelParams(spec) parameters; 0 = no limit.
  double max_model_params = 1e9;
};

// The admission checks of `limits` on a spec as submitted (`spec`, whose size is measured) and
// with its defaults filled in (for data.dir and the model shape):
//   - spec too large: INVALID_ARGUMENT "job spec is 70000 bytes; the limit is 65536
//     (--max-spec-bytes)";
//   - data.dir outside the roots: INVALID_ARGUMENT "data.dir: '/etc' is not under a data root
//     (/data) (--data-root)";
//   - model too large: RESOURCE_EXHAUSTED "model has about 2.1e+09 parameters (layers 48,
//     d_model 2048, ...; vocabulary assumed 50000); the limit is 1e+09 (--max-model-params)"; for
//     vgg "model has about 2.1e+09 parameters (vgg16, width 64, classifier_hidden 0); ...".
// OK otherwise.
absl::Status CheckJobSpecLimits(const v1::JobSpec& spec, const JobSpecLimits& limits);

}  // namespace mat::api

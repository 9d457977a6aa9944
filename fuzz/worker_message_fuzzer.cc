// libFuzzer target: the coordinator's handling of worker messages (Coordinator::
// HandleWorkerMessage, the domain behind WorkerService.Session). The process keeps one
// Coordinator on a temporary state dir with two connected workers running a 2-rank MAT job whose
// modules are declared; each input is decoded as a mat.v1.WorkerMessage (protobuf bytes; inputs
// that do not decode are skipped) and handed to the coordinator as if one of the workers sent it.
// Whatever it says (NaN λ, wrong ranks, stale versions, unknown jobs, huge steps), the coordinator
// must answer with a status and stay consistent — never crash. Every 200 inputs it starts over
// with a fresh job so the fuzzer keeps reaching the running-job paths.
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>

#include "coordinator/coordinator.h"
#include "api/job_spec.h"
#include "coordinator/job_store.h"
#include "google/protobuf/stubs/logging.h"
#include "spdlog/spdlog.h"

namespace {

using mat::coordinator::Coordinator;

class NullChannel : public mat::coordinator::WorkerChannel {
 public:
  void Send(const mat::v1::CoordinatorMessage&) override {}
  void Close(const absl::Status&) override {}
};

struct World {
  std::unique_ptr<Coordinator> coordinator;
  std::string worker[2];
  std::string job;
  int inputs = 0;
};

void Must(bool ok) {
  if (!ok) std::abort();
}

std::unique_ptr<World> MakeWorld() {
  static std::string dir;
  static int generation = 0;
  if (dir.empty()) {
    spdlog::set_level(spdlog::level::off);  // the refusals are the point; their logs are noise
    // Inputs with invalid UTF-8 in string fields do not decode; protobuf would log each one.
    google::protobuf::SetLogHandler(nullptr);
    char tmpl[] = "/tmp/mat_fuzz_worker_XXXXXX";
    Must(::mkdtemp(tmpl) != nullptr);
    dir = tmpl;
  }
  auto world = std::make_unique<World>();
  auto store = mat::coordinator::JobStore::Open(dir + "/state" + std::to_string(generation++));
  Must(store.ok());
  mat::coordinator::CoordinatorOptions options;
  int64_t clock_ms = 0;
  options.now_ms = [clock_ms]() mutable { return clock_ms += 1; };
  auto coordinator = Coordinator::Create(std::move(*store), options);
  Must(coordinator.ok());
  world->coordinator = std::move(*coordinator);
  for (int i = 0; i < 2; ++i) {
    mat::v1::RegisterRequest r;
    r.mutable_capabilities()->set_device("cpu");
    r.mutable_capabilities()->set_host("127.0.0.1");
    r.mutable_capabilities()->set_rendezvous_port(29500 + i);
    const std::string secret(64, static_cast<char>('0' + i));  // well formed, one per worker
    auto reply = world->coordinator->RegisterWorker(r, secret);
    Must(reply.ok());
    world->worker[i] = reply->worker_id();
    mat::v1::WorkerMessage hello;
    hello.set_worker_id(world->worker[i]);
    hello.mutable_heartbeat();
    Must(world->coordinator->OpenSession(hello, std::make_shared<NullChannel>()).ok());
  }
  auto spec = mat::api::ParseJobSpecYaml(
      "train: {steps: 100, batch_size: 8}\n"
      "policy: {kind: mat, probe_every: 10, warmup_steps: 10, probe_samples: 2}\n"
      "resources: {workers: 2}\n",
      "fuzz");
  Must(spec.ok());
  auto submitted = world->coordinator->SubmitJob("", *spec);
  Must(submitted.ok());
  world->job = submitted->job_id();
  mat::v1::WorkerMessage modules;
  modules.set_worker_id(world->worker[0]);
  modules.mutable_modules()->set_job_id(world->job);
  for (int i = 0; i < 4; ++i) {
    mat::v1::ModuleDescriptor* m = modules.mutable_modules()->add_modules();
    m->set_name("layer0.head" + std::to_string(i));
    m->set_group("heads");
    m->set_layer(0);
    m->set_index(i);
  }
  // Rank 0 is the first worker when the job started; declare from whichever holds rank 0.
  if (!world->coordinator->HandleWorkerMessage(modules).ok()) {
    modules.set_worker_id(world->worker[1]);
    (void)world->coordinator->HandleWorkerMessage(modules);
  }
  return world;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static std::unique_ptr<World> world;
  if (world == nullptr || world->inputs >= 200) world = MakeWorld();
  ++world->inputs;
  mat::v1::WorkerMessage message;
  if (!message.ParseFromArray(data, static_cast<int>(size))) return 0;
  // Mostly speak as one of the two workers (the interesting paths), sometimes as anyone.
  if (!message.worker_id().empty() && message.worker_id().size() % 4 != 0) {
    message.set_worker_id(world->worker[message.worker_id().size() % 2]);
  }
  // Point job-bearing bodies at the running job half of the time.
  if (size % 2 == 0) {
    switch (message.body_case()) {
      case mat::v1::WorkerMessage::kSpectra: message.mutable_spectra()->set_job_id(world->job); break;
      case mat::v1::WorkerMessage::kProgress: message.mutable_progress()->set_job_id(world->job); break;
      case mat::v1::WorkerMessage::kMaskAck: message.mutable_mask_ack()->set_job_id(world->job); break;
      case mat::v1::WorkerMessage::kModules: message.mutable_modules()->set_job_id(world->job); break;
      case mat::v1::WorkerMessage::kDone: message.mutable_done()->set_job_id(world->job); break;
      default: break;
    }
  }
  (void)world->coordinator->HandleWorkerMessage(message);
  (void)world->coordinator->GetJob(world->job);
  (void)world->coordinator->ListWorkers();
  world->coordinator->CheckHeartbeats();
  return 0;
}

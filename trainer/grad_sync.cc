// ProcessGroupGloo.hpp and ProcessGroupNCCL.hpp declare their API only under these macros (set
// by LibTorch's own build, not by its CMake config).
#ifdef MAT_WITH_GLOO
#define USE_C10D_GLOO 1
#endif
#ifdef MAT_WITH_NCCL
#define USE_C10D_NCCL 1
#endif
#include "trainer/grad_sync.h"

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef MAT_WITH_GLOO
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#endif
#ifdef MAT_WITH_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <thread>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/net_util.h"
#include "common/status.h"

namespace mat::trainer {

std::vector<std::string> AvailableBackends() {
  std::vector<std::string> b;
#ifdef MAT_WITH_GLOO
  b.push_back("gloo");
#endif
#ifdef MAT_WITH_NCCL
  b.push_back("nccl");
#endif
  return b;
}

namespace {

bool Contains(const std::vector<std::string>& v, const std::string& x) {
  return std::find(v.begin(), v.end(), x) != v.end();
}

absl::Status NotInBuild(const std::string& backend, const std::vector<std::string>& available,
                        const std::string& why = "") {
  return absl::InvalidArgumentError(absl::StrCat(
      why, "process group backend '", backend, "' is not in this build (it has: ",
      absl::StrJoin(available, ", "), "); gloo needs libgloo-dev, nccl a CUDA LibTorch"));
}

}  // namespace

std::string DeviceKey(const std::string& host, const torch::Device& device,
                      const char* cuda_visible_devices) {
  if (!device.is_cuda()) return absl::StrCat(host, " ", device.str());
  const int index = device.has_index() ? device.index() : 0;
  std::string id = std::to_string(index);
  if (cuda_visible_devices != nullptr && *cuda_visible_devices != '\0') {
    std::vector<std::string> visible = absl::StrSplit(cuda_visible_devices, ',');
    if (index < int(visible.size())) id = std::string(absl::StripAsciiWhitespace(visible[index]));
  }
  return absl::StrCat(host, " cuda:", id);
}

absl::StatusOr<std::string> ResolveBackend(const std::string& requested,
                                           const std::vector<std::string>& rank_devices,
                                           const std::vector<std::string>& available) {
  if (requested != "auto") {
    if (!Contains(available, requested)) return NotInBuild(requested, available);
    return requested;
  }
  bool any_cpu = false;
  std::string shared;  // "ranks A and B both compute on 'KEY'"
  for (size_t a = 0; a < rank_devices.size(); ++a) {
    if (rank_devices[a].find(" cuda:") == std::string::npos) any_cpu = true;
    for (size_t b = a + 1; b < rank_devices.size() && shared.empty(); ++b) {
      if (rank_devices[a] == rank_devices[b]) {
        shared = absl::StrCat("ranks ", a, " and ", b, " both compute on '", rank_devices[a], "'");
      }
    }
  }
  if (!any_cpu && shared.empty() && Contains(available, "nccl")) return std::string("nccl");
  if (Contains(available, "gloo")) return std::string("gloo");
  const std::string why =
      any_cpu ? "a rank computes on the CPU, which NCCL cannot reduce, and "
              : !shared.empty() ? absl::StrCat(shared, ", which NCCL refuses, and ") : "";
  return NotInBuild("gloo", available, why);
}

absl::StatusOr<c10::intrusive_ptr<CollectiveGroup>> ConnectProcessGroup(
    const RendezvousOptions& o) {
  const std::vector<std::string> backends = AvailableBackends();
  if (o.backend != "auto") {  // a named backend needs no other rank's device to check
    if (absl::StatusOr<std::string> b = ResolveBackend(o.backend, {}, backends); !b.ok()) {
      return b.status();
    }
  }
  if (o.world_size < 1 || o.rank < 0 || o.rank >= o.world_size) {
    return absl::InvalidArgumentError(
        absl::StrCat("rank ", o.rank, " is not in [0, world_size ", o.world_size, ")"));
  }
  if (o.master_port < 1 || o.master_port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("rendezvous port ", o.master_port, " is not in 1..65535"));
  }
  const std::string where = absl::StrCat(o.master_host, ":", o.master_port);
  const auto deadline = std::chrono::steady_clock::now() + o.timeout;
  if (o.cancelled && o.cancelled()) {
    return absl::CancelledError(absl::StrCat("cancelled before the rendezvous at ", where));
  }
  if (o.rank != 0) {
    // TCPStore's client constructor retries its connect until the timeout and cannot be
    // stopped: a rank whose job was cancelled, or whose rank 0 is gone, sat there for the whole
    // timeout (120 s by default) and took no other job meanwhile. Wait for rank 0's store to
    // listen here instead, where a cancel is seen within 50 ms.
    const absl::Status up =
        common::WaitForListener(o.master_host, o.master_port, deadline, o.cancelled);
    if (up.code() == absl::StatusCode::kCancelled) {
      return absl::CancelledError(
          absl::StrCat("cancelled while waiting for rank 0's store at ", where));
    }
    if (!up.ok()) {
      return absl::UnavailableError(absl::StrCat(
          "cannot form the process group of ", o.world_size, " ranks at ", where, " as rank ",
          o.rank, ": ", up.message(), " within ", o.timeout.count() / 1000.0, " s"));
    }
  }
  try {
    c10d::TCPStoreOptions store_options;
    store_options.port = static_cast<uint16_t>(o.master_port);
    store_options.isServer = o.rank == 0;
    store_options.numWorkers = static_cast<size_t>(o.world_size);
    store_options.waitWorkers = false;  // counted below, so the wait can be cancelled
    store_options.timeout = o.timeout;
    auto store = c10::make_intrusive<c10d::TCPStore>(o.master_host, store_options);
    auto prefixed = c10::make_intrusive<c10d::PrefixStore>(o.prefix, store);
    int64_t joined = prefixed->add("mat/joined", 1);
    while (joined < o.world_size) {
      if (o.cancelled && o.cancelled()) {
        return absl::CancelledError(absl::StrCat("cancelled while waiting for the other ranks at ",
                                                 where));
      }
      if (std::chrono::steady_clock::now() > deadline) {
        return absl::UnavailableError(absl::StrCat(
            "only ", joined, " of ", o.world_size, " ranks reached the rendezvous at ", where,
            " within ", o.timeout.count() / 1000.0, " s"));
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      joined = prefixed->add("mat/joined", 0);
    }
    std::string backend = o.backend;
    if (backend == "auto") {
      // Every rank publishes its device, reads all of them, and resolves the same answer.
      char host[256] = {};
      gethostname(host, sizeof(host) - 1);
      const std::string mine = DeviceKey(host, o.device, std::getenv("CUDA_VISIBLE_DEVICES"));
      prefixed->set(absl::StrCat("mat/device/", o.rank), std::vector<uint8_t>(mine.begin(), mine.end()));
      std::vector<std::string> keys;
      for (int r = 0; r < o.world_size; ++r) {
        const std::vector<uint8_t> v = prefixed->get(absl::StrCat("mat/device/", r));
        keys.emplace_back(v.begin(), v.end());
      }
      absl::StatusOr<std::string> resolved = ResolveBackend("auto", keys, backends);
      if (!resolved.ok()) return resolved.status();
      backend = *resolved;
    }
    c10::intrusive_ptr<CollectiveGroup> group;
#ifdef MAT_WITH_NCCL
    if (backend == "nccl") {
      auto options = c10d::ProcessGroupNCCL::Options::create();
      options->timeout = o.timeout;
      group = c10::make_intrusive<c10d::ProcessGroupNCCL>(prefixed, o.rank, o.world_size, options);
    }
#endif
#ifdef MAT_WITH_GLOO
    if (backend == "gloo") {
      auto options = c10d::ProcessGroupGloo::Options::create(o.timeout);
      options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(
          o.local_host.empty() ? o.master_host : o.local_host));
      options->threads = 2;
      group = c10::make_intrusive<c10d::ProcessGroupGloo>(prefixed, o.rank, o.world_size, options);
      // Gloo's constructor returns on a rank once its own pairs are made, while another rank may
      // still be connecting to it: a rank that then dropped its group at once made that rank's
      // connect fail with "Connection closed by peer". The barrier makes OK mean every rank is in.
      group->barrier()->wait();
    }
#endif
    return group;
  } catch (const std::exception& e) {
    return absl::UnavailableError(absl::StrCat("cannot form the process group of ", o.world_size,
                                               " ranks at ", where, " as rank ", o.rank, ": ",
                                               e.what()));
  }
}

GradientSync::GradientSync(c10::intrusive_ptr<CollectiveGroup> group,
                           std::vector<ParamEntry> params, int64_t bucket_bytes)
    : group_(std::move(group)), params_(std::move(params)), bucket_bytes_(bucket_bytes) {
  MAT_CHECK(group_) << "GradientSync needs a process group";
  MAT_CHECK(bucket_bytes_ > 0) << "bucket_bytes must be positive";
  for (size_t i = 0; i < params_.size(); ++i) {
    const std::vector<ParamSegment> segments = params_[i].Segments();
    for (const ParamSegment& s : segments) {
      num_modules_ = std::max(num_modules_, s.module + 1);
      pieces_.push_back({i, s.begin, s.end, s.module, segments.size() == 1});
    }
  }
  // Shared rows first, then modules in index order; the order of `params` within each.
  std::stable_sort(pieces_.begin(), pieces_.end(),
                   [](const Piece& a, const Piece& b) { return a.module < b.module; });
}

int GradientSync::world_size() const { return group_->getSize(); }

int64_t GradientSync::PieceBytes(const Piece& p) const {
  const torch::Tensor& t = params_[p.entry].param;
  const int64_t row = t.dim() == 0 ? 1 : t.numel() / std::max<int64_t>(t.size(0), 1);
  return row * (p.end - p.begin) * int64_t(t.element_size());
}

int64_t GradientSync::BytesFor(const std::vector<uint8_t>& active) const {
  int64_t bytes = 0;
  for (const Piece& p : pieces_) {
    if (p.module >= 0 && (size_t(p.module) >= active.size() || !active[p.module])) continue;
    bytes += PieceBytes(p);
  }
  return bytes;
}

absl::StatusOr<int64_t> GradientSync::AgreeMin(int64_t value) {
  // On the parameters' device: NCCL reduces CUDA tensors only.
  const torch::Device device = params_.empty() ? torch::Device(torch::kCPU) : params_[0].param.device();
  torch::Tensor t = torch::full({1}, value, torch::TensorOptions().dtype(torch::kInt64).device(device));
  try {
    std::vector<torch::Tensor> tensors{t};
    c10d::AllreduceOptions options;
    options.reduceOp = c10d::ReduceOp::MIN;
    group_->allreduce(tensors, options)->wait();
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("all-reduce (min) failed: ", e.what()));
  }
  return t.cpu().item<int64_t>();
}

absl::Status GradientSync::AverageTensors(const std::vector<torch::Tensor>& tensors) {
  if (tensors.empty()) return absl::OkStatus();
  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> flat_parts;
  for (const torch::Tensor& t : tensors) flat_parts.push_back(t.detach().reshape({-1}).to(torch::kFloat64));
  torch::Tensor flat = torch::cat(flat_parts);
  try {
    std::vector<torch::Tensor> list{flat};
    group_->allreduce(list)->wait();  // sum
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("all-reduce (buffers) failed: ", e.what()));
  }
  flat.div_(double(group_->getSize()));
  int64_t offset = 0;
  for (const torch::Tensor& t : tensors) {
    const int64_t n = t.numel();
    torch::Tensor(t).copy_(flat.slice(0, offset, offset + n).view(t.sizes()));
    offset += n;
  }
  return absl::OkStatus();
}

absl::StatusOr<int> GradientSync::AllReduce(const std::vector<uint8_t>& active,
                                            bool loss_finite) {
  if (active.size() != size_t(num_modules_)) {
    return absl::InvalidArgumentError(absl::StrCat("mask has ", active.size(), " modules, the ",
                                                   "model ", num_modules_));
  }
  torch::NoGradGuard no_grad;
  struct Bucket {
    std::vector<torch::Tensor> grads;  // views of the parameters' .grad()
    int64_t numel = 0;
    torch::Tensor flat;
  };
  std::vector<Bucket> buckets(1);
  int64_t skipped = 0;
  int previous_module = -2;
  for (const Piece& piece : pieces_) {
    ParamEntry& p = params_[piece.entry];
    const int64_t bytes = PieceBytes(piece);
    if (piece.module >= 0 && !active[piece.module]) {
      skipped += bytes;
      continue;
    }
    torch::Tensor& grad = p.param.mutable_grad();
    if (!grad.defined()) {
      if (piece.module >= 0) {
        return absl::FailedPreconditionError(absl::StrCat(
            "active module ", piece.module, " parameter ", p.name, " has no gradient"));
      }
      grad = torch::zeros_like(p.param);
    }
    // A bucket closes only between modules (or before the first module).
    const bool boundary = piece.module != previous_module;
    if (boundary && buckets.back().numel * int64_t(p.param.element_size()) >= bucket_bytes_) {
      buckets.emplace_back();
    }
    previous_module = piece.module;
    torch::Tensor rows = piece.whole ? grad : grad.narrow(0, piece.begin, piece.end - piece.begin);
    buckets.back().numel += rows.numel();
    buckets.back().grads.push_back(std::move(rows));
  }
  // The last bucket (or a bucket of its own when nothing else is reduced) carries one more
  // element: 1 where this rank's loss is not finite, summed over the ranks.
  Bucket* counted = nullptr;
  for (Bucket& b : buckets) {
    if (!b.grads.empty()) counted = &b;
  }
  if (counted == nullptr) counted = &buckets.back();
  const torch::TensorOptions count_options =
      !counted->grads.empty() ? counted->grads.front().options()
      : params_.empty()       ? torch::TensorOptions(torch::kFloat)
                              : params_.front().param.options();
  const double world = group_->getSize();
  int not_finite = 0;
  try {
    std::vector<c10::intrusive_ptr<c10d::Work>> work;
    for (Bucket& b : buckets) {
      if (b.grads.empty() && &b != counted) continue;
      std::vector<torch::Tensor> flat_views;
      for (const torch::Tensor& g : b.grads) flat_views.push_back(g.reshape({-1}));
      if (&b == counted) flat_views.push_back(torch::full({1}, loss_finite ? 0.0 : 1.0, count_options));
      b.flat = torch::cat(flat_views);
      std::vector<torch::Tensor> tensors{b.flat};
      work.push_back(group_->allreduce(tensors));
      stats_.bytes_reduced += b.numel * int64_t(b.flat.element_size());
      if (!b.grads.empty()) ++stats_.buckets;
    }
    for (auto& w : work) w->wait();
    not_finite = static_cast<int>(std::lround(counted->flat[-1].item<double>()));
    for (Bucket& b : buckets) {
      if (b.grads.empty()) continue;
      b.flat.div_(world);
      int64_t offset = 0;
      for (torch::Tensor& g : b.grads) {
        g.copy_(b.flat.narrow(0, offset, g.numel()).view_as(g));
        offset += g.numel();
      }
    }
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("gradient all-reduce failed: ", e.what()));
  }
  stats_.bytes_skipped += skipped;
  ++stats_.steps;
  return not_finite;
}

}  // namespace mat::trainer

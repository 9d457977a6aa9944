// Data parallelism for mat-worker: the job's c10d process group (TCPStore rendezvous +
// ProcessGroupGloo for CPU tensors, ProcessGroupNCCL for CUDA tensors) and gradient averaging in
// module-aligned buckets that skip masked-off modules.
//
// Which backends a build has: Gloo where its headers were found (Debian: libgloo-dev;
// MAT_WITH_GLOO), NCCL where LibTorch is a CUDA build and nccl.h was found (MAT_WITH_NCCL).
//
// Buckets: every step the gradients to reduce are laid out in one fixed order: the parameters
// outside any module (embeddings, layer norms, biases of unsliced maps, the decoder) first, then
// the active modules' gradient rows (whole leaves, or their row segments of a layer's split
// tensor: ParamEntry::Segments) in module order. They are packed into flat float buffers of at
// most `bucket_bytes` each (a bucket closes only at a module boundary, so a module is never split
// and a masked-off module costs no bytes), every bucket is all-reduced (sum) asynchronously, then
// divided by the world size and copied back. Every rank applies the same mask at the same step
// (the coordinator's), so every rank builds the same buckets in the same order.
//
// Thread-safety: not thread-safe; called from the training thread only. Not copyable.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/torch.h>
#include <torch/version.h>
#if TORCH_VERSION_MAJOR >= 2
#include <torch/csrc/distributed/c10d/Backend.hpp>
#endif

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "trainer/optim/optimizer.h"

namespace mat::trainer {

// What runs the collectives: LibTorch 2 splits the process group into a front and per-device
// backends (ProcessGroupGloo and ProcessGroupNCCL are Backends); in 1.13 they are ProcessGroups.
#if TORCH_VERSION_MAJOR >= 2
using CollectiveGroup = c10d::Backend;
#else
using CollectiveGroup = c10d::ProcessGroup;
#endif

// The backends this build has, e.g. {"gloo"} or {"nccl"}.
std::vector<std::string> AvailableBackends();

// Which GPU (or CPU) a rank computes on, as ResolveBackend compares them: "HOST cpu", or
// "HOST cuda:ID" where ID is the physical GPU, CUDA_VISIBLE_DEVICES's entry for the device's
// index when that variable is set (an index or a GPU-UUID), else the index ("cuda" = index 0).
// `host` names the machine (ConnectProcessGroup passes gethostname()).
std::string DeviceKey(const std::string& host, const torch::Device& device,
                      const char* cuda_visible_devices);

// The backend `requested` means for ranks whose DeviceKeys are `rank_devices` (rank r's at r),
// in a build with the backends `available`. "gloo" and "nccl" mean themselves; "auto" is:
//   - gloo when any rank computes on the CPU (NCCL reduces CUDA tensors only);
//   - nccl when every rank has a GPU of its own and the build has NCCL;
//   - gloo otherwise: two ranks on one GPU (NCCL refuses them: "Duplicate GPU detected"), or no
//     NCCL in the build. Gloo reduces CUDA tensors through host memory.
// INVALID_ARGUMENT when the answer is not in `available`, saying why, e.g. "ranks 0 and 1 both
// compute on 'node1 cuda:0', which NCCL refuses, and process group backend 'gloo' is not in this
// build (it has: nccl); ...". `rank_devices` is read for "auto" only.
absl::StatusOr<std::string> ResolveBackend(const std::string& requested,
                                           const std::vector<std::string>& rank_devices,
                                           const std::vector<std::string>& available);

struct RendezvousOptions {
  std::string master_host;  // rank 0's host, where it listens with the TCPStore
  int master_port = 0;      // 1..65535
  std::string local_host;   // the address this rank's Gloo transport binds to (e.g. 127.0.0.1)
  int rank = 0;
  int world_size = 1;
  // "gloo" (CPU or CUDA tensors), "nccl" (CUDA tensors, each rank on its own GPU) or "auto":
  // the ranks tell each other their DeviceKey through the store and ResolveBackend chooses.
  std::string backend = "auto";
  torch::Device device = torch::kCPU;  // where this rank's gradients live (auto's input)
  std::string prefix;       // keys namespace, e.g. "job-000003/attempt-0": attempts never mix
  std::chrono::milliseconds timeout{60000};  // rendezvous and every collective
  // Polled while waiting for the other ranks to join; true stops the wait with CANCELLED.
  std::function<bool()> cancelled;
};

// The job's process group: rank 0 starts the TCPStore server on master_port; every rank connects,
// counts itself in under `prefix`, waits until all world_size ranks did (polling `cancelled`),
// then builds the `backend`'s group over the same store (auto: every rank resolves the same
// backend from the same keys; the group's getBackendName() says which). UNAVAILABLE naming the
// address when the store cannot be reached or the ranks do not all arrive within `timeout`;
// CANCELLED when `cancelled` said so (polled from the start: also while a rank waits for rank
// 0's store to listen, so a cancelled rank never sits in TCPStore's own connect retries);
// INVALID_ARGUMENT for a bad rank/size/port or a backend this build lacks (for auto, on every
// rank: ResolveBackend's message).
// On OK every rank's group is connected (gloo: a barrier after the group is made), so a rank may
// drop its group at once without failing another's connect. NCCL connects lazily at the first
// collective; no barrier there (1.13's NCCL barrier guesses the device from the rank).
absl::StatusOr<c10::intrusive_ptr<CollectiveGroup>> ConnectProcessGroup(
    const RendezvousOptions& options);

struct GradSyncStats {
  int64_t steps = 0;            // AllReduce calls
  int64_t buckets = 0;          // buckets all-reduced, count
  int64_t bytes_reduced = 0;    // gradient bytes this rank put into all-reduces (the loss
                                // count's element not included)
  int64_t bytes_skipped = 0;    // gradient bytes of masked-off modules not sent
};

class GradientSync {
 public:
  // `params`: every trainable parameter with its module index (-1 = shared), as the optimizer
  // sees them (BuildParamEntries). `group` is shared with the caller. bucket_bytes > 0.
  GradientSync(c10::intrusive_ptr<CollectiveGroup> group, std::vector<ParamEntry> params,
               int64_t bucket_bytes = 16 << 20);
  GradientSync(const GradientSync&) = delete;
  GradientSync& operator=(const GradientSync&) = delete;

  // Averages the gradients of the shared parameters and of the modules with active[m] = 1 over
  // the ranks. A shared parameter without a gradient is reduced as zeros (and gets that
  // gradient). `loss_finite`: whether this rank's loss at this step is finite; the same
  // all-reduce (one more element in the last bucket) counts the ranks whose loss is not, so
  // every rank learns it at the same step instead of waiting for the failed rank in the next
  // collective. Returns that count (0 .. world size; when > 0 the averaged gradients are not
  // finite either and must not be applied). REQUIRES: active.size() == number of modules; every
  // active module's tensors have gradients. INTERNAL with the collective's error (e.g. a peer
  // gone, a timeout).
  absl::StatusOr<int> AllReduce(const std::vector<uint8_t>& active, bool loss_finite);

  // The minimum of `value` over the ranks (every rank calls it at the same point; e.g. the
  // newest checkpoint step every rank holds). INTERNAL with the collective's error.
  absl::StatusOr<int64_t> AgreeMin(int64_t value);
  // Replaces each of `tensors` (float32 or float64, on one device, e.g. BatchNorm running
  // statistics) by its mean over the ranks, in one all-reduce of their concatenation. Every
  // rank calls it at the same point with tensors of the same shapes, and afterwards holds the
  // same values. INTERNAL with the collective's error.
  absl::Status AverageTensors(const std::vector<torch::Tensor>& tensors);

  // Gradient bytes AllReduce(active, ...) puts into all-reduces (the count of non-finite losses
  // not included), without communicating.
  int64_t BytesFor(const std::vector<uint8_t>& active) const;

  const GradSyncStats& stats() const { return stats_; }
  int world_size() const;

 private:
  // Rows [begin, end) of params_[entry]'s gradient, reduced when `module` is -1 or active.
  struct Piece {
    size_t entry = 0;
    int64_t begin = 0, end = 0;
    int module = -1;
    bool whole = true;
  };
  int64_t PieceBytes(const Piece& p) const;

  c10::intrusive_ptr<CollectiveGroup> group_;
  std::vector<ParamEntry> params_;
  std::vector<Piece> pieces_;  // shared first, then by module
  int64_t bucket_bytes_;
  int num_modules_ = 0;
  GradSyncStats stats_;
};

}  // namespace mat::trainer

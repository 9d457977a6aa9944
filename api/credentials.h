// Client-side credentials shared by matctl (client/job_client.h) and mat-worker
// (worker/worker_agent.h): TLS channel credentials from PEM files and the token-file format of
// coordinator/auth.h. Thread-safety: pure functions; safe from any thread.
#pragma once

#include <memory>
#include <string>

#include <grpcpp/security/credentials.h>

#include "absl/status/statusor.h"

namespace mat::api {

struct TlsFiles {
  std::string ca_file;    // set: TLS, verifying the coordinator against this CA (PEM)
  std::string cert_file;  // with key_file: the client certificate (mutual TLS)
  std::string key_file;
};

// Insecure credentials without ca_file; INVALID_ARGUMENT when only one of cert/key is set, when
// they are set without a CA, or when a file holds no PEM data; errors name the flag
// (--tls-ca, --tls-cert, --tls-key) and the file.
absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> MakeChannelCredentials(
    const TlsFiles& files);

// The first token of a token file (one per line, blank lines and '#' comments skipped);
// NOT_FOUND naming an unreadable file, INVALID_ARGUMENT naming one without a token.
absl::StatusOr<std::string> ReadFirstToken(const std::string& path);

}  // namespace mat::api

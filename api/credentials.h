// Client-side credentials shared by matctl (client/job_client.h) and mat-worker
// (worker/worker_agent.h): TLS channel credentials from PEM files (ReadPemFile, which the
// coordinator's server credentials read too) and the token-file format of coordinator/auth.h. Thread-safety: pure functions; safe from any thread.
#pragma once

#include <memory>
#include <string>
#include <string_view>

#include <grpcpp/security/credentials.h>

#include "absl/status/statusor.h"

namespace mat::api {

// The metadata keys of the worker credentials (service.proto; lower case, as gRPC delivers
// keys): the join token all workers share and each worker's own secret. mat-worker sends them,
// the coordinator (coordinator/auth.h) reads them.
inline constexpr char kJoinTokenMetadataKey[] = "x-mat-join-token";
inline constexpr char kWorkerSecretMetadataKey[] = "x-mat-worker-secret";

struct TlsFiles {
  std::string ca_file;    // set: TLS, verifying the coordinator against this CA (PEM)
  std::string cert_file;  // with key_file: the client certificate (mutual TLS)
  std::string key_file;
};

// What to check when the coordinator closed the connection while it was being set up
// (gRPC: "Socket closed"), which is how a TLS mismatch looks from the client: "" for any other
// error. Without ca_file: the coordinator may serve TLS (give --tls-ca), or the address may be
// another port (its --metrics-listen HTTP port closes so too); with ca_file but without a
// client certificate: it may require mutual TLS (--tls-cert, --tls-key); with one: it may refuse
// that certificate (expired, signed by another CA).
std::string TlsMismatchHint(const TlsFiles& files, std::string_view error);

// The text of the PEM file `path` given as `flag`, which must hold a certificate or a private
// key: NOT_FOUND etc. naming the flag and file when it cannot be read, INVALID_ARGUMENT naming
// them when it holds no PEM data or not the kind asked for ("--tls-ca: 'k.pem' holds no
// certificate (it holds a private key: give the certificate's file)"). gRPC itself only says
// "Could not load any root certificate", then that the address list is empty.
enum class PemKind { kCertificate, kPrivateKey };
absl::StatusOr<std::string> ReadPemFile(const std::string& flag, const std::string& path,
                                        PemKind kind);

// Insecure credentials without ca_file; INVALID_ARGUMENT when only one of cert/key is set, when
// they are set without a CA, or when a file holds no PEM data or not its kind (ReadPemFile);
// errors name the flag
// (--tls-ca, --tls-cert, --tls-key) and the file.
absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> MakeChannelCredentials(
    const TlsFiles& files);

// The first token of a token file (one per line, blank lines and '#' comments skipped);
// NOT_FOUND naming an unreadable file, INVALID_ARGUMENT naming one without a token.
absl::StatusOr<std::string> ReadFirstToken(const std::string& path);

}  // namespace mat::api

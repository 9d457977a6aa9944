// Authentication of the coordinator's gRPC callers (issue 6 §4): the bearer tokens of JobService
// clients ("authorization: Bearer <token>" metadata) and the join token of workers
// ("x-mat-join-token" metadata on every WorkerService call), plus the TLS server credentials of
// `--tls-cert/--tls-key/--tls-ca`. A worker's own secret ("x-mat-worker-secret") is read here
// and checked by the Coordinator, which keeps the workers.
//
// A token file holds one token per line; blank lines and lines starting with '#' are ignored,
// surrounding whitespace is trimmed. A file that is missing, unreadable or holds no token is an
// error naming the file. Tokens are compared in constant time (ConstantTimeEquals: the time
// depends on the lengths only, never on where the bytes differ), and never logged.
//
// Refusals: no token -> UNAUTHENTICATED ("missing bearer token" / "missing join token"); a token
// that is not in the set -> PERMISSION_DENIED ("unknown token" / "unknown join token"). Each
// refusal is logged at warn with the caller's peer address. A null TokenSet admits every caller.
//
// Thread-safety: TokenSet is immutable after loading; every function here is safe from any
// thread (the checks run on gRPC handler threads, before anything is posted to the loop).
#pragma once

#include <grpcpp/security/server_credentials.h>
#include <grpcpp/server_context.h>
#include <grpcpp/support/string_ref.h>

#include <map>
#include <memory>
#include <string>
#include "absl/strings/string_view.h"
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "api/credentials.h"

namespace mat::coordinator {

// The worker credentials' metadata keys (defined once in api/credentials.h, which mat-worker
// sends them with); a worker's secret is checked by the Coordinator (SessionManager::Register
// and Authenticate).
using api::kJoinTokenMetadataKey;
using api::kWorkerSecretMetadataKey;

// True when `a` and `b` are equal; the time taken depends on their lengths only.
bool ConstantTimeEquals(absl::string_view a, absl::string_view b);

class TokenSet {
 public:
  // The tokens of `text` (the format above); INVALID_ARGUMENT naming `source` when none.
  static absl::StatusOr<TokenSet> Parse(absl::string_view text, const std::string& source);
  // Parse of the file at `path`; NOT_FOUND / INVALID_ARGUMENT naming the path.
  static absl::StatusOr<TokenSet> LoadFile(const std::string& path);

  // The tokens of both (a coordinator's bearer tokens: --auth-token-file's and
  // --admin-token-file's).
  static TokenSet Union(const TokenSet& a, const TokenSet& b);

  // Whether `token` is one of the set; compares against every token, in constant time each.
  bool Contains(absl::string_view token) const;
  size_t size() const { return tokens_.size(); }  // distinct tokens

 private:
  void Add(absl::string_view token);  // unless already there

  std::vector<std::string> tokens_;  // never empty once built
};

using ClientMetadata = std::multimap<grpc::string_ref, grpc::string_ref>;

// The checks on a call's metadata (the pure part of CheckBearer/CheckJoinToken; `peer` is only
// logged). `tokens` null: OK.
absl::Status CheckBearerMetadata(const ClientMetadata& metadata, const TokenSet* tokens,
                                 const std::string& peer);
absl::Status CheckJoinTokenMetadata(const ClientMetadata& metadata, const TokenSet* tokens,
                                    const std::string& peer);

// JobService: the call's "authorization: Bearer <token>" against `tokens` (null: OK).
absl::Status CheckBearer(const grpc::CallbackServerContext& context, const TokenSet* tokens);
// WorkerService: the call's "x-mat-join-token" against `tokens` (null: OK).
absl::Status CheckJoinToken(const grpc::CallbackServerContext& context, const TokenSet* tokens);
// WorkerService: the call's "x-mat-worker-secret" ("" without one).
std::string WorkerSecret(const grpc::CallbackServerContext& context);
// Whether the call's bearer token is one of `tokens` (false for null `tokens` or no token): an
// admin token (--admin-token-file).
bool BearerIn(const ClientMetadata& metadata, const TokenSet* tokens);
bool BearerIn(const grpc::CallbackServerContext& context, const TokenSet* tokens);

// Who a JobService caller is, for per-client limits (the per-client job limit) and logs: with
// `tokens`, "token:" (kTokenClientPrefix) + the first 16 hex digits of SHA-256(bearer token), so the stored id cannot
// be turned back into the token; without, "peer:" + the peer address without its port
// ("peer:ipv4:127.0.0.1", "peer:ipv6:[::1]"). REQUIRES with tokens: the call passed
// CheckBearerMetadata.
std::string ClientIdentity(const ClientMetadata& metadata, const TokenSet* tokens,
                           const std::string& peer);
std::string ClientIdentity(const grpc::CallbackServerContext& context, const TokenSet* tokens);

// Server credentials: insecure when `cert_file` and `key_file` are both empty; TLS with that
// certificate chain and key otherwise; with `ca_file` also mutual TLS (client certificates are
// required and verified against that CA). INVALID_ARGUMENT when only one of cert/key is given
// or a CA without them; NOT_FOUND / INVALID_ARGUMENT naming an unreadable or empty file.
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(
    const std::string& cert_file, const std::string& key_file, const std::string& ca_file);

}  // namespace mat::coordinator

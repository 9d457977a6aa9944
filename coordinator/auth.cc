#include "coordinator/auth.h"

#include <grpcpp/security/server_credentials.h>

#include <algorithm>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "api/artifacts.h"
#include "api/credentials.h"
#include "common/file_util.h"
#include "coordinator/job_store.h"
#include "spdlog/spdlog.h"

namespace mat::coordinator {
namespace {

constexpr absl::string_view kBearerPrefix("bearer ");

// The first value of `key`, or nullptr.
const grpc::string_ref* FindMetadata(const ClientMetadata& metadata, absl::string_view key) {
  auto it = metadata.find(grpc::string_ref(key.data(), key.size()));
  return it == metadata.end() ? nullptr : &it->second;
}

// The bearer token of "authorization: Bearer <token>" (trimmed), "" when there is none.
absl::string_view BearerToken(const ClientMetadata& metadata) {
  const grpc::string_ref* value = FindMetadata(metadata, "authorization");
  const absl::string_view text =
      value == nullptr ? absl::string_view() : absl::string_view(value->data(), value->size());
  const bool bearer = text.size() > kBearerPrefix.size() &&
                      absl::EqualsIgnoreCase(text.substr(0, kBearerPrefix.size()), kBearerPrefix);
  return bearer ? absl::StripAsciiWhitespace(text.substr(kBearerPrefix.size()))
                : absl::string_view();
}

}  // namespace

bool ConstantTimeEquals(absl::string_view a, absl::string_view b) {
  const size_t n = a.size() > b.size() ? a.size() : b.size();
  unsigned char diff = a.size() == b.size() ? 0 : 1;
  for (size_t i = 0; i < n; ++i) {
    const unsigned char x = i < a.size() ? static_cast<unsigned char>(a[i]) : 0;
    const unsigned char y = i < b.size() ? static_cast<unsigned char>(b[i]) : 0;
    diff |= static_cast<unsigned char>(x ^ y);
  }
  return diff == 0;
}

absl::StatusOr<TokenSet> TokenSet::Parse(absl::string_view text, const std::string& source) {
  TokenSet set;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    line = absl::StripAsciiWhitespace(line);
    if (line.empty() || line.front() == '#') continue;
    set.Add(line);
  }
  if (set.tokens_.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("'", source, "' holds no token"));
  }
  return set;
}

absl::StatusOr<TokenSet> TokenSet::LoadFile(const std::string& path) {
  absl::StatusOr<std::string> text = common::ReadFile(path);
  if (!text.ok()) return text.status();  // names the path
  return Parse(*text, path);
}

TokenSet TokenSet::Union(const TokenSet& a, const TokenSet& b) {
  TokenSet set = a;
  for (const std::string& token : b.tokens_) set.Add(token);
  return set;
}

void TokenSet::Add(absl::string_view token) {
  // At start only, so not in constant time.
  if (std::find(tokens_.begin(), tokens_.end(), token) == tokens_.end()) {
    tokens_.emplace_back(token);
  }
}

bool TokenSet::Contains(absl::string_view token) const {
  bool found = false;
  for (const std::string& t : tokens_) found |= ConstantTimeEquals(t, token);
  return found;
}

absl::Status CheckBearerMetadata(const ClientMetadata& metadata, const TokenSet* tokens,
                                 const std::string& peer) {
  if (tokens == nullptr) return absl::OkStatus();
  const absl::string_view token = BearerToken(metadata);
  if (token.empty()) {
    spdlog::warn("refused a JobService call from {}: missing bearer token", peer);
    return absl::UnauthenticatedError("missing bearer token");
  }
  if (!tokens->Contains(token)) {
    spdlog::warn("refused a JobService call from {}: unknown token", peer);
    return absl::PermissionDeniedError("unknown token");
  }
  return absl::OkStatus();
}

absl::Status CheckJoinTokenMetadata(const ClientMetadata& metadata, const TokenSet* tokens,
                                    const std::string& peer) {
  if (tokens == nullptr) return absl::OkStatus();
  const grpc::string_ref* value = FindMetadata(metadata, kJoinTokenMetadataKey);
  if (value == nullptr || value->empty()) {
    spdlog::warn("refused a worker from {}: missing join token", peer);
    return absl::UnauthenticatedError("missing join token");
  }
  if (!tokens->Contains(absl::string_view(value->data(), value->size()))) {
    spdlog::warn("refused a worker from {}: unknown join token", peer);
    return absl::PermissionDeniedError("unknown join token");
  }
  return absl::OkStatus();
}

std::string ClientIdentity(const ClientMetadata& metadata, const TokenSet* tokens,
                           const std::string& peer) {
  if (tokens == nullptr) {
    const size_t colon = peer.rfind(':');
    const size_t first = peer.find(':');
    // "ipv4:HOST:PORT" / "ipv6:[HOST]:PORT": drop the port; anything else as it is.
    const bool has_port = colon != std::string::npos && first != std::string::npos && colon > first;
    return absl::StrCat("peer:", has_port ? peer.substr(0, colon) : peer);
  }
  const absl::string_view token = BearerToken(metadata);
  api::Sha256 sha;
  sha.Add(std::string_view(token.data(), token.size()));
  return kTokenClientPrefix + sha.Hex().substr(0, 16);
}

std::string ClientIdentity(const grpc::CallbackServerContext& context, const TokenSet* tokens) {
  return ClientIdentity(context.client_metadata(), tokens, context.peer());
}

absl::Status CheckBearer(const grpc::CallbackServerContext& context, const TokenSet* tokens) {
  if (tokens == nullptr) return absl::OkStatus();
  return CheckBearerMetadata(context.client_metadata(), tokens, context.peer());
}

absl::Status CheckJoinToken(const grpc::CallbackServerContext& context, const TokenSet* tokens) {
  if (tokens == nullptr) return absl::OkStatus();
  return CheckJoinTokenMetadata(context.client_metadata(), tokens, context.peer());
}

bool BearerIn(const ClientMetadata& metadata, const TokenSet* tokens) {
  if (tokens == nullptr) return false;
  const absl::string_view token = BearerToken(metadata);
  return !token.empty() && tokens->Contains(token);
}

bool BearerIn(const grpc::CallbackServerContext& context, const TokenSet* tokens) {
  return BearerIn(context.client_metadata(), tokens);
}

std::string WorkerSecret(const grpc::CallbackServerContext& context) {
  const grpc::string_ref* value = FindMetadata(context.client_metadata(), kWorkerSecretMetadataKey);
  return value == nullptr ? std::string() : std::string(value->data(), value->size());
}

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(
    const std::string& cert_file, const std::string& key_file, const std::string& ca_file) {
  if (cert_file.empty() && key_file.empty()) {
    if (!ca_file.empty()) {
      return absl::InvalidArgumentError("--tls-ca needs --tls-cert and --tls-key");
    }
    return grpc::InsecureServerCredentials();
  }
  if (cert_file.empty() || key_file.empty()) {
    return absl::InvalidArgumentError("--tls-cert and --tls-key go together");
  }
  grpc::SslServerCredentialsOptions options;
  grpc::SslServerCredentialsOptions::PemKeyCertPair pair;
  absl::StatusOr<std::string> cert =
      api::ReadPemFile("--tls-cert", cert_file, api::PemKind::kCertificate);
  if (!cert.ok()) return cert.status();
  absl::StatusOr<std::string> key =
      api::ReadPemFile("--tls-key", key_file, api::PemKind::kPrivateKey);
  if (!key.ok()) return key.status();
  pair.cert_chain = std::move(*cert);
  pair.private_key = std::move(*key);
  options.pem_key_cert_pairs.push_back(std::move(pair));
  if (!ca_file.empty()) {
    absl::StatusOr<std::string> ca =
        api::ReadPemFile("--tls-ca", ca_file, api::PemKind::kCertificate);
    if (!ca.ok()) return ca.status();
    options.pem_root_certs = std::move(*ca);
    options.client_certificate_request = GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY;
  }
  return grpc::SslServerCredentials(options);
}

}  // namespace mat::coordinator

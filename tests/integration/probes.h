// Test helpers that probe a running coordinator the way an operator's tools would, without any
// of our own code in the way: an HTTP GET over a raw socket, the standard gRPC health check and
// a server-reflection service listing. This Debian's gRPC ships no generated health or
// reflection stubs, so both go through grpc::GenericStub with hand-encoded protobuf bytes (the
// messages involved are one or two fields).
#pragma once

#include <arpa/inet.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <netdb.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <string>
#include <vector>

namespace mat::probes {

struct HttpResult {
  int status = 0;     // 0: no HTTP answer
  std::string body;
  std::string raw;    // the whole response
};

// GET `path` from "HOST:PORT" with a raw socket (HTTP/1.0, read to EOF).
inline HttpResult HttpGet(const std::string& host_port, const std::string& path,
                          const std::string& method = "GET") {
  HttpResult result;
  const size_t colon = host_port.rfind(':');
  const std::string host = host_port.substr(0, colon);
  const std::string port = host_port.substr(colon + 1);
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* info = nullptr;
  if (::getaddrinfo(host.c_str(), port.c_str(), &hints, &info) != 0) return result;
  const int fd = ::socket(info->ai_family, info->ai_socktype, info->ai_protocol);
  timeval timeout{5, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
  const bool connected = fd >= 0 && ::connect(fd, info->ai_addr, info->ai_addrlen) == 0;
  ::freeaddrinfo(info);
  if (!connected) {
    if (fd >= 0) ::close(fd);
    return result;
  }
  const std::string request = method + " " + path + " HTTP/1.0\r\nHost: " + host + "\r\n\r\n";
  if (::send(fd, request.data(), request.size(), MSG_NOSIGNAL) !=
      static_cast<ssize_t>(request.size())) {
    ::close(fd);
    return result;
  }
  char buf[4096];
  ssize_t n = 0;
  while ((n = ::recv(fd, buf, sizeof(buf), 0)) > 0) result.raw.append(buf, static_cast<size_t>(n));
  ::close(fd);
  // "HTTP/1.x NNN reason\r\n...\r\n\r\nbody"
  if (result.raw.size() >= 12 && result.raw.compare(0, 5, "HTTP/") == 0) {
    result.status = std::stoi(result.raw.substr(9, 3));
  }
  const size_t header_end = result.raw.find("\r\n\r\n");
  if (header_end != std::string::npos) result.body = result.raw.substr(header_end + 4);
  return result;
}

inline std::string ByteBufferToString(const grpc::ByteBuffer& buffer) {
  std::vector<grpc::Slice> slices;
  std::string out;
  if (!buffer.Dump(&slices).ok()) return out;
  for (const grpc::Slice& s : slices) out.append(reinterpret_cast<const char*>(s.begin()), s.size());
  return out;
}

inline grpc::ByteBuffer StringToByteBuffer(const std::string& bytes) {
  grpc::Slice slice(bytes);
  return grpc::ByteBuffer(&slice, 1);
}

// grpc.health.v1.Health/Check for `service` ("" = the whole server). Returns the response's
// ServingStatus (1 = SERVING, 2 = NOT_SERVING), or -1 with `*error` set when the call failed.
inline int GrpcHealthCheck(const std::shared_ptr<grpc::Channel>& channel,
                           const std::string& service, std::string* error) {
  // HealthCheckRequest { string service = 1; }
  std::string request;
  if (!service.empty()) {
    request.push_back(0x0a);
    request.push_back(static_cast<char>(service.size()));
    request += service;
  }
  grpc::GenericStub stub(channel);
  grpc::CompletionQueue cq;
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  const grpc::ByteBuffer request_buffer = StringToByteBuffer(request);
  auto call = stub.PrepareUnaryCall(&context, "/grpc.health.v1.Health/Check", request_buffer, &cq);
  call->StartCall();
  grpc::ByteBuffer response;
  grpc::Status status;
  call->Finish(&response, &status, reinterpret_cast<void*>(1));
  void* tag = nullptr;
  bool ok = false;
  cq.Next(&tag, &ok);
  cq.Shutdown();
  while (cq.Next(&tag, &ok)) {
  }
  if (!status.ok()) {
    *error = std::to_string(status.error_code()) + ": " + status.error_message();
    return -1;
  }
  // HealthCheckResponse { ServingStatus status = 1; }: 0x08, varint; empty = UNKNOWN (0).
  const std::string bytes = ByteBufferToString(response);
  if (bytes.empty()) return 0;
  if (bytes.size() == 2 && bytes[0] == 0x08) return bytes[1];
  *error = "unexpected HealthCheckResponse bytes";
  return -1;
}

// grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo with one list_services request;
// returns the raw response bytes (the service names appear in them as plain strings), or "" with
// `*error` set when the call failed.
inline std::string GrpcReflectionListServices(const std::shared_ptr<grpc::Channel>& channel,
                                              std::string* error) {
  grpc::GenericStub stub(channel);
  grpc::CompletionQueue cq;
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  auto call = stub.PrepareCall(
      &context, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", &cq);
  void* tag = nullptr;
  bool ok = false;
  auto step = [&](intptr_t id) {
    bool next = cq.Next(&tag, &ok);
    return next && ok && reinterpret_cast<intptr_t>(tag) == id;
  };
  std::string out;
  call->StartCall(reinterpret_cast<void*>(1));
  if (step(1)) {
    // ServerReflectionRequest { string list_services = 7; } with "" -> tag 0x3a, length 0.
    call->Write(StringToByteBuffer(std::string("\x3a\x00", 2)), reinterpret_cast<void*>(2));
    if (step(2)) {
      call->WritesDone(reinterpret_cast<void*>(3));
      if (step(3)) {
        grpc::ByteBuffer response;
        call->Read(&response, reinterpret_cast<void*>(4));
        if (step(4)) out = ByteBufferToString(response);
      }
    }
  }
  grpc::Status status;
  call->Finish(&status, reinterpret_cast<void*>(5));
  cq.Next(&tag, &ok);
  cq.Shutdown();
  while (cq.Next(&tag, &ok)) {
  }
  if (!status.ok()) {
    *error = std::to_string(status.error_code()) + ": " + status.error_message();
    return "";
  }
  if (out.empty()) *error = "no reflection response";
  return out;
}

}  // namespace mat::probes

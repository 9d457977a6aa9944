#include "coordinator/grpc_metrics.h"

#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "google/protobuf/descriptor.h"

namespace mat::coordinator {
namespace {

class RequestCounter final : public grpc::experimental::Interceptor {
 public:
  RequestCounter(std::string method, metrics::Counter requests)
      : method_(std::move(method)), requests_(requests) {}

  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    if (methods->QueryInterceptionHookPoint(
            grpc::experimental::InterceptionHookPoints::PRE_SEND_STATUS)) {
      const grpc::Status status = methods->GetSendStatus();
      requests_.Inc({method_, absl::StatusCodeToString(
                                  static_cast<absl::StatusCode>(status.error_code()))});
    }
    methods->Proceed();
  }

 private:
  const std::string method_;
  const metrics::Counter requests_;
};

class RequestCounterFactory final
    : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  RequestCounterFactory(metrics::Counter requests, std::set<std::string> methods)
      : requests_(requests), methods_(std::move(methods)) {}

  grpc::experimental::Interceptor* CreateServerInterceptor(
      grpc::experimental::ServerRpcInfo* info) override {
    std::string method = info->method() != nullptr ? info->method() : "";
    if (!method.empty() && method.front() == '/') method.erase(0, 1);
    // The path is the caller's: one per name a caller makes up would grow /metrics unbounded.
    if (methods_.count(method) == 0) method = "unknown";
    return new RequestCounter(std::move(method), requests_);
  }

 private:
  const metrics::Counter requests_;
  const std::set<std::string> methods_;
};

}  // namespace

std::set<std::string> ServedMethods(const std::vector<std::string>& services) {
  std::set<std::string> methods = {"grpc.health.v1.Health/Check", "grpc.health.v1.Health/Watch"};
  for (const std::string& name : services) {
    const google::protobuf::ServiceDescriptor* service =
        google::protobuf::DescriptorPool::generated_pool()->FindServiceByName(name);
    if (service == nullptr) continue;
    for (int i = 0; i < service->method_count(); ++i) {
      methods.insert(absl::StrCat(name, "/", service->method(i)->name()));
    }
  }
  return methods;
}

std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface> MakeRequestCounter(
    metrics::Counter requests, std::set<std::string> methods) {
  return std::make_unique<RequestCounterFactory>(requests, std::move(methods));
}

}  // namespace mat::coordinator

#include "coordinator/grpc_metrics.h"

#include <string>
#include <utility>

#include "absl/status/status.h"

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
  explicit RequestCounterFactory(metrics::Counter requests) : requests_(requests) {}

  grpc::experimental::Interceptor* CreateServerInterceptor(
      grpc::experimental::ServerRpcInfo* info) override {
    std::string method = info->method() != nullptr ? info->method() : "unknown";
    if (!method.empty() && method.front() == '/') method.erase(0, 1);
    return new RequestCounter(std::move(method), requests_);
  }

 private:
  const metrics::Counter requests_;
};

}  // namespace

std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface> MakeRequestCounter(
    metrics::Counter requests) {
  return std::make_unique<RequestCounterFactory>(requests);
}

}  // namespace mat::coordinator

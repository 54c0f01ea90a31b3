#include <grpcpp/grpcpp.h>

#include <condition_variable>
#include <map>
#include <mutex>
#include <set>

#include "tandem/common/log.h"
#include "tandem/rendezvous/rendezvous.h"
#include "tandem/v1/rendezvous.grpc.pb.h"

namespace tandem::rendezvous {
namespace {

using Clock = std::chrono::system_clock;

// Waits on `condition` until `done()` or the call's deadline (less a margin, so our own explanation
// reaches the client before its deadline fires) or cancellation. Returns done().
template <typename Predicate>
bool waitForCall(std::unique_lock<std::mutex>& lock, std::condition_variable& condition,
                 grpc::ServerContext* context, Predicate done) {
  const auto deadline = context->deadline() - std::chrono::milliseconds(250);
  while (!done()) {
    if (context->IsCancelled() || Clock::now() >= deadline) return false;
    condition.wait_until(lock, std::min(deadline, Clock::now() + std::chrono::milliseconds(100)));
  }
  return true;
}

class RendezvousService final : public tandem::v1::Rendezvous::Service {
 public:
  explicit RendezvousService(ServerOptions options) : options_(std::move(options)) {
    addresses_.resize(options_.worldSize);
  }

  void stop() {
    std::lock_guard<std::mutex> lock(mutex_);
    stopped_ = true;
    changed_.notify_all();
  }

  grpc::Status Join(grpc::ServerContext* context, const tandem::v1::JoinRequest* request,
                    tandem::v1::JoinResponse* response) override {
    const std::string who = "rank " + std::to_string(request->rank()) + " (" + context->peer() + ")";
    if (request->token() != options_.token) return refuse(grpc::StatusCode::PERMISSION_DENIED, who, "wrong rendezvous token");
    if (request->job() != options_.job)
      return refuse(grpc::StatusCode::FAILED_PRECONDITION, who,
                    "job " + request->job() + " does not match this rendezvous' job " + options_.job);
    if (request->generation() != options_.generation)
      return refuse(grpc::StatusCode::FAILED_PRECONDITION, who,
                    "generation " + std::to_string(request->generation()) + " does not match this rendezvous' generation " +
                        std::to_string(options_.generation));
    if (request->world_size() != options_.worldSize)
      return refuse(grpc::StatusCode::FAILED_PRECONDITION, who,
                    "world size " + std::to_string(request->world_size()) + " differs from rank 0's " +
                        std::to_string(options_.worldSize));
    if (request->config_hash() != options_.configHash)
      return refuse(grpc::StatusCode::FAILED_PRECONDITION, who,
                    "config hash " + request->config_hash() + " differs from rank 0's " + options_.configHash +
                        ": the ranks were given different job specs");
    if (request->rank() < 0 || request->rank() >= options_.worldSize)
      return refuse(grpc::StatusCode::INVALID_ARGUMENT, who,
                    "rank outside 0.." + std::to_string(options_.worldSize - 1));

    std::unique_lock<std::mutex> lock(mutex_);
    std::string& slot = addresses_[request->rank()];
    if (!slot.empty() && slot != request->address())
      return refuse(grpc::StatusCode::ALREADY_EXISTS, who,
                    "rank already joined from " + slot + " (two workers claim the same rank)");
    if (slot.empty()) {
      slot = request->address();
      ++joined_;
      heartbeats_[request->rank()] = std::chrono::steady_clock::now();
      log::info() << "rendezvous: rank " << request->rank() << " joined from " << request->address() << " ("
                  << joined_ << "/" << options_.worldSize << ")";
      changed_.notify_all();
    }
    if (!waitForCall(lock, changed_, context, [&] { return stopped_ || joined_ == options_.worldSize; })) {
      std::string missing;
      for (int rank = 0; rank < options_.worldSize; ++rank)
        if (addresses_[rank].empty()) missing += (missing.empty() ? "" : ", ") + std::to_string(rank);
      return grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED,
                          "only " + std::to_string(joined_) + " of " + std::to_string(options_.worldSize) +
                              " ranks joined before the deadline; missing ranks: " + missing);
    }
    if (stopped_) return grpc::Status(grpc::StatusCode::UNAVAILABLE, "rendezvous server is shutting down");
    for (int rank = 0; rank < options_.worldSize; ++rank) {
      auto* peer = response->add_peers();
      peer->set_rank(rank);
      peer->set_address(addresses_[rank]);
    }
    response->set_nccl_unique_id(options_.ncclUniqueId);
    return grpc::Status::OK;
  }

  grpc::Status Barrier(grpc::ServerContext* context, const tandem::v1::BarrierRequest* request,
                       tandem::v1::BarrierResponse*) override {
    if (auto refused = checkMember(context, request->token(), request->generation(), request->rank()); !refused.ok())
      return refused;
    std::unique_lock<std::mutex> lock(mutex_);
    // A name can be used again: each completion opens the next round, and a rank waits for its own.
    BarrierState& barrier = barriers_[request->name()];
    const int64_t round = barrier.completed;
    barrier.arrived.insert(request->rank());
    if (static_cast<int>(barrier.arrived.size()) == options_.worldSize) {
      ++barrier.completed;
      barrier.arrived.clear();
      changed_.notify_all();
    }
    if (!waitForCall(lock, changed_, context, [&] { return stopped_ || barrier.completed > round; }))
      return grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED,
                          "barrier " + request->name() + ": only " + std::to_string(barrier.arrived.size()) + " of " +
                              std::to_string(options_.worldSize) + " ranks arrived");
    // Shutting down is not everyone having arrived.
    if (barrier.completed == round)
      return grpc::Status(grpc::StatusCode::UNAVAILABLE, "rendezvous server is shutting down");
    return grpc::Status::OK;
  }

  grpc::Status Heartbeat(grpc::ServerContext* context, const tandem::v1::HeartbeatRequest* request,
                         tandem::v1::HeartbeatResponse* response) override {
    if (auto refused = checkMember(context, request->token(), request->generation(), request->rank()); !refused.ok())
      return refused;
    std::lock_guard<std::mutex> lock(mutex_);
    const auto now = std::chrono::steady_clock::now();
    heartbeats_[request->rank()] = now;
    for (const auto& [rank, seen] : heartbeats_)
      if (now - seen > options_.heartbeatTimeout) response->add_silent_ranks(rank);
    return grpc::Status::OK;
  }

  grpc::Status StoreSet(grpc::ServerContext* context, const tandem::v1::StoreSetRequest* request,
                        tandem::v1::StoreSetResponse*) override {
    if (auto refused = checkMember(context, request->token(), request->generation(), 0); !refused.ok()) return refused;
    std::lock_guard<std::mutex> lock(mutex_);
    store_[request->key()] = request->value();
    changed_.notify_all();
    return grpc::Status::OK;
  }

  grpc::Status StoreGet(grpc::ServerContext* context, const tandem::v1::StoreGetRequest* request,
                        tandem::v1::StoreGetResponse* response) override {
    if (auto refused = checkMember(context, request->token(), request->generation(), 0); !refused.ok()) return refused;
    std::unique_lock<std::mutex> lock(mutex_);
    if (!waitForCall(lock, changed_, context, [&] { return stopped_ || store_.count(request->key()) > 0; }) ||
        stopped_)
      return grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED, "key " + request->key() + " was never set");
    response->set_value(store_[request->key()]);
    return grpc::Status::OK;
  }

 private:
  grpc::Status refuse(grpc::StatusCode code, const std::string& who, const std::string& reason) {
    log::warning() << "rendezvous: refused Join from " << who << ": " << reason;
    return grpc::Status(code, reason);
  }

  grpc::Status checkMember(grpc::ServerContext* context, const std::string& token, int64_t generation, int rank) {
    const std::string who = "rank " + std::to_string(rank) + " (" + context->peer() + ")";
    if (token != options_.token) {
      log::warning() << "rendezvous: refused a call from " << context->peer() << ": wrong rendezvous token";
      return grpc::Status(grpc::StatusCode::PERMISSION_DENIED, "wrong rendezvous token");
    }
    if (generation != options_.generation)
      return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                          "generation " + std::to_string(generation) + " does not match " +
                              std::to_string(options_.generation));
    if (rank < 0 || rank >= options_.worldSize)
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, who + ": rank out of range");
    return grpc::Status::OK;
  }

  const ServerOptions options_;
  std::mutex mutex_;
  std::condition_variable changed_;
  bool stopped_ = false;
  int joined_ = 0;
  std::vector<std::string> addresses_;
  std::map<int, std::chrono::steady_clock::time_point> heartbeats_;
  struct BarrierState {
    std::set<int> arrived;  // this round's ranks
    int64_t completed = 0;  // rounds every rank arrived at
  };
  std::map<std::string, BarrierState> barriers_;
  std::map<std::string, std::string> store_;
};

class GrpcRendezvousServer final : public RendezvousServer {
 public:
  explicit GrpcRendezvousServer(const ServerOptions& options) : service_(options) {}
  ~GrpcRendezvousServer() override { shutdown(); }

  Status start(const std::string& address) {
    grpc::ServerBuilder builder;
    // gRPC sets SO_REUSEPORT by default: a second job whose rank 0 drew the same port would then listen
    // beside this one and the kernel would split the workers' connections between the two (each refusing
    // the other's token, a permanent exit). Without it the second bind fails, which is retryable.
    builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
    builder.AddListeningPort(address, grpc::InsecureServerCredentials(), &port_);
    builder.RegisterService(&service_);
    server_ = builder.BuildAndStart();
    if (server_ == nullptr || port_ == 0)
      return TANDEM_ERROR(StatusCode::kResourceUnavailable, "rendezvous: cannot listen on " + address + " (port in use?)");
    return Status::Ok();
  }
  int port() const override { return port_; }
  void shutdown() override {
    if (server_ == nullptr) return;
    service_.stop();
    server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
    server_.reset();
  }

 private:
  RendezvousService service_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
};

}  // namespace

StatusOr<std::unique_ptr<RendezvousServer>> RendezvousServer::start(const ServerOptions& options) {
  auto server = std::make_unique<GrpcRendezvousServer>(options);
  TANDEM_RETURN_IF_ERROR(server->start(options.listenAddress));
  return std::unique_ptr<RendezvousServer>(std::move(server));
}

}  // namespace tandem::rendezvous

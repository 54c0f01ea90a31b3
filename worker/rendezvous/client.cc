#include <grpcpp/grpcpp.h>

#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <mutex>
#include <thread>

#include "tandem/rendezvous/rendezvous.h"
#include "tandem/v1/rendezvous.grpc.pb.h"

namespace tandem::rendezvous {
namespace {

StatusCode fromGrpc(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::OK: return StatusCode::kOk;
    case grpc::StatusCode::INVALID_ARGUMENT: return StatusCode::kInvalidArgument;
    case grpc::StatusCode::NOT_FOUND: return StatusCode::kNotFound;
    case grpc::StatusCode::DEADLINE_EXCEEDED: return StatusCode::kDeadlineExceeded;
    case grpc::StatusCode::PERMISSION_DENIED:
    case grpc::StatusCode::UNAUTHENTICATED: return StatusCode::kPermissionDenied;
    case grpc::StatusCode::FAILED_PRECONDITION: return StatusCode::kFailedPrecondition;
    case grpc::StatusCode::ALREADY_EXISTS: return StatusCode::kAlreadyExists;
    case grpc::StatusCode::ABORTED: return StatusCode::kAborted;
    case grpc::StatusCode::CANCELLED: return StatusCode::kCancelled;
    case grpc::StatusCode::UNAVAILABLE: return StatusCode::kUnavailable;
    default: return StatusCode::kInternal;
  }
}

std::string secondsText(std::chrono::milliseconds timeout) {
  char text[32];
  std::snprintf(text, sizeof(text), "%.1fs", timeout.count() / 1000.0);
  return text;
}

}  // namespace

struct RendezvousClient::Impl {
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<tandem::v1::Rendezvous::Stub> stub;
  std::string token;
  int64_t generation;
  // Set once any call got an answer from the server: separates "unreachable" from "slow peers".
  std::atomic<bool> reached{false};

  void prepare(grpc::ClientContext& context, std::chrono::milliseconds timeout) {
    context.set_deadline(std::chrono::system_clock::now() + timeout);
    // Queue the call until the server is up (rank 0 may start later than we do), within the deadline.
    context.set_wait_for_ready(true);
  }

  Status convert(const grpc::Status& status, const std::string& endpoint, const std::string& what,
                 std::chrono::milliseconds timeout) {
    if (status.ok()) {
      reached = true;
      return Status::Ok();
    }
    const bool neverConnected = !reached && channel->GetState(false) != GRPC_CHANNEL_READY;
    if ((status.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED ||
         status.error_code() == grpc::StatusCode::UNAVAILABLE) &&
        neverConnected && status.error_message().find("ranks joined") == std::string::npos)
      return TANDEM_ERROR(StatusCode::kUnavailable,
                          "cannot reach the rendezvous at " + endpoint + " within " + secondsText(timeout) +
                              " (is rank 0 running? TANDEM_RDZV_ENDPOINT)");
    reached = true;
    return TANDEM_ERROR(fromGrpc(status.error_code()),
                        "rendezvous " + endpoint + ": " + what + " refused: " + status.error_message());
  }
};

RendezvousClient::RendezvousClient(std::string endpoint, std::string token, int64_t generation)
    : endpoint_(std::move(endpoint)), impl_(std::make_unique<Impl>()) {
  grpc::ChannelArguments arguments;
  // Reconnect quickly while rank 0 is still starting.
  arguments.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  arguments.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 100);
  arguments.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
  impl_->channel = grpc::CreateCustomChannel(endpoint_, grpc::InsecureChannelCredentials(), arguments);
  impl_->stub = tandem::v1::Rendezvous::NewStub(impl_->channel);
  impl_->token = std::move(token);
  impl_->generation = generation;
}

RendezvousClient::~RendezvousClient() = default;

StatusOr<JoinResult> RendezvousClient::join(const JoinRequest& request, std::chrono::milliseconds timeout,
                                            const std::atomic<int>* stop) {
  tandem::v1::JoinRequest message;
  message.set_job(request.job);
  message.set_generation(request.generation);
  message.set_rank(request.rank);
  message.set_world_size(request.worldSize);
  message.set_token(impl_->token);
  message.set_address(request.address);
  message.set_config_hash(request.configHash);
  tandem::v1::JoinResponse response;
  grpc::ClientContext context;
  impl_->prepare(context, timeout);
  // A stop request cancels the call from a watcher: the call itself can only wait out its deadline.
  std::mutex doneMutex;
  std::condition_variable doneChanged;
  bool done = false;
  std::thread watcher;
  if (stop != nullptr)
    watcher = std::thread([&] {
      std::unique_lock<std::mutex> lock(doneMutex);
      while (!done && stop->load() == 0) doneChanged.wait_for(lock, std::chrono::milliseconds(50));
      if (!done) context.TryCancel();
    });
  const grpc::Status called = impl_->stub->Join(&context, message, &response);
  if (watcher.joinable()) {
    {
      std::lock_guard<std::mutex> lock(doneMutex);
      done = true;
    }
    doneChanged.notify_all();
    watcher.join();
  }
  if (stop != nullptr && stop->load() != 0 && !called.ok())
    return TANDEM_ERROR(StatusCode::kCancelled, "stopped while waiting at the rendezvous " + endpoint_);
  TANDEM_RETURN_IF_ERROR(impl_->convert(called, endpoint_, "Join", timeout));
  JoinResult result;
  for (const auto& peer : response.peers()) result.peerAddresses.push_back(peer.address());
  result.ncclUniqueId = response.nccl_unique_id();
  return result;
}

Status RendezvousClient::barrier(int rank, const std::string& name, std::chrono::milliseconds timeout) {
  tandem::v1::BarrierRequest message;
  message.set_token(impl_->token);
  message.set_generation(impl_->generation);
  message.set_rank(rank);
  message.set_name(name);
  tandem::v1::BarrierResponse response;
  grpc::ClientContext context;
  impl_->prepare(context, timeout);
  return impl_->convert(impl_->stub->Barrier(&context, message, &response), endpoint_, "Barrier " + name, timeout);
}

StatusOr<std::vector<int>> RendezvousClient::heartbeat(int rank, int64_t step, std::chrono::milliseconds timeout) {
  tandem::v1::HeartbeatRequest message;
  message.set_token(impl_->token);
  message.set_generation(impl_->generation);
  message.set_rank(rank);
  message.set_step(step);
  tandem::v1::HeartbeatResponse response;
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + timeout);
  TANDEM_RETURN_IF_ERROR(impl_->convert(impl_->stub->Heartbeat(&context, message, &response), endpoint_, "Heartbeat", timeout));
  return std::vector<int>(response.silent_ranks().begin(), response.silent_ranks().end());
}

Status RendezvousClient::storeSet(const std::string& key, const std::string& value, std::chrono::milliseconds timeout) {
  tandem::v1::StoreSetRequest message;
  message.set_token(impl_->token);
  message.set_generation(impl_->generation);
  message.set_key(key);
  message.set_value(value);
  tandem::v1::StoreSetResponse response;
  grpc::ClientContext context;
  impl_->prepare(context, timeout);
  return impl_->convert(impl_->stub->StoreSet(&context, message, &response), endpoint_, "StoreSet " + key, timeout);
}

StatusOr<std::string> RendezvousClient::storeGet(const std::string& key, std::chrono::milliseconds timeout) {
  tandem::v1::StoreGetRequest message;
  message.set_token(impl_->token);
  message.set_generation(impl_->generation);
  message.set_key(key);
  tandem::v1::StoreGetResponse response;
  grpc::ClientContext context;
  impl_->prepare(context, timeout);
  TANDEM_RETURN_IF_ERROR(impl_->convert(impl_->stub->StoreGet(&context, message, &response), endpoint_, "StoreGet " + key, timeout));
  return response.value();
}

}  // namespace tandem::rendezvous

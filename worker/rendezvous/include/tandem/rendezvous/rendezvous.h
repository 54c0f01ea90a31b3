// Rendezvous over gRPC (DESIGN.md §4, proto/tandem/v1/rendezvous.proto).
// RendezvousServer runs in rank 0; every rank (rank 0 included) uses RendezvousClient. Every call has a
// deadline: nothing here waits forever. The token is compared, never logged.
#pragma once

#include <atomic>
#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "tandem/common/status.h"

namespace tandem::rendezvous {

struct ServerOptions {
  std::string listenAddress = "0.0.0.0:29400";  // host:port; port 0 picks a free one
  std::string job;                               // namespace/name
  int64_t generation = 0;
  int worldSize = 1;
  std::string token;
  std::string configHash;
  std::string ncclUniqueId;  // bytes handed to every rank (empty on CPU)
  // A rank that has not sent a heartbeat for this long is reported silent.
  std::chrono::milliseconds heartbeatTimeout{30000};
};

class RendezvousServer {
 public:
  // Binds and starts serving; fails with UNAVAILABLE naming the address when the port is taken.
  static StatusOr<std::unique_ptr<RendezvousServer>> start(const ServerOptions& options);
  virtual ~RendezvousServer() = default;
  virtual int port() const = 0;
  // Stops serving; waiting calls are cancelled.
  virtual void shutdown() = 0;
};

struct JoinRequest {
  std::string job;
  int64_t generation = 0;
  int rank = 0;
  int worldSize = 1;
  std::string address;
  std::string configHash;
};

struct JoinResult {
  std::vector<std::string> peerAddresses;  // by rank
  std::string ncclUniqueId;
};

// Thread-safe: gRPC stubs may be shared across threads.
class RendezvousClient {
 public:
  RendezvousClient(std::string endpoint, std::string token, int64_t generation);
  ~RendezvousClient();

  // Waits for the server to come up and for all ranks to join, both within `timeout`.
  // Errors: UNAVAILABLE/DEADLINE_EXCEEDED "cannot reach the rendezvous at ... within Ns" when the server
  // never answered; PERMISSION_DENIED on a wrong token; FAILED_PRECONDITION on another generation or
  // config; DEADLINE_EXCEEDED naming the missing ranks when some ranks never came; CANCELLED soon after
  // *stop turns non-zero (a SIGTERM while waiting for peers that may never come).
  StatusOr<JoinResult> join(const JoinRequest& request, std::chrono::milliseconds timeout,
                            const std::atomic<int>* stop = nullptr);
  Status barrier(int rank, const std::string& name, std::chrono::milliseconds timeout);
  // Returns the ranks the server has not heard from within its heartbeat timeout.
  StatusOr<std::vector<int>> heartbeat(int rank, int64_t step, std::chrono::milliseconds timeout);
  Status storeSet(const std::string& key, const std::string& value, std::chrono::milliseconds timeout);
  StatusOr<std::string> storeGet(const std::string& key, std::chrono::milliseconds timeout);

  const std::string& endpoint() const { return endpoint_; }

 private:
  struct Impl;
  std::string endpoint_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace tandem::rendezvous

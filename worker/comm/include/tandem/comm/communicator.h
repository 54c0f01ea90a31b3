// comm::Communicator: the one interface through which the engine talks to its peers (DESIGN.md §5).
// Implementations: Gloo over TCP (host buffers, here) and NCCL (GPU buffers, with the CUDA build).
// Operations are executed in the order they are issued; the *Async forms return at once and let the
// caller overlap computation with communication. Every operation has a deadline (the communicator's
// timeout, or its own for the *Within forms): a dead or stuck peer becomes an error, never a hang.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

#include "tandem/common/status.h"

namespace tandem::comm {

// A pending operation. wait() blocks until it finished or failed; call it exactly once.
class Work {
 public:
  virtual ~Work() = default;
  virtual Status wait() = 0;
};

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;

  // The deadline of every operation that is not given one of its own.
  virtual std::chrono::milliseconds timeout() const = 0;

  // Sums `count` floats in place across all ranks.
  virtual std::shared_ptr<Work> allReduceAsync(float* data, int64_t count) = 0;
  Status allReduce(float* data, int64_t count) { return allReduceAsync(data, count)->wait(); }
  // Copies `bytes` from `root` to every rank.
  Status broadcast(void* data, int64_t bytes, int root) { return broadcastWithin(data, bytes, root, timeout()); }
  // The same with a deadline of their own, for an exchange that waits on a peer's slow work rather than
  // on the network (a resume waits while the checkpoint writers read from storage).
  virtual Status allReduceWithin(float* data, int64_t count, std::chrono::milliseconds timeout) = 0;
  virtual Status broadcastWithin(void* data, int64_t bytes, int root, std::chrono::milliseconds timeout) = 0;
  // Point to point; a send matches the recv with the same tag on the peer. Either side may post first.
  virtual std::shared_ptr<Work> sendAsync(const void* data, int64_t bytes, int peer, uint32_t tag) = 0;
  virtual std::shared_ptr<Work> recvAsync(void* data, int64_t bytes, int peer, uint32_t tag) = 0;
  Status send(const void* data, int64_t bytes, int peer, uint32_t tag) { return sendAsync(data, bytes, peer, tag)->wait(); }
  Status recv(void* data, int64_t bytes, int peer, uint32_t tag) { return recvAsync(data, bytes, peer, tag)->wait(); }
  virtual Status barrier() = 0;

  // Collective over this communicator: ranks that pass the same color form a new communicator, ranked
  // by (key, rank). Used for a stage's data-parallel group and a replica's pipeline.
  virtual StatusOr<std::unique_ptr<Communicator>> split(int color, int key) = 0;
};

// The key-value store a communicator bootstraps from (the rendezvous, or memory in tests).
class KeyValueStore {
 public:
  virtual ~KeyValueStore() = default;
  virtual Status set(const std::string& key, const std::string& value) = 0;
  // Waits until the key exists, at most `timeout`.
  virtual StatusOr<std::string> get(const std::string& key, std::chrono::milliseconds timeout) = 0;
};

// An in-process store for tests that run ranks as threads.
std::shared_ptr<KeyValueStore> makeMemoryStore();

struct GlooOptions {
  int rank = 0;
  int size = 1;
  std::string hostAddress = "127.0.0.1";  // the address peers reach this rank on
  std::string keyPrefix = "gloo";         // separates communicators sharing one store
  std::chrono::milliseconds timeout{30000};
};

// Connects a full mesh of TCP pairs, exchanging addresses through `store`. Fails with DEADLINE_EXCEEDED
// when peers do not show up within the timeout.
StatusOr<std::unique_ptr<Communicator>> createGlooCommunicator(const GlooOptions& options,
                                                                std::shared_ptr<KeyValueStore> store);

}  // namespace tandem::comm

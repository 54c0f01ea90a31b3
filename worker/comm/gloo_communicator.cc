// GlooCommunicator: comm::Communicator over Gloo's TCP transport (Debian's libgloo).
// Gloo's collectives are blocking and a gloo::Context must not run two of them at once, so every
// operation runs on one executor thread, in issue order; the caller gets a Work to wait on.
// Point-to-point operations are only posted on that thread and waited for by the caller, so a send and
// a recv between the same two ranks cannot deadlock each other.
#include <gloo/allreduce.h>
#include <gloo/barrier.h>
#include <gloo/broadcast.h>
#include <gloo/common/error.h>
#include <gloo/common/logging.h>
#include <gloo/math.h>
#include <gloo/rendezvous/context.h>
#include <gloo/rendezvous/store.h>
#include <gloo/transport/tcp/device.h>
#include <gloo/transport/unbound_buffer.h>

#include <condition_variable>
#include <algorithm>
#include <cstdio>
#include <deque>
#include <tuple>
#include <functional>
#include <map>
#include <future>
#include <mutex>
#include <system_error>
#include <thread>

#include "tandem/comm/communicator.h"

namespace tandem::comm {
namespace {

// Point-to-point slots live far above the slots Gloo's collectives derive from their tags, and the
// slots of our own exchange all-reduce above those.
constexpr uint64_t kPointToPointSlotBase = uint64_t{1} << 40;
constexpr uint64_t kExchangeSlotBase = uint64_t{1} << 48;
// Power-of-two groups all-reduce by recursive doubling up to this size (fewest rounds), and by
// recursive halving then doubling above it (least traffic). Both add in the same order.
constexpr int64_t kRecursiveDoublingMaxBytes = int64_t{256} << 10;

bool isPowerOfTwo(int value) { return value > 0 && (value & (value - 1)) == 0; }

// Runs a Gloo call and turns its exceptions into a Status naming the operation.
Status guarded(const std::string& what, const std::function<void()>& call) {
  try {
    call();
    return Status::Ok();
  } catch (const gloo::IoException& error) {
    const std::string message = error.what();
    // Gloo says "Timed out"; our store adapter passes on the store's DEADLINE_EXCEEDED status text.
    const bool timedOut = message.find("imed out") != std::string::npos || message.find("imeout") != std::string::npos ||
                          message.find("DEADLINE_EXCEEDED") != std::string::npos;
    return Status(timedOut ? StatusCode::kDeadlineExceeded : StatusCode::kAborted,
                  what + " failed: " + (timedOut ? "a peer did not answer in time: " : "a peer connection broke: ") + message,
                  __FILE__, __LINE__);
  } catch (const gloo::Exception& error) {
    return TANDEM_ERROR(StatusCode::kAborted, what + " failed: " + error.what());
  } catch (const gloo::EnforceNotMet& error) {
    return TANDEM_ERROR(StatusCode::kInternal, what + " failed: " + error.what());
  } catch (const std::system_error& error) {  // no thread or descriptor to be had: this machine, for now
    return TANDEM_ERROR(StatusCode::kResourceUnavailable, what + " failed: " + error.what());
  } catch (const std::exception& error) {
    return TANDEM_ERROR(StatusCode::kInternal, what + " failed: " + error.what());
  }
}

// Adapts our KeyValueStore to the interface Gloo's full-mesh bootstrap wants (it reports failure by
// throwing).
class GlooStoreAdapter final : public gloo::rendezvous::Store {
 public:
  GlooStoreAdapter(std::shared_ptr<KeyValueStore> store, std::string prefix, std::chrono::milliseconds timeout)
      : store_(std::move(store)), prefix_(std::move(prefix)), timeout_(timeout) {}

  void set(const std::string& key, const std::vector<char>& data) override {
    Status status = store_->set(prefix_ + "/" + key, std::string(data.begin(), data.end()));
    if (!status.ok()) throw gloo::IoException(status.toString());
  }
  std::vector<char> get(const std::string& key) override {
    auto value = store_->get(prefix_ + "/" + key, timeout_);
    if (!value.ok()) throw gloo::IoException(value.status().toString());
    return std::vector<char>(value->begin(), value->end());
  }
  void wait(const std::vector<std::string>& keys) override { wait(keys, timeout_); }
  void wait(const std::vector<std::string>& keys, const std::chrono::milliseconds& timeout) override {
    for (const auto& key : keys) {
      auto value = store_->get(prefix_ + "/" + key, timeout);
      if (!value.ok()) throw gloo::IoException(value.status().toString());
    }
  }

 private:
  std::shared_ptr<KeyValueStore> store_;
  std::string prefix_;
  std::chrono::milliseconds timeout_;
};

class FutureWork final : public Work {
 public:
  explicit FutureWork(std::future<Status> future) : future_(std::move(future)) {}
  Status wait() override { return future_.get(); }

 private:
  std::future<Status> future_;
};

// A posted send/recv: the caller waits on the transport buffer itself.
class PointToPointWork final : public Work {
 public:
  PointToPointWork(std::future<Status> posted, std::shared_ptr<std::unique_ptr<gloo::transport::UnboundBuffer>> buffer,
                   bool isSend, int peer, std::chrono::milliseconds timeout)
      : posted_(std::move(posted)), buffer_(std::move(buffer)), isSend_(isSend), peer_(peer), timeout_(timeout) {}

  Status wait() override {
    TANDEM_RETURN_IF_ERROR(posted_.get());
    const std::string what = std::string(isSend_ ? "send to" : "recv from") + " rank " + std::to_string(peer_);
    bool completed = false;
    Status status = guarded(what, [&] {
      completed = isSend_ ? (*buffer_)->waitSend(timeout_) : (*buffer_)->waitRecv(timeout_);
    });
    if (status.ok() && !completed) return TANDEM_ERROR(StatusCode::kAborted, what + " was aborted");
    return status;
  }

 private:
  std::future<Status> posted_;
  std::shared_ptr<std::unique_ptr<gloo::transport::UnboundBuffer>> buffer_;
  bool isSend_;
  int peer_;
  std::chrono::milliseconds timeout_;
};

class GlooCommunicator final : public Communicator {
 public:
  GlooCommunicator(std::shared_ptr<gloo::rendezvous::Context> context, GlooOptions options,
                   std::shared_ptr<KeyValueStore> store)
      : context_(std::move(context)),
        options_(std::move(options)),
        store_(std::move(store)),
        timeout_(options_.timeout),
        executor_([this] { runExecutor(); }) {}

  ~GlooCommunicator() override {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    ready_.notify_all();
    executor_.join();
  }

  int rank() const override { return context_->rank; }
  int size() const override { return context_->size; }
  std::chrono::milliseconds timeout() const override { return timeout_; }

  std::shared_ptr<Work> allReduceAsync(float* data, int64_t count) override {
    return std::make_shared<FutureWork>(submit(allReduceTask(data, count, timeout_)));
  }
  Status allReduceWithin(float* data, int64_t count, std::chrono::milliseconds timeout) override {
    return submit(allReduceTask(data, count, timeout)).get();
  }

  Status broadcastWithin(void* data, int64_t bytes, int root, std::chrono::milliseconds timeout) override {
    return submit([this, data, bytes, root, timeout] {
             return guarded("broadcast from rank " + std::to_string(root), [&] {
               gloo::BroadcastOptions options(context_);
               options.setOutput(static_cast<uint8_t*>(data), static_cast<size_t>(bytes));
               options.setRoot(root);
               options.setTag(nextTag());
               options.setTimeout(timeout);
               gloo::broadcast(options);
             });
           })
        .get();
  }

  std::shared_ptr<Work> sendAsync(const void* data, int64_t bytes, int peer, uint32_t tag) override {
    return postPointToPoint(const_cast<void*>(data), bytes, peer, tag, /*isSend=*/true);
  }
  std::shared_ptr<Work> recvAsync(void* data, int64_t bytes, int peer, uint32_t tag) override {
    return postPointToPoint(data, bytes, peer, tag, /*isSend=*/false);
  }

  StatusOr<std::unique_ptr<Communicator>> split(int color, int key) override {
    // Every rank publishes (color, key) under this split's own prefix, reads everyone's, and connects
    // a new mesh among the ranks of its color.
    const std::string prefix = options_.keyPrefix + "/split-" + std::to_string(splitCount_++);
    TANDEM_RETURN_IF_ERROR(store_->set(prefix + "/rank-" + std::to_string(rank()),
                                       std::to_string(color) + " " + std::to_string(key)));
    std::vector<std::tuple<int, int>> members;  // (key, rank) of my color
    for (int peer = 0; peer < size(); ++peer) {
      TANDEM_ASSIGN_OR_RETURN(std::string entry, store_->get(prefix + "/rank-" + std::to_string(peer), timeout_));
      int peerColor = 0, peerKey = 0;
      if (std::sscanf(entry.c_str(), "%d %d", &peerColor, &peerKey) != 2)
        return TANDEM_ERROR(StatusCode::kInternal, "split: malformed entry from rank " + std::to_string(peer));
      if (peerColor == color) members.emplace_back(peerKey, peer);
    }
    std::sort(members.begin(), members.end());
    GlooOptions options = options_;
    options.size = static_cast<int>(members.size());
    options.rank = static_cast<int>(std::find(members.begin(), members.end(), std::make_tuple(key, rank())) - members.begin());
    options.keyPrefix = prefix + "/color-" + std::to_string(color);
    return createGlooCommunicator(options, store_);
  }

  Status barrier() override {
    return submit([this] {
             return guarded("barrier", [&] {
               gloo::BarrierOptions options(context_);
               options.setTag(nextTag());
               options.setTimeout(timeout_);
               gloo::barrier(options);
             });
           })
        .get();
  }

 private:
  std::function<Status()> allReduceTask(float* data, int64_t count, std::chrono::milliseconds timeout) {
    return [this, data, count, timeout] {
      const int64_t bytes = count * static_cast<int64_t>(sizeof(float));
      if (isPowerOfTwo(size()))
        return guarded("all-reduce of " + std::to_string(count) + " floats", [&] {
          if (size() == 2 || bytes <= kRecursiveDoublingMaxBytes)
            allReduceByRecursiveDoubling(data, count, timeout);
          else
            allReduceByHalvingDoubling(data, count, timeout);
        });
      return guarded("all-reduce of " + std::to_string(count) + " floats", [&] {
        gloo::AllreduceOptions options(context_);
        options.setOutput(data, static_cast<size_t>(count));
        options.setReduceFunction(
            static_cast<void (*)(void*, const void*, const void*, size_t)>(&gloo::sum<float>));
        options.setTag(nextTag());
        options.setTimeout(timeout);
        gloo::allreduce(options);
      });
    };
  }

  // Collectives get tags in issue order; every rank issues the same sequence, so tags match.
  uint32_t nextTag() { return tagCounter_++; }

  // Adds theirs into data[0, count): the lower rank's value is the left operand, so both partners
  // (and every rank, round after round) compute bitwise the same sums.
  static void addInRankOrder(float* data, const float* theirs, int64_t count, bool mineIsLower) {
    if (mineIsLower)
      for (int64_t i = 0; i < count; ++i) data[i] = data[i] + theirs[i];
    else
      for (int64_t i = 0; i < count; ++i) data[i] = theirs[i] + data[i];
  }

  // Posts a send and a recv with the partner and waits for both.
  void exchange(int partner, uint64_t slot, float* sendData, int64_t sendCount, float* recvData, int64_t recvCount,
                std::chrono::milliseconds timeout) {
    auto sendBuffer = context_->createUnboundBuffer(sendData, static_cast<size_t>(sendCount) * sizeof(float));
    auto recvBuffer = context_->createUnboundBuffer(recvData, static_cast<size_t>(recvCount) * sizeof(float));
    recvBuffer->recv(partner, slot);
    sendBuffer->send(partner, slot);
    if (!sendBuffer->waitSend(timeout) || !recvBuffer->waitRecv(timeout))
      throw gloo::IoException("exchange with rank " + std::to_string(partner) + " was aborted");
  }

  // Bandwidth-optimal all-reduce for power-of-two groups: recursive halving (distance 1, 2, 4, ...:
  // each round keeps half of the segment and adds the partner's copy of it), then recursive doubling
  // back. Each element is summed in the same tree as allReduceByRecursiveDoubling:
  // ((r0 + r1) + (r2 + r3)) + ...
  void allReduceByHalvingDoubling(float* data, int64_t count, std::chrono::milliseconds timeout) {
    if (scratch_.size() < static_cast<size_t>(count)) scratch_.resize(count);
    const uint64_t sequence = exchangeCounter_++;
    const int me = rank();
    std::vector<std::pair<int64_t, int64_t>> segments;  // the segment before each halving round
    int64_t low = 0, high = count;
    int round = 0;
    for (int distance = 1; distance < size(); distance <<= 1, ++round) {
      const int partner = me ^ distance;
      const int64_t middle = low + (high - low) / 2;
      const bool keepLower = (me & distance) == 0;
      const int64_t keepLow = keepLower ? low : middle, keepHigh = keepLower ? middle : high;
      const int64_t sendLow = keepLower ? middle : low, sendHigh = keepLower ? high : middle;
      exchange(partner, kExchangeSlotBase + sequence * 64 + round, data + sendLow, sendHigh - sendLow, scratch_.data(),
               keepHigh - keepLow, timeout);
      addInRankOrder(data + keepLow, scratch_.data(), keepHigh - keepLow, me < partner);
      segments.emplace_back(low, high);
      low = keepLow;
      high = keepHigh;
    }
    for (int distance = size() >> 1; distance >= 1; distance >>= 1, ++round) {
      const int partner = me ^ distance;
      const auto [outerLow, outerHigh] = segments.back();
      segments.pop_back();
      const int64_t otherLow = low == outerLow ? high : outerLow;
      const int64_t otherHigh = low == outerLow ? outerHigh : low;
      exchange(partner, kExchangeSlotBase + sequence * 64 + round, data + low, high - low, data + otherLow,
               otherHigh - otherLow, timeout);
      low = outerLow;
      high = outerHigh;
    }
  }

  // All-reduce for power-of-two groups: log2(size) rounds; in round k each rank swaps its whole partial
  // sum with rank ^ 2^k and adds. Measured on loopback it takes one exchange's latency per round where
  // Gloo's ring takes 2(size-1) (2 ranks, 1 KiB: about 0.1 ms against 1.2 ms). The two partners add in
  // the same order (lower rank's value first), so every rank ends with bitwise identical sums.
  void allReduceByRecursiveDoubling(float* data, int64_t count, std::chrono::milliseconds timeout) {
    if (scratch_.size() < static_cast<size_t>(count)) scratch_.resize(count);
    const uint64_t sequence = exchangeCounter_++;
    const int me = rank();
    for (int distance = 1, round = 0; distance < size(); distance <<= 1, ++round) {
      const int partner = me ^ distance;
      exchange(partner, kExchangeSlotBase + sequence * 64 + round, data, count, scratch_.data(), count, timeout);
      addInRankOrder(data, scratch_.data(), count, me < partner);
    }
  }

  std::shared_ptr<Work> postPointToPoint(void* data, int64_t bytes, int peer, uint32_t tag, bool isSend) {
    auto buffer = std::make_shared<std::unique_ptr<gloo::transport::UnboundBuffer>>();
    auto posted = submit([this, buffer, data, bytes, peer, tag, isSend] {
      return guarded(std::string(isSend ? "posting send to" : "posting recv from") + " rank " + std::to_string(peer), [&] {
        *buffer = context_->createUnboundBuffer(data, static_cast<size_t>(bytes));
        if (isSend)
          (*buffer)->send(peer, kPointToPointSlotBase + tag);
        else
          (*buffer)->recv(peer, kPointToPointSlotBase + tag);
      });
    });
    return std::make_shared<PointToPointWork>(std::move(posted), std::move(buffer), isSend, peer, timeout_);
  }

  std::future<Status> submit(std::function<Status()> task) {
    auto packaged = std::make_shared<std::packaged_task<Status()>>(std::move(task));
    std::future<Status> future = packaged->get_future();
    {
      std::lock_guard<std::mutex> lock(mutex_);
      queue_.push_back([packaged] { (*packaged)(); });
    }
    ready_.notify_one();
    return future;
  }

  void runExecutor() {
    for (;;) {
      std::function<void()> task;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        ready_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
        if (queue_.empty()) return;
        task = std::move(queue_.front());
        queue_.pop_front();
      }
      task();
    }
  }

  std::shared_ptr<gloo::rendezvous::Context> context_;
  GlooOptions options_;
  std::shared_ptr<KeyValueStore> store_;
  int splitCount_ = 0;  // split() is called on one thread, the same sequence on every rank
  std::chrono::milliseconds timeout_;
  uint32_t tagCounter_ = 0;       // touched only on the executor thread
  uint64_t exchangeCounter_ = 0;  // likewise
  std::vector<float> scratch_;    // likewise: the partner's partial sums
  std::mutex mutex_;
  std::condition_variable ready_;
  std::deque<std::function<void()>> queue_;
  bool stopping_ = false;
  std::thread executor_;
};

class MemoryStore final : public KeyValueStore {
 public:
  Status set(const std::string& key, const std::string& value) override {
    std::lock_guard<std::mutex> lock(mutex_);
    values_[key] = value;
    changed_.notify_all();
    return Status::Ok();
  }
  StatusOr<std::string> get(const std::string& key, std::chrono::milliseconds timeout) override {
    std::unique_lock<std::mutex> lock(mutex_);
    if (!changed_.wait_for(lock, timeout, [&] { return values_.count(key) > 0; }))
      return TANDEM_ERROR(StatusCode::kDeadlineExceeded, "key " + key + " was never set");
    return values_[key];
  }

 private:
  std::mutex mutex_;
  std::condition_variable changed_;
  std::map<std::string, std::string> values_;
};

}  // namespace

std::shared_ptr<KeyValueStore> makeMemoryStore() { return std::make_shared<MemoryStore>(); }

StatusOr<std::unique_ptr<Communicator>> createGlooCommunicator(const GlooOptions& options,
                                                                std::shared_ptr<KeyValueStore> store) {
  std::shared_ptr<gloo::transport::Device> device;
  Status status = guarded("listening on " + options.hostAddress, [&] {
    gloo::transport::tcp::attr attributes;
    attributes.hostname = options.hostAddress;
    device = gloo::transport::tcp::CreateDevice(attributes);
  });
  // Gloo's checks fail here on this worker's network (an address it cannot bind, a name it cannot
  // resolve), not on a bug: retryable, with this worker named as the cause.
  if (status.code() == StatusCode::kInternal)
    return Status(StatusCode::kResourceUnavailable, status.message() + " (this worker's network)", __FILE__, __LINE__);
  if (!status.ok()) return status;
  std::shared_ptr<gloo::rendezvous::Context> context;
  status = guarded("connecting the Gloo full mesh of " + std::to_string(options.size) + " ranks", [&] {
    context = std::make_shared<gloo::rendezvous::Context>(options.rank, options.size);
    context->setTimeout(options.timeout);
    GlooStoreAdapter adapter(store, options.keyPrefix, options.timeout);
    context->connectFullMesh(adapter, device);
  });
  if (!status.ok()) return status;
  return std::unique_ptr<Communicator>(std::make_unique<GlooCommunicator>(std::move(context), options, store));
}

}  // namespace tandem::comm

// Checkpoints (DESIGN.md §7): <root>/step-<NNNNNNNN>/ holds one shard per pipeline stage
// (stage-<S>.bin: parameters then optimizer state, raw float32) and manifest.json (step, optimizer
// steps, model description, training config, each shard's size and SHA-256). A checkpoint is written
// into a hidden temporary directory, fsynced, renamed into place, and only then is `latest` replaced
// (atomically, by rename); checkpoints beyond `keep` are deleted last. A failed write leaves every
// earlier checkpoint untouched. Loading verifies sizes and checksums and falls back to older
// checkpoints, saying why.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "tandem/common/status.h"

namespace tandem::checkpoint {

struct CheckpointState {
  int64_t step = 0;             // optimizer steps completed; training resumes at step + 1
  int64_t optimizerSteps = 0;   // the optimizer's own counter (bias correction)
  int stage = 0;                // pipeline stage this shard belongs to
  std::string job;              // namespace/name
  std::string modelDescription; // e.g. "mlp 784-256-128-10 relu": must match to resume
  std::string trainingConfig;   // canonical training config: differences are logged, not refused
  uint64_t seed = 0;            // data order and initialisation seed (the data position is `step`)
  std::vector<float> parameters;
  std::vector<float> optimizerState;
};

// "step-00000500"
std::string stepDirectoryName(int64_t step);

// The deadline of a resume's exchanges that wait on storage. Before any rank hears which step to resume,
// the writers read and verify up to kept + 1 checkpoints (newest first; an older one only when a newer
// fails; + 1: the newest common step that pruning spares), then each stage's replicas receive its shard.
// Each read and the transfer get one collective timeout plus the largest shard at 20 MB/s: with the
// usual 30 s alone, every resume of a shard over about 600 MB on such storage would time out, and so
// would its restarts. At most 8 reads are planned for and at most a week (or the collective timeout if
// longer), or a huge keep would leave a peer that hangs during a resume unnoticed for days.
std::chrono::milliseconds resumeExchangeDeadline(std::chrono::milliseconds collectiveTimeout, double largestShardBytes,
                                                 int64_t kept);

class CheckpointStore {
 public:
  // root: <checkpoint.dir>/<job name>; keep: how many complete checkpoints to retain.
  CheckpointStore(std::string root, int64_t keep);

  const std::string& root() const { return root_; }

  // Writes durably (see the file comment); on failure nothing earlier is touched and the temporary
  // directory is removed. Returns the bytes written. Pruning spares step `alsoKeep` (0: none) beyond
  // `keep`: with pipeline stages, the newest step every stage holds, which a stage whose writes failed
  // may still need.
  StatusOr<int64_t> write(const CheckpointState& state, int64_t alsoKeep = 0);

  // Steps of the complete checkpoint directories present, newest first (`latest` is not needed).
  std::vector<int64_t> listSteps() const;

  // Reads and verifies one checkpoint: manifest, sizes, SHA-256 of every shard.
  StatusOr<CheckpointState> read(int64_t step, int stage = 0) const;

  // The model description in one checkpoint's manifest, read without its shards (nor verifying them).
  StatusOr<std::string> readModelDescription(int64_t step) const;

  // `step` when it verifies and holds `modelDescription`; nullopt (reported through `warn`) when it does
  // not verify; FAILED_PRECONDITION naming both models when it holds another model.
  StatusOr<std::optional<CheckpointState>> readMatching(int64_t step, int stage, const std::string& modelDescription,
                                                        const std::function<void(const std::string&)>& warn) const;

  // The newest checkpoint that verifies, skipping (and reporting through `warn`) the ones that do
  // not; nullopt when there is none. A checkpoint whose model differs is not skipped: it is an error
  // (FAILED_PRECONDITION naming both models), since resuming would silently start over.
  StatusOr<std::optional<CheckpointState>> loadNewestValid(const std::string& modelDescription, int stage,
                                                           const std::function<void(const std::string&)>& warn) const;

 private:
  // Deletes the checkpoints beyond `keep`, counting back from `written` (the step just written), except
  // `alsoKeep`.
  Status removeOld(int64_t written, int64_t alsoKeep) const;
  std::string root_;
  int64_t keep_;
};

// Writes checkpoints in the background: snapshot() copies the state at a step boundary (the caller's
// only cost) and a writer thread makes it durable while training goes on. One write is in flight at a
// time and they land in order.
// Nothing waits on storage without a deadline: a write in flight longer than `writeTimeout` is hung (an
// NFS server gone, a volume that blocks), which checkWriter(), submit() and drain() report as UNAVAILABLE
// naming the step, the directory and the last durable checkpoint. A hung write cannot be interrupted, so
// the destructor then leaves the writer thread behind instead of joining it, and its result is dropped.
// Thread-safe for one producer.
class AsyncCheckpointer {
 public:
  using Clock = std::chrono::steady_clock;
  struct Result {
    int64_t step = 0;
    int64_t bytes = 0;
    double seconds = 0.0;
    Status status;
    int64_t lastDurableStep = 0;  // after this attempt: `step` if it succeeded (0: none yet)
  };
  // lastDurableStep: the checkpoint training resumed from (0: none), for messages. onWritten runs on the
  // writer thread after each attempt (success or failure), never after the destructor has returned.
  AsyncCheckpointer(CheckpointStore store, std::chrono::milliseconds writeTimeout, int64_t lastDurableStep,
                    std::function<void(const Result&)> onWritten);
  // Finishes what was submitted, waiting until it lands, turns hung, or the shutdown limit passes (then
  // the writer is left behind; its temporary directory is debris the next write removes).
  ~AsyncCheckpointer();
  // The destructor waits at most `patience` from when it runs (a worker that failed is killed after its
  // grace period anyway), and never past `deadline` once set (a stop's grace period).
  void limitShutdown(std::chrono::milliseconds patience);
  void limitShutdown(Clock::time_point deadline);

  // The step being written now, if a write is in flight or queued: a periodic snapshot then skips rather
  // than stall training (and every peer waiting for this rank in the next collective).
  std::optional<int64_t> stepInFlight();
  // UNAVAILABLE once the write in flight has run longer than writeTimeout.
  Status checkWriter();
  // Queues the state once no write is in flight, waiting until `deadline` at most (then
  // DEADLINE_EXCEEDED) or until the write in flight is hung (UNAVAILABLE). Its pruning spares `alsoKeep`
  // (see CheckpointStore::write).
  Status submit(CheckpointState state, Clock::time_point deadline = Clock::time_point::max(), int64_t alsoKeep = 0);
  // Waits until nothing is in flight; the same errors as submit(). Returns the last attempt's result
  // (nullopt before the first).
  StatusOr<std::optional<Result>> drain(Clock::time_point deadline = Clock::time_point::max());
  const CheckpointStore& store() const { return shared_->store; }

 private:
  // What the writer thread uses: it may outlive this object after a timeout.
  struct Shared {
    explicit Shared(CheckpointStore s) : store(std::move(s)) {}
    CheckpointStore store;
    std::mutex mutex;
    std::condition_variable changed;
    std::optional<CheckpointState> pending;
    int64_t pendingAlsoKeep = 0;
    std::optional<int64_t> writingStep;  // the step being written now
    Clock::time_point writeStart;
    bool stopping = false;
    bool abandoned = false;  // the destructor left: report nothing more
    bool reporting = false;  // onWritten is running
    std::optional<Result> lastResult;
    int64_t lastDurableStep = 0;
    std::function<void(const Result&)> onWritten;
  };
  static constexpr std::chrono::milliseconds kForever = std::chrono::hours(24 * 365);  // clock-safe "no limit"
  static void run(const std::shared_ptr<Shared>& shared);
  // With shared_->mutex held: whether the write in flight has outlived writeTimeout, and the error saying so.
  bool hung() const;
  Status hungError() const;
  // Waits with `lock` held until nothing is in flight (OK), the write in flight is hung (UNAVAILABLE) or
  // `deadline` passes (DEADLINE_EXCEEDED); `what` says who waits, for the messages.
  Status waitIdle(std::unique_lock<std::mutex>& lock, Clock::time_point deadline, const std::string& what);
  std::string inFlightDescription() const;  // with shared_->mutex held
  std::string lastDurableDescription() const;  // "; the last durable checkpoint is ..."

  std::shared_ptr<Shared> shared_;
  std::chrono::milliseconds writeTimeout_;
  std::chrono::milliseconds shutdownPatience_ = kForever;
  Clock::time_point shutdownDeadline_ = Clock::time_point::max();
  std::thread writer_;
};

}  // namespace tandem::checkpoint

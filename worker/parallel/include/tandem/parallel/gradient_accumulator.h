// Sums a step's per-microbatch gradients on a thread of its own.
//
// The sum is pairwise, a binary tree in microbatch order: ((g0 + g1) + (g2 + g3)) + ... With power-of-two
// degrees this is the very order in which data-parallel replicas' partial sums meet in the
// recursive-doubling all-reduce, so D replicas of M microbatches compute bitwise the gradient of one
// worker with D x M microbatches of the same size. Gradient buffers change hands instead of being copied:
// after each backward the trainer swaps the filled buffer for a spare one (spareBuffer()) and hands the
// filled one over (add()). Backward overwrites gradients, so spares are never zeroed, and the sums run
// while the stage computes its next microbatch instead of delaying the neighbours waiting for it.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <mutex>
#include <thread>
#include <vector>

#include "tandem/tensor/tensor.h"

namespace tandem::parallel {

class GradientAccumulator {
 public:
  enum class Summing {
    kBackground,  // on the accumulator's thread (SCHED_IDLE)
    kInline,      // in add(), on the caller's thread, as each microbatch arrives (TANDEM_GRADIENT_SUMS=inline:
                  // to compare the two on a machine, BENCHMARKS.md §3)
    kNoThread,    // tests: no thread, add() sums only once kMaxQueued wait, finish() the rest (the paths
                  // taken when the thread gets no CPU)
  };
  // size: floats per gradient buffer. Every mode sums in the same tree: the same bits.
  explicit GradientAccumulator(int64_t size, Summing summing = Summing::kBackground);
  ~GradientAccumulator();
  GradientAccumulator(const GradientAccumulator&) = delete;
  GradientAccumulator& operator=(const GradientAccumulator&) = delete;

  // A buffer of `size` floats for the next backward to overwrite, its contents unspecified: a spare
  // one, else a new one (so there are never more buffers than a step holds at once).
  FloatBuffer spareBuffer();
  // Takes one microbatch's gradients; summed in the background. When more than kMaxQueued wait for the
  // thread (it had no CPU), the caller sums them itself, so memory does not grow with M. It first waits
  // for a sum the thread is in the middle of, as finish() does: on a core that other busy threads also
  // share, that wait lasts until the scheduler gives the SCHED_IDLE thread a slice.
  void add(FloatBuffer gradients);
  static constexpr size_t kMaxQueued = 2;
  // Returns the total of everything added since the last finish (zeros when nothing was). Waits only for
  // a sum the thread is in the middle of and does what is still queued itself, at the caller's priority:
  // the thread is SCHED_IDLE and may have had no CPU. Unequal levels (a microbatch count that is not a
  // power of two) fold right to left.
  FloatBuffer finish();
  // Gives back a buffer that is no longer needed, for spareBuffer().
  void recycle(FloatBuffer buffer);
  // Buffers allocated so far. The pool grows while a step holds more than it has: at most a partial sum
  // per bit of M, kMaxQueued queued ones, the one a backward is writing and the model's (log2(M) + 5).
  int64_t buffersAllocated() const { return allocated_.load(); }

 private:
  void run();
  void addToTree(FloatBuffer gradients);  // a microbatch's gradients as the newest leaf, merged up
  // Waits for the thread to put down its sum, then takes what is queued (with `lock` held on entry and
  // exit); the tree is the caller's until it clears callerOwnsTree_.
  std::deque<FloatBuffer> takeOverQueue(std::unique_lock<std::mutex>& lock);
  void mergeEqualLevels();
  void foldTop(size_t count);  // the top `count` partial sums into the lowest of them

  const int64_t size_;
  const Summing summing_;
  std::atomic<int64_t> allocated_{0};
  std::mutex mutex_;
  std::condition_variable changed_;
  std::deque<FloatBuffer> added_;    // handed over, not yet in the tree
  std::vector<FloatBuffer> spare_;   // for spareBuffer()
  bool working_ = false;             // the thread holds a buffer outside the queues
  bool callerOwnsTree_ = false;      // add() or finish() sums: the thread takes nothing new
  bool stopping_ = false;
  // Partial sums and their levels: the thread's, or add()'s or finish()'s while callerOwnsTree_ (they
  // take it only once the thread has put its sum down).
  std::vector<FloatBuffer> tree_;
  std::vector<int> levels_;
  std::thread thread_;  // started for kBackground only
};

}  // namespace tandem::parallel

// Process exit codes (DESIGN.md §3): 0 done; 1-127 permanent (no restart helps); 128+ retryable.
#pragma once

#include "tandem/common/status.h"

namespace tandem {

constexpr int kExitOk = 0;
constexpr int kExitInvalidConfig = 2;   // manifest, command line or environment is wrong
constexpr int kExitBadData = 3;         // dataset missing, truncated or corrupt
constexpr int kExitRefused = 4;         // the rendezvous refused us (token, config hash, rank)
constexpr int kExitInternal = 5;        // a bug: retrying would fail the same way
constexpr int kExitDeadlineExceeded = 124;  // tandem run: spec.runPolicy.activeDeadlineSeconds passed (timeout(1)'s code)
constexpr int kExitPeerLost = 129;      // a peer died or timed out, rendezvous unreachable: retry
constexpr int kExitInterrupted = 130;   // SIGINT (128 + 2)
constexpr int kExitTerminated = 143;    // SIGTERM (128 + 15): preempted, retry
// This worker's own disk or port failed (full, hung, taken): retry, and name this worker as the cause, not
// the peers that exit kExitPeerLost after it. 150 = 128 + SIGTTOU, a signal that stops a process and never
// ends one, so no signal death reads as this code.
constexpr int kExitResourceUnavailable = 150;

inline bool isRetryableExit(int code) { return code >= 128; }

// The exit code for a failure of this kind.
inline int exitCodeFor(const Status& status) {
  switch (status.code()) {
    case StatusCode::kOk: return kExitOk;
    case StatusCode::kInvalidArgument: return kExitInvalidConfig;
    case StatusCode::kNotFound:
    case StatusCode::kDataLoss: return kExitBadData;
    case StatusCode::kPermissionDenied:
    case StatusCode::kFailedPrecondition:
    case StatusCode::kAlreadyExists: return kExitRefused;
    case StatusCode::kUnavailable:
    case StatusCode::kDeadlineExceeded:
    case StatusCode::kAborted: return kExitPeerLost;
    case StatusCode::kCancelled: return kExitTerminated;
    case StatusCode::kInternal: return kExitInternal;
    case StatusCode::kResourceUnavailable: return kExitResourceUnavailable;
  }
  return kExitInternal;
}

}  // namespace tandem

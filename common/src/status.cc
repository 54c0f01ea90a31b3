#include "tandem/common/status.h"

#include <cstring>

namespace tandem {

const char* statusCodeName(StatusCode code) {
  switch (code) {
    case StatusCode::kOk: return "OK";
    case StatusCode::kInvalidArgument: return "INVALID_ARGUMENT";
    case StatusCode::kNotFound: return "NOT_FOUND";
    case StatusCode::kDataLoss: return "DATA_LOSS";
    case StatusCode::kUnavailable: return "UNAVAILABLE";
    case StatusCode::kDeadlineExceeded: return "DEADLINE_EXCEEDED";
    case StatusCode::kPermissionDenied: return "PERMISSION_DENIED";
    case StatusCode::kFailedPrecondition: return "FAILED_PRECONDITION";
    case StatusCode::kAlreadyExists: return "ALREADY_EXISTS";
    case StatusCode::kAborted: return "ABORTED";
    case StatusCode::kCancelled: return "CANCELLED";
    case StatusCode::kInternal: return "INTERNAL";
    case StatusCode::kResourceUnavailable: return "RESOURCE_UNAVAILABLE";
  }
  return "UNKNOWN";
}

std::string Status::toString() const {
  if (ok()) return "OK";
  std::string out = std::string(statusCodeName(code_)) + ": " + message_;
  if (file_ != nullptr && *file_ != '\0') {
    const char* base = std::strrchr(file_, '/');
    out += " (" + std::string(base ? base + 1 : file_) + ":" + std::to_string(line_) + ")";
  }
  return out;
}

Status Status::withContext(const std::string& context) const {
  if (ok()) return *this;
  Status copy = *this;
  copy.message_ = context + ": " + message_;
  return copy;
}

}  // namespace tandem

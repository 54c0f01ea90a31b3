// Status and StatusOr<T>: errors as values. A Status carries a code, a message that names what failed
// (a file, a field, a peer) and the file:line that created it. Only main() turns one into an exit code.
#pragma once

#include <optional>
#include <string>
#include <utility>
#include <variant>

namespace tandem {

enum class StatusCode {
  kOk = 0,
  kInvalidArgument,     // bad configuration or command line
  kNotFound,            // a file or resource is missing
  kDataLoss,            // a file is truncated or corrupt
  kUnavailable,         // a peer or service cannot be reached (retryable)
  kDeadlineExceeded,    // a wait ran out of time (retryable)
  kPermissionDenied,    // wrong token, unwritable directory
  kFailedPrecondition,  // mismatched configuration or generation
  kAlreadyExists,
  kAborted,             // a peer failed or the run was stopped (retryable)
  kCancelled,           // stopped on request (SIGTERM, Ctrl-C)
  kInternal,
  kResourceUnavailable,  // this process's own disk or port is full, hung or taken (retryable; the cause is here)
};

const char* statusCodeName(StatusCode code);

class [[nodiscard]] Status {
 public:
  Status() = default;
  Status(StatusCode code, std::string message, const char* file = "", int line = 0)
      : code_(code), message_(std::move(message)), file_(file), line_(line) {}

  static Status Ok() { return Status(); }

  bool ok() const { return code_ == StatusCode::kOk; }
  StatusCode code() const { return code_; }
  const std::string& message() const { return message_; }
  // "CODE: message (file:line)", for logs.
  std::string toString() const;
  // Prepends context ("loading checkpoint: ") to the message, keeping code and origin.
  Status withContext(const std::string& context) const;

 private:
  StatusCode code_ = StatusCode::kOk;
  std::string message_;
  const char* file_ = "";
  int line_ = 0;
};

template <typename T>
class [[nodiscard]] StatusOr {
 public:
  StatusOr(Status status) : value_(std::move(status)) {}  // NOLINT: implicit by design
  StatusOr(T value) : value_(std::move(value)) {}         // NOLINT: implicit by design

  bool ok() const { return std::holds_alternative<T>(value_); }
  const Status& status() const {
    static const Status kOkStatus;
    return ok() ? kOkStatus : std::get<Status>(value_);
  }
  T& value() & { return std::get<T>(value_); }
  const T& value() const& { return std::get<T>(value_); }
  T&& value() && { return std::get<T>(std::move(value_)); }
  T& operator*() & { return value(); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }

 private:
  std::variant<Status, T> value_;
};

}  // namespace tandem

#define TANDEM_ERROR(code, message) ::tandem::Status((code), (message), __FILE__, __LINE__)

#define TANDEM_CONCAT_INNER(a, b) a##b
#define TANDEM_CONCAT(a, b) TANDEM_CONCAT_INNER(a, b)

#define TANDEM_RETURN_IF_ERROR(expr)          \
  do {                                        \
    ::tandem::Status tandem_status_ = (expr); \
    if (!tandem_status_.ok()) return tandem_status_; \
  } while (0)

#define TANDEM_ASSIGN_OR_RETURN_IMPL(holder, lhs, expr) \
  auto holder = (expr);                                  \
  if (!holder.ok()) return holder.status();              \
  lhs = std::move(holder).value()

#define TANDEM_ASSIGN_OR_RETURN(lhs, expr) \
  TANDEM_ASSIGN_OR_RETURN_IMPL(TANDEM_CONCAT(tandem_or_, __LINE__), lhs, expr)

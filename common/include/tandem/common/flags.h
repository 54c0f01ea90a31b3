// Numbers from the command line and the environment, checked: an error names the flag and what it
// accepts, instead of a value that overflows a clock or a port later (or is silently ignored).
#pragma once

#include <cstdint>
#include <string>

#include "tandem/common/status.h"

namespace tandem {

// An integer in [minimum, maximum].
StatusOr<int64_t> parseIntegerFlag(const std::string& name, const std::string& text, int64_t minimum, int64_t maximum);

// A number in (0, maximum]: seconds, megabytes.
StatusOr<double> parsePositiveFlag(const std::string& name, const std::string& text, double maximum);

// Seconds a flag may give a timeout or grace period: about 11.6 days, far below what overflows a clock.
inline constexpr double kMaxFlagSeconds = 1e6;

}  // namespace tandem

#include "tandem/common/flags.h"

#include <cerrno>
#include <cstdlib>
#include <iomanip>
#include <sstream>

namespace tandem {

StatusOr<int64_t> parseIntegerFlag(const std::string& name, const std::string& text, int64_t minimum, int64_t maximum) {
  char* end = nullptr;
  errno = 0;
  const long long value = std::strtoll(text.c_str(), &end, 10);
  if (end == text.c_str() || *end != '\0' || errno == ERANGE || value < minimum || value > maximum)
    return TANDEM_ERROR(StatusCode::kInvalidArgument, name + ": expected an integer from " + std::to_string(minimum) +
                                                          " to " + std::to_string(maximum) + ", got \"" + text + "\"");
  return static_cast<int64_t>(value);
}

StatusOr<double> parsePositiveFlag(const std::string& name, const std::string& text, double maximum) {
  char* end = nullptr;
  const double value = std::strtod(text.c_str(), &end);
  if (end == text.c_str() || *end != '\0' || !(value > 0) || !(value <= maximum)) {  // NaN fails both
    std::ostringstream message;
    message << name << ": expected a positive number up to " << std::setprecision(15) << maximum << ", got \"" << text << "\"";
    return TANDEM_ERROR(StatusCode::kInvalidArgument, message.str());
  }
  return value;
}

}  // namespace tandem

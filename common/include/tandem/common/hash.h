// FNV-1a 64-bit hashing: a stable fingerprint of configuration text (the config hash of the
// rendezvous). Not for security and not for data integrity.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace tandem {

uint64_t fnv1a64(std::string_view bytes, uint64_t seed = 14695981039346656037ull);
// 16 lowercase hex digits.
std::string toHex64(uint64_t value);

}  // namespace tandem

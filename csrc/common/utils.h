// Small utilities of the core: strings, clocks, random bytes.
#pragma once

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace tcpx {

using Clock = std::chrono::steady_clock;

std::string hostName();
std::string toUpper(const std::string& s);
std::string toLower(const std::string& s);
std::string trim(const std::string& s);
std::vector<std::string> splitString(const std::string& s, char sep);
// printf into a std::string.
std::string strFormat(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
// "1.5 MiB", "512 B": sizes in error messages and logs.
std::string formatBytes(uint64_t bytes);
// Reads the first line of a small sysfs or procfs file as an integer. False
// when the file is absent, unreadable (reading lo's "speed" fails with
// EINVAL) or not a number.
bool readIntFile(const std::string& path, long* out);

// Fills `out` with `n` bytes from the kernel's CSPRNG (getrandom); falls back
// to std::random_device if that fails.
void randomBytes(void* out, size_t n);

// Milliseconds from `now` to `deadline`, at least 0.
int64_t msUntil(Clock::time_point deadline);

// Page-aligned heap memory (bounce buffers, scratch): aligned for the
// vectorised reduction kernels and for page-granular pinning later.
// allocAligned returns an empty pointer when out of memory.
using AlignedBuf = std::unique_ptr<char, void (*)(char*)>;
AlignedBuf allocAligned(size_t bytes);

}  // namespace tcpx

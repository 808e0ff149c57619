// The kernel's per-connection TCP estimates that the socket net balances
// channels by. Kept apart because <linux/tcp.h>, which has the current
// struct tcp_info, cannot be included next to glibc's <netinet/tcp.h>.
#pragma once

#include <cstdint>

namespace tcpx {

struct TcpRate {
  uint64_t deliveryBps = 0;  // tcpi_delivery_rate: the latest delivery-rate sample, bytes/s
                             // (Linux tcp_rate.c; draft-cheng-iccrg-delivery-rate-estimation)
  bool appLimited = false;   // the sample was taken while the sender had too little to send
};

// Reads TCP_INFO of socket `fd`. False when the kernel has no such estimate
// (older than 4.9, or not TCP).
bool readTcpRate(int fd, TcpRate* out);

}  // namespace tcpx

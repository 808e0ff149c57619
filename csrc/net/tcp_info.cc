#include "net/tcp_info.h"

#include <linux/tcp.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <cstddef>

namespace tcpx {

bool readTcpRate(int fd, TcpRate* out) {
  tcp_info ti{};
  socklen_t len = sizeof(ti);
  if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &ti, &len) != 0) return false;
  // Kernels older than the field return a shorter struct.
  if (len < offsetof(tcp_info, tcpi_delivery_rate) + sizeof(ti.tcpi_delivery_rate)) return false;
  out->deliveryBps = ti.tcpi_delivery_rate;
  out->appLimited = ti.tcpi_delivery_rate_app_limited;
  return true;
}

}  // namespace tcpx

// Network interfaces as devices of the socket net.
//
// Discovery lists the host's interfaces (getifaddrs) that are up and have an
// IPv4 or IPv6 address, filtered by an NCCL_SOCKET_IFNAME-style specification,
// and reads what sysfs knows of each (speed, PCI path, NUMA node).
//
// Filter syntax (NCCL's, `TCPX_SOCKET_IFNAME`): a comma-separated list of
// prefixes ("eth,ens" matches eth0, eth1, ens5); a leading '^' makes it an
// exclusion list ("^docker,lo"); a leading '=' (after '^' if both) makes the
// names exact instead of prefixes ("=eth1,eth2", "^=docker0"). Each list item
// may carry a ":port" suffix, which is ignored for matching.
#pragma once

#include <string>
#include <vector>

#include <netinet/in.h>
#include <sys/socket.h>

#include "common/status.h"

namespace tcpx {

// A parsed TCPX_SOCKET_IFNAME value.
struct IfnameFilter {
  bool exclude = false;  // '^': the list names interfaces to leave out
  bool exact = false;    // '=': names must match whole, not as prefixes
  std::vector<std::string> names;

  // Parses `spec`; an empty spec matches everything. Never fails: empty
  // items are dropped.
  static IfnameFilter parse(const std::string& spec);
  bool matches(const std::string& ifname) const;
};

// One usable interface: a device of the socket net.
struct NetInterface {
  std::string name;                  // "eth1"
  sockaddr_storage addr{};           // first address of the interface (IPv4 preferred)
  socklen_t addrLen = 0;
  std::string addrString;            // "10.0.1.2" or "fe80::1%eth1"
  int speedMbps = 0;                 // /sys/class/net/<if>/speed; 0 when unknown
  std::string pciPath;               // realpath of /sys/class/net/<if>/device; "" when virtual
  int numaNode = -1;                 // /sys/class/net/<if>/device/numa_node; -1 when unknown
  bool loopback = false;
};

// Lists interfaces that are up, not loopback unless asked, have an address of
// `family` (AF_INET, AF_INET6 or AF_UNSPEC for both, IPv4 first) and pass
// `filter`. `sysfsRoot` is "/sys" except in tests, which give a fake tree.
// Order: the order getifaddrs reports, one entry per interface name.
tcpxResult_t listInterfaces(const IfnameFilter& filter, int family,
                            bool includeLoopback, const std::string& sysfsRoot,
                            std::vector<NetInterface>* out);

// The devices of the socket net, chosen as NCCL does: with a filter, the
// interfaces it selects (loopback included if named); without one, every
// interface but loopback and docker*, falling back to docker*, then to
// loopback when nothing else is up. An empty result is an error that names
// the filter.
tcpxResult_t findNetDevices(const std::string& ifnameSpec,
                            const std::string& sysfsRoot,
                            std::vector<NetInterface>* out);

// The socket net's devices: findNetDevices, then only addresses of `family`
// (TCPX_SOCKET_FAMILY; 0: any). Error (tcpxInvalidArgument) when the family
// leaves none.
tcpxResult_t selectNetDevices(const std::string& ifnameSpec, int family,
                              const std::string& sysfsRoot, std::vector<NetInterface>* out);

// Reads speed / pciPath / numaNode of `ifname` under `sysfsRoot` into `iface`
// (fields left at their defaults when sysfs has nothing).
void readSysfsAttributes(const std::string& sysfsRoot, const std::string& ifname,
                         NetInterface* iface);

// "1.2.3.4:port" / "[fe80::1]:port" for logs and error messages.
std::string sockaddrToString(const sockaddr* addr, socklen_t len);

}  // namespace tcpx

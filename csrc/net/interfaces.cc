#include "net/interfaces.h"

#include <cerrno>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <map>

#include <arpa/inet.h>
#include <ifaddrs.h>
#include <net/if.h>

#include "common/logging.h"
#include "common/utils.h"

namespace tcpx {
namespace {

// Preference among the addresses of one interface: IPv4, then IPv6 other
// than link-local, then link-local (usable only with a scope, and only on the
// one link, so kept as a last resort).
int addressRank(const sockaddr* sa) {
  if (sa->sa_family == AF_INET) return 0;
  const sockaddr_in6* s6 = reinterpret_cast<const sockaddr_in6*>(sa);
  return IN6_IS_ADDR_LINKLOCAL(&s6->sin6_addr) ? 2 : 1;
}

// Numeric host part of an address; IPv6 scoped addresses get "%ifname".
std::string hostString(const sockaddr* sa, const char* ifname) {
  char buf[INET6_ADDRSTRLEN] = {0};
  if (sa->sa_family == AF_INET) {
    inet_ntop(AF_INET, &reinterpret_cast<const sockaddr_in*>(sa)->sin_addr, buf, sizeof(buf));
    return buf;
  }
  const sockaddr_in6* s6 = reinterpret_cast<const sockaddr_in6*>(sa);
  inet_ntop(AF_INET6, &s6->sin6_addr, buf, sizeof(buf));
  std::string s = buf;
  if (s6->sin6_scope_id != 0) {
    char name[IF_NAMESIZE] = {0};
    if (ifname) {
      s += "%" + std::string(ifname);
    } else if (if_indextoname(s6->sin6_scope_id, name)) {
      s += "%" + std::string(name);
    } else {
      s += "%" + std::to_string(s6->sin6_scope_id);
    }
  }
  return s;
}

// Every interface name getifaddrs reports, in its order, with a note for
// those that cannot be used: the error message of an empty selection shows
// what there was to choose from.
std::string describeAllInterfaces() {
  ifaddrs* list = nullptr;
  if (getifaddrs(&list) != 0) return strFormat("getifaddrs failed: %s", strerror(errno));
  std::vector<std::string> order;
  std::map<std::string, std::pair<bool, bool>> state;  // name -> (up, has IP address)
  for (ifaddrs* ifa = list; ifa; ifa = ifa->ifa_next) {
    if (!ifa->ifa_name) continue;
    auto it = state.find(ifa->ifa_name);
    if (it == state.end()) {
      order.push_back(ifa->ifa_name);
      it = state.emplace(ifa->ifa_name, std::make_pair(false, false)).first;
    }
    if (ifa->ifa_flags & IFF_UP) it->second.first = true;
    if (ifa->ifa_addr &&
        (ifa->ifa_addr->sa_family == AF_INET || ifa->ifa_addr->sa_family == AF_INET6))
      it->second.second = true;
  }
  freeifaddrs(list);
  std::string out;
  for (const std::string& name : order) {
    if (!out.empty()) out += ", ";
    out += name;
    const auto& st = state[name];
    if (!st.first) {
      out += " (down)";
    } else if (!st.second) {
      out += " (no address)";
    }
  }
  return out.empty() ? "none" : out;
}

std::string describeSelection(const std::vector<NetInterface>& v) {
  std::string out;
  for (const NetInterface& i : v) {
    if (!out.empty()) out += " ";
    out += strFormat("%s(%s", i.name.c_str(), i.addrString.c_str());
    if (i.speedMbps > 0) out += strFormat(", %d Mb/s", i.speedMbps);
    if (i.numaNode >= 0) out += strFormat(", numa %d", i.numaNode);
    out += ")";
  }
  return out;
}

}  // namespace

IfnameFilter IfnameFilter::parse(const std::string& spec) {
  IfnameFilter f;
  std::string s = trim(spec);
  if (!s.empty() && s[0] == '^') {
    f.exclude = true;
    s.erase(0, 1);
  }
  if (!s.empty() && s[0] == '=') {
    f.exact = true;
    s.erase(0, 1);
  }
  for (const std::string& raw : splitString(s, ',')) {
    // "eth0:5000": NCCL lets an item name a port too; matching ignores it.
    std::string item = trim(raw.substr(0, raw.find(':')));
    if (!item.empty()) f.names.push_back(item);
  }
  return f;
}

bool IfnameFilter::matches(const std::string& ifname) const {
  // Nothing listed selects everything, whatever the '^' says: "exclude
  // nothing" and "no filter" mean the same.
  if (names.empty()) return true;
  bool listed = false;
  for (const std::string& n : names) {
    if (exact ? ifname == n : ifname.compare(0, n.size(), n) == 0) {
      listed = true;
      break;
    }
  }
  return listed != exclude;
}

void readSysfsAttributes(const std::string& sysfsRoot, const std::string& ifname,
                         NetInterface* iface) {
  const std::string dir = sysfsRoot + "/class/net/" + ifname;
  long v = 0;
  // Virtual and some paravirtual devices report -1 (or fail the read): unknown.
  iface->speedMbps = (readIntFile(dir + "/speed", &v) && v > 0 && v <= INT_MAX)
                         ? static_cast<int>(v)
                         : 0;
  char resolved[PATH_MAX];
  iface->pciPath = realpath((dir + "/device").c_str(), resolved) ? resolved : "";
  // The kernel writes -1 when the platform has no NUMA information.
  iface->numaNode = (readIntFile(dir + "/device/numa_node", &v) && v >= 0 && v <= INT_MAX)
                        ? static_cast<int>(v)
                        : -1;
}

tcpxResult_t listInterfaces(const IfnameFilter& filter, int family, bool includeLoopback,
                            const std::string& sysfsRoot, std::vector<NetInterface>* out) {
  if (family != AF_UNSPEC && family != AF_INET && family != AF_INET6)
    TCPX_ERR(tcpxInvalidArgument, "listInterfaces: unsupported address family %d", family);
  out->clear();
  ifaddrs* list = nullptr;
  if (getifaddrs(&list) != 0) {
    int err = errno;
    TCPX_ERR(tcpxSystemError, "getifaddrs failed: %s", strerror(err));
  }
  // Per name, the best-ranked address seen so far; `out` keeps the order in
  // which names first showed a usable address.
  std::map<std::string, std::pair<size_t, int>> seen;  // name -> (index in out, rank)
  for (ifaddrs* ifa = list; ifa; ifa = ifa->ifa_next) {
    if (!ifa->ifa_addr || !ifa->ifa_name) continue;
    const int af = ifa->ifa_addr->sa_family;
    if (af != AF_INET && af != AF_INET6) continue;
    if (family != AF_UNSPEC && af != family) continue;
    if (!(ifa->ifa_flags & IFF_UP)) continue;
    const bool loopback = (ifa->ifa_flags & IFF_LOOPBACK) != 0;
    if (loopback && !includeLoopback) continue;
    if (!filter.matches(ifa->ifa_name)) continue;
    const int rank = addressRank(ifa->ifa_addr);
    auto it = seen.find(ifa->ifa_name);
    if (it != seen.end() && it->second.second <= rank) continue;  // keep the first of a rank
    NetInterface* iface;
    if (it == seen.end()) {
      seen.emplace(ifa->ifa_name, std::make_pair(out->size(), rank));
      out->emplace_back();
      iface = &out->back();
      iface->name = ifa->ifa_name;
      iface->loopback = loopback;
    } else {
      it->second.second = rank;
      iface = &(*out)[it->second.first];
    }
    const socklen_t len = af == AF_INET ? sizeof(sockaddr_in) : sizeof(sockaddr_in6);
    memset(&iface->addr, 0, sizeof(iface->addr));
    memcpy(&iface->addr, ifa->ifa_addr, len);
    iface->addrLen = len;
    iface->addrString = hostString(ifa->ifa_addr, ifa->ifa_name);
  }
  freeifaddrs(list);
  for (NetInterface& iface : *out) readSysfsAttributes(sysfsRoot, iface.name, &iface);
  return tcpxSuccess;
}

tcpxResult_t findNetDevices(const std::string& ifnameSpec, const std::string& sysfsRoot,
                            std::vector<NetInterface>* out) {
  const std::string spec = trim(ifnameSpec);
  if (!spec.empty()) {
    IfnameFilter filter = IfnameFilter::parse(spec);
    // Loopback only when the list names it: an exclusion list ("^docker")
    // means "the real interfaces but these", as NCCL users expect.
    TCPX_CHECK(listInterfaces(filter, AF_UNSPEC, /*includeLoopback=*/!filter.exclude,
                              sysfsRoot, out));
    if (out->empty()) {
      TCPX_ERR(tcpxInvalidArgument,
               "TCPX_SOCKET_IFNAME='%s' matches no interface that is up with an address "
               "(interfaces: %s)",
               spec.c_str(), describeAllInterfaces().c_str());
    }
  } else {
    // NCCL's default order: anything but docker and loopback, then docker
    // bridges, then loopback (a single-host run with no network).
    TCPX_CHECK(listInterfaces(IfnameFilter::parse("^docker"), AF_UNSPEC, false, sysfsRoot, out));
    if (out->empty())
      TCPX_CHECK(listInterfaces(IfnameFilter::parse("docker"), AF_UNSPEC, false, sysfsRoot, out));
    if (out->empty()) {
      std::vector<NetInterface> all;
      TCPX_CHECK(listInterfaces(IfnameFilter(), AF_UNSPEC, true, sysfsRoot, &all));
      for (NetInterface& i : all)
        if (i.loopback) out->push_back(i);
    }
    if (out->empty()) {
      TCPX_ERR(tcpxInvalidArgument,
               "TCPX_SOCKET_IFNAME is unset and no interface is up with an address, not even "
               "loopback (interfaces: %s)",
               describeAllInterfaces().c_str());
    }
  }
  TCPX_INFO(kLogNet, "NET/Socket: %zu device(s) for TCPX_SOCKET_IFNAME=%s: %s", out->size(),
            spec.empty() ? "(auto)" : spec.c_str(), describeSelection(*out).c_str());
  return tcpxSuccess;
}

std::string sockaddrToString(const sockaddr* addr, socklen_t len) {
  if (!addr) return "<null address>";
  if (addr->sa_family == AF_INET && len >= static_cast<socklen_t>(sizeof(sockaddr_in))) {
    const sockaddr_in* s4 = reinterpret_cast<const sockaddr_in*>(addr);
    return hostString(addr, nullptr) + ":" + std::to_string(ntohs(s4->sin_port));
  }
  if (addr->sa_family == AF_INET6 && len >= static_cast<socklen_t>(sizeof(sockaddr_in6))) {
    const sockaddr_in6* s6 = reinterpret_cast<const sockaddr_in6*>(addr);
    return "[" + hostString(addr, nullptr) + "]:" + std::to_string(ntohs(s6->sin6_port));
  }
  return strFormat("<address of family %d, %u bytes>", static_cast<int>(addr->sa_family),
                   static_cast<unsigned>(len));
}

tcpxResult_t selectNetDevices(const std::string& ifnameSpec, int family,
                              const std::string& sysfsRoot, std::vector<NetInterface>* out) {
  std::vector<NetInterface> devs;
  TCPX_CHECK(findNetDevices(ifnameSpec, sysfsRoot, &devs));
  out->clear();
  for (auto& d : devs)
    if (family == 0 || d.addr.ss_family == family) out->push_back(d);
  if (out->empty())
    TCPX_ERR(tcpxInvalidArgument, "TCPX_SOCKET_FAMILY leaves no usable interface");
  return tcpxSuccess;
}

}  // namespace tcpx

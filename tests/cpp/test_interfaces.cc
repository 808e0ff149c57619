// Tests of net/interfaces.h: the TCPX_SOCKET_IFNAME filter, sysfs attributes
// read from a fake tree, and discovery on the real host (which has at least
// loopback).
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>
#include <vector>

#include <arpa/inet.h>
#include <ifaddrs.h>
#include <net/if.h>

#include "common/status.h"
#include "net/interfaces.h"
#include "net/pairing.h"

namespace tcpx {
namespace {

namespace fs = std::filesystem;

// ---------------------------------------------------------------------------
// Filter parsing and matching.

struct ParseCase {
  const char* spec;
  bool exclude;
  bool exact;
  std::vector<std::string> names;
};

TEST(IfnameFilter, Parse) {
  const ParseCase cases[] = {
      {"", false, false, {}},
      {"eth", false, false, {"eth"}},
      {"eth,ens", false, false, {"eth", "ens"}},
      {"^docker,lo", true, false, {"docker", "lo"}},
      {"=eth1,eth2", false, true, {"eth1", "eth2"}},
      {"^=docker0", true, true, {"docker0"}},
      {"eth0:5000,eth1:5001", false, false, {"eth0", "eth1"}},
      {"=eth1:1234", false, true, {"eth1"}},
      {",,eth,,", false, false, {"eth"}},
      {" eth1 , eth2 ", false, false, {"eth1", "eth2"}},
      {"^", true, false, {}},
      {"=^eth", false, true, {"^eth"}},  // '^' counts only in front of '='
      {":5000", false, false, {}},
  };
  for (const ParseCase& c : cases) {
    IfnameFilter f = IfnameFilter::parse(c.spec);
    EXPECT_EQ(f.exclude, c.exclude) << "'" << c.spec << "'";
    EXPECT_EQ(f.exact, c.exact) << "'" << c.spec << "'";
    EXPECT_EQ(f.names, c.names) << "'" << c.spec << "'";
  }
}

struct MatchCase {
  const char* spec;
  const char* ifname;
  bool match;
};

TEST(IfnameFilter, Matches) {
  const MatchCase cases[] = {
      {"", "eth0", true},
      {"", "lo", true},
      {"eth", "eth0", true},
      {"eth", "eth10", true},
      {"eth", "ens5", false},
      {"eth", "veth0", false},  // prefixes, not substrings
      {"eth,ens", "ens5", true},
      {"eth,ens", "enp0s3", false},
      {"^docker,lo", "docker0", false},
      {"^docker,lo", "lo", false},
      {"^docker,lo", "lo2", false},  // exclusion by prefix too
      {"^docker,lo", "eth0", true},
      {"=eth1,eth2", "eth1", true},
      {"=eth1,eth2", "eth2", true},
      {"=eth1,eth2", "eth10", false},
      {"=eth1,eth2", "eth", false},
      {"^=docker0", "docker0", false},
      {"^=docker0", "docker1", true},
      {"^=docker0", "eth0", true},
      {"eth0:5000", "eth0", true},
      {"=eth0:5000", "eth0", true},
      {"=eth0:5000", "eth0:5000", false},
      {"^", "eth0", true},  // excluding nothing
      {"eth1", "eth", false},
  };
  for (const MatchCase& c : cases) {
    EXPECT_EQ(IfnameFilter::parse(c.spec).matches(c.ifname), c.match)
        << "spec '" << c.spec << "' ifname '" << c.ifname << "'";
  }
}

// ---------------------------------------------------------------------------
// A fake sysfs tree.

class FakeSysfs : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/tcpx_sysfs_XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    root_ = tmpl;
    // The PCI paths compared below are realpaths: resolve the root too (/tmp
    // may itself be a link).
    realRoot_ = fs::canonical(root_).string();
  }
  void TearDown() override {
    std::error_code ec;
    if (!root_.empty()) fs::remove_all(root_, ec);
  }

  void writeFile(const std::string& rel, const std::string& content) {
    fs::path p = fs::path(root_) / rel;
    fs::create_directories(p.parent_path());
    std::ofstream(p) << content;
  }
  // class/net/<ifname>/device -> ../../../<devRel> (relative, as the kernel's are).
  void linkDevice(const std::string& ifname, const std::string& devRel) {
    fs::create_directories(fs::path(root_) / devRel);
    fs::path netDir = fs::path(root_) / "class/net" / ifname;
    fs::create_directories(netDir);
    fs::create_symlink(fs::path("../../..") / devRel, netDir / "device");
  }

  std::string root_;
  std::string realRoot_;
};

// GCP A3-high: eth0 is the host's own NIC, eth1..eth4 the four 200 Gb/s
// gVNICs for GPU traffic, two per NUMA node (one per PCIe switch pair).
TEST_F(FakeSysfs, A3HighLayout) {
  writeFile("class/net/eth0/speed", "-1\n");  // no device link: virtual here
  const char* pci[] = {
      "devices/pci0000:00/0000:00:01.0/0000:06:00.0",
      "devices/pci0000:00/0000:00:02.0/0000:0c:00.0",
      "devices/pci0000:80/0000:80:01.0/0000:86:00.0",
      "devices/pci0000:80/0000:80:02.0/0000:8c:00.0",
  };
  const int numa[] = {0, 0, 1, 1};
  for (int i = 0; i < 4; ++i) {
    std::string ifname = "eth" + std::to_string(i + 1);
    linkDevice(ifname, pci[i]);
    writeFile(std::string(pci[i]) + "/numa_node", std::to_string(numa[i]) + "\n");
    writeFile("class/net/" + ifname + "/speed", "200000\n");
  }

  NetInterface eth0;
  readSysfsAttributes(root_, "eth0", &eth0);
  EXPECT_EQ(eth0.speedMbps, 0);
  EXPECT_EQ(eth0.pciPath, "");
  EXPECT_EQ(eth0.numaNode, -1);

  for (int i = 0; i < 4; ++i) {
    std::string ifname = "eth" + std::to_string(i + 1);
    NetInterface iface;
    readSysfsAttributes(root_, ifname, &iface);
    EXPECT_EQ(iface.speedMbps, 200000) << ifname;
    EXPECT_EQ(iface.pciPath, realRoot_ + "/" + pci[i]) << ifname;
    EXPECT_EQ(iface.numaNode, numa[i]) << ifname;
  }
}

// GPU <-> NIC pairing on the A3-high tree: each PCIe switch (a root port
// here) holds two GPUs and one gVNIC, so GPU 0,1 -> eth1 ... GPU 6,7 -> eth4
// (../shared/reference/a3-high.md). Bus ids come as CUDA writes them
// (upper-case hex) and are found through bus/pci/devices links.
TEST_F(FakeSysfs, GpuNicPairingA3High) {
  const char* ports[] = {"pci0000:00/0000:00:01.0", "pci0000:00/0000:00:02.0",
                         "pci0000:80/0000:80:01.0", "pci0000:80/0000:80:02.0"};
  const char* nicFn[] = {"0000:06:00.0", "0000:0c:00.0", "0000:86:00.0", "0000:8c:00.0"};
  const char* gpuFn[] = {"0000:04:00.0", "0000:05:00.0", "0000:0a:00.0", "0000:0b:00.0",
                         "0000:84:00.0", "0000:85:00.0", "0000:8a:00.0", "0000:8b:00.0"};
  std::vector<NetInterface> nics;
  for (int i = 0; i < 4; ++i) {
    const std::string ifname = "eth" + std::to_string(i + 1);
    linkDevice(ifname, std::string("devices/") + ports[i] + "/" + nicFn[i]);
    NetInterface n;
    n.name = ifname;
    readSysfsAttributes(root_, ifname, &n);
    ASSERT_FALSE(n.pciPath.empty()) << ifname;
    nics.push_back(n);
  }
  // Listed in an order unlike the GPUs', so that "the first NIC" cannot pass.
  std::swap(nics[0], nics[3]);
  std::swap(nics[1], nics[2]);
  std::vector<std::string> gpus, busIds;
  for (int g = 0; g < 8; ++g) {
    const std::string dev = std::string("devices/") + ports[g / 2] + "/" + gpuFn[g];
    fs::create_directories(fs::path(root_) / dev);
    fs::create_directories(fs::path(root_) / "bus/pci/devices");
    fs::create_symlink(fs::path("../../..") / dev, fs::path(root_) / "bus/pci/devices" / gpuFn[g]);
    std::string busId = gpuFn[g];
    for (char& c : busId) c = static_cast<char>(toupper(static_cast<unsigned char>(c)));
    gpus.push_back(pciPathOfBusId(root_, busId));
    busIds.push_back(busId);
    EXPECT_EQ(gpus.back(), realRoot_ + "/" + dev) << busId;
  }
  const std::vector<int> pairing = pairGpusWithNics(gpus, nics);
  ASSERT_EQ(pairing.size(), 8u);
  for (int g = 0; g < 8; ++g)
    EXPECT_EQ(nics[pairing[g]].name, "eth" + std::to_string(g / 2 + 1)) << "GPU " << g;
  EXPECT_EQ(pciDistance(gpus[0], nics[3].pciPath), 2);  // eth1: behind the same port
  EXPECT_EQ(pciDistance(gpus[0], nics[2].pciPath), 4);  // eth2: same host bridge
  EXPECT_EQ(pciDistance(gpus[0], nics[0].pciPath), 6);  // eth4: the other socket

  // TCPX_GPU_NIC_MAP moves GPU 1 to eth3 and leaves the others alone.
  std::map<int, std::string> m;
  ASSERT_EQ(parseGpuNicMap(" 1 : eth3 ,9:eth1", &m), tcpxSuccess) << lastError();
  std::vector<int> moved = pairing;
  ASSERT_EQ(applyGpuNicMap(m, nics, &moved), tcpxSuccess) << lastError();
  for (int g = 0; g < 8; ++g)
    EXPECT_EQ(nics[moved[g]].name, g == 1 ? "eth3" : "eth" + std::to_string(g / 2 + 1)) << g;
  EXPECT_EQ(applyGpuNicMap({{0, "eth9"}}, nics, &moved), tcpxInvalidArgument);
  EXPECT_NE(lastError().find("eth9"), std::string::npos) << lastError();
  EXPECT_NE(lastError().find("eth1"), std::string::npos) << "lists the devices: " << lastError();

  // The whole chain as the process group runs it (bus ids in CUDA order ->
  // sysfs paths -> pairing -> TCPX_GPU_NIC_MAP): the same answers.
  std::vector<int> chain;
  std::vector<std::string> paths;
  ASSERT_EQ(pairGpusWithMap(root_, busIds, nics, "1:eth3", &chain, &paths), tcpxSuccess)
      << lastError();
  EXPECT_EQ(paths, gpus);
  for (int g = 0; g < 8; ++g)
    EXPECT_EQ(nics[chain[g]].name, g == 1 ? "eth3" : "eth" + std::to_string(g / 2 + 1)) << g;
  EXPECT_EQ(pairGpusWithMap(root_, busIds, nics, "0=eth1", &chain), tcpxInvalidArgument);
  EXPECT_NE(lastError().find("0=eth1"), std::string::npos) << lastError();

  EXPECT_EQ(pciPathOfBusId(root_, "0000:ff:00.0"), "");  // not in sysfs
}

TEST(GpuNicPairing, TiesSpreadAndUnknownPathsRoundRobin) {
  // Two NICs equally near four GPUs (all under one host bridge): 2 each.
  std::vector<NetInterface> nics(2);
  nics[0].name = "a";
  nics[0].pciPath = "/sys/devices/pci0000:00/0000:00:01.0";
  nics[1].name = "b";
  nics[1].pciPath = "/sys/devices/pci0000:00/0000:00:02.0";
  const std::vector<std::string> gpus = {
      "/sys/devices/pci0000:00/0000:00:03.0", "/sys/devices/pci0000:00/0000:00:04.0",
      "/sys/devices/pci0000:00/0000:00:05.0", "/sys/devices/pci0000:00/0000:00:06.0"};
  EXPECT_EQ(pairGpusWithNics(gpus, nics), (std::vector<int>{0, 1, 0, 1}));
  // No path known (a VM without PCI passthrough): round-robin by GPU index.
  std::vector<NetInterface> virt(3);
  EXPECT_EQ(pairGpusWithNics({"", "", "", ""}, virt), (std::vector<int>{0, 1, 2, 0}));
  EXPECT_EQ(pairGpusWithNics(gpus, {}), (std::vector<int>{-1, -1, -1, -1}));
  EXPECT_EQ(pciDistance("", gpus[0]), -1);
  EXPECT_EQ(pciDistance(gpus[0], gpus[0]), 0);
  EXPECT_EQ(nicForLocalRank(5, 4), 1);
  EXPECT_EQ(nicForLocalRank(0, 0), -1);
}

TEST(GpuNicPairing, MapSyntaxErrorsNameTheItem) {
  std::map<int, std::string> m;
  ASSERT_EQ(parseGpuNicMap("", &m), tcpxSuccess);
  EXPECT_TRUE(m.empty());
  ASSERT_EQ(parseGpuNicMap("0:eth1,1:eth1,2:eth2,", &m), tcpxSuccess);
  EXPECT_EQ(m, (std::map<int, std::string>{{0, "eth1"}, {1, "eth1"}, {2, "eth2"}}));
  const char* bad[] = {"eth1", "x:eth1", "-1:eth1", "1.5:eth1", ":eth1", "3:", "0:eth1,0:eth2"};
  for (const char* spec : bad) {
    EXPECT_EQ(parseGpuNicMap(spec, &m), tcpxInvalidArgument) << spec;
    EXPECT_NE(lastError().find("TCPX_GPU_NIC_MAP"), std::string::npos) << lastError();
  }
}

TEST_F(FakeSysfs, OddValuesMeanUnknown) {
  linkDevice("eth5", "devices/pci0000:00/0000:00:05.0");
  writeFile("class/net/eth5/speed", "-1\n");
  writeFile("devices/pci0000:00/0000:00:05.0/numa_node", "-1\n");
  linkDevice("eth6", "devices/pci0000:00/0000:00:06.0");
  writeFile("class/net/eth6/speed", "fast\n");
  writeFile("devices/pci0000:00/0000:00:06.0/numa_node", "\n");
  writeFile("class/net/eth7/speed", "0\n");
  linkDevice("eth8", "devices/pci0000:00/0000:00:08.0");  // no numa_node file
  writeFile("class/net/eth8/speed", "25000");              // no newline

  NetInterface a;
  readSysfsAttributes(root_, "eth5", &a);
  EXPECT_EQ(a.speedMbps, 0);
  EXPECT_EQ(a.numaNode, -1);
  EXPECT_EQ(a.pciPath, realRoot_ + "/devices/pci0000:00/0000:00:05.0");

  NetInterface b;
  readSysfsAttributes(root_, "eth6", &b);
  EXPECT_EQ(b.speedMbps, 0);
  EXPECT_EQ(b.numaNode, -1);

  NetInterface c;
  readSysfsAttributes(root_, "eth7", &c);
  EXPECT_EQ(c.speedMbps, 0);
  EXPECT_EQ(c.pciPath, "");

  NetInterface d;
  readSysfsAttributes(root_, "eth8", &d);
  EXPECT_EQ(d.speedMbps, 25000);
  EXPECT_EQ(d.numaNode, -1);
  EXPECT_EQ(d.pciPath, realRoot_ + "/devices/pci0000:00/0000:00:08.0");

  // An interface sysfs knows nothing of: every field back at its default,
  // whatever it held before.
  NetInterface e;
  e.speedMbps = 7;
  e.pciPath = "stale";
  e.numaNode = 3;
  readSysfsAttributes(root_, "nosuch0", &e);
  EXPECT_EQ(e.speedMbps, 0);
  EXPECT_EQ(e.pciPath, "");
  EXPECT_EQ(e.numaNode, -1);
}

TEST(Sysfs, RealLoopbackHasNoDevice) {
  NetInterface lo;
  readSysfsAttributes("/sys", "lo", &lo);
  EXPECT_EQ(lo.speedMbps, 0);  // reading lo's speed fails with EINVAL
  EXPECT_EQ(lo.pciPath, "");
  EXPECT_EQ(lo.numaNode, -1);
}

// ---------------------------------------------------------------------------
// Discovery on this host.

const NetInterface* findByName(const std::vector<NetInterface>& v, const std::string& name) {
  for (const NetInterface& i : v)
    if (i.name == name) return &i;
  return nullptr;
}

TEST(ListInterfaces, FindsLoopbackWhenAsked) {
  std::vector<NetInterface> all;
  ASSERT_EQ(listInterfaces(IfnameFilter(), AF_UNSPEC, true, "/sys", &all), tcpxSuccess);
  const NetInterface* lo = findByName(all, "lo");
  ASSERT_NE(lo, nullptr);
  EXPECT_TRUE(lo->loopback);
  // IPv4 is preferred under AF_UNSPEC; lo has 127.0.0.1 on any usual host.
  EXPECT_EQ(lo->addr.ss_family, AF_INET);
  EXPECT_EQ(lo->addrLen, static_cast<socklen_t>(sizeof(sockaddr_in)));
  EXPECT_EQ(lo->addrString, "127.0.0.1");
  EXPECT_EQ(lo->pciPath, "");

  std::set<std::string> names;
  for (const NetInterface& i : all) {
    EXPECT_TRUE(names.insert(i.name).second) << "listed twice: " << i.name;
    EXPECT_TRUE(i.addr.ss_family == AF_INET || i.addr.ss_family == AF_INET6) << i.name;
    EXPECT_FALSE(i.addrString.empty()) << i.name;
  }

  std::vector<NetInterface> noLo;
  ASSERT_EQ(listInterfaces(IfnameFilter(), AF_UNSPEC, false, "/sys", &noLo), tcpxSuccess);
  for (const NetInterface& i : noLo) EXPECT_FALSE(i.loopback) << i.name;
  EXPECT_EQ(findByName(noLo, "lo"), nullptr);
  size_t loopbacks = 0;
  for (const NetInterface& i : all) loopbacks += i.loopback ? 1 : 0;
  EXPECT_EQ(noLo.size() + loopbacks, all.size());
}

TEST(ListInterfaces, FamilyAndFilter) {
  std::vector<NetInterface> v4;
  ASSERT_EQ(listInterfaces(IfnameFilter::parse("=lo"), AF_INET, true, "/sys", &v4),
            tcpxSuccess);
  ASSERT_EQ(v4.size(), 1u);
  EXPECT_EQ(v4[0].name, "lo");

  std::vector<NetInterface> v6;
  ASSERT_EQ(listInterfaces(IfnameFilter(), AF_INET6, true, "/sys", &v6), tcpxSuccess);
  // Which up interfaces have an IPv6 address other than link-local, seen
  // directly through getifaddrs.
  std::set<std::string> withGlobal6, with6;
  ifaddrs* list = nullptr;
  ASSERT_EQ(getifaddrs(&list), 0);
  for (ifaddrs* a = list; a; a = a->ifa_next) {
    if (!a->ifa_addr || a->ifa_addr->sa_family != AF_INET6 || !(a->ifa_flags & IFF_UP)) continue;
    with6.insert(a->ifa_name);
    const sockaddr_in6* s6 = reinterpret_cast<const sockaddr_in6*>(a->ifa_addr);
    if (!IN6_IS_ADDR_LINKLOCAL(&s6->sin6_addr)) withGlobal6.insert(a->ifa_name);
  }
  freeifaddrs(list);
  EXPECT_EQ(v6.size(), with6.size());
  for (const NetInterface& i : v6) {
    EXPECT_EQ(i.addr.ss_family, AF_INET6) << i.name;
    EXPECT_EQ(i.addrLen, static_cast<socklen_t>(sizeof(sockaddr_in6))) << i.name;
    const sockaddr_in6* s6 = reinterpret_cast<const sockaddr_in6*>(&i.addr);
    // A link-local address only when the interface has no other, and then
    // with its scope.
    if (IN6_IS_ADDR_LINKLOCAL(&s6->sin6_addr)) {
      EXPECT_EQ(withGlobal6.count(i.name), 0u) << i.name << " " << i.addrString;
      EXPECT_EQ(i.addrString, i.addrString.substr(0, i.addrString.find('%')) + "%" + i.name);
    } else {
      EXPECT_EQ(withGlobal6.count(i.name), 1u) << i.name;
    }
  }
  if (const NetInterface* lo = findByName(v6, "lo")) {
    EXPECT_EQ(lo->addrString, "::1");
  }

  std::vector<NetInterface> none;
  ASSERT_EQ(listInterfaces(IfnameFilter::parse("=doesnotexist"), AF_UNSPEC, true, "/sys", &none),
            tcpxSuccess);
  EXPECT_TRUE(none.empty());
}

TEST(FindNetDevices, LoopbackByName) {
  std::vector<NetInterface> devs;
  ASSERT_EQ(findNetDevices("lo", "/sys", &devs), tcpxSuccess);
  ASSERT_NE(findByName(devs, "lo"), nullptr);
  for (const NetInterface& i : devs) EXPECT_EQ(i.name.compare(0, 2, "lo"), 0) << i.name;

  std::vector<NetInterface> exact;
  ASSERT_EQ(findNetDevices("=lo", "/sys", &exact), tcpxSuccess);
  ASSERT_EQ(exact.size(), 1u);
  EXPECT_EQ(exact[0].name, "lo");
  EXPECT_TRUE(exact[0].loopback);
}

TEST(FindNetDevices, NoMatchIsAnErrorNamingTheFilter) {
  std::vector<NetInterface> devs;
  EXPECT_EQ(findNetDevices("=doesnotexist", "/sys", &devs), tcpxInvalidArgument);
  const std::string& err = lastError();
  EXPECT_NE(err.find("TCPX_SOCKET_IFNAME='=doesnotexist'"), std::string::npos) << err;
  EXPECT_NE(err.find("(interfaces: "), std::string::npos) << err;  // lists what exists
  EXPECT_NE(err.find("lo"), std::string::npos) << err;
  EXPECT_TRUE(devs.empty());
}

TEST(FindNetDevices, DefaultPolicy) {
  std::vector<NetInterface> devs;
  ASSERT_EQ(findNetDevices("", "/sys", &devs), tcpxSuccess);
  ASSERT_FALSE(devs.empty());
  bool anyLoopback = false, anyDocker = false;
  for (const NetInterface& i : devs) {
    anyLoopback |= i.loopback;
    anyDocker |= i.name.compare(0, 6, "docker") == 0;
  }
  // Loopback or docker only as fallbacks: never mixed with real interfaces.
  if (anyLoopback) {
    for (const NetInterface& i : devs) EXPECT_TRUE(i.loopback) << i.name;
  }
  if (anyDocker) {
    for (const NetInterface& i : devs) EXPECT_EQ(i.name.compare(0, 6, "docker"), 0) << i.name;
  }
  // An exclusion list does not bring loopback back.
  std::vector<NetInterface> excl;
  if (findNetDevices("^docker", "/sys", &excl) == tcpxSuccess) {
    for (const NetInterface& i : excl) EXPECT_FALSE(i.loopback) << i.name;
  }
}

// ---------------------------------------------------------------------------

TEST(SockaddrToString, Formats) {
  sockaddr_in s4{};
  s4.sin_family = AF_INET;
  s4.sin_port = htons(29500);
  inet_pton(AF_INET, "10.0.1.2", &s4.sin_addr);
  EXPECT_EQ(sockaddrToString(reinterpret_cast<sockaddr*>(&s4), sizeof(s4)), "10.0.1.2:29500");

  sockaddr_in6 s6{};
  s6.sin6_family = AF_INET6;
  s6.sin6_port = htons(443);
  inet_pton(AF_INET6, "::1", &s6.sin6_addr);
  EXPECT_EQ(sockaddrToString(reinterpret_cast<sockaddr*>(&s6), sizeof(s6)), "[::1]:443");

  inet_pton(AF_INET6, "fe80::1", &s6.sin6_addr);
  s6.sin6_scope_id = if_nametoindex("lo");
  ASSERT_NE(s6.sin6_scope_id, 0u);
  EXPECT_EQ(sockaddrToString(reinterpret_cast<sockaddr*>(&s6), sizeof(s6)), "[fe80::1%lo]:443");

  EXPECT_EQ(sockaddrToString(nullptr, 0), "<null address>");
  // Too short for its family: described, not read past its end.
  EXPECT_NE(sockaddrToString(reinterpret_cast<sockaddr*>(&s6), sizeof(sockaddr_in)).find("family"),
            std::string::npos);
}

}  // namespace
}  // namespace tcpx

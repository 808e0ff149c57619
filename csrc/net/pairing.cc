#include "net/pairing.h"

#include <cctype>
#include <climits>
#include <cstdlib>

#include "common/logging.h"
#include "common/utils.h"

namespace tcpx {
namespace {

std::vector<std::string> pathParts(const std::string& p) {
  std::vector<std::string> parts;
  for (const std::string& s : splitString(p, '/'))
    if (!s.empty()) parts.push_back(s);
  return parts;
}

}  // namespace

std::string pciPathOfBusId(const std::string& sysfsRoot, const std::string& busId) {
  std::string id;
  for (char c : trim(busId)) id += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (id.empty() || id.find('/') != std::string::npos) return "";
  char resolved[PATH_MAX];
  const std::string link = sysfsRoot + "/bus/pci/devices/" + id;
  return realpath(link.c_str(), resolved) ? resolved : "";
}

int pciDistance(const std::string& a, const std::string& b) {
  if (a.empty() || b.empty()) return -1;
  const std::vector<std::string> pa = pathParts(a), pb = pathParts(b);
  size_t common = 0;
  while (common < pa.size() && common < pb.size() && pa[common] == pb[common]) common++;
  return static_cast<int>((pa.size() - common) + (pb.size() - common));
}

std::vector<int> pairGpusWithNics(const std::vector<std::string>& gpuPciPaths,
                                  const std::vector<NetInterface>& nics) {
  std::vector<int> pairing(gpuPciPaths.size(), -1);
  if (nics.empty()) return pairing;
  std::vector<int> load(nics.size(), 0);
  for (size_t g = 0; g < gpuPciPaths.size(); g++) {
    int best = -1, bestDist = INT_MAX;
    for (size_t k = 0; k < nics.size(); k++) {
      const int d = pciDistance(gpuPciPaths[g], nics[k].pciPath);
      if (d < 0) continue;
      if (d < bestDist || (d == bestDist && load[k] < load[best])) {
        best = static_cast<int>(k);
        bestDist = d;
      }
    }
    if (best < 0) best = static_cast<int>(g % nics.size());  // nothing known: spread
    pairing[g] = best;
    load[best]++;
  }
  return pairing;
}

tcpxResult_t parseGpuNicMap(const std::string& spec, std::map<int, std::string>* out) {
  std::map<int, std::string> m;
  for (const std::string& raw : splitString(spec, ',')) {
    const std::string item = trim(raw);
    if (item.empty()) continue;
    const size_t colon = item.find(':');
    if (colon == std::string::npos)
      TCPX_ERR(tcpxInvalidArgument,
               "TCPX_GPU_NIC_MAP item '%s' is invalid: expected gpu:ifname, e.g. 0:eth1",
               item.c_str());
    const std::string gpu = trim(item.substr(0, colon)), ifname = trim(item.substr(colon + 1));
    char* end = nullptr;
    const long idx = gpu.empty() ? -1 : strtol(gpu.c_str(), &end, 10);
    if (gpu.empty() || *end != '\0' || idx < 0 || idx > INT_MAX)
      TCPX_ERR(tcpxInvalidArgument,
               "TCPX_GPU_NIC_MAP item '%s': GPU index '%s' is not an integer >= 0", item.c_str(),
               gpu.c_str());
    if (ifname.empty())
      TCPX_ERR(tcpxInvalidArgument, "TCPX_GPU_NIC_MAP item '%s' names no interface", item.c_str());
    if (!m.emplace(static_cast<int>(idx), ifname).second)
      TCPX_ERR(tcpxInvalidArgument, "TCPX_GPU_NIC_MAP names GPU %ld twice", idx);
  }
  *out = std::move(m);
  return tcpxSuccess;
}

tcpxResult_t applyGpuNicMap(const std::map<int, std::string>& overrides,
                            const std::vector<NetInterface>& nics, std::vector<int>* pairing) {
  for (const auto& [gpu, ifname] : overrides) {
    int found = -1;
    for (size_t k = 0; k < nics.size() && found < 0; k++)
      if (nics[k].name == ifname) found = static_cast<int>(k);
    if (found < 0) {
      std::string names;
      for (const NetInterface& n : nics) names += (names.empty() ? "" : ", ") + n.name;
      TCPX_ERR(tcpxInvalidArgument,
               "TCPX_GPU_NIC_MAP pairs GPU %d with '%s', which is not a device of the net "
               "(devices: %s)",
               gpu, ifname.c_str(), names.empty() ? "none" : names.c_str());
    }
    if (gpu < static_cast<int>(pairing->size())) (*pairing)[gpu] = found;
  }
  return tcpxSuccess;
}

tcpxResult_t pairGpusWithMap(const std::string& sysfsRoot, const std::vector<std::string>& busIds,
                             const std::vector<NetInterface>& nics, const std::string& mapSpec,
                             std::vector<int>* pairing, std::vector<std::string>* paths) {
  std::vector<std::string> p;
  for (const std::string& id : busIds) p.push_back(pciPathOfBusId(sysfsRoot, id));
  std::vector<int> out = pairGpusWithNics(p, nics);
  std::map<int, std::string> overrides;
  TCPX_CHECK(parseGpuNicMap(mapSpec, &overrides));
  TCPX_CHECK(applyGpuNicMap(overrides, nics, &out));
  *pairing = std::move(out);
  if (paths) *paths = std::move(p);
  return tcpxSuccess;
}

}  // namespace tcpx

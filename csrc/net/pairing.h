// GPU <-> NIC pairing: which of the socket net's interfaces a GPU's traffic
// should start on.
//
// The default is the NIC nearest the GPU on the PCI tree (NCCL's topology
// search ranks paths the same way: a NIC behind the GPU's own PCIe switch
// beats one behind the same root port, which beats one on the same host
// bridge, which beats one across the CPU interconnect). On GCP A3-high this
// gives GPU 0,1 -> eth1, 2,3 -> eth2, 4,5 -> eth3, 6,7 -> eth4
// (../shared/reference/a3-high.md). TCPX_GPU_NIC_MAP overrides it.
#pragma once

#include <map>
#include <string>
#include <vector>

#include "common/status.h"
#include "net/interfaces.h"

namespace tcpx {

// The sysfs device path of the PCI function `busId` ("0000:0A:00.0", as
// cudaDeviceGetPCIBusId writes it; any case): the realpath of
// <sysfsRoot>/bus/pci/devices/<busid>. "" when sysfs does not have it.
std::string pciPathOfBusId(const std::string& sysfsRoot, const std::string& busId);

// Hops between two sysfs device paths through their deepest common
// ancestor: 2 for two functions behind one bridge. -1 when either is "".
int pciDistance(const std::string& a, const std::string& b);

// For each GPU (its sysfs PCI path, "" when unknown), the index in `nics` of
// the NIC it pairs with: the nearest by pciDistance; among equally near ones,
// the one with the fewest GPUs so far, then the first. A GPU of unknown path,
// or with no NIC of known path, is spread round-robin by its index.
// Empty `nics`: every entry is -1.
std::vector<int> pairGpusWithNics(const std::vector<std::string>& gpuPciPaths,
                                  const std::vector<NetInterface>& nics);

// TCPX_GPU_NIC_MAP: comma-separated "gpu:ifname" items ("0:eth1,1:eth1,
// 2:eth2"), GPU indexes as CUDA numbers them in the process. GPUs not named
// keep the PCI pairing. Errors (tcpxInvalidArgument, naming the item): an
// item without ':', a GPU index that is not an integer >= 0, an empty
// interface name, a GPU named twice.
tcpxResult_t parseGpuNicMap(const std::string& spec, std::map<int, std::string>* out);

// Applies `overrides` (parseGpuNicMap) to `pairing`: GPU g pairs with the
// NIC named overrides[g]. Error (tcpxInvalidArgument) when a named
// interface is not one of `nics` (the message lists those that are).
// GPU indexes beyond `pairing` are ignored (the process sees fewer GPUs).
tcpxResult_t applyGpuNicMap(const std::map<int, std::string>& overrides,
                            const std::vector<NetInterface>& nics, std::vector<int>* pairing);

// The whole pairing of a process: GPUs given by PCI bus id in CUDA order
// (pciPathOfBusId under `sysfsRoot`), pairGpusWithNics, then the
// TCPX_GPU_NIC_MAP `mapSpec` applied. `paths` (optional) receives the
// GPUs' sysfs paths. Errors: those of parseGpuNicMap and applyGpuNicMap.
tcpxResult_t pairGpusWithMap(const std::string& sysfsRoot, const std::vector<std::string>& busIds,
                             const std::vector<NetInterface>& nics, const std::string& mapSpec,
                             std::vector<int>* pairing, std::vector<std::string>* paths = nullptr);

// The NIC of a process with CPU tensors: spread by local rank.
inline int nicForLocalRank(int localRank, int nnics) {
  return nnics > 0 && localRank >= 0 ? localRank % nnics : -1;
}

}  // namespace tcpx

// The Python module torch_tcpx._C: exposes ProcessGroupTCPX as a subclass of
// torch's c10d Backend (torch.distributed must be imported first, which
// registers the Backend type with pybind11).
#include <pybind11/chrono.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>

#include "c10d/ProcessGroupTCPX.hpp"
#include "common/param.h"
#include "net/interfaces.h"
#include "net/pairing.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "torch_tcpx: a c10d backend over TCP (see torch_tcpx/__init__.py)";
  py::class_<tcpx::ProcessGroupTCPX, c10d::Backend, c10::intrusive_ptr<tcpx::ProcessGroupTCPX>>(
      m, "ProcessGroupTCPX",
      R"(The tcpx backend of one process group.

Normally created by torch.distributed through the registered creator, not by
hand. Raises ValueError for invalid TCPX_* settings and DistBackendError when
bootstrap through the store fails.)")
      .def(py::init([](const c10::intrusive_ptr<c10d::Store>& store, int rank, int size,
                       std::chrono::milliseconds timeout, std::string groupName,
                       std::vector<int64_t> globalRanks) {
             return c10::make_intrusive<tcpx::ProcessGroupTCPX>(
                 store, rank, size, timeout, std::move(groupName), std::move(globalRanks));
           }),
           py::arg("store"), py::arg("rank"), py::arg("size"), py::arg("timeout"),
           py::arg("group_name") = "", py::arg("global_ranks") = std::vector<int64_t>{},
           py::call_guard<py::gil_scoped_release>())
      .def_property_readonly(
          "options",
          [](tcpx::ProcessGroupTCPX& pg) { return pg.getBackendOptions(); },
          "A fresh copy of the backend's options (name, timeout, group name, global ranks); "
          "dist.split_group starts from it.")
      .def(
          "perform_nocolor_split", [](tcpx::ProcessGroupTCPX&, py::object) {},
          "Called by new_group on ranks outside the new group when the default group has a "
          "bound device (NCCL needs them to join ncclCommSplit); tcpx needs nothing from them.",
          py::arg("device"))
      .def("dump_state", &tcpx::ProcessGroupTCPX::dumpState,
           "Logs (at WARN) what each worker of this group is doing or waiting for, for a hang: "
           "how long ago it last looped, the running collective and the next one.")
      .def(
          "device_breakdown",
          [](tcpx::ProcessGroupTCPX& pg) {
            tcpx::DeviceBreakdown b = pg.deviceBreakdown();
            py::dict d;
            d["ops"] = b.ops;
            d["wall_us"] = b.wallUs;
            d["staging_us"] = b.stagingUs;
            d["net_us"] = b.netUs;
            d["unpack_us"] = b.unpackUs;
            return d;
          },
          "Where the time of this group's CUDA collectives went, summed over all of them so far "
          "(microseconds): wall time from start to completion, and the time during which device "
          "-> pinned staging copies, sends in the net and unpacks were in flight. Their sum "
          "exceeding the wall time is the overlap of the pipeline.");
  m.def(
      "config",
      []() {
        const tcpx::Params* p = nullptr;
        if (tcpx::getParams(&p) != tcpx::tcpxSuccess)
          throw py::value_error("tcpx: " + tcpx::lastError());
        return tcpx::describeParams(*p);
      },
      "The effective TCPX_* configuration, one 'NAME=value' per knob separated by spaces, "
      "'value,cuda:value' where CUDA tensors have their own (raises ValueError for an invalid "
      "setting).");
  // The socket net's devices under TCPX_SOCKET_IFNAME, as the net chooses them.
  auto devices = []() {
    const tcpx::Params* p = nullptr;
    std::vector<tcpx::NetInterface> devs;
    if (tcpx::getParams(&p) != tcpx::tcpxSuccess ||
        tcpx::selectNetDevices(p->socketIfname, p->socketFamily, "/sys", &devs) != tcpx::tcpxSuccess)
      throw py::value_error("tcpx: " + tcpx::lastError());
    return devs;
  };
  m.def(
      "net_devices",
      [devices]() {
        py::list out;
        for (const tcpx::NetInterface& d : devices()) {
          py::dict e;
          e["name"] = d.name;
          e["address"] = d.addrString;
          e["speed_mbps"] = d.speedMbps;
          e["pci_path"] = d.pciPath;
          e["numa_node"] = d.numaNode;
          out.append(e);
        }
        return out;
      },
      "The socket net's devices (TCPX_SOCKET_IFNAME applied) as dicts: name, address, "
      "speed_mbps (0: unknown), pci_path ('': virtual), numa_node (-1: unknown). Raises "
      "ValueError when the filter matches nothing.");
  m.def(
      "gpu_nic_pairing",
      [devices](const std::vector<std::string>& busIds) {
        const tcpx::Params* p = nullptr;
        if (tcpx::getParams(&p) != tcpx::tcpxSuccess) throw py::value_error("tcpx: " + tcpx::lastError());
        const std::vector<tcpx::NetInterface> devs = devices();
        std::vector<std::string> paths;
        std::vector<int> pairing;
        if (tcpx::pairGpusWithMap("/sys", busIds, devs, p->gpuNicMap, &pairing, &paths) !=
            tcpx::tcpxSuccess)
          throw py::value_error("tcpx: " + tcpx::lastError());
        std::map<int, std::string> overrides;
        tcpx::parseGpuNicMap(p->gpuNicMap, &overrides);  // valid: pairGpusWithMap parsed it
        py::list out;
        for (size_t g = 0; g < busIds.size(); g++) {
          py::dict e;
          e["gpu"] = static_cast<int>(g);
          e["bus_id"] = busIds[g];
          e["pci_path"] = paths[g];
          e["nic"] = pairing[g] >= 0 ? py::object(py::str(devs[pairing[g]].name)) : py::none();
          e["pci_distance"] = pairing[g] >= 0 ? tcpx::pciDistance(paths[g], devs[pairing[g]].pciPath) : -1;
          e["overridden"] = overrides.count(static_cast<int>(g)) > 0;
          out.append(e);
        }
        return out;
      },
      "The NIC each GPU's traffic starts on, given the GPUs' PCI bus ids in CUDA order "
      "('0000:0A:00.0'): nearest by PCI distance, TCPX_GPU_NIC_MAP applied. Dicts: gpu, "
      "bus_id, pci_path, nic (None without devices), pci_distance (-1: unknown), overridden. "
      "Raises ValueError for an invalid TCPX_GPU_NIC_MAP or one naming a non-device.");
}

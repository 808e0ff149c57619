// The Python module torch_tcpx._C: exposes ProcessGroupTCPX as a subclass of
// torch's c10d Backend (torch.distributed must be imported first, which
// registers the Backend type with pybind11).
#include <pybind11/chrono.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>

#include "c10d/ProcessGroupTCPX.hpp"
#include "common/param.h"

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
}

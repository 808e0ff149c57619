"""``python -m torch_tcpx.info``: what tcpx sees on this host, the first thing to run on a new
cluster node.

Prints the socket net's devices (``TCPX_SOCKET_IFNAME`` applied: name, address, speed in Mb/s,
PCI path, NUMA node), the GPU <-> NIC pairing (nearest NIC by PCI distance, ``TCPX_GPU_NIC_MAP``
applied; processes with CPU tensors spread over the NICs by local rank) and the effective
``TCPX_*`` configuration. Exits with status 2 and the reason when a setting is invalid.
"""
from __future__ import annotations

import sys

import torch

import torch_tcpx
from torch_tcpx import _C


def gpu_bus_ids() -> list[str]:
    """PCI bus ids of the visible CUDA devices, in CUDA order ("0000:0a:00.0"); [] without CUDA."""
    if not torch.cuda.is_available():
        return []
    ids = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        fields = [getattr(p, f"pci_{k}_id", None) for k in ("domain", "bus", "device")]
        # (unknown: "" pairs round-robin, as a GPU without a PCI path does)
        ids.append("" if None in fields else "{:04x}:{:02x}:{:02x}.0".format(*fields))
    return ids


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*map(str, r)) for r in [header] + rows)


def main() -> int:
    try:
        config = torch_tcpx.config()
        devices = _C.net_devices()
        pairing = _C.gpu_nic_pairing(gpu_bus_ids())
    except ValueError as e:
        print(f"torch_tcpx.info: {e}", file=sys.stderr)
        return 2
    print(f"torch_tcpx on torch {torch.__version__}")
    print(f"\nnet devices ({len(devices)}):")
    print(_table([[d["name"], d["address"], d["speed_mbps"] or "?", d["pci_path"] or "(virtual)",
                   d["numa_node"] if d["numa_node"] >= 0 else "?"] for d in devices],
                 ["name", "address", "Mb/s", "PCI path", "NUMA"]))
    print("\nGPU <-> NIC pairing:")
    if pairing:
        print(_table([[p["gpu"], p["bus_id"], p["nic"] or "-",
                       p["pci_distance"] if p["pci_distance"] >= 0 else "?",
                       "TCPX_GPU_NIC_MAP" if p["overridden"] else "PCI distance"] for p in pairing],
                     ["GPU", "bus id", "NIC", "hops", "from"]))
    else:
        print("  no CUDA device: processes with CPU tensors use NIC (local rank mod "
              f"{len(devices)}): " + ", ".join(f"local rank {i} -> {d['name']}"
                                               for i, d in enumerate(devices)))
    print("\nconfiguration:")
    for name, value in config.items():
        print(f"  {name}={value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

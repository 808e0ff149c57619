"""Launched by test_init.py under torchrun: init_process_group(<backend>) from torchrun's
environment, run a few collectives, check them, and exit 0 (or raise).

The backend comes from $TCPX_TEST_BACKEND (default "tcpx"); torch_tcpx is imported only for tcpx.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta


def main() -> int:
    backend = os.environ.get("TCPX_TEST_BACKEND", "").strip() or "tcpx"
    import torch
    import torch.distributed as dist

    if backend == "tcpx":
        import torch_tcpx  # noqa: F401
    dist.init_process_group(backend, timeout=timedelta(seconds=60))
    rank, ws = dist.get_rank(), dist.get_world_size()
    assert rank == int(os.environ["RANK"]) and ws == int(os.environ["WORLD_SIZE"])
    assert dist.get_backend() == backend, dist.get_backend()
    t = torch.arange(1000, dtype=torch.float32) + rank
    dist.all_reduce(t)
    expected = torch.arange(1000, dtype=torch.float32) * ws + ws * (ws - 1) / 2
    assert torch.equal(t, expected), "all_reduce under torchrun gave a wrong result"
    b = torch.full((10,), float(rank))
    dist.broadcast(b, src=ws - 1)
    assert torch.equal(b, torch.full((10,), float(ws - 1)))
    dist.barrier()
    dist.destroy_process_group()
    print(f"torchrun worker rank {rank}/{ws}: ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""torch_tcpx: a PyTorch distributed backend over TCP.

Importing this package registers the backend ``"tcpx"`` with
``torch.distributed`` for CPU and CUDA devices::

    import torch.distributed as dist
    import torch_tcpx  # noqa: F401  (registers "tcpx")

    dist.init_process_group("tcpx")  # under torchrun, or with init_method="tcp://..."

Configuration is through ``TCPX_*`` environment variables (docs/configuration.md);
``torch_tcpx.config()`` returns the effective values.

Errors: invalid arguments raise ``ValueError``; communication failures raise
``torch.distributed.DistBackendError`` (a ``RuntimeError``).
"""
from datetime import timedelta

import torch
import torch.distributed as dist  # registers c10d's Backend type before _C loads

from . import _C
from ._C import ProcessGroupTCPX

__all__ = ["ProcessGroupTCPX", "config", "BACKEND_NAME"]

BACKEND_NAME = "tcpx"


def config() -> dict:
    """The effective TCPX_* configuration as {name: value} (ValueError if a setting is invalid)."""
    out = {}
    for item in _C.config().split():
        name, _, value = item.partition("=")
        out[name] = value
    return out


def _create_backend(dist_backend_opts, pg_options):
    """Creator registered with torch.distributed (extended API): one ProcessGroupTCPX per group."""
    timeout = dist_backend_opts.timeout
    if not isinstance(timeout, timedelta):
        timeout = timedelta(seconds=float(timeout))
    return ProcessGroupTCPX(
        dist_backend_opts.store,
        dist_backend_opts.group_rank,
        dist_backend_opts.group_size,
        timeout,
        str(dist_backend_opts.group_id or ""),
        [int(r) for r in (dist_backend_opts.global_ranks_in_group or [])],
    )


def _register():
    if BACKEND_NAME.upper() in getattr(dist.Backend, "_plugins", {}):
        return
    dist.Backend.register_backend(
        BACKEND_NAME, _create_backend, extended_api=True, devices=["cpu", "cuda"]
    )


_register()

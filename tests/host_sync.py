"""A CPU stand-in for `torch.cuda.set_sync_debug_mode("error")`: fail when code under test does something that, on a
GPU, makes the host wait for the device.

On CUDA those are: reading a tensor's value on the host (`.item()`, `bool()`, `int()`, `float()`, `.tolist()`, all
of which dispatch `aten._local_scalar_dense`), and the ops whose output shape depends on the data (`nonzero`,
boolean-mask indexing, `masked_select`, `unique`, `bincount`, `repeat_interleave` without `output_size`) or that
return a host bool (`equal`, `is_nonzero`), `multinomial` (it checks its input on the host), and `Tensor.tolist`/`Tensor.numpy`. Under `no_host_sync()` every such op raises `HostSync` naming it. On a
CPU the guard cannot tell a device tensor from a host one, so the code under test must keep host-side bookkeeping in
plain Python (ints, lists) rather than in torch scalars; a GPU test under the real sync debug mode covers host-to-
device copies, which this guard cannot see.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNCING_OPS = {
    "aten._local_scalar_dense",
    "aten.nonzero",
    "aten.masked_select",
    "aten.bincount",
    "aten.equal",
    "aten.is_nonzero",
    "aten._unique",
    "aten._unique2",
    "aten.unique_dim",
    "aten.unique_consecutive",
    "aten.histogram",
    "aten.multinomial",  # checks its probabilities on the host
}


class HostSync(AssertionError):
    """An op that makes the host wait for the device ran where none may."""


def _is_sync(func, args, kwargs) -> bool:
    name = func._overloadpacket._qualified_op_name.replace("::", ".")
    if name in SYNCING_OPS:
        return True
    if name == "aten.repeat_interleave":
        return kwargs.get("output_size") is None and (len(args) < 4 or args[3] is None)
    if name in ("aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl_"):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices)
    return False


class _Guard(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_sync(func, args, kwargs):
            raise HostSync(f"{func} would make the host wait for the device")
        return func(*args, **kwargs)


@contextmanager
def no_host_sync() -> Iterator[None]:
    """Raise `HostSync` on any op that would synchronise the host with a GPU (see the module docstring)."""
    def refuse(name):
        def method(self, *args, **kwargs):
            raise HostSync(f"Tensor.{name} would make the host wait for the device")
        return method

    saved = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}  # not seen by dispatch modes
    try:
        for name in saved:
            setattr(torch.Tensor, name, refuse(name))
        with _Guard():
            yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)

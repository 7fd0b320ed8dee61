"""Counting the tensor ops that make the host wait for a device (`.item()`, `bool(t)`, `nonzero`, ...).

On the CPU these ops cost nothing, but the same call on a GPU stalls the host until the queue drains,
so counting them on the CPU tells whether a loop would sync once per column or group on a GPU.
"""

from __future__ import annotations

from collections import Counter

from torch.utils._python_dispatch import TorchDispatchMode

# Ops whose result (a Python scalar, or an output size) the host needs before it can go on.
SYNCING_OPS = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.equal", "aten.is_nonzero")


class HostSyncs(TorchDispatchMode):
    """`with HostSyncs() as syncs: ...` then `syncs.total` / `syncs.ops`."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith(SYNCING_OPS):
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())

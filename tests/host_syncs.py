"""A dispatch-level detector of what a CUDA-graph capture cannot take, usable on the CPU."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class HostSyncs(TorchDispatchMode):
    """Records the ops that would stall a CUDA stream on the host or that a captured graph
    could not replay: reading a value back (.item(), bool(), float(), .tolist()), shapes
    that depend on values (nonzero, boolean-mask indexing), and random draws (a replay
    would repeat the captured draw's numbers unless the generator is registered with the
    graph)."""

    SYNCS = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "equal",
             "is_nonzero", "allclose")
    RANDOM = ("rand", "randn", "randint", "randperm", "normal", "uniform", "bernoulli",
              "multinomial", "exponential", "random_")

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.SYNCS or name.rstrip("_") in self.RANDOM or name in self.RANDOM:
            self.found.append(name)
        elif name.startswith("index") and any(  # x[mask]: the kernel counts the mask first
                isinstance(i, torch.Tensor) and i.dtype == torch.bool
                for i in (args[1] if len(args) > 1 and isinstance(args[1], list | tuple)
                          else ())):
            self.found.append(f"{name} with a boolean mask")
        return func(*args, **(kwargs or {}))

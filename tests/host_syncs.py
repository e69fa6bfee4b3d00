"""A dispatch-level detector of what a CUDA-graph capture cannot take, usable on the CPU."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Reading a value back (.item(), bool(), float(), .tolist()) or shapes that depend on values.
SYNCS = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "equal", "is_nonzero",
         "allclose")
# A replay would repeat the captured draw's numbers unless the generator is registered.
RANDOM = ("rand", "randn", "randint", "randperm", "normal", "uniform", "bernoulli",
          "multinomial", "exponential", "random")


def capture_problem(func, args: tuple) -> str | None:
    """Why an aten op would stall a CUDA stream on the host or could not be replayed from a
    captured graph (None: it can be captured)."""
    name = func.overloadpacket.__name__
    if name in SYNCS or name.rstrip("_") in RANDOM:
        return name
    indices = args[1] if len(args) > 1 and isinstance(args[1], list | tuple) else ()
    if name.startswith("index") and any(  # x[mask]: the kernel counts the mask first
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices):
        return f"{name} with a boolean mask"
    return None


class HostSyncs(TorchDispatchMode):
    """Records, in `found`, the ops `capture_problem` names; runs every op as usual."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        problem = capture_problem(func, args)
        if problem is not None:
            self.found.append(problem)
        return func(*args, **(kwargs or {}))

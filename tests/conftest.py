"""Test-session setup shared by every test module.

Triton kernels run on the CPU through the interpreter when no GPU is present; the
variable must be set before anything imports triton, hence here at the top.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

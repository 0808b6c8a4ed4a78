"""The network made ready for sampling: the inference fast path every door shares (pipeline, `sdm sample`, the
generation actors, the Serve replicas).

`fast` (on by default) puts the weights in channels_last, which oneDNN and cuDNN convolve faster and which
convolutions pass on to their outputs, and, when sampling runs in bf16, holds the convolution and linear weights
in bf16 instead of casting them on every step (the norms stay in fp32, as GroupNorm32 computes in fp32). Autocast
would round the weights to the same bf16 values, so this changes speed, not the weights' values; the memory layout
changes which kernels run, so pixels may differ by rounding from the eager contiguous path (tests bound it).

`compile` adds torch.compile (inductor on CPU; CUDA graphs on CUDA), which also fuses each GroupNorm with its
SPADE modulation and activation. Compiling takes tens of seconds to minutes per batch shape on a small CPU, so it
is off by default and pays for long jobs and long-lived replicas; `warm_up` compiles the shapes the runner uses
before the first request. Inductor keeps compiled kernels in its on-disk cache, so a second start is quicker.
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

LOW_PRECISION_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Linear)


def prepare_net(net: nn.Module, device: torch.device, dtype: torch.dtype | None, fast: bool = True) -> nn.Module:
    """The network on `device` in eval mode; with `fast`, a copy in channels_last with (for bf16) bf16 conv/linear
    weights, so a caller who goes on training `net` keeps its fp32 contiguous weights."""
    net = net.to(device).eval()
    if not fast:
        return net
    net = copy.deepcopy(net).to(memory_format=torch.channels_last)
    if dtype is not None:
        for module in net.modules():
            if isinstance(module, LOW_PRECISION_LAYERS):
                module.to(dtype)
    return net


def compile_net(net: nn.Module, device: torch.device) -> nn.Module:
    """torch.compile for fixed batch shapes: CUDA graphs on CUDA ('reduce-overhead'), inductor's default on CPU."""
    mode = "reduce-overhead" if device.type == "cuda" else None
    return torch.compile(net, mode=mode, dynamic=False)


def add_fast_path_args(p: argparse.ArgumentParser) -> None:
    """--fast-path/--no-fast-path and --compile, as `sdm sample` and the generation job take them."""
    p.add_argument("--fast-path", action=argparse.BooleanOptionalAction, default=True,
                   help="channels_last and bf16-held weights (default on); --no-fast-path runs the eager contiguous network")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the network, compiled before sampling starts (minutes on a small CPU; pays on long runs)")

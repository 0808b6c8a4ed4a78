"""The network made ready for sampling: the inference fast path every door shares (pipeline, `sdm sample`, the
generation actors, the Serve replicas), and the command-line flags of both sampling commands.

`fast_path` (on by default) puts the weights in channels_last, which oneDNN and cuDNN convolve faster and which
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
import sys
from dataclasses import fields
from typing import Any, Literal, get_args, get_origin, get_type_hints

import torch
from torch import nn

from sdm.config import SamplingParams

LOW_PRECISION_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Linear)


def prepare_net(net: nn.Module, device: torch.device, dtype: torch.dtype | None, fast_path: bool = True) -> nn.Module:
    """The network on `device` in eval mode; with `fast_path`, a copy in channels_last with (for bf16) bf16 conv/linear
    weights, so a caller who goes on training `net` keeps its fp32 contiguous weights."""
    net = net.to(device).eval()
    if not fast_path:
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


_SAMPLING_HELP = {
    "guidance_scale": "classifier-free guidance scale s",
    "sampler": "the sampler",
    "num_inference_steps": "denoising steps",
    "eta": "DDIM's eta",
    "cache_interval": "recompute the deep U-Net features every CACHE_INTERVAL-th step only (1: every step)",
}
DEPRECATED_SAMPLING_FLAGS = {"--guidance": "guidance_scale", "--steps": "num_inference_steps"}  # for one release


class _DeprecatedFlag(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, value: Any, option: Any = None) -> None:
        print(f"warning: {option} is deprecated and will be removed; use --{self.dest.split('.')[1].replace('_', '-')}",
              file=sys.stderr)
        setattr(namespace, self.dest, value)


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """A flag per SamplingParams field (--guidance-scale, --sampler, --num-inference-steps, --eta, --cache-interval;
    unset: the model's default), and the deprecated --guidance and --steps; `sampling_overrides` reads them."""
    hints = get_type_hints(SamplingParams)
    for f in fields(SamplingParams):
        hint = hints[f.name]
        kind = {"choices": get_args(hint)} if get_origin(hint) is Literal else {"type": hint, "metavar": f.name.upper()}
        flag = "--" + f.name.replace("_", "-")
        p.add_argument(flag, dest=f"sampling.{f.name}", default=None, **kind,
                       help=f"{_SAMPLING_HELP[f.name]} (default: the model's)")
    for old, name in DEPRECATED_SAMPLING_FLAGS.items():
        p.add_argument(old, dest=f"sampling.{name}", action=_DeprecatedFlag, type=hints[name], metavar=name.upper(),
                       help=f"deprecated name of --{name.replace('_', '-')}")


def sampling_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling parameters given on the command line of add_sampling_args, by SamplingParams' names."""
    given = {k.split(".", 1)[1]: v for k, v in vars(args).items() if k.startswith("sampling.")}
    return {k: v for k, v in given.items() if v is not None}

"""The SDM denoising U-Net.

The noisy image enters the encoder; the semantic label map enters every middle and decoder resblock
through SPADE normalisation. With `conditioning="concat"` (the paper's Table 4 baseline) the label
channels are instead concatenated to the noisy image and every norm is a plain GroupNorm.
The network knows nothing of noise schedules: it maps (x_t, t, label input) to eps (+ variance v).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from sdm.config import ModelConfig


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos | sin] of (possibly fractional) timesteps, [N] -> [N, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the autocast dtype (statistics are fragile in bf16)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float()).to(x.dtype)


# Guidance scales enter the sinusoidal embedding as timesteps do: a scale of 1 lands where timestep 250 would.
GUIDANCE_EMBED_SCALE = 250.0

Modulations = list[tuple[torch.Tensor, torch.Tensor]]  # (gamma, beta) of every SPADE, in SDMUNet.modulations' order


class SPADE(nn.Module):
    """Parameter-free GroupNorm, then x * (1 + gamma(m)) + beta(m) from the label map m.

    gamma and beta depend on the label map alone, not on x_t or t: a sampling run computes them once
    (`SDMUNet.modulations`) and hands them to every step, which skips most of the label path's FLOPs."""

    def __init__(self, channels: int, label_channels: int, hidden: int, groups: int, divisor: int):
        super().__init__()
        self.norm = GroupNorm32(groups, channels, affine=False)
        self.mlp_shared = nn.Sequential(nn.Conv2d(label_channels, hidden, 3, padding=1), nn.ReLU())
        self.mlp_gamma = nn.Conv2d(hidden, channels, 3, padding=1)
        self.mlp_beta = nn.Conv2d(hidden, channels, 3, padding=1)
        self.divisor = divisor  # the input image's size over this norm's
        self.index = 0  # its place in SDMUNet.modulations, set by the network

    def modulation(self, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(gamma, beta) for a label input at the image's size."""
        size = (label.shape[-2] // self.divisor, label.shape[-1] // self.divisor)
        actv = self.mlp_shared(F.interpolate(label, size=size, mode="nearest"))
        return self.mlp_gamma(actv), self.mlp_beta(actv)

    def forward(self, x: torch.Tensor, label: torch.Tensor, mods: Modulations | None = None) -> torch.Tensor:
        x = self.norm(x)
        gamma, beta = self.modulation(label) if mods is None else mods[self.index]
        return x * (1 + gamma) + beta


class Norm(nn.Module):
    """SPADE when the block is label-conditioned, else an affine GroupNorm; one call signature."""

    def __init__(self, channels: int, cfg: ModelConfig, spade: bool, divisor: int):
        super().__init__()
        if spade:
            self.spade = SPADE(channels, cfg.label_channels, cfg.spade_hidden, cfg.norm_groups, divisor)
        else:
            self.group = GroupNorm32(cfg.norm_groups, channels)

    def forward(self, x: torch.Tensor, label: torch.Tensor | None, mods: Modulations | None = None) -> torch.Tensor:
        if hasattr(self, "spade"):
            return self.spade(x, label, mods)
        return self.group(x)


class ResBlock(nn.Module):
    """norm -> SiLU -> [resample] -> conv; timestep scale/shift after the second norm; skip connection."""

    def __init__(
        self,
        cfg: ModelConfig,
        channels: int,
        out_channels: int,
        emb_dim: int,
        spade: bool,
        resample: str | None = None,
        divisor: int = 1,
    ):
        """`divisor`: the input image's size over this block's input size."""
        super().__init__()
        self.in_norm = Norm(channels, cfg, spade, divisor)
        self.in_conv = nn.Conv2d(channels, out_channels, 3, padding=1)
        self.resample = resample  # None | "up" | "down"
        self.emb_proj = nn.Linear(emb_dim, 2 * out_channels)
        out_divisor = {"up": divisor // 2, "down": divisor * 2}.get(resample or "", divisor)
        self.out_norm = Norm(out_channels, cfg, spade, out_divisor)
        self.dropout = nn.Dropout(cfg.dropout)
        self.out_conv = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.out_conv.weight)
        nn.init.zeros_(self.out_conv.bias)
        self.skip = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2, mode="nearest")
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor, label: torch.Tensor | None, mods: Modulations | None = None) -> torch.Tensor:
        h = F.silu(self.in_norm(x, label, mods))
        h = self.in_conv(self._resample(h))
        x = self._resample(x)
        scale, shift = self.emb_proj(F.silu(emb)).to(h.dtype)[..., None, None].chunk(2, dim=1)
        h = self.out_norm(h, label, mods) * (1 + scale) + shift
        h = self.out_conv(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head self-attention over all positions, with a skip connection.

    qkv channels are laid out [q | k | v], each [head0 | head1 | ...] of `head_dim` channels.
    """

    def __init__(self, cfg: ModelConfig, channels: int):
        super().__init__()
        if cfg.num_head_channels == -1:
            self.heads = cfg.num_heads
        else:
            self.heads = channels // cfg.num_head_channels
        self.norm = GroupNorm32(cfg.norm_groups, channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        flat = x.reshape(b, c, hgt * wid)
        qkv = self.qkv(self.norm(flat))  # [B, 3C, T]
        q, k, v = qkv.reshape(b, 3, self.heads, c // self.heads, hgt * wid).transpose(-1, -2).unbind(1)
        a = F.scaled_dot_product_attention(q, k, v)  # [B, heads, T, d]
        a = a.transpose(-1, -2).reshape(b, c, hgt * wid)
        return (flat + self.proj_out(a)).reshape(b, c, hgt, wid)


class Downsample(nn.Module):
    """Strided 3x3 conv, for configs without resblock down-sampling."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest x2 then 3x3 conv, for configs without resblock up-sampling."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Stage(nn.ModuleList):
    """A sequence of layers; resblocks also get the timestep embedding and the label map."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, label: torch.Tensor | None, mods: Modulations | None = None) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb, label, mods) if isinstance(layer, ResBlock) else layer(x)
        return x


@dataclass
class FeatureCache:
    """DeepCache-style reuse of the deep U-Net features across denoising steps (Ma et al. 2024).

    A full step runs the whole network and keeps `deep`, the decoder's input to its last `depth` stages. A cached
    step runs only the first `depth` encoder stages and those last `depth` decoder stages (which keep their SPADE
    conditioning), fed with `deep` from the last full step. The caller sets `full` before each call."""

    depth: int = 1
    full: bool = True
    deep: torch.Tensor | None = None


class SDMUNet(nn.Module):
    """U-Net over [B, 3, H, W] noisy images; returns [B, 3 or 6, H, W] (eps, then v when learn_sigma)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        spade = cfg.conditioning == "spade"
        mc = cfg.model_channels
        emb_dim = 4 * mc
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if cfg.guidance_input:
            # Added to the timestep embedding; its last layer starts at zero, so a fresh guidance student is its
            # teacher's conditional branch at every scale (Meng et al. 2023).
            self.guidance_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
            nn.init.zeros_(self.guidance_embed[2].weight)
            nn.init.zeros_(self.guidance_embed[2].bias)
        in_ch = 3 + (0 if spade else cfg.label_channels)
        ch = int(cfg.channel_mult[0] * mc)
        self.input_blocks = nn.ModuleList([Stage([nn.Conv2d(in_ch, ch, 3, padding=1)])])
        skips = [ch]
        short_side = min(cfg.image_size)
        ds = 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(cfg, ch, int(mult * mc), emb_dim, spade=False, divisor=ds)]
                ch = int(mult * mc)
                if short_side // ds in cfg.attention_resolutions:
                    layers.append(Attention(cfg, ch))
                self.input_blocks.append(Stage(layers))
                skips.append(ch)
            if level != len(cfg.channel_mult) - 1:
                down = ResBlock(cfg, ch, ch, emb_dim, spade=False, resample="down", divisor=ds) if cfg.resblock_updown else Downsample(ch)
                self.input_blocks.append(Stage([down]))
                skips.append(ch)
                ds *= 2
        self.middle_block = Stage(
            [
                ResBlock(cfg, ch, ch, emb_dim, spade=spade, divisor=ds),
                Attention(cfg, ch),
                ResBlock(cfg, ch, ch, emb_dim, spade=spade, divisor=ds),
            ]
        )
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(cfg, ch + skips.pop(), int(mult * mc), emb_dim, spade=spade, divisor=ds)]
                ch = int(mult * mc)
                if short_side // ds in cfg.attention_resolutions:
                    layers.append(Attention(cfg, ch))
                if level and i == cfg.num_res_blocks:
                    up = ResBlock(cfg, ch, ch, emb_dim, spade=spade, resample="up", divisor=ds) if cfg.resblock_updown else Upsample(ch)
                    layers.append(up)
                    ds //= 2
                self.output_blocks.append(Stage(layers))
        self.out_norm = GroupNorm32(cfg.norm_groups, ch)
        self.out_conv = nn.Conv2d(ch, cfg.out_channels, 3, padding=1)
        nn.init.zeros_(self.out_conv.weight)
        nn.init.zeros_(self.out_conv.bias)
        for i, spade_norm in enumerate(self._spades()):
            spade_norm.index = i

    def _spades(self) -> list[SPADE]:
        return [m for m in self.modules() if isinstance(m, SPADE)]

    def modulations(self, label: torch.Tensor) -> Modulations:
        """Every SPADE's (gamma, beta) for a label input: what a sampling run computes once and passes to forward."""
        return [m.modulation(label) for m in self._spades()]

    def _run(self, stage: Stage, h: torch.Tensor, emb: torch.Tensor, label: torch.Tensor | None, mods: Modulations | None) -> torch.Tensor:
        if self.cfg.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(stage, h, emb, label, mods, use_reentrant=False)
        return stage(h, emb, label, mods)

    def forward(self, x: torch.Tensor, t: torch.Tensor, label: torch.Tensor, cache: FeatureCache | None = None,
                mods: Modulations | None = None, guidance: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B,3,H,W] noisy image; t: [B] timesteps on the original 0..T-1 scale; label: [B,C,H,W]; guidance: [B]
        scales, which a guidance student (cfg.guidance_input) needs and any other network refuses.
        With a `cache` whose `full` is False, only the shallow path runs (see FeatureCache); `mods`, this label
        input's `modulations`, spares the SPADE layers computing them."""
        emb = self.time_embed(timestep_embedding(t, self.cfg.model_channels))
        if self.cfg.guidance_input != (guidance is not None):
            raise ValueError("a guidance student takes the guidance scale as an input, and only a guidance student does")
        if guidance is not None:
            emb = emb + self.guidance_embed(timestep_embedding(guidance * GUIDANCE_EMBED_SCALE, self.cfg.model_channels))
        spade = self.cfg.conditioning == "spade"
        h = x if spade else torch.cat([x, label.to(x.dtype)], dim=1)
        cond = label if spade else None
        shallow = cache is not None and not cache.full
        hs = []
        for stage in self.input_blocks[: cache.depth] if shallow else self.input_blocks:
            h = self._run(stage, h, emb, None, None)
            hs.append(h)
        if shallow:
            h, decoder = cache.deep, self.output_blocks[-cache.depth :]
        else:
            h = self._run(self.middle_block, h, emb, cond, mods)
            decoder = self.output_blocks
        for j, stage in enumerate(decoder):
            if cache is not None and cache.full and j == len(decoder) - cache.depth:
                cache.deep = h
            h = self._run(stage, torch.cat([h, hs.pop()], dim=1), emb, cond, mods)
        return self.out_conv(F.silu(self.out_norm(h)))


def takes_guidance(net: nn.Module) -> bool:
    """Whether a network (bare, compiled or DDP-wrapped) is a guidance student, which guidance runs in one pass."""
    inner = getattr(net, "_orig_mod", net)
    inner = getattr(inner, "module", inner)
    return bool(inner.cfg.guidance_input)


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())

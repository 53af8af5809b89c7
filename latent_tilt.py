"""Exponential tilting of generative models with a latent energy-based model.

Xiao, Yan & Amit (2020), "Exponential Tilting of Generative Models: Improving Sample Quality by
Training and Sampling from Latent Energy", https://arxiv.org/abs/2006.08100

A frozen generator x = G(z), z ~ p(z) = N(0, I), is tilted by an energy on what it generates,
p(z) ∝ p(z) exp(-E(G(z))) (Eq. 6). E is learned by maximum likelihood (Eq. 5, 7) with model
samples from short-run, non-persistent Langevin chains in z started from p(z) (Eq. 8).

Stages (--stage): all (default): base, then latent EBM, in one folder. base: trains
--base vae (DCGAN VAE, latent 100, BCE / MSE; an MLP VAE on toys), glow (actnorm, 1x1 conv,
affine coupling, squeeze, multi-scale split; test bits/dim) or glf (deterministic AE,
latent 64, + 4 affine couplings of 256 units, trained jointly) into runs/latent_tilt-DATA-BASE.
ebm: loads that frozen base (--base-ckpt; its architecture flags are read from it) and trains
the latent EBM. Early stop "when samples get worse" (Section 5.3), made explicit: every
--eval-every steps a fixed set of EBM samples is scored (MMD vs. fresh data on toys, FID vs.
the training split on images), the best EBM is kept, and training stops after --patience
scores without improvement. pixel: the "EBM on data" baseline (Table 1) with the replay buffer
of Du & Mordatch 2019 (10000, 5% noise restarts, 60 steps of step 10 / noise 0.005), saved.

Langevin convention: the paper's z <- z - eps/2 grad U(z) + sqrt(eps) w (common.langevin,
convention="eps"), eps = 0.01, U(z) = E(G(z)) + |z|^2 / 2; 60 steps in training, 100 when
sampling. Evaluation: toys base_/ebm_ hq_frac, modes, mmd + tilt.png (Figure 5.1); images
base_fid, ebm_fid (same sample count, test split), tilt.png and langevin_traj.png (Fig. 5.3).

Offline demo (25-Gaussians: 10000 VAE steps, then up to 1000 EBM steps; 36 s on 2 idle CPU cores):
    python latent_tilt.py
  measured: hq_frac 0.506 -> 0.594, modes 25 -> 25, mmd 0.0059 -> 0.0058 (EBM of step 800 kept).
Fashion-MNIST on a CPU budget (README: the budget and the FIDs it gave):
    python latent_tilt.py --dataset fashion --stage base --base vae
    python latent_tilt.py --dataset fashion --stage ebm --base vae
Paper configuration (GPU; Table 1: VAE 57.1 -> VAE + EBM 38.1 on Fashion):
    python latent_tilt.py --dataset fashion --stage base --base vae --preset paper
    python latent_tilt.py --dataset fashion --stage ebm --base vae --preset paper
"""
import copy
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# ======================================================================================
# Arguments
# ======================================================================================

BASE_ARCH = ("base", "nz", "ngf", "hidden", "glow_levels", "glow_depth", "glow_hidden", "glow_scale_floor",
             "flow_couplings", "flow_hidden")
OLD_CKPT = {"glow_scale_floor": 0.0, "input_scale": 1.0}  # what checkpoints older than these flags used
EBM_ARCH = ("ch", "num_blocks", "hidden")
_PAPER_IMAGES = dict(base_steps=120000, base_batch_size=128, ngf=64, ch=64, num_blocks=3,
                     langevin_steps=60, sample_steps=100, batch_size=128, fid_samples=10000,
                     glow_levels=2, glow_depth=16, glow_hidden=64)
# Appendix B: VAE / GLF 256 epochs of batch 128 (= 120k steps on 60k images; GLOW: 128
# epochs of 64, also 120k); the EBM batch size is not stated (128 here).
PRESETS = {"mnist": dict(_PAPER_IMAGES), "fashion": dict(_PAPER_IMAGES),
           "cifar10": dict(_PAPER_IMAGES, base_steps=100000, glow_levels=3, glow_depth=32,
                           glow_hidden=256)}


def build_parser():
    p = common.base_parser("Latent-EBM exponential tilting of a VAE / GLOW / GLF (Xiao, Yan & Amit 2020)",
                           dataset="25gaussians", steps=None, batch_size=None, fid_samples=500)
    p.set_defaults(log_every=20, ckpt_every=100)
    p.add_argument("--stage", default="all", choices=["all", "base", "ebm", "pixel"],
                   help="all: base then latent EBM in one folder; base / ebm: one stage each; pixel: the EBM-on-data "
                        "baseline. --steps counts EBM steps (default: 1000 for a VAE and on toys, 200 for GLOW / GLF "
                        "as in the paper; pixel: 20000 with --preset paper, 200 otherwise)")
    p.add_argument("--base", default="vae", choices=["vae", "glow", "glf"], help="base generative model")
    p.add_argument("--base-ckpt", default=None,
                   help="--stage ebm: the frozen base's checkpoint (default runs/latent_tilt-DATASET-BASE/"
                        "checkpoint.pt, what --stage base writes); its architecture flags are read from it")
    p.add_argument("--base-steps", type=int, default=None, help="base steps (paper ~120k; 10000 toys, 2000 images)")
    p.add_argument("--base-batch-size", type=int, default=128, help="base batch size (paper: 128; GLOW 64)")
    p.add_argument("--base-lr", type=float, default=None, help="base Adam lr (paper: 1e-3; GLOW 5e-4)")
    p.add_argument("--nz", type=int, default=None, help="latent size (paper: 100 VAE, 64 GLF; toys: 2)")
    p.add_argument("--ngf", type=int, default=32, help="DCGAN encoder/decoder width (paper: 64)")
    p.add_argument("--hidden", type=int, default=64, help="toys: width of the MLP VAE and energy")
    p.add_argument("--input-scale", type=float, default=8.0,
                   help="toys: the energy MLP sees input_scale * x (ours; at 1 it is too smooth to tilt: README)")
    p.add_argument("--recon-std", type=float, default=0.05, help="toys: std of the VAE's Gaussian decoder")
    p.add_argument("--glow-levels", type=int, default=2, help="GLOW levels (squeeze ... split); paper: 2, cifar10 3")
    p.add_argument("--glow-depth", type=int, default=4, help="GLOW flow steps per level (paper: 16, cifar10 32)")
    p.add_argument("--glow-hidden", type=int, default=32, help="GLOW coupling width (paper: 64, cifar10 256)")
    p.add_argument("--glow-scale-floor", type=float, default=0.01, help="coupling scales >= this (Glow: 0; README)")
    p.add_argument("--flow-couplings", type=int, default=4, help="GLF latent flow couplings (paper: 4)")
    p.add_argument("--flow-hidden", type=int, default=256, help="GLF coupling hidden units (paper: 256)")
    p.add_argument("--ch", type=int, default=16, help="energy net width (paper: 64 -> 3 blocks of 64, 3 of 128)")
    p.add_argument("--num-blocks", type=int, default=1, help="energy net res blocks per level (paper: 3)")
    p.add_argument("--lr", type=float, default=None, help="EBM Adam lr (not in the paper; 3e-3 toys, 1e-4 images)")
    p.add_argument("--eps", type=float, default=0.01, help="Eq. 8: z <- z - eps/2 grad U + sqrt(eps) w (paper: 0.01)")
    p.add_argument("--langevin-steps", type=int, default=None,
                   help="Langevin steps per training step (paper: 60; default 60 toys, 20 images on CPU)")
    p.add_argument("--sample-steps", type=int, default=100, help="Langevin steps when sampling (paper: 100)")
    p.add_argument("--alpha", type=float, default=None,
                   help="energy regularisation alpha (E+^2 + E-^2) (paper: 0.1; default 0.1 images, 0.3 toys: README)")
    p.add_argument("--eval-every", type=int, default=None, help="early stop: score every N steps (toys 200; 50)")
    p.add_argument("--patience", type=int, default=3, help="stop after this many scores without improvement (0: never)")
    p.add_argument("--stop-samples", type=int, default=None,
                   help="samples per early-stop score (default 1000 toys, 200 images: FID vs. train split)")
    p.add_argument("--buffer-size", type=int, default=10000, help="pixel EBM replay buffer (Du & Mordatch: 10000)")
    p.add_argument("--reinit", type=float, default=0.05, help="pixel EBM: fraction of chains from noise (D&M: 0.05)")
    p.add_argument("--pixel-step", type=float, default=10.0, help="pixel Langevin gradient step (D&M: 10)")
    p.add_argument("--pixel-noise", type=float, default=0.005, help="pixel Langevin noise std (D&M: 0.005)")
    p.add_argument("--pixel-alpha", type=float, default=1.0, help="pixel EBM energy L2 weight (D&M: 1)")
    return p


def resolve_defaults(args):
    """Fill the defaults that depend on the data set, base model or stage."""
    toy = args.dataset in common.TOYS
    if args.steps is None:
        if args.stage == "pixel":
            args.steps = (100000 if args.dataset == "cifar10" else 20000) if args.preset else 200
        else:
            args.steps = 1000 if toy or args.base == "vae" else 200
    defaults = dict(batch_size=128 if toy else 32, base_steps=10000 if toy else 2000,
                    nz=2 if toy else (64 if args.base == "glf" else 100), lr=3e-3 if toy else 1e-4,
                    alpha=0.3 if toy else 0.1, base_lr=5e-4 if args.base == "glow" else 1e-3,
                    langevin_steps=60 if toy else 20,
                    eval_every=200 if toy else 50, stop_samples=1000 if toy else 200)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    common.check_positive(args, "eps", "sample_steps", "langevin_steps", "base_batch_size", "base_lr", "lr", "nz",
                          "input_scale", "ngf", "hidden", "ch", "num_blocks", "recon_std", "buffer_size", "pixel_step",
                          "pixel_noise", "glow_levels", "glow_depth", "glow_hidden", "flow_couplings", "flow_hidden",
                          "stop_samples")
    for name in ("alpha", "pixel_alpha", "base_steps", "eval_every", "patience", "glow_scale_floor"):
        if getattr(args, name) < 0 or not 0 <= args.reinit <= 1:
            raise common.UserError(f"--{name.replace('_', '-')} must be >= 0 and --reinit in [0, 1]")
    if toy and (args.base != "vae" or args.stage == "pixel"):
        raise common.UserError("the 2-D toys use a VAE base (as in the paper) and no pixel EBM: "
                               "pass --base vae, or an image --dataset")
    if args.out is None:
        suffix = {"all": "", "base": f"-{args.base}", "ebm": f"-{args.base}-ebm", "pixel": "-pixel"}[args.stage]
        args.out = f"runs/latent_tilt-{args.dataset}{suffix}"
    if args.base_ckpt is None:
        args.base_ckpt = f"runs/latent_tilt-{args.dataset}-{args.base}/checkpoint.pt"
    return args


# ======================================================================================
# Data
# ======================================================================================

def image_size(args):
    """GLOW models the raw 28 x 28 mnist/fashion (its squeezes need only /4; padding would
    add constant pixels that make bits/dim meaningless); the DCGAN nets need 32 x 32."""
    return 28 if (args.base == "glow" and args.stage != "pixel" and args.dataset in ("mnist", "fashion")) else 32


def load_data(args, split="train"):
    """Images as float [-1, 1] [N, C, H, W], or None for the toys (drawn fresh each step)."""
    if args.dataset in common.TOYS:
        return None
    return common.to_float(common.load_images(args.dataset, args.data_dir, split, pad_to_32=image_size(args) == 32))


def per_rank(n):  # torchrun: each rank draws its share of a batch
    return n // (common.dist.get_world_size() if common.dist.is_initialized() else 1)


def next_batch(args, batches, n, device):
    return (common.toy_sample(args.dataset, n) if batches is None else next(batches)).to(device)


# ======================================================================================
# Networks: base models (VAE, GLOW, GLF) and the energy E(x)
# ======================================================================================

class VAE(nn.Module):
    """q(z|x) = N(mu, diag sigma^2) from `enc` ([B, 2 nz]); `dec`: z -> pre-activation a.
    recon: "bce" (x = 2 sigmoid(a) - 1), "mse" (x = tanh a), "gauss" (toys: x = a, std recon_std)."""

    def __init__(self, enc, dec, recon, recon_std=1.0):
        super().__init__()
        self.enc, self.dec, self.recon, self.recon_std = enc, dec, recon, recon_std

    def decode(self, z):  # G(z)
        a = self.dec(z)
        return {"bce": lambda: torch.tanh(a / 2), "mse": lambda: torch.tanh(a), "gauss": lambda: a}[self.recon]()

    def encode(self, x):
        return self.enc(x).chunk(2, 1)[0]

    def loss(self, x):
        """Negative ELBO per example (sum over dimensions), averaged over the batch."""
        mu, logvar = self.enc(x).chunk(2, 1)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        rec = reconstruction_nll(self.dec(z), x, self.recon, self.recon_std)
        kl = 0.5 * (mu ** 2 + logvar.exp() - 1 - logvar).sum(1)
        return (rec + kl).mean()


def reconstruction_nll(a, x, recon, std=1.0):
    """-log p(x | a) per example, up to a constant; a is the decoder's pre-activation."""
    if recon == "bce":  # Bernoulli on pixels in [0, 1] (Appendix B.1: mnist / fashion)
        return F.binary_cross_entropy_with_logits(a, (x + 1) / 2, reduction="none").flatten(1).sum(1)
    if recon == "mse":  # cifar10
        return ((torch.tanh(a) - x) ** 2).flatten(1).sum(1)
    return ((a - x) ** 2).flatten(1).sum(1) / (2 * std ** 2)


class VectorCoupling(nn.Module):
    """Affine coupling on vectors [B, d] (GLF's latent flow): the second half is scaled and shifted
    by a one-hidden-layer net of the first, then the order is reversed (log|det| 0)."""

    def __init__(self, d, hidden):
        super().__init__()
        self.h = d // 2
        self.net = nn.Sequential(nn.Linear(self.h, hidden), nn.ReLU(), nn.Linear(hidden, 2 * (d - self.h)))
        nn.init.zeros_(self.net[-1].weight), nn.init.zeros_(self.net[-1].bias)

    def forward(self, z):  # z -> (u, log|det du/dz|)
        a, b = z[:, :self.h], z[:, self.h:]
        s, t = self.net(a).chunk(2, 1)
        s = torch.tanh(s)  # bounded log-scale keeps the joint training stable
        return torch.cat([a, b * s.exp() + t], 1).flip(1), s.sum(1)

    def inverse(self, u):
        z = u.flip(1)
        a, b = z[:, :self.h], z[:, self.h:]
        s, t = self.net(a).chunk(2, 1)
        return torch.cat([a, (b - t) * torch.exp(-torch.tanh(s))], 1)


class GLF(nn.Module):
    """Generative latent flow (Xiao et al. 2019): a deterministic AE x -> z -> x and a flow
    z -> u ~ N(0, I). G(u) = dec(flow^-1(u)), so the EBM's latent is the flow's u."""

    def __init__(self, enc, dec, recon, nz, couplings, hidden):
        super().__init__()
        self.enc, self.dec, self.recon = enc, dec, recon
        self.flow = nn.ModuleList([VectorCoupling(nz, hidden) for _ in range(couplings)])

    def decode(self, u):  # G(u)
        for c in reversed(self.flow):
            u = c.inverse(u)
        return VAE.decode(self, u)

    def encode(self, x):  # x -> u, the EBM's latent, so that G(encode(x)) reconstructs x
        u = self.enc(x)
        for c in self.flow:
            u = c(u)[0]
        return u

    def loss(self, x):
        z = self.enc(x)
        rec = reconstruction_nll(self.dec(z), x, self.recon)
        # The flow's NLL does not reach the encoder (stop-gradient, as in the GLF paper):
        # otherwise the encoder can shrink z and drive the NLL to -infinity.
        u, logdet = z.detach(), 0.0
        for c in self.flow:
            u, ld = c(u)
            logdet = logdet + ld
        nll = 0.5 * (u ** 2).sum(1) + 0.5 * u.shape[1] * math.log(2 * math.pi) - logdet
        return (rec + nll).mean()


def squeeze(x):
    """[B, C, H, W] -> [B, 4C, H/2, W/2] (each 2 x 2 patch to channels)."""
    B, C, H, W = x.shape
    return x.view(B, C, H // 2, 2, W // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(B, 4 * C, H // 2, W // 2)


def unsqueeze(x):
    B, C, H, W = x.shape
    return x.view(B, C // 4, 2, 2, H, W).permute(0, 1, 4, 2, 5, 3).reshape(B, C // 4, 2 * H, 2 * W)


class ActNorm(nn.Module):
    """y = (x + loc) exp(log_scale) per channel; the first batch sets zero mean, unit variance."""

    def __init__(self, c):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.log_scale = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.register_buffer("initialised", torch.tensor(0))

    def forward(self, x):
        if not self.initialised:
            with torch.no_grad():
                self.loc.copy_(-x.mean((0, 2, 3), keepdim=True))
                self.log_scale.copy_(-torch.log(x.std((0, 2, 3), keepdim=True) + 1e-6))
                self.initialised.fill_(1)
        return (x + self.loc) * self.log_scale.exp(), self.log_scale.sum() * x.shape[2] * x.shape[3]

    def inverse(self, y):
        return y * torch.exp(-self.log_scale) - self.loc


class InvConv(nn.Module):
    """Invertible 1x1 convolution, free weight W (a random rotation at init): log|det| = H W log|det W|."""

    def __init__(self, c):
        super().__init__()
        self.weight = nn.Parameter(torch.linalg.qr(torch.randn(c, c))[0])

    def forward(self, x):
        logdet = x.shape[2] * x.shape[3] * torch.linalg.slogdet(self.weight)[1]
        return F.conv2d(x, self.weight[:, :, None, None]), logdet

    def inverse(self, y):
        return F.conv2d(y, torch.inverse(self.weight)[:, :, None, None])


class AffineCoupling(nn.Module):
    """x_b <- (x_b + t(x_a)) * s, s = floor + (1 - floor) sigmoid(h(x_a) + 2) (Glow's code: floor 0;
    ours 0.01: without it the inverse's gain 1 / s is unbounded, and latent Langevin chains
    through an undertrained GLOW reached NaN within 10 steps); the coupling net is
    conv3x3 - ReLU - conv1x1 - ReLU - zero-initialised conv3x3 (the paper's 3-layer Highway
    net is replaced by this plain 3-layer net)."""

    def __init__(self, c, hidden, floor):
        super().__init__()
        self.h, self.floor = c // 2, floor
        self.net = nn.Sequential(nn.Conv2d(self.h, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, hidden, 1),
                                 nn.ReLU(), nn.Conv2d(hidden, 2 * (c - self.h), 3, padding=1))
        nn.init.zeros_(self.net[-1].weight), nn.init.zeros_(self.net[-1].bias)

    def _shift_scale(self, xa):
        t, h = self.net(xa).chunk(2, 1)
        return t, self.floor + (1 - self.floor) * torch.sigmoid(h + 2.0)

    def forward(self, x):
        xa, xb = x[:, :self.h], x[:, self.h:]
        t, s = self._shift_scale(xa)
        return torch.cat([xa, (xb + t) * s], 1), torch.log(s).flatten(1).sum(1)

    def inverse(self, y):
        ya, yb = y[:, :self.h], y[:, self.h:]
        t, s = self._shift_scale(ya)
        return torch.cat([ya, yb / s - t], 1)


class Glow(nn.Module):
    """Multi-scale Glow: per level squeeze, `depth` x (actnorm, 1x1 conv, affine coupling),
    then (except at the last level) half the channels leave as latents. All latents are
    N(0, I) (no learned split prior), concatenated into one flat z [B, C H W]."""

    def __init__(self, shape, levels, depth, hidden, floor=0.01):
        super().__init__()
        c, h, w = shape
        self.levels, self.z_shapes = nn.ModuleList(), []
        for i in range(levels):
            c, h, w = 4 * c, h // 2, w // 2
            self.levels.append(nn.ModuleList([m for _ in range(depth)
                                              for m in (ActNorm(c), InvConv(c), AffineCoupling(c, hidden, floor))]))
            if i < levels - 1:
                self.z_shapes.append((c // 2, h, w))
                c -= c // 2
        self.z_shapes.append((c, h, w))

    def encode(self, x):
        """x -> (z [B, D], log|det dz/dx| [B])."""
        h, zs, logdet = x, [], torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
        for i, level in enumerate(self.levels):
            h = squeeze(h)
            for layer in level:
                h, ld = layer(h)
                logdet = logdet + ld
            if i < len(self.levels) - 1:
                k = self.z_shapes[i][0]
                zs.append(h[:, :k])
                h = h[:, k:]
        zs.append(h)
        return torch.cat([z.flatten(1) for z in zs], 1), logdet

    def decode(self, z):  # G(z): the images live in [-1, 1]; the raw inverse can overshoot by orders of magnitude
        return self.inverse(z).clamp(-1, 1)

    def inverse(self, z):  # f^-1(z)
        sizes = [math.prod(s) for s in self.z_shapes]
        parts = [p.reshape(-1, *s) for p, s in zip(z.split(sizes, 1), self.z_shapes)]
        h = parts[-1]
        for i in reversed(range(len(self.levels))):
            if i < len(self.levels) - 1:
                h = torch.cat([parts[i], h], 1)
            for layer in reversed(self.levels[i]):
                h = layer.inverse(h)
            h = unsqueeze(h)
        return h

    def log_prob(self, x):
        z, logdet = self.encode(x)
        return -0.5 * (z ** 2).sum(1) - 0.5 * z.shape[1] * math.log(2 * math.pi) + logdet

    def loss(self, x):
        """Bits per dimension of uniformly dequantised 8-bit images mapped to [-1, 1)."""
        return bits_per_dim(self, x).mean()


def bits_per_dim(glow, x):
    y = torch.round((x + 1) * 127.5)  # back to the integers 0..255
    x_deq = (y + torch.rand_like(y)) / 128 - 1  # density on [-1, 1): 8 bits - log2(2) per dim
    D = x[0].numel()
    return (-glow.log_prob(x_deq) + D * math.log(128)) / (D * math.log(2))


def build_base(args, in_ch):
    """The base generative model, with the methods loss(x), decode(z) = G(z)."""
    if args.dataset in common.TOYS:  # Section 5.1: small fully connected nets (Tanaka 2019)
        H = args.hidden
        return VAE(common.mlp([2, H, H, H, 2 * args.nz], act=nn.ReLU),
                   common.mlp([args.nz, H, H, H, 2], act=nn.ReLU), "gauss", args.recon_std)
    recon = "mse" if in_ch == 3 else "bce"
    if args.base == "glow":
        s = image_size(args)
        return Glow((in_ch, s, s), args.glow_levels, args.glow_depth, args.glow_hidden, args.glow_scale_floor)
    dec = common.dcgan_generator(args.nz, in_ch, args.ngf, 32, norm=True)[:-1]  # pre-tanh: BCE from logits
    if args.base == "vae":
        return VAE(common.dcgan_encoder(2 * args.nz, in_ch, args.ngf, 32, norm="batch"), dec, recon)
    return GLF(common.dcgan_encoder(args.nz, in_ch, args.ngf, 32, norm="batch"), dec, recon, args.nz,
               args.flow_couplings, args.flow_hidden)


class ToyEnergy(nn.Module):
    """E(x [B, 2]) -> [B]: a 3-hidden-layer SiLU MLP of input_scale * x."""

    def __init__(self, hidden, input_scale):
        super().__init__()
        self.net, self.input_scale = common.mlp([2, hidden, hidden, hidden, 1], act=nn.SiLU), input_scale

    def forward(self, x):
        return self.net(self.input_scale * x).squeeze(1)


def build_energy(args, in_ch, sn=False):
    """E(x) -> [B]. Images: Appendix B.2 (res blocks of ch then 2 ch, global sum pooling, linear
    head); toys: an MLP (in the role of DOT's discriminator)."""
    if args.dataset in common.TOYS:
        return ToyEnergy(args.hidden, args.input_scale)
    return common.EnergyResNet(in_ch, ch=args.ch, ch_mult=(1, 2), num_blocks=args.num_blocks, time_embed=False, sn=sn)


# ======================================================================================
# Objective: maximum likelihood of the tilted model (Eq. 5, 7)
# ======================================================================================

def mle_loss(e_data, e_model, alpha, weights=None):
    """Surrogate whose theta-gradient is Eq. 5 / 7, E_data[dE(x)/dtheta] - E_tilted[dE(G(z))/dtheta],
    plus alpha (E_data^2 + E_model^2) (Appendix B.2's energy regularisation). weights: None for
    equally weighted Langevin samples, or normalised weights of the model points (quadrature)."""
    mean = (lambda e: e.mean()) if weights is None else (lambda e: (weights * e).sum())
    return e_data.mean() - mean(e_model) + alpha * ((e_data ** 2).mean() + mean(e_model ** 2))


# ======================================================================================
# Sampler: Langevin in z (Eq. 8) and, for the baseline, in pixels
# ======================================================================================

def latent_log_p(E, G):
    """log of the unnormalised tilted prior, Eq. 6: log p(z) - E(G(z)), p(z) = N(0, I)."""
    return lambda z: -E(G(z)) - 0.5 * (z ** 2).flatten(1).sum(1)


def sample_latent(E, G, z0, n_steps, eps, keep_every=0):
    """Eq. 8: z <- z - eps/2 grad_z [E(G(z)) - log p(z)] + sqrt(eps) w, short-run from z0."""
    return common.langevin(latent_log_p(E, G), z0, n_steps, eps, convention="eps",
                           trace=keep_every > 0, keep_every=keep_every)


def sample_pixels(E, x0, args):
    """Du & Mordatch 2019: x <- x - step grad E(x) + N(0, noise^2), clipped; s^2 / 2 = step."""
    s = math.sqrt(2 * args.pixel_step)
    return common.langevin(lambda x: -E(x), x0, 60, s, noise_scale=args.pixel_noise / s, clamp=(-1.0, 1.0))


# ======================================================================================
# Training
# ======================================================================================

def train_base(args, G, batches, state, out, device, stop, nz):
    """Maximum likelihood (ELBO / exact) of the base model; returns False if stopped."""
    params = list(G.parameters())
    opt = torch.optim.Adam(params, lr=args.base_lr)
    start = 0
    if state is not None:
        opt.load_state_dict(state["base_opt"])
        start = state["step"]
    elif isinstance(G, Glow):  # actnorm's data-dependent init, then the same on every rank
        with torch.no_grad():
            G.log_prob(next_batch(args, batches, args.base_batch_size, device))
        common.broadcast_params(G)
    logger = common.Logger(out, args.base_steps, initial=start)

    def save(step):
        common.save_checkpoint(out / "checkpoint.pt", {
            "script": "latent_tilt", "args": vars(args), "phase": "base", "step": step, "base": G.state_dict(),
            "base_opt": opt.state_dict(), "rng": common.rng_state(),
            "batches": batches.state_dict() if batches is not None else None})
        G.eval()
        save_samples(out, step, args, G.decode, None, nz, device, batches is None)
        G.train()

    G.train()
    for step in range(start + 1, args.base_steps + 1):
        loss = G.loss(next_batch(args, batches, per_rank(args.base_batch_size), device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        common.average_gradients(params)
        opt.step()
        logger.update()
        if step % args.log_every == 0 or step == args.base_steps:
            value = loss.item()
            common.check_finite(step, "--base-lr", base_loss=value)
            logger.log(step, args.base_batch_size, base_loss=value)
        stopping = stop.should_stop()  # every rank agrees (torchrun)
        if step % args.ckpt_every == 0 or step == args.base_steps or stopping:
            save(step)
        if stopping:
            return False
    logger.close()
    G.eval().requires_grad_(False)
    return True


def ebm_update(e_data, e_model, alpha, opt, params, logger, step, args, knobs):
    """One Adam step on mle_loss (latent and pixel EBM alike) and the log line."""
    loss = mle_loss(e_data, e_model, alpha)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    common.average_gradients(params)
    opt.step()
    logger.update()
    if step % args.log_every == 0 or step == args.steps:
        common.check_finite(step, knobs, loss=loss.item())
        logger.log(step, args.batch_size, loss=loss.item(), e_data=e_data.mean().item(), e_sample=e_model.mean().item())


@torch.no_grad()
def sample_score(args, G, E, nz, device, ref):
    """Early-stop score (lower is better) of a fixed set of EBM samples: MMD vs. fresh toy data,
    or FID vs. the training split (the test split stays unseen)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(args.seed + 12345)
        x, _ = generate(args, G, E, args.stop_samples, nz, device, tilt=True)
    if ref is not None:
        return common.mmd_rbf(x, ref)
    return common.fid_vs_data(x, args.dataset, args.data_dir, "train", device)


def train_ebm(args, base, E, batches, state, out, device, stop, nz):
    """Eq. 5 / 7 with short-run, non-persistent latent Langevin (Eq. 8) from p(z). Returns
    the early-stop record (best_E: the kept EBM), or None when stopped by a signal."""
    G = base.decode
    params = list(E.parameters())
    opt = torch.optim.Adam(params, lr=args.lr, betas=(0.5, 0.999))
    track = {"step": 0, "best": None, "best_step": 0, "bad": 0, "stopped": False, "best_E": None}
    if state is not None:  # E itself is loaded in main()
        opt.load_state_dict(state["opt"])
        track = dict(state["track"])
    logger = common.Logger(out, args.steps, initial=track["step"])
    ref = common.toy_sample(args.dataset, args.stop_samples, torch.Generator().manual_seed(args.seed + 1)) \
        if batches is None else None
    B = per_rank(args.batch_size)

    def save(step):
        track["step"] = step
        common.save_checkpoint(out / "checkpoint.pt", {
            "script": "latent_tilt", "args": vars(args), "phase": "ebm", "step": step, "base": base.state_dict(),
            "E": E.state_dict(), "opt": opt.state_dict(), "track": track, "rng": common.rng_state(),
            "batches": batches.state_dict() if batches is not None else None})

    def check(step):  # the paper's early stop "when samples get worse", made explicit
        score = sample_score(args, G, E, nz, device, ref)
        if track["best"] is None or score < track["best"]:
            track.update(best=score, best_step=step, bad=0, best_E=copy.deepcopy(E.state_dict()))
        else:
            track["bad"] += 1
        if common.is_main():
            print(f"step {step}: sample score {score:.4g} (best {track['best']:.4g} at step {track['best_step']})")
        if args.patience and track["bad"] >= args.patience:
            track["stopped"] = True

    if track["step"] == 0 and args.eval_every:
        check(0)
    step = track["step"]
    while step < args.steps and not track["stopped"]:
        step += 1
        x = next_batch(args, batches, B, device)
        z = sample_latent(E, G, torch.randn(B, nz, device=device), args.langevin_steps, args.eps)  # Eq. 8
        x_model = G(z).detach()
        ebm_update(E(x), E(x_model), args.alpha, opt, params, logger, step, args, "--lr, --eps")  # Eq. 5 / 7
        if args.eval_every and step % args.eval_every == 0:
            check(step)
        stopping = stop.should_stop()  # every rank agrees (torchrun)
        if step % args.ckpt_every == 0 or step == args.steps or stopping or track["stopped"]:
            save(step)
            save_samples(out, step, args, G, E, nz, device, batches is None)
        if stopping:
            return None
    if track["stopped"] and common.is_main():
        print(f"early stop at step {step}: kept the EBM of step {track['best_step']}")
    logger.close()
    return track


def train_pixel(args, E, batches, state, out, device, stop, shape):
    """Du & Mordatch 2019 with a replay buffer of --buffer-size images (Appendix B.2)."""
    params = list(E.parameters())
    opt = torch.optim.Adam(params, lr=args.lr, betas=(0.0, 0.999))
    buffer = torch.rand(args.buffer_size, *shape) * 2 - 1  # uniform noise
    start = 0
    if state is not None:  # E itself is loaded in main()
        opt.load_state_dict(state["opt"])
        buffer, start = state["buffer"], state["step"]
    logger = common.Logger(out, args.steps, initial=start)
    B = per_rank(args.batch_size)

    def save(step):
        common.save_checkpoint(out / "checkpoint.pt", {
            "script": "latent_tilt", "args": vars(args), "phase": "pixel", "step": step, "E": E.state_dict(),
            "opt": opt.state_dict(), "buffer": buffer, "rng": common.rng_state(), "batches": batches.state_dict()})

    for step in range(start + 1, args.steps + 1):
        x = next_batch(args, batches, B, device)
        idx = torch.randint(args.buffer_size, (B,))
        x0 = buffer[idx].to(device)
        fresh = torch.rand(B, device=device) < args.reinit  # 5% restart from uniform noise
        x0 = torch.where(fresh[:, None, None, None], torch.rand_like(x0) * 2 - 1, x0)
        x_model = sample_pixels(E, x0, args)
        buffer[idx] = x_model.cpu()
        ebm_update(E(x), E(x_model), args.pixel_alpha, opt, params, logger, step, args, "--lr, --pixel-step")
        stopping = stop.should_stop()  # every rank agrees (torchrun)
        if step % args.ckpt_every == 0 or step == args.steps or stopping:
            save(step)
            if common.is_main():
                common.save_image_grid(out / f"samples_{step:06d}.png", x_model[:64])
        if stopping:
            return None
    logger.close()
    return buffer


# ======================================================================================
# Evaluation
# ======================================================================================

def generate(args, G, E, n, nz, device, tilt, batch=100):
    """n samples x = G(z): z ~ p(z) (tilt=False) or z from Eq. 8 with --sample-steps."""
    xs, zs = [], []
    for i in range(0, n, batch):
        z = torch.randn(min(batch, n - i), nz, device=device)
        if tilt:
            z = sample_latent(E, G, z, args.sample_steps, args.eps)
        with torch.no_grad():
            xs.append(G(z).float().cpu())
        zs.append(z.cpu())
    return torch.cat(xs), torch.cat(zs)


TOY_LIM = 2.0  # both toys lie within [-2, 2]^2 (NOTES.md scaling)


def save_samples(out, step, args, G, E, nz, device, toy):
    if not common.is_main():
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        x, _ = generate(args, G, E, 1000 if toy else 64, nz, device, tilt=E is not None)
    if toy:
        title = f"{'base + EBM' if E is not None else 'base'}, step {step}"
        common.save_toy_panels(out / f"samples_{step:06d}.png", [(title, x)], lim=TOY_LIM)
    else:
        common.save_image_grid(out / f"samples_{step:06d}.png", x)


def toy_metrics(prefix, x, args):
    data = common.toy_sample(args.dataset, len(x), torch.Generator().manual_seed(args.seed + 2))
    m = {f"{prefix}_mmd": common.mmd_rbf(x, data)}
    if common.toy_modes(args.dataset) is not None:
        s = common.mode_stats(x, args.dataset)
        m.update({f"{prefix}_hq_frac": s["hq_frac"], f"{prefix}_modes": s["modes"]})
    return m


def evaluate(args, G, E, nz, device, out, test):
    """Table 1 protocol for base and base + EBM (E None: base only); pictures of Fig. 5.1 / 5.3."""
    toy = args.dataset in common.TOYS
    n = 2000 if toy else args.fid_samples
    base, G = G, G.decode
    metrics, samples = {}, {}
    for prefix, tilt in [("base", False)] + ([("ebm", True)] if E is not None else []):
        x, z = generate(args, G, E, max(n, 64), nz, device, tilt)  # 64 for samples.npz when FID is off
        samples[prefix] = (x, z)
        if toy:
            metrics.update(toy_metrics(prefix, x, args))
        elif n > 0:
            metrics[f"{prefix}_fid"] = common.fid_vs_data(x.to(device), args.dataset, args.data_dir, "test", device)
    if not toy:
        xt = test[:1000].to(device)
        with torch.no_grad():
            if isinstance(base, Glow):
                metrics["base_bpd"] = bits_per_dim(base, xt).mean().item()
            else:
                metrics["mse_recon"] = ((G(base.encode(xt)) - xt) ** 2).mean().item()
    if common.is_main():
        if toy:
            panels = [("data", common.toy_sample(args.dataset, n, torch.Generator().manual_seed(args.seed + 3))),
                      ("VAE", samples["base"][0])] + ([("VAE + EBM", samples["ebm"][0])] if E is not None else [])
            common.save_toy_panels(out / "tilt.png", panels, lim=TOY_LIM)
        else:
            z0 = torch.randn(64, nz, device=device)
            grids = [common.image_grid(G(z0).detach())]
            if E is not None:  # Figure 5.3: one chain per row, a column every 10 steps, prior on the left
                z, info = sample_latent(E, G, z0[:8], args.sample_steps, args.eps, keep_every=10)
                traj = torch.stack([G(t).detach().cpu() for t in info["traj"]], 1)  # [8, K, C, H, W]
                common.save_image_grid(out / "langevin_traj.png", traj.flatten(0, 1), nrow=traj.shape[1])
                grids.append(common.image_grid(G(sample_latent(E, G, z0, args.sample_steps, args.eps)).detach()))
            sep = [np.full((grids[0].shape[0], 8, 3), 255, np.uint8)] if E is not None else []
            common.save_png(out / "tilt.png", np.concatenate(grids[:1] + sep + grids[1:], 1))
    return metrics, samples["ebm" if E is not None else "base"]


def evaluate_pixel(args, E, buffer, device, out):
    """FID of chains started from the replay buffer (Appendix B.2)."""
    xs = []
    for i in range(0, args.fid_samples, 100):
        idx = torch.randint(len(buffer), (min(100, args.fid_samples - i),))
        xs.append(sample_pixels(E, buffer[idx].to(device), args).cpu())
    x = torch.cat(xs) if xs else buffer[:64]
    metrics = {"fid": common.fid_vs_data(x.to(device), args.dataset, args.data_dir, "test", device)} if xs else {}
    if common.is_main():
        common.save_image_grid(out / "tilt.png", x[:64])
    return metrics, x


# ======================================================================================
# Main
# ======================================================================================

def main():
    args = resolve_defaults(common.parse_args(build_parser(), PRESETS))
    rank, world = common.init_distributed()
    own = Path(args.out) / "checkpoint.pt"
    base_state = None
    if args.stage == "ebm":  # the frozen base: its architecture flags come from its checkpoint
        source = own if (args.resume or args.eval_only) and own.exists() else Path(args.base_ckpt)
        if not source.exists():
            raise common.UserError(f"no base checkpoint at {source}: run --stage base first, or pass --base-ckpt")
        base_state = common.load_checkpoint(source, "latent_tilt", args, must_match=("dataset",), missing=OLD_CKPT)
        if base_state["phase"] == "base" and base_state["step"] < base_state["args"]["base_steps"]:
            raise common.UserError(f"{source} holds an unfinished base (step {base_state['step']}): "
                                   "finish it with --stage base --resume")
        for key in BASE_ARCH:
            setattr(args, key, base_state["args"][key])
    common.seed_everything(args.seed)
    device = common.pick_device(args.device)
    data = load_data(args)
    in_ch = 2 if data is None else data.shape[1]
    nz = in_ch * image_size(args) ** 2 if args.base == "glow" and data is not None else args.nz  # GLOW: full-dim z
    G = build_base(args, in_ch).to(device) if args.stage != "pixel" else None
    E = build_energy(args, in_ch, sn=args.stage == "pixel").to(device) if args.stage != "base" else None
    common.seed_everything(args.seed + rank)
    out = common.prepare_out_dir(args, "latent_tilt")
    state = None
    if args.resume or args.eval_only:
        state = common.load_checkpoint(out / "checkpoint.pt", "latent_tilt", args,
                                       must_match=("dataset", "stage") + BASE_ARCH + EBM_ARCH
                                       + (("input_scale",) if data is None else ()), missing=OLD_CKPT)
        common.set_rng_state(state["rng"])
    for m in (G, E):
        if m is not None:
            common.broadcast_params(m)
    phase = state["phase"] if state is not None else None
    base_phase = args.stage in ("all", "base") and phase in (None, "base")
    batches = None if data is None else common.Batches(
        data, (args.base_batch_size if base_phase else args.batch_size) // world, seed=args.seed)
    if state is not None and batches is not None and state.get("batches"):
        batches.load_state_dict(state["batches"])
    stop = common.StopFlag()
    test = load_data(args, "test")

    if phase in ("ebm", "pixel"):
        common.load_state(E, state["E"], "energy")
    if args.stage == "pixel":
        buffer = state["buffer"] if args.eval_only else train_pixel(args, E, batches, state, out, device, stop,
                                                                     data.shape[1:])
        if buffer is None:
            return
        metrics, x = evaluate_pixel(args, E, buffer, device, out)
        if args.eval_only and common.is_main():
            np.savez(out / "samples.npz", x=x.numpy())
        common.write_metrics(out, metrics)
        return

    # the base model: trained here (stages all / base) or loaded frozen (stage ebm)
    if phase is not None or base_state is not None:
        common.load_state(G, (state if phase is not None else base_state)["base"], "base model")
    if base_phase and not args.eval_only:
        if not train_base(args, G, batches, state, out, device, stop, nz):
            return
        if args.stage == "all" and batches is not None:  # the EBM's own batch size from here on
            batches = common.Batches(data, args.batch_size // world, seed=args.seed)
    G.eval().requires_grad_(False)
    if args.stage == "base" or phase == "base" and args.eval_only:
        metrics, (x, z) = evaluate(args, G, None, nz, device, out, test)
    else:
        if args.eval_only:
            track = state["track"]
        else:
            track = train_ebm(args, G, E, batches, state if phase == "ebm" else None, out, device, stop, nz)
            if track is None:
                return
        if track["best_E"] is not None:  # the early-stopped EBM
            common.load_state(E, track["best_E"], "energy")
        E.eval().requires_grad_(False)
        metrics, (x, z) = evaluate(args, G, E, nz, device, out, test)
        kept = track["best_step"] if track["best_E"] is not None else track["step"]  # --eval-every 0: the last
        metrics.update(ebm_steps=track["step"], ebm_best_step=kept)
    if args.eval_only and common.is_main():
        np.savez(out / "samples.npz", x=x.numpy(), z=z.numpy())
    common.write_metrics(out, metrics)


if __name__ == "__main__":
    common.main_guard(main)

"""Exponential tilting of generative models with a latent energy-based model.

Xiao, Yan & Amit (2020), "Exponential Tilting of Generative Models: Improving Sample Quality by
Training and Sampling from Latent Energy", https://arxiv.org/abs/2006.08100

A frozen generator x = G(z), z ~ p(z) = N(0, I), is tilted by an energy on what it generates,
p(z) ∝ p(z) exp(-E(G(z))) (Eq. 6). E is learned by maximum likelihood (Eq. 5, 7) with model
samples from short-run, non-persistent Langevin chains in z started from p(z) (Eq. 8).

--stage all (default): base, then latent EBM, in one folder. base: trains --base vae (DCGAN VAE; an MLP
VAE on toys), glow (multi-scale GLOW with a learned split prior; test bits/dim) or glf (deterministic AE
+ 4 affine couplings, trained jointly). ebm: trains the latent EBM on that frozen base (--base-ckpt),
keeping the best of the scores taken every --eval-every steps ("early stop when sample quality
deteriorates", Section 5.3). pixel: the "EBM on data" baseline (Table 1), Du & Mordatch's replay buffer.

Langevin (Eq. 8; common.langevin, convention="eps"): z <- z - eps/2 grad U(z) + sqrt(eps) w, eps = 0.01,
U(z) = E(G(z)) + |z|^2 / 2; 60 steps in training (paper preset; small images 20; toys 100, with --mala),
100 when sampling. GLOW, GLF's flow, Langevin and every log-density run in fp32 whatever --amp says.

Evaluation (Table 1, for every base and the pixel EBM): FID of --fid-samples images (paper: 10,000)
against the --fid-split split (paper: test) at 32 x 32, checked at start-up: base_fid, ebm_fid (fid
for the pixel EBM), tilt.png, langevin_traj.png (Figure 5.3). Toys: base_ / ebm_ hq_frac, modes,
mmd, and ebm_*_exact for exact grid draws of the learned tilt.

Offline demo (25-Gaussians: 10000 VAE steps, then up to 2000 EBM steps; 6 min 9 s on 2 CPU cores):
    python latent_tilt.py
  measured: hq_frac 0.493 -> 0.851 (exact draws: 0.849), modes 25 -> 25, mmd 0.0064 -> 0.0028.
Fashion-MNIST on a CPU budget (its FIDs: docs/latent_tilt.md):
    python latent_tilt.py --dataset fashion --preset small --stage base --base vae
    python latent_tilt.py --dataset fashion --preset small --stage ebm --base vae
Paper configuration (the default for mnist, fashion, cifar10; GPU; Table 1: VAE 57.1 -> VAE + EBM
38.1 on Fashion; --print-config shows every resolved value):
    python latent_tilt.py --dataset fashion --stage base --base vae
    python latent_tilt.py --dataset fashion --stage ebm --base vae
    torchrun --nproc_per_node=4 latent_tilt.py --dataset cifar10 --stage pixel
"""
import argparse
import contextlib
import copy
import functools
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
EBM_ARCH = ("ch", "num_blocks", "e_hidden")
# --preset paper (Appendix B): DCGAN width 64; GLOW 2 levels of 16 steps, coupling width 64 (CIFAR-10: 3 of
# 32, width 256); energy net 3 res blocks of 64 then 3 of 128; Langevin 60 training / 100 sampling steps; FID
# of 10,000 samples against the test set. Ours: the EBM's batch size and the early stop's sample count.
_PAPER_IMAGES = dict(ngf=64, ch=64, num_blocks=3, langevin_steps=60, sample_steps=100, batch_size=128,
                     fid_samples=10000, fid_split="test", stop_samples=1000, glow_levels=2, glow_depth=16,
                     glow_hidden=64)
PRESETS = {"mnist": dict(_PAPER_IMAGES), "fashion": dict(_PAPER_IMAGES),
           "cifar10": dict(_PAPER_IMAGES, glow_levels=3, glow_depth=32, glow_hidden=256)}
# --preset paper, per base (Appendix B.1): (base steps, base batch size), steps = epochs x training images /
# batch: VAE and GLF 256 epochs of 128; GLOW 128 epochs of 64 (CIFAR-10: 256).
PAPER_BASE = {"mnist": {"vae": (120000, 128), "glf": (120000, 128), "glow": (120000, 64)},
              "fashion": {"vae": (120000, 128), "glf": (120000, 128), "glow": (120000, 64)},
              "cifar10": {"vae": (100000, 128), "glf": (100000, 128), "glow": (200000, 64)}}
PAPER_PIXEL_STEPS = {"mnist": 20000, "fashion": 20000, "cifar10": 100000}  # Appendix B.2


def build_parser():
    p = common.base_parser("Latent-EBM exponential tilting of a VAE / GLOW / GLF (Xiao, Yan & Amit 2020)",
                           dataset="25gaussians", steps=None, batch_size=None, fid_samples=500,
                           batch_size_help="EBM batch: 512 toys, 32 images; paper preset 128")
    p.set_defaults(log_every=20, ckpt_every=None)
    p.add_argument("--stage", default="all", choices=["all", "base", "ebm", "pixel"],
                   help="all: base then latent EBM in one folder; base / ebm: one each; pixel: the EBM-on-data "
                        "baseline. EBM --steps: 1000 VAE, 200 GLOW / GLF (paper), toys 2000, pixel 200 (paper 20000, "
                        "cifar10 100000); --ckpt-every: a tenth of them")
    p.add_argument("--base", default="vae", choices=["vae", "glow", "glf"],
                   help="base generative model (--stage ebm: read from --base-ckpt)")
    p.add_argument("--base-ckpt", default=None,
                   help="--stage ebm: the frozen base, with its --base and architecture flags (default "
                        "runs/latent_tilt-DATASET-BASE/checkpoint.pt)")
    p.add_argument("--base-steps", type=int, default=None,
                   help="base steps (10000 toys, 2000 images, GLOW 8000); paper preset: 120000 (GLOW too), "
                        "cifar10 100000, GLOW 200000")
    p.add_argument("--base-batch-size", type=int, default=None, help="base batch size (128, GLOW 64, as in the paper)")
    p.add_argument("--base-lr", type=float, default=None, help="base Adam lr (1e-3, GLOW 5e-4, as in the paper)")
    p.add_argument("--base-ckpt-every", type=int, default=None,
                   help="base steps between the base's checkpoints and sample pictures (default: a tenth of "
                        "--base-steps)")
    p.add_argument("--nz", type=int, default=None, help="latent size (paper: 100 VAE, 64 GLF; toys: 2)")
    p.add_argument("--ngf", type=int, default=32, help="DCGAN encoder/decoder width (paper: 64)")
    p.add_argument("--hidden", type=int, default=64, help="toys: width of the MLP VAE")
    p.add_argument("--e-hidden", type=int, default=128, help="toys: width of the energy MLP")
    p.add_argument("--input-scale", type=float, default=8.0,
                   help="toys: the energy MLP sees input_scale * x (ours; at 1 it is too smooth to tilt)")
    p.add_argument("--recon-std", type=float, default=0.05, help="toys: std of the VAE's Gaussian decoder")
    p.add_argument("--glow-levels", type=int, default=2, help="GLOW levels (squeeze ... split); paper: 2, cifar10 3")
    p.add_argument("--glow-depth", type=int, default=8, help="GLOW flow steps per level (paper: 16, cifar10 32)")
    p.add_argument("--glow-hidden", type=int, default=64, help="GLOW coupling width (paper: 64, cifar10 256)")
    p.add_argument("--glow-scale-floor", type=float, default=0.01, help="coupling scales >= this (Glow: 0)")
    p.add_argument("--flow-couplings", type=int, default=4, help="GLF latent flow couplings (paper: 4)")
    p.add_argument("--flow-hidden", type=int, default=256, help="GLF coupling hidden units (paper: 256)")
    p.add_argument("--ch", type=int, default=16, help="energy net width (paper: 64 -> 3 blocks of 64, 3 of 128)")
    p.add_argument("--num-blocks", type=int, default=1, help="energy net res blocks per level (paper: 3)")
    p.add_argument("--lr", type=float, default=None, help="EBM Adam lr (not in the paper; 3e-3 toys, 1e-4 images)")
    p.add_argument("--eps", type=float, default=0.01, help="Eq. 8: z <- z - eps/2 grad U + sqrt(eps) w (paper: 0.01)")
    p.add_argument("--langevin-steps", type=int, default=None,
                   help="Langevin steps per training step, latent and pixel EBM (100 toys, 20 images; paper, D&M: 60)")
    p.add_argument("--sample-steps", type=int, default=100, help="Langevin steps when sampling (paper: 100)")
    p.add_argument("--mala", action=argparse.BooleanOptionalAction, default=None,
                   help="Metropolis-adjust the latent chains (default: toys on, images off; paper: off)")
    p.add_argument("--alpha", type=float, default=0.1,
                   help="energy regularisation alpha (E+^2 + E-^2) (paper: 0.1); it caps the data-sample energy gap "
                        "at 1/alpha: our GLOW tilt uses 0.001 (docs/latent_tilt.md)")
    p.add_argument("--eval-every", type=int, default=None, help="early stop: score every N steps (toys 250; 50)")
    p.add_argument("--patience", type=int, default=3, help="stop after this many scores without improvement (0: never)")
    p.add_argument("--stop-samples", type=int, default=None,
                   help="samples per early-stop score (1000 toys, 200 images; paper preset 1000); images: FID vs train")
    p.add_argument("--eval-samples", type=int, default=2000, help="toys: samples for the final mmd, hq_frac, modes")
    p.add_argument("--buffer-size", type=int, default=10000, help="pixel EBM replay buffer, all ranks (D&M: 10000)")
    p.add_argument("--reinit", type=float, default=0.05, help="pixel EBM: fraction of chains from noise (D&M: 0.05)")
    p.add_argument("--pixel-step", type=float, default=10.0, help="pixel Langevin gradient step, on [0, 1] (D&M: 10)")
    p.add_argument("--pixel-noise", type=float, default=0.005, help="pixel Langevin noise std, on [0, 1] (D&M: 0.005)")
    p.add_argument("--pixel-grad-clip", type=float, default=0.01,
                   help="pixel Langevin: each pixel's energy gradient clipped to +-this (D&M's proj_norm: 0.01)")
    p.add_argument("--pixel-alpha", type=float, default=1.0, help="pixel EBM energy L2 weight (D&M: 1)")
    return p


def default_out(args, stage=None):
    suffix = {"all": "", "base": f"-{args.base}", "ebm": f"-{args.base}-ebm", "pixel": "-pixel"}[stage or args.stage]
    return f"runs/latent_tilt-{args.dataset}{suffix}"


def read_base(args):
    """--stage ebm, before the defaults: --base and its architecture flags from the base's checkpoint (--base-ckpt,
    else on --resume / --eval-only this run's own). Returns it (None: --print-config without one)."""
    path = Path(args.base_ckpt or f"{default_out(args, 'base')}/checkpoint.pt")
    own = Path(args.out or default_out(args)) / "checkpoint.pt"
    if not path.exists() and (args.resume or args.eval_only) and own.exists():
        path = own
    if not path.exists():
        if args.print_config:
            return None
        raise common.UserError(f"no base checkpoint at {path}: run --stage base first, or pass --base-ckpt")
    state = common.load_checkpoint(path, "latent_tilt", args, must_match=("dataset",))
    saved = state["args"]
    if "base" not in state:
        raise common.UserError(f"{path} holds a pixel EBM, not a base model: pass a --stage base checkpoint")
    if "base" in args.given and args.base != saved["base"]:
        raise common.UserError(f"{path} holds a {saved['base']} base, not --base {args.base}: drop --base")
    if state["phase"] == "base" and state["step"] < saved["base_steps"]:
        raise common.UserError(f"{path} holds an unfinished base (step {state['step']}): "
                               "finish it with --stage base --resume")
    for key in BASE_ARCH:
        setattr(args, key, saved[key])
    args.base_ckpt = str(path)
    return state


def resolve_defaults(args):
    """Fill the defaults that depend on the data set, base model, stage or preset."""
    toy = args.dataset in common.TOYS
    paper = args.preset == "paper"
    if paper and args.dataset in PAPER_BASE:
        for key, value in zip(("base_steps", "base_batch_size"), PAPER_BASE[args.dataset][args.base]):
            if key not in args.given:
                setattr(args, key, value)
    glow = args.base == "glow"
    latent_steps = 2000 if toy else (1000 if args.base == "vae" else 200)
    pixel_steps = PAPER_PIXEL_STEPS.get(args.dataset, 200) if paper else 200
    defaults = dict(steps=pixel_steps if args.stage == "pixel" else latent_steps,
                    batch_size=512 if toy else 32, base_steps=10000 if toy else (8000 if glow else 2000),
                    base_batch_size=64 if glow else 128, nz=2 if toy else (64 if args.base == "glf" else 100),
                    lr=3e-3 if toy else 1e-4, base_lr=5e-4 if glow else 1e-3, langevin_steps=100 if toy else 20,
                    eval_every=250 if toy else 50, stop_samples=1000 if toy else 200, mala=toy)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.ckpt_every is None:
        args.ckpt_every = max(1, args.steps // 10)
    if args.base_ckpt_every is None:
        args.base_ckpt_every = max(1, args.base_steps // 10)
    common.check_positive(args, "eps", "sample_steps", "langevin_steps", "base_batch_size", "base_lr", "lr", "nz",
                          "input_scale", "ngf", "hidden", "e_hidden", "ch", "num_blocks", "recon_std", "buffer_size",
                          "pixel_step", "pixel_noise", "pixel_grad_clip", "glow_levels", "glow_depth", "glow_hidden",
                          "flow_couplings", "flow_hidden", "stop_samples", "base_ckpt_every", "eval_samples")
    for name in ("alpha", "pixel_alpha", "base_steps", "eval_every", "patience", "glow_scale_floor"):
        if getattr(args, name) < 0:
            raise common.UserError(f"--{name.replace('_', '-')} must be >= 0 (got {getattr(args, name)})")
    if not 0 <= args.reinit <= 1:
        raise common.UserError(f"--reinit must be in [0, 1] (got {args.reinit})")
    if toy and (args.base != "vae" or args.stage == "pixel"):
        raise common.UserError("the 2-D toys use a VAE base (as in the paper) and no pixel EBM: "
                               "pass --base vae, or an image --dataset")
    if args.out is None:
        args.out = default_out(args)
    if args.base_ckpt is None:
        args.base_ckpt = f"{default_out(args, 'base')}/checkpoint.pt"
    return args


def check_protocol(args):
    """At start-up, before data: the evaluation's and the early stop's reference splits can serve their sample
    counts (FID compares equally many generated and real images)."""
    if args.dataset in common.TOYS:
        return
    common.check_fid_protocol(args)
    if args.stage in ("all", "ebm") and args.eval_every:
        have = common.split_size(args.dataset, "train", args.data_dir)
        if args.stop_samples > have:
            raise common.UserError(f"--stop-samples {args.stop_samples} exceeds the {have} images of "
                                   f"{args.dataset}/train (the early stop's reference): lower --stop-samples")


# ======================================================================================
# Data
# ======================================================================================

def image_size(args):
    """GLOW models the raw 28 x 28 mnist/fashion (its squeezes need only /4; padding would add constant pixels
    that make bits/dim meaningless); the DCGAN nets need 32 x 32 there. Other data sets keep their own size."""
    if args.base == "glow" and args.stage != "pixel" and args.dataset in ("mnist", "fashion"):
        return 28
    return common.image_shape(args.dataset, pad_to_32=True)[-1]


def load_data(args, split="train"):
    """Images as uint8 [N, C, H, W] (or a lazily read folder), or None for the toys (drawn fresh)."""
    if args.dataset in common.TOYS:
        return None
    return common.load_images(args.dataset, args.data_dir, split, pad_to_32=image_size(args) == 32)


def next_batch(args, batches, n, device):
    """n examples in [-1, 1]: fresh toy points, or the next image batch (n is then the Batches' own)."""
    return common.toy_sample(args.dataset, n).to(device) if batches is None else common.to_float(next(batches))


def fid_view(x):
    """Samples as FID sees them: 28 x 28 (GLOW on mnist / fashion) padded with black (-1) to the reference's 32 x 32."""
    return F.pad(x, (2, 2, 2, 2), value=-1.0) if x.shape[-1] == 28 else x


# ======================================================================================
# Networks: base models (VAE, GLOW, GLF) and the energy E(x)
# ======================================================================================
# `amp` arguments are context factories: common.autocast for --amp, else no-ops. Networks run
# inside them; what they return is cast back to fp32 before it enters a loss or a sampler.

def dcgan_generator(nz, out_ch, ngf, size):
    """DCGAN generator (Radford et al.), the paper's VAE / GLF decoder: z [B, nz] -> a 4x4
    transposed conv, then BatchNorm - LeakyReLU(0.2) - stride-2 transposed conv halving the
    width up to `size`, tanh: [B, out_ch, size, size] in (-1, 1)."""
    n_up = int(math.log2(size // 4))
    width = [ngf * 2 ** (n_up - 1 - i) for i in range(n_up)]
    layers = [nn.Unflatten(1, (nz, 1, 1)), nn.ConvTranspose2d(nz, width[0], 4, 1, 0)]
    for i in range(n_up):
        cout = width[i + 1] if i + 1 < n_up else out_ch
        layers += [nn.BatchNorm2d(width[i]), nn.LeakyReLU(0.2), nn.ConvTranspose2d(width[i], cout, 4, 2, 1)]
    return nn.Sequential(*layers, nn.Tanh())


def dcgan_encoder(out_dim, in_ch, ndf, size):
    """DCGAN encoder, the paper's VAE / GLF encoder: stride-2 convs doubling the width down to
    4x4 (BatchNorm after all but the first, LeakyReLU(0.2)), then a 4x4 conv: [B, out_dim]."""
    n_down = int(math.log2(size // 4))
    layers, cin = [], in_ch
    for i in range(n_down):
        cout = ndf * 2 ** i
        layers += [nn.Conv2d(cin, cout, 4, 2, 1)] + ([nn.BatchNorm2d(cout)] if i > 0 else []) + [nn.LeakyReLU(0.2)]
        cin = cout
    return nn.Sequential(*layers, nn.Conv2d(cin, out_dim, 4, 1, 0), nn.Flatten())


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

    def loss(self, x, amp=contextlib.nullcontext):
        """Negative ELBO per example (sum over dimensions), averaged over the batch."""
        with amp():
            mu, logvar = self.enc(x).float().chunk(2, 1)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        with amp():
            a = self.dec(z)
        rec = reconstruction_nll(a.float(), x, self.recon, self.recon_std)
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
    """Generative latent flow (Xiao et al. 2019): a deterministic AE x -> z -> x and a flow z -> u ~ N(0, I).
    G(u) = dec(flow^-1(u)), so the EBM's latent is the flow's u. The flow runs in fp32 whatever --amp says."""

    def __init__(self, enc, dec, recon, nz, couplings, hidden):
        super().__init__()
        self.enc, self.dec, self.recon = enc, dec, recon
        self.flow = nn.ModuleList([VectorCoupling(nz, hidden) for _ in range(couplings)])

    def decode(self, u):  # G(u)
        with torch.autocast(u.device.type, enabled=False):
            u = u.float()
            for c in reversed(self.flow):
                u = c.inverse(u)
        return VAE.decode(self, u)

    def encode(self, x):  # x -> u, the EBM's latent, so that G(encode(x)) reconstructs x
        u = self.enc(x).float()
        for c in self.flow:
            u = c(u)[0]
        return u

    def flow_nll(self, z):
        """-log p(z) per example: N(0, I) on u = flow(z), plus -log|det du/dz|."""
        with torch.autocast(z.device.type, enabled=False):
            u, logdet = z.float(), 0.0
            for c in self.flow:
                u, ld = c(u)
                logdet = logdet + ld
        return 0.5 * (u ** 2).sum(1) + 0.5 * u.shape[1] * math.log(2 * math.pi) - logdet

    def loss(self, x, amp=contextlib.nullcontext):
        with amp():
            z = self.enc(x)
            a = self.dec(z)
        rec = reconstruction_nll(a.float(), x, self.recon)
        # The flow's NLL does not reach the encoder (stop-gradient, as in the GLF paper):
        # otherwise the encoder can shrink z and drive the NLL to -infinity.
        return (rec + self.flow_nll(z.detach())).mean()


def squeeze(x):
    """[B, C, H, W] -> [B, 4C, H/2, W/2] (each 2 x 2 patch to channels)."""
    B, C, H, W = x.shape
    return x.view(B, C, H // 2, 2, W // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(B, 4 * C, H // 2, W // 2)


def unsqueeze(x):
    B, C, H, W = x.shape
    return x.view(B, C // 4, 2, 2, H, W).permute(0, 1, 4, 2, 5, 3).reshape(B, C // 4, 2 * H, 2 * W)


class ActNorm(nn.Module):
    """y = (x + loc) exp(log_scale) per channel; the first batch sets zero mean, unit variance. Whether that happened
    is a buffer (it travels with checkpoints) read once into a flag, so a forward pass never waits for the GPU."""

    def __init__(self, c):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.log_scale = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.register_buffer("initialised", torch.tensor(0))
        self.ready = False

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.ready = False  # read the loaded buffer again

    def forward(self, x):
        self.ready = self.ready or bool(self.initialised)  # the buffer is read only until it is set
        if not self.ready:
            with torch.no_grad():
                self.loc.copy_(-x.mean((0, 2, 3), keepdim=True))
                self.log_scale.copy_(-torch.log(x.std((0, 2, 3), keepdim=True) + 1e-6))
                self.initialised.fill_(1)
            self.ready = True
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
    ours 0.01: it bounds the inverse's gain 1 / s, through which latent Langevin chains
    otherwise overflow; docs/latent_tilt.md); the coupling net is
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
    then (except at the last level) half the channels h_a leave as latents, whitened by Glow's
    learned split prior: z_a = (h_a - mu(h_b)) exp(-log_sigma(h_b)), where mu and log_sigma =
    tanh(r) come from a zero-initialised conv3x3 of the half h_b that stays (Glow's log-scale is
    unbounded; ours is bounded, as GLF's, so each split's inverse gain is <= e). So every latent is
    N(0, I), concatenated into one flat z [B, C H W]."""

    def __init__(self, shape, levels, depth, hidden, floor=0.01):
        super().__init__()
        c, h, w = shape
        self.levels, self.priors, self.z_shapes = nn.ModuleList(), nn.ModuleList(), []
        for i in range(levels):
            c, h, w = 4 * c, h // 2, w // 2
            self.levels.append(nn.ModuleList([m for _ in range(depth)
                                              for m in (ActNorm(c), InvConv(c), AffineCoupling(c, hidden, floor))]))
            if i < levels - 1:
                k = c // 2
                self.priors.append(nn.Conv2d(c - k, 2 * k, 3, padding=1))
                nn.init.zeros_(self.priors[-1].weight), nn.init.zeros_(self.priors[-1].bias)
                self.z_shapes.append((k, h, w))
                c -= k
        self.z_shapes.append((c, h, w))

    def _split_prior(self, i, h_b):
        mu, raw = self.priors[i](h_b).chunk(2, 1)
        return mu, torch.tanh(raw)

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
                mu, log_sigma = self._split_prior(i, h[:, k:])
                zs.append((h[:, :k] - mu) * torch.exp(-log_sigma))
                logdet = logdet - log_sigma.flatten(1).sum(1)
                h = h[:, k:]
        zs.append(h)
        return torch.cat([z.flatten(1) for z in zs], 1), logdet

    def decode(self, z):  # G(z): the images live in [-1, 1]; the raw inverse can overshoot by orders of magnitude
        with torch.autocast(z.device.type, enabled=False):  # fp32 whatever --amp says
            return self.inverse(z.float()).clamp(-1, 1)

    def inverse(self, z):  # f^-1(z)
        sizes = [math.prod(s) for s in self.z_shapes]
        parts = [p.reshape(-1, *s) for p, s in zip(z.split(sizes, 1), self.z_shapes)]
        h = parts[-1]
        for i in reversed(range(len(self.levels))):
            if i < len(self.levels) - 1:
                mu, log_sigma = self._split_prior(i, h)
                h = torch.cat([parts[i] * torch.exp(log_sigma) + mu, h], 1)
            for layer in reversed(self.levels[i]):
                h = layer.inverse(h)
            h = unsqueeze(h)
        return h

    def log_prob(self, x):
        z, logdet = self.encode(x)
        return -0.5 * (z ** 2).sum(1) - 0.5 * z.shape[1] * math.log(2 * math.pi) + logdet

    def loss(self, x, amp=None):
        """Bits per dimension of uniformly dequantised 8-bit images mapped to [-1, 1) (fp32: no amp)."""
        return bits_per_dim(self, x).mean()


def bits_per_dim(glow, x):
    """-log2 P(8-bit image behind x) / D: the density at the dequantised point times its bin's volume 128^-D."""
    y = torch.round((x + 1) * 127.5)  # back to the integers 0..255
    x_deq = (y + torch.rand_like(y)) / 128 - 1  # density on [-1, 1): 8 bits - log2(2) per dim
    D = x[0].numel()
    return (-glow.log_prob(x_deq) + D * math.log(128)) / (D * math.log(2))


def build_base(args, in_ch):
    """The base generative model, with the methods loss(x, amp), decode(z) = G(z)."""
    if args.dataset in common.TOYS:  # Section 5.1: small fully connected nets (Tanaka 2019)
        H = args.hidden
        return VAE(common.mlp([2, H, H, H, 2 * args.nz], act=nn.ReLU),
                   common.mlp([args.nz, H, H, H, 2], act=nn.ReLU), "gauss", args.recon_std)
    recon = "mse" if in_ch == 3 else "bce"
    s = image_size(args)
    if args.base == "glow":
        if s % 2 ** args.glow_levels:
            raise common.UserError(f"--glow-levels {args.glow_levels} squeezes {s} x {s} images to odd sizes: "
                                   f"use at most {int(math.log2(s & -s))}")
        return Glow((in_ch, s, s), args.glow_levels, args.glow_depth, args.glow_hidden, args.glow_scale_floor)
    dec = dcgan_generator(args.nz, in_ch, args.ngf, s)[:-1]  # pre-tanh: BCE from logits
    if args.base == "vae":
        return VAE(dcgan_encoder(2 * args.nz, in_ch, args.ngf, s), dec, recon)
    return GLF(dcgan_encoder(args.nz, in_ch, args.ngf, s), dec, recon, args.nz,
               args.flow_couplings, args.flow_hidden)


class ToyEnergy(nn.Module):
    """E(x [B, 2]) -> [B]: a 3-hidden-layer SiLU MLP of input_scale * x. Its output layer starts
    at zero, so the untrained EBM is the untilted base (the early stop's step-0 candidate)."""

    def __init__(self, hidden, input_scale):
        super().__init__()
        self.net, self.input_scale = common.mlp([2, hidden, hidden, hidden, 1], act=nn.SiLU), input_scale
        nn.init.zeros_(self.net[-1].weight), nn.init.zeros_(self.net[-1].bias)

    def forward(self, x):
        return self.net(self.input_scale * x).squeeze(1)


def build_energy(args, in_ch, sn=False):
    """E(x) -> [B]: Appendix B.2's ResNet on images (ch, then 2 ch; sum pooling); toys: an MLP (DOT's critic's role)."""
    if args.dataset in common.TOYS:
        return ToyEnergy(args.e_hidden, args.input_scale)
    return common.EnergyResNet(in_ch, ch=args.ch, ch_mult=(1, 2), num_blocks=args.num_blocks, time_embed=False, sn=sn)


# ======================================================================================
# Objective: maximum likelihood of the tilted model (Eq. 5, 7)
# ======================================================================================

def mle_loss(e_data, e_model, alpha):
    """Surrogate whose theta-gradient is Eq. 5 / 7, E_data[dE(x)/dtheta] - E_tilted[dE(G(z))/dtheta] (model points
    held fixed), plus Appendix B.2's alpha (E_data^2 + E_model^2). Its minimiser for free energies is
    E_data = -1/(2 alpha), E_model = +1/(2 alpha): alpha caps the energy gap between data and samples at 1/alpha."""
    return e_data.mean() - e_model.mean() + alpha * ((e_data ** 2).mean() + (e_model ** 2).mean())


def ebm_loss(E, x_data, x_model, alpha, amp=contextlib.nullcontext):
    """mle_loss of E (latent and pixel EBM alike; E under --amp, energies in fp32): (loss, E(x_data), E(x_model))."""
    with amp():
        e_data, e_model = E(x_data).float(), E(x_model).float()
    return mle_loss(e_data, e_model, alpha), e_data, e_model


# ======================================================================================
# Sampler: Langevin in z (Eq. 8) and, for the baseline, in pixels
# ======================================================================================

def latent_log_p(E, G, amp=contextlib.nullcontext):
    """log of the unnormalised tilted prior, Eq. 6: log p(z) - E(G(z)), p(z) = N(0, I)."""
    def log_p(z):
        with amp():
            e = E(G(z))
        return -e.float() - 0.5 * (z ** 2).flatten(1).sum(1)
    return log_p


def sample_latent(E, G, z0, n_steps, eps, keep_every=0, amp=contextlib.nullcontext, mh=False, trace=False):
    """Eq. 8: z <- z - eps/2 grad_z [E(G(z)) - log p(z)] + sqrt(eps) w, short-run from z0; mh: Metropolis-adjusted
    (MALA), so that sharp wells do not bias the chain. trace (or keep_every > 0): also common.langevin's trace."""
    return common.langevin(latent_log_p(E, G, amp), z0, n_steps, eps, convention="eps", mh=mh,
                           trace=trace or keep_every > 0, keep_every=keep_every)


def sample_pixels(E, x0, args, n_steps, amp=contextlib.nullcontext, trace=False):
    """Du & Mordatch 2019's sampler (their code) on their pixel scale u = (x + 1) / 2 in [0, 1], so that their numbers
    apply: u <- u + noise w, then u <- clip(u - step clip(grad_u E, -c, c), 0, 1), c = --pixel-grad-clip (their
    proj_norm). trace: also {"grad_norm": [K, B]} (before the clip)."""
    u, c = (x0.detach().float() + 1) / 2, args.pixel_grad_clip
    grad_norms = []
    for _ in range(n_steps):
        u = (u + args.pixel_noise * torch.randn_like(u)).requires_grad_(True)
        with torch.enable_grad(), amp():
            e = E(2 * u - 1).float().sum()
        (grad,) = torch.autograd.grad(e, u)
        if trace:
            grad_norms.append(grad.flatten(1).norm(dim=1))
        u = (u.detach() - args.pixel_step * grad.clamp(-c, c)).clamp(0, 1)
    x = 2 * u - 1
    return (x, {"grad_norm": torch.stack(grad_norms)}) if trace else x


# ======================================================================================
# Training
# ======================================================================================

def save_checkpoint(out, args, phase, step, batches, **state):
    """OUT/checkpoint.pt of any stage: its networks, optimiser and sampler (`state`), RNG states and data order."""
    common.save_checkpoint(out / "checkpoint.pt", {
        "script": "latent_tilt", "args": vars(args), "phase": phase, "step": step, **state, "rng": common.rng_state(),
        "batches": batches.state_dict() if batches is not None else None})


def adam_step(loss, opt, params, logger):
    """One optimiser step on `loss`, its gradients averaged over the ranks (torchrun)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    common.average_gradients(params)
    opt.step()
    logger.update()


def train_base(args, G, batches, state, out, device, stop, nz, amp):
    """Maximum likelihood (ELBO / exact) of the base model; returns False if stopped."""
    params = list(G.parameters())
    opt = torch.optim.Adam(params, lr=args.base_lr)
    start = 0
    B = common.rank_share(args.base_batch_size)
    if state is not None:
        opt.load_state_dict(state["base_opt"])
        start = state["step"]
    elif isinstance(G, Glow):  # actnorm's data-dependent init, then the same on every rank
        with torch.no_grad():
            G.log_prob(next_batch(args, batches, B, device))
        common.broadcast_params(G)
    logger = common.Logger(out, args.base_steps, initial=start)
    G.train()
    for step in range(start + 1, args.base_steps + 1):
        loss = G.loss(next_batch(args, batches, B, device), amp)
        adam_step(loss, opt, params, logger)
        if step % args.log_every == 0 or step == args.base_steps:  # the only host sync of a step
            value = loss.item()
            common.check_finite(step, "--base-lr", base_loss=value)
            logger.log(step, args.base_batch_size, base_loss=value)
        stopping = stop.should_stop(step)  # every rank agrees (torchrun)
        if step % args.base_ckpt_every == 0 or step == args.base_steps or stopping:
            save_checkpoint(out, args, "base", step, batches, base=G.state_dict(), base_opt=opt.state_dict())
            G.eval()
            save_samples(out, step, args, G.decode, None, nz, device, batches is None, amp)
            G.train()
        if stopping:
            return False
    logger.close()
    G.eval().requires_grad_(False)
    return True


def ebm_update(E, x_data, x_model, alpha, opt, params, logger, step, args, knobs, amp, chain):
    """One Adam step on ebm_loss (latent and pixel EBM alike); at log steps, the log line with the chains' last
    Langevin gradient norm and MALA's acceptance rate (from the trace dict `chain`)."""
    loss, e_data, e_model = ebm_loss(E, x_data, x_model, alpha, amp)
    adam_step(loss, opt, params, logger)
    if step % args.log_every == 0 or step == args.steps:  # the only host sync of a step
        common.check_finite(step, knobs, loss=loss.item())
        extra = {"accept": chain["accept"].item()} if "accept" in chain else {}
        logger.log(step, args.batch_size, loss=loss.item(), e_data=e_data.mean().item(), e_sample=e_model.mean().item(),
                   langevin_grad=chain["grad_norm"][-1].mean().item(), **extra)


def share_from_main(value, device):
    """Rank 0's float on every rank (torchrun); without torch.distributed: value."""
    if not common.dist.is_initialized():
        return value
    if common.dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    t = torch.tensor([value if value is not None else 0.0], dtype=torch.float64, device=device)
    common.dist.broadcast(t, 0)
    return t.item()


def sample_score(args, G, E, nz, device, ref, amp):
    """Early-stop score (lower is better) of a fixed set of EBM samples, drawn in shares, scored on rank 0: toys, the
    mean negative log-density under the data where it has a closed form (it sees the bridges between modes, which MMD
    hardly does), else MMD vs. fresh data; images, FID vs. the train split (the test split stays unseen)."""
    rank = common.dist.get_rank() if common.dist.is_initialized() else 0
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(args.seed + 12345 + rank)
        x, _ = generate(args, G, E, torch.randn(common.rank_share(args.stop_samples), nz, device=device), True, amp)
    x = common.gather_rows(x.to(device))
    score = None
    if common.is_main():
        log_p = common.toy_log_prob(args.dataset, x.cpu()) if ref is not None else None
        if log_p is not None:
            score = -log_p.mean().item()
        elif ref is not None:
            score = common.mmd_rbf(x.cpu(), ref)
        else:
            score = common.fid_vs_data(fid_view(x), args.dataset, args.data_dir, "train", device)
    return share_from_main(score, device)


def keep_best(track, score, step, E, patience):
    """Section 5.3's early stop "when sample quality deteriorates": keep the EBM with the lowest score so far; stop
    after `patience` scores in a row that do not improve on it (0: never)."""
    if track["best"] is None or score < track["best"]:
        track.update(best=score, best_step=step, bad=0, best_E=copy.deepcopy(E.state_dict()))
    else:
        track["bad"] += 1
    track["stopped"] = bool(patience) and track["bad"] >= patience
    return track


def train_ebm(args, base, E, batches, state, out, device, stop, nz, amp):
    """Eq. 5 / 7 with short-run, non-persistent latent Langevin (Eq. 8) from p(z). Returns the early-stop record
    (best_E: the kept EBM), or None when stopped by a signal."""
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
    B = common.rank_share(args.batch_size)

    def check(step):
        score = sample_score(args, G, E, nz, device, ref, amp)
        keep_best(track, score, step, E, args.patience)
        if common.is_main():
            print(f"step {step}: sample score {score:.4g} (best {track['best']:.4g} at step {track['best_step']})")

    if track["step"] == 0 and args.eval_every:
        check(0)
    step = track["step"]
    while step < args.steps and not track["stopped"]:
        step += 1
        x = next_batch(args, batches, B, device)
        z, chain = sample_latent(E, G, torch.randn(B, nz, device=device), args.langevin_steps, args.eps, amp=amp,
                                 mh=args.mala, trace=True)  # Eq. 8
        with torch.no_grad(), amp():
            x_model = G(z).float()
        ebm_update(E, x, x_model, args.alpha, opt, params, logger, step, args, "--lr, --eps", amp, chain)  # Eq. 5 / 7
        if args.eval_every and step % args.eval_every == 0:
            check(step)
        stopping = stop.should_stop(step)  # every rank agrees (torchrun)
        if step % args.ckpt_every == 0 or step == args.steps or stopping or track["stopped"]:
            track["step"] = step
            save_checkpoint(out, args, "ebm", step, batches, base=base.state_dict(), E=E.state_dict(),
                            opt=opt.state_dict(), track=track)
            save_samples(out, step, args, G, E, nz, device, batches is None, amp)
        if stopping:
            return None
    if track["stopped"] and common.is_main():
        print(f"early stop at step {step}: kept the EBM of step {track['best_step']}")
    logger.close()
    return track


def buffer_share(full):
    """This rank's rows of a replay buffer gathered from all ranks (common.rank_share's shares, in rank order): a run
    resumed on another number of processes splits the same buffer among its own ranks."""
    if not common.dist.is_initialized():
        return full
    shares = [None] * common.dist.get_world_size()
    common.dist.all_gather_object(shares, common.rank_share(len(full)))
    start = sum(shares[:common.dist.get_rank()])
    return full[start:start + shares[common.dist.get_rank()]]


def write_back(buffer, idx, x):
    """buffer[idx] = x where idx may repeat (drawn with replacement, as D&M's): every repeat of a slot writes
    the same whole chain, the last that drew it (a plain indexed write leaves the winner unspecified, pixel by
    pixel). No host sync."""
    last = torch.full((len(buffer),), -1, dtype=torch.long, device=idx.device)
    last.scatter_reduce_(0, idx, torch.arange(len(idx), device=idx.device), "amax")
    buffer[idx] = x[last[idx]]


def train_pixel(args, E, batches, state, out, device, stop, shape, amp):
    """Du & Mordatch 2019 with a replay buffer of --buffer-size images (Appendix B.2), split among the ranks."""
    params = list(E.parameters())
    opt = torch.optim.Adam(params, lr=args.lr, betas=(0.0, 0.999))
    buffer = torch.rand(common.rank_share(args.buffer_size), *shape, device=device) * 2 - 1  # uniform noise
    start = 0
    if state is not None:  # E itself is loaded in main()
        opt.load_state_dict(state["opt"])
        buffer, start = buffer_share(state["buffer"]).to(device), state["step"]
    logger = common.Logger(out, args.steps, initial=start)
    B = common.rank_share(args.batch_size)
    for step in range(start + 1, args.steps + 1):
        x = next_batch(args, batches, B, device)
        idx = torch.randint(len(buffer), (B,), device=device)
        fresh = torch.rand(B, device=device) < args.reinit  # 5% restart from uniform noise
        x0 = torch.where(fresh[:, None, None, None], torch.rand_like(buffer[idx]) * 2 - 1, buffer[idx])
        x_model, chain = sample_pixels(E, x0, args, args.langevin_steps, amp, trace=True)
        write_back(buffer, idx, x_model)
        ebm_update(E, x, x_model, args.pixel_alpha, opt, params, logger, step, args, "--lr, --pixel-step", amp, chain)
        stopping = stop.should_stop(step)  # every rank agrees (torchrun)
        if step % args.ckpt_every == 0 or step == args.steps or stopping:
            full = common.gather_rows(buffer)  # a collective: every rank's share, on rank 0
            save_checkpoint(out, args, "pixel", step, batches, E=E.state_dict(), opt=opt.state_dict(),
                            buffer=full.cpu() if full is not None else None)
            if common.is_main():
                common.save_image_grid(out / f"samples_{step:06d}.png", x_model[:64])
        if stopping:
            return None
    logger.close()
    return buffer


# ======================================================================================
# Evaluation
# ======================================================================================

def exact_tilt_sample(log_p, n, generator, device, lim=4.0, size=400):
    """n exact draws (on the CPU) from a 2-D density prop. to exp(log_p(z)), here Eq. 6's tilted prior: a cell of a
    size x size grid over [-lim, lim]^2 drawn with probability prop. to its density at the midpoint, then a uniform
    point in it. What the learned energy gives, with no sampler in between."""
    h = 2 * lim / size
    axis = -lim + h * (torch.arange(size, dtype=torch.float32) + 0.5)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        logits = torch.cat([log_p(g.to(device)).cpu() for g in grid.split(40000)])
    idx = torch.multinomial(torch.softmax(logits.double(), 0), n, replacement=True, generator=generator)
    return grid[idx] + h * (torch.rand(n, 2, generator=generator) - 0.5)


def generate(args, G, E, z0, tilt, amp=contextlib.nullcontext):
    """Samples x = G(z) and their z (on the CPU) from z0 ~ p(z) [n, nz]: z = z0 (tilt=False) or Eq. 8 from z0 with
    --sample-steps; chains in batches of 100 images (toys: all at once)."""
    batch = max(len(z0), 1) if args.dataset in common.TOYS else 100
    xs, zs = [], []
    for z in z0.split(batch) if len(z0) else [z0]:  # n = 0: empty, but shaped
        if tilt and len(z):
            z = sample_latent(E, G, z, args.sample_steps, args.eps, amp=amp, mh=args.mala)
        with torch.no_grad(), amp():
            xs.append(G(z).float().cpu())
        zs.append(z.cpu())
    return torch.cat(xs), torch.cat(zs)


def gathered(x, device):
    """gather_rows of a CPU tensor through the device (nccl gathers CUDA tensors): rank 0 gets it, the others None."""
    x = common.gather_rows(x.to(device))
    return x.cpu() if x is not None else None


TOY_LIM = 2.0  # both toys lie within [-2, 2]^2 (NOTES.md scaling)


def save_samples(out, step, args, G, E, nz, device, toy, amp):
    """samples_STEP.png of the EBM (base + EBM), samples_base_STEP.png of the base (E None): the two stages of
    --stage all count their own steps in one folder."""
    if not common.is_main():
        return
    path = out / f"samples_{'base_' if E is None else ''}{step:06d}.png"
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        x, _ = generate(args, G, E, torch.randn(1000 if toy else 64, nz, device=device), E is not None, amp)
    if toy:
        common.save_toy_panels(path, [(f"{'base + EBM' if E is not None else 'base'}, step {step}", x)], lim=TOY_LIM)
    else:
        common.save_image_grid(path, x)


def toy_metrics(prefix, x, args):
    data = common.toy_sample(args.dataset, len(x), torch.Generator().manual_seed(args.seed + 2))
    m = {f"{prefix}_mmd": common.mmd_rbf(x, data)}
    if common.toy_modes(args.dataset) is not None:
        s = common.mode_stats(x, args.dataset)
        m.update({f"{prefix}_hq_frac": s["hq_frac"], f"{prefix}_modes": s["modes"]})
    return m


def evaluate(args, base, E, nz, device, out, test, amp):
    """Table 1 protocol for base and base + EBM (E None: base only): the EBM's chains start at the base's own z, drawn
    in shares, scored on rank 0; Fig. 5.1 / 5.3 from the same samples. Returns (metrics, (x, z)); others ({}, None)."""
    toy = args.dataset in common.TOYS
    n = args.eval_samples if toy else args.fid_samples
    G = base.decode
    z0 = torch.randn(common.rank_share(n or 64), nz, device=device)  # FID off: 64 for the pictures, samples.npz
    metrics, samples = {}, {}
    for prefix, tilt in [("base", False)] + ([("ebm", True)] if E is not None else []):
        x, z = generate(args, G, E, z0, tilt, amp)
        x, z = gathered(x, device), gathered(z, device)
        if not common.is_main():
            continue
        samples[prefix] = (x, z)
        if toy:
            metrics.update(toy_metrics(prefix, x, args))
            if tilt:  # the learned energy without the sampler: exact draws from the grid
                z = exact_tilt_sample(latent_log_p(E, G), n, torch.Generator().manual_seed(args.seed + 4),
                                      device).to(device)
                with torch.no_grad():
                    x_exact = G(z).float().cpu()
                metrics.update({f"{k}_exact": v for k, v in toy_metrics("ebm", x_exact, args).items()})
                samples["ebm_exact"] = (x_exact, z.cpu())
        elif n > 0:
            metrics[f"{prefix}_fid"] = common.fid_vs_data(fid_view(x).to(device), args.dataset, args.data_dir,
                                                          args.fid_split, device)
    if not common.is_main():
        return {}, None
    if toy:
        panels = [("data", common.toy_sample(args.dataset, n, torch.Generator().manual_seed(args.seed + 3))),
                  ("VAE", samples["base"][0])]
        if E is not None:
            panels += [("VAE + EBM", samples["ebm"][0]), ("VAE + EBM, exact", samples["ebm_exact"][0])]
        common.save_toy_panels(out / "tilt.png", panels, lim=TOY_LIM)
    else:
        xt = common.to_float(test[:1000]).to(device)
        with torch.no_grad():
            if isinstance(base, Glow):
                metrics["base_bpd"] = bits_per_dim(base, xt).mean().item()
            else:
                metrics["mse_recon"] = ((G(base.encode(xt)) - xt) ** 2).mean().item()
        grids = [common.image_grid(samples[k][0][:64]) for k in samples]  # tilt.png: base | the same z after Eq. 8
        if E is not None:  # Figure 5.3: one chain per row, a column every 10 steps, prior on the left
            z8 = samples["base"][1][:8].to(device)
            _, info = sample_latent(E, G, z8, args.sample_steps, args.eps, keep_every=10, amp=amp, mh=args.mala)
            with torch.no_grad():
                traj = torch.stack([G(t).float().cpu() for t in info["traj"]], 1)  # [8, K, C, H, W]
            common.save_image_grid(out / "langevin_traj.png", traj.flatten(0, 1), nrow=traj.shape[1])
        sep = [np.full((grids[0].shape[0], 8, 3), 255, np.uint8)] if E is not None else []
        common.save_png(out / "tilt.png", np.concatenate(grids[:1] + sep + grids[1:], 1))
    return metrics, samples["ebm" if E is not None else "base"]


def evaluate_pixel(args, E, buffer, device, out, amp):
    """FID of chains started from the replay buffer (Appendix B.2), each rank from its own share, scored on rank 0.
    Returns (metrics, x); other ranks: ({}, None)."""
    xs = [buffer[:0].cpu()]
    n = common.rank_share(args.fid_samples)
    for i in range(0, n, 100):
        idx = torch.randint(len(buffer), (min(100, n - i),), device=buffer.device)
        xs.append(sample_pixels(E, buffer[idx].to(device), args, args.langevin_steps, amp).cpu())
    x = gathered(torch.cat(xs), device)
    if not common.is_main():
        return {}, None
    x = x if len(x) else buffer[:64].cpu()
    metrics = {}
    if args.fid_samples:
        metrics["fid"] = common.fid_vs_data(x.to(device), args.dataset, args.data_dir, args.fid_split, device)
    common.save_image_grid(out / "tilt.png", x[:64])
    return metrics, x


# ======================================================================================
# Main
# ======================================================================================

def get_args(argv=None):
    """Parse and resolve (--stage ebm: the base's flags from its checkpoint first): (args, base checkpoint or None)."""
    args = common.parse_args(build_parser(), PRESETS, argv)
    base_state = read_base(args) if args.stage == "ebm" else None
    return resolve_defaults(args), base_state


def main(argv=None):
    args, base_state = get_args(argv)
    toy = args.dataset in common.TOYS
    in_ch = 2 if toy else common.image_shape(args.dataset)[0]
    s = None if toy else image_size(args)
    nz = in_ch * s * s if args.base == "glow" and not toy else args.nz  # GLOW: full-dimensional z
    if not args.print_config:  # which reads no data, not even a folder's file names
        check_protocol(args)
    common.seed_everything(args.seed)
    G = build_base(args, in_ch) if args.stage != "pixel" else None
    E = build_energy(args, in_ch, sn=args.stage == "pixel") if args.stage != "base" else None
    common.print_config(args, {name: net for name, net in (("base", G), ("energy", E)) if net is not None})

    rank, _ = common.init_distributed()
    device = common.pick_device(args.device)
    amp = functools.partial(common.autocast, args.amp, device)
    data = load_data(args)
    nets = [net.to(device) for net in (G, E) if net is not None]
    common.compile_nets(args.compile, *nets)
    common.seed_everything(args.seed + rank)
    out = common.prepare_out_dir(args, "latent_tilt")
    state = None
    if args.resume or args.eval_only:
        arch = (BASE_ARCH if args.stage != "pixel" else ()) + (EBM_ARCH if args.stage != "base" else ()) \
            + (("input_scale",) if toy else ()) + (("buffer_size",) if args.stage == "pixel" else ())
        state = common.load_checkpoint(out / "checkpoint.pt", "latent_tilt", args,
                                       must_match=("dataset", "stage") + arch)
        common.set_rng_state(state["rng"])
    for net in nets:
        common.broadcast_params(net)
    phase = state["phase"] if state is not None else None
    base_phase = args.stage in ("all", "base") and phase in (None, "base")
    batches = None if data is None else common.Batches(
        data, common.rank_share(args.base_batch_size if base_phase else args.batch_size), seed=args.seed,
        device=device)
    if state is not None and batches is not None and state.get("batches"):
        batches.load_state_dict(state["batches"])
    stop = common.StopFlag()
    test = load_data(args, "test")

    if phase in ("ebm", "pixel"):
        common.load_state(E, state["E"], "energy")
    if args.stage == "pixel":
        if args.eval_only:
            buffer = buffer_share(state["buffer"]).to(device)
        else:
            buffer = train_pixel(args, E, batches, state, out, device, stop, (in_ch, s, s), amp)
        if buffer is None:
            return
        metrics, x = evaluate_pixel(args, E, buffer, device, out, amp)
        if args.eval_only and common.is_main():
            np.savez(out / "samples.npz", x=x.numpy())
        common.write_metrics(out, metrics)
        return

    # the base model: trained here (stages all / base) or loaded frozen (stage ebm)
    if phase is not None or base_state is not None:
        common.load_state(G, (state if phase is not None else base_state)["base"], "base model")
    if base_phase and not args.eval_only:
        if not train_base(args, G, batches, state, out, device, stop, nz, amp):
            return
        if args.stage == "all" and batches is not None:  # the EBM's own batch size from here on
            batches = common.Batches(data, common.rank_share(args.batch_size), seed=args.seed, device=device)
    G.eval().requires_grad_(False)
    if args.stage == "base" or phase == "base" and args.eval_only:
        metrics, samples = evaluate(args, G, None, nz, device, out, test, amp)
    else:
        if args.eval_only:
            track = state["track"]
        else:
            track = train_ebm(args, G, E, batches, state if phase == "ebm" else None, out, device, stop, nz, amp)
            if track is None:
                return
        if track["best_E"] is not None:  # the early-stopped EBM
            common.load_state(E, track["best_E"], "energy")
        E.eval().requires_grad_(False)
        metrics, samples = evaluate(args, G, E, nz, device, out, test, amp)
        kept = track["best_step"] if track["best_E"] is not None else track["step"]  # --eval-every 0: the last
        metrics.update(ebm_steps=track["step"], ebm_best_step=kept)
    if args.eval_only and common.is_main():
        np.savez(out / "samples.npz", x=samples[0].numpy(), z=samples[1].numpy())
    common.write_metrics(out, metrics)


if __name__ == "__main__":
    common.main_guard(main)

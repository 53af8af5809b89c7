"""Learning Energy-Based Prior Model with Diffusion-Amortized MCMC (Yu et al., NeurIPS 2023).
https://arxiv.org/abs/2310.03218  (the text beside this repository is the poster; the details
come from the authors' code, summarised in NOTES.md section 3)

Implemented (docs/damc_prior.md maps each part to the poster and lists every deviation):
- The latent-space EBM (LEBM, Pang et al. 2020): prior p_alpha(z) = exp(f_alpha(z)) N(0, I) / Z, an MLP
  energy E = -f, generator x = g_beta(z) + N(0, sigma^2 I) (the authors' DCGAN-style nets), learned with
  the poster's "Background" gradients delta_alpha and delta_beta.
- DAMC: q_phi, the authors' diffusion model over z conditioned on an x-encoding (its unconditional branch
  samples the prior), starts the chains; short-run posterior / prior Langevin refines them; q is fitted
  M times to the refined posterior samples, then g, then E are updated.
- `--sampler langevin`: the short-run LEBM baseline with Pang et al.'s own image settings.
- The poster's toy ("Amortizing long-run MCMC"): a 2-arm pinwheel latent through a fixed random MLP
  generator; q's and short-run Langevin's posterior samples against the current model's exact posterior.
Evaluation (images; --preset paper follows the authors' eval_gen_recon.py): fid_q (q's prior branch -> g)
and fid_ebm (prior Langevin from N(0, I) -> g) on 50,000 samples against the training split; mse_recon
(q(x) + 10 noise-free posterior steps, per-pixel MSE in [-1, 1] over the test set), mse_recon_start
(q(x) alone). Toy: post_dist_damc, post_dist_langevin (MMD^2 to the exact posterior),
log_px_gap (held-out log p(x), learned minus true prior), prior_mmd.
Langevin (poster, authors' code; common.langevin's "s" convention, in fp32), with U = -log pi:
    z <- z - s^2/2 grad U(z) + s w = z + s^2/2 grad log pi(z) + s w,  w ~ N(0, I)

Offline demo (toy; 4 min 49 s on 2 CPU cores):   python damc_prior.py
    post_dist_damc 0.017 vs. post_dist_langevin 0.139; log_px_gap -0.080 nats (N(0, I): -0.746)
Images:  python damc_prior.py --dataset fashion --steps 1500 --slow-rate 0.05 --fid-samples 1000 \
             --recon-images 1000
    fid_ebm 146.4, mse_recon 0.0552; LEBM (--sampler langevin) 242.7, 0.0743; at DAMC's wall-clock
    (--steps 3750) 163.8, 0.0614.
Full reproduction (GPU):  python damc_prior.py --dataset cifar10       (--preset paper is the default)
                          torchrun --nproc_per_node=4 damc_prior.py --dataset svhn
    paper: SVHN MSE 0.002 / FID 21.17 (fid_ebm), 18.76 (fid_q); CIFAR-10 0.015 / 60.89, 57.72;
    CelebA 0.005 / 35.67, 30.83. LEBM (add --sampler langevin): SVHN 0.008 / 29.44, CIFAR-10 0.020 / 70.15
"""
import argparse
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# ======================================================================================
# Arguments
# ======================================================================================

IMAGE_SETS = ["mnist", "fashion", "svhn", "cifar10", "celeba"]
# nz of the authors' generators; fashion has no authors' setting: MNIST's (anomaly detection) is used.
LATENT_DIM = {"mnist": 8, "fashion": 8, "svhn": 100, "cifar10": 128, "celeba": 100}
# Training images per data set (Pang et al.'s lr decays once per epoch); CelebA: its official train partition.
TRAIN_SIZE = {**{name: n for (name, split), n in common.SPLIT_SIZE.items() if split == "train"}, "celeba": 162770}
# --preset paper: the authors' train_gen_recon.py per data set (CelebA-64 is their "celeba64");
# the paper reports no generation result on MNIST (their anomaly-detection setting) or Fashion.
PAPER = {"ndf": 64, "nxemb": 1024, "q_width": 256, "batch_size": 128, "steps": 1000000, "fid_samples": 50000,
         "fid_split": "train"}
PRESETS = {
    "cifar10": {**PAPER, "ngf": 128, "recon_images": 10000, "eval_prior_step_size": 1.6},
    "svhn": {**PAPER, "ngf": 64, "recon_images": 26032},
    "celeba": {**PAPER, "ngf": 128, "recon_images": 19962},
    # the authors' toy_example.py: batch 500, q lr 2e-4, q at full width (their toy converges in 300-3000 steps)
    "pinwheel": {"batch_size": 500, "q_lr": 2e-4, "q_width": 256, "nxemb": 128, "steps": 10000},
}
# Per-kind defaults for flags left at None: the toy script's settings differ (NOTES.md).
KIND_DEFAULTS = {
    "toy": {"sigma": 0.25, "post_steps": 50, "p_mask": 0.1, "slow_rate": 0.75, "q_wd": 1e-2,
            "nxemb": 128, "q_width": 64, "q_lr": 1e-3, "e_lr": 1e-3, "prior_mala": True, "flip": False},
    "image": {"sigma": 0.1, "post_steps": 30, "p_mask": 0.2, "slow_rate": 0.005, "q_wd": 1e-4,
              "nxemb": 256, "q_width": 128, "q_lr": 2e-4, "e_lr": 1e-4, "prior_mala": False, "flip": True},
}
# --sampler langevin on images: Pang et al.'s settings (their train_svhn.py), for every flag not given.
LEBM = {"sigma": 0.3, "post_steps": 20, "post_step_size": 0.1, "prior_steps": 60, "prior_step_size": 0.4,
        "eval_prior_steps": 60, "eval_prior_step_size": 0.4, "g_lr": 1e-4, "e_lr": 2e-5, "grad_clip": 0.0,
        "q_updates": 0, "lr_decay": 0.998, "lr_min": 0.0}
LEBM_PAPER_BATCH = 100
# Flags that change the model or the objective: --resume / --eval-only refuse a different value.
MUST_MATCH = ("dataset", "arms", "nz", "ngf", "ndf", "nxemb", "q_width", "logsnr_min", "logsnr_max", "sampler",
              "sigma", "p_mask", "post_steps", "post_step_size", "prior_steps", "prior_step_size", "prior_mala",
              "q_steps", "flip")


def build_parser():
    p = common.base_parser("DAMC: latent EBM prior learned with diffusion-amortized MCMC",
                           dataset="pinwheel", steps=1000, batch_size=None, fid_samples=500,
                           batch_size_help="default 64; --preset paper: 128 (authors' images), 500 (authors' "
                                           "toy), 100 with --sampler langevin (Pang et al.)")
    a = p.add_argument
    a("--sampler", default="damc", choices=["damc", "langevin"],
      help="damc: chains start from q's slow copy (the paper); langevin: from N(0, I), the short-run LEBM "
           "baseline, with Pang et al.'s image settings (the 'LEBM' values below) for every flag not given")
    a("--nz", type=int, default=None, help="latent dim (default: authors' per data set: cifar10 128, svhn 100, "
      "celeba 100, mnist/fashion 8; toy 2)")
    a("--ngf", type=int, default=8, help="generator width: top layer 8*ngf channels (paper: 128, svhn 64)")
    a("--ndf", type=int, default=8, help="width of q's x-encoder: ndf .. 8*ndf channels (paper: 64)")
    a("--nxemb", type=int, default=None, help="size of q's x-embedding (paper: 1024 images, 128 toy; "
      "default 256 images, 128 toy)")
    a("--q-width", type=int, default=None, help="q's noise-predictor width w: layers w/2, w, w, w, w, w/2 "
      "(paper: 256 = 64*nf with the authors' nf 4, images and toy; default 128 images, 64 toy)")
    a("--flip", action=argparse.BooleanOptionalAction, default=None, help="random left-right flips of training images "
      "(paper: on; default on for images)")
    a("--sigma", type=float, default=None, help="generator noise std (paper: 0.1 images, 0.25 toy; LEBM 0.3)")
    a("--post-steps", type=int, default=None, help="posterior Langevin steps (paper: 30 images, 50 toy; LEBM 20)")
    a("--post-step-size", type=float, default=0.1, help="posterior Langevin s (paper and LEBM: 0.1)")
    a("--prior-steps", type=int, default=60, help="prior Langevin steps in training (paper and LEBM: 60)")
    a("--prior-step-size", type=float, default=0.4, help="prior Langevin s in training (paper and LEBM: 0.4)")
    a("--prior-mala", action=argparse.BooleanOptionalAction, default=None, help="Metropolis-adjusted prior "
      "chains (MALA), in training and for the prior's samples (paper: off; default on for the toy, off for images)")
    a("--eval-prior-steps", type=int, default=100, help="prior Langevin steps for fid_ebm (paper: 100; LEBM 60)")
    a("--eval-prior-step-size", type=float, default=None, help="prior Langevin s for fid_ebm (default "
      "--prior-step-size; paper: 0.4, CIFAR-10 1.6; LEBM 0.4)")
    a("--recon-steps", type=int, default=10, help="noise-free posterior steps after q(x) for mse_recon (paper: 10)")
    a("--recon-images", type=int, default=500, help="test images for mse_recon, 0: none (paper: the whole test "
      "set: cifar10 10000, svhn 26032, celeba 19962)")
    a("--q-steps", type=int, default=100, help="ancestral sampling steps of q (paper: 100)")
    a("--q-updates", type=int, default=6, help="M: q updates per iteration on the refined samples (paper: 6; LEBM 0)")
    a("--p-mask", type=float, default=None, help="probability of dropping x to train q's prior branch "
      "(paper: 0.2 images, 0.1 toy)")
    a("--slow-rate", type=float, default=None, help="slow copy <- rate*q + (1-rate)*copy every --slow-every steps "
      "(paper: 0.005 images, 0.75 toy; raise it for runs of a few thousand steps)")
    a("--slow-every", type=int, default=10, help="iterations between slow-copy updates (paper: 10)")
    a("--q-lr", type=float, default=None, help="AdamW lr of q (paper: 2e-4; toy default 1e-3 for a short run)")
    a("--q-wd", type=float, default=None, help="AdamW weight decay of q (paper: 1e-4 images, 1e-2 toy)")
    a("--g-lr", type=float, default=2e-4, help="Adam lr of g (paper: 2e-4; LEBM 1e-4)")
    a("--e-lr", type=float, default=None, help="Adam lr of E (paper: 1e-4; LEBM 2e-5; default 1e-4 images, 1e-3 toy)")
    a("--grad-clip", type=float, default=100.0, help="gradient-norm clip for q, g, E; 0: off (paper: 100; LEBM off)")
    a("--lr-decay", type=float, default=0.99, help="lrs x this every --lr-decay-every steps (paper: 0.99; LEBM 0.998)")
    a("--lr-decay-every", type=int, default=None, help="default 1000 (paper); LEBM: one epoch, "
      "ceil(training images / batch size)")
    a("--lr-min", type=float, default=1e-5, help="floor of the lr decay (paper: 1e-5; LEBM 0)")
    a("--logsnr-min", type=float, default=-5.1, help="log-SNR at t = 1 (paper: -5.1)")
    a("--logsnr-max", type=float, default=9.8, help="log-SNR at t = 0 (paper: 9.8)")
    a("--arms", type=int, default=2, help="toy: arms of the pinwheel latent (poster: 2)")
    a("--eval-every", type=int, default=250, help="toy: steps between posterior-distance evaluations")
    a("--eval-x", type=int, default=16, help="toy: observations x the posterior distance is averaged over")
    a("--eval-z", type=int, default=128, help="toy: posterior samples per x and method")
    a("--eval-prior-x", type=int, default=500, help="toy: held-out observations x for log_px_gap; twice as many "
      "true latents for prior_mmd (default 500; ours, the paper has no such metric)")
    return p


def resolve_defaults(args):
    """Fill the flags left at None (per kind, per sampler, the authors' sizes) and check them."""
    if args.dataset not in IMAGE_SETS and args.dataset not in common.TOYS:
        raise common.UserError(f"damc_prior.py supports {', '.join(common.TOYS + IMAGE_SETS)}, not {args.dataset}")
    kind = "image" if args.dataset in IMAGE_SETS else "toy"
    given = set(getattr(args, "given", ()))
    lebm = kind == "image" and args.sampler == "langevin"
    if lebm:  # Pang et al.'s baseline: their values where not given
        for key, value in LEBM.items():
            if key not in given:
                setattr(args, key, value)
        if args.preset == "paper" and "batch_size" not in given:
            args.batch_size = LEBM_PAPER_BATCH
    for key, value in KIND_DEFAULTS[kind].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.batch_size is None:
        args.batch_size = 64
    if args.nz is None:
        args.nz = LATENT_DIM[args.dataset] if kind == "image" else 2
    if args.eval_prior_step_size is None:
        args.eval_prior_step_size = args.prior_step_size
    if args.lr_decay_every is None:
        args.lr_decay_every = math.ceil(TRAIN_SIZE[args.dataset] / args.batch_size) if lebm else 1000
    if kind == "toy" and args.nz != 2:
        raise common.UserError("the toy's latent is 2-D: drop --nz")
    if kind == "toy" and args.flip:
        raise common.UserError("--flip applies to images: drop it for a toy")
    common.check_positive(args, "batch_size", "nz", "ngf", "ndf", "nxemb", "sigma", "post_step_size", "prior_step_size",
                          "eval_prior_step_size", "slow_every", "q_lr", "g_lr", "e_lr", "lr_decay", "lr_decay_every",
                          "slow_rate", "eval_every", "eval_x", "eval_z", "eval_prior_x", "arms")
    if args.q_width < 2 or args.q_width % 2:
        raise common.UserError(f"--q-width must be an even number >= 2 (got {args.q_width})")
    if args.q_steps < 2:
        raise common.UserError(f"--q-steps must be at least 2 (got {args.q_steps})")
    for name in ("post_steps", "prior_steps", "eval_prior_steps", "recon_steps", "recon_images", "q_wd", "q_updates",
                 "grad_clip", "lr_min"):
        if getattr(args, name) < 0:
            raise common.UserError(f"--{name.replace('_', '-')} must be >= 0 (got {getattr(args, name)})")
    if args.sampler == "damc" and args.q_updates == 0:
        raise common.UserError("--sampler damc starts the chains from q: --q-updates must be >= 1")
    if not 0 <= args.p_mask < 1 or args.slow_rate > 1:
        raise common.UserError("--p-mask must lie in [0, 1) and --slow-rate in (0, 1]")
    return args


def get_args(argv=None):
    return resolve_defaults(common.parse_args(build_parser(), PRESETS, argv))


def check_eval_protocol(args):
    """At start-up (before data and training): the FID reference split must hold --fid-samples
    images and the test split --recon-images."""
    if args.dataset not in IMAGE_SETS:
        return
    if args.fid_samples > 0:
        common.check_fid_protocol(args)
    have = common.split_size(args.dataset, "test", args.data_dir) if args.recon_images > 0 else 0
    if args.recon_images > have:
        raise common.UserError(f"--recon-images {args.recon_images} exceeds the {have} images of "
                               f"{args.dataset}/test: lower --recon-images")


# ======================================================================================
# Data
# ======================================================================================

def toy_generator(seed=0):
    """The toy's fixed random likelihood network g: 2 -> 128 x 3 -> 2, ReLU; weights N(0, 0.2^2),
    biases N(0, 0.1^2) (authors' toy). Built from its own seed: the same toy for every --seed."""
    gen = torch.Generator().manual_seed(seed)
    g = common.mlp([2, 128, 128, 128, 2], act=nn.ReLU)
    with torch.no_grad():
        for layer in g:
            if isinstance(layer, nn.Linear):
                layer.weight.copy_(0.2 * torch.randn(layer.weight.shape, generator=gen))
                layer.bias.copy_(0.1 * torch.randn(layer.bias.shape, generator=gen))
    return g.requires_grad_(False)


def toy_latent(args, n, generator=None):
    """The toy's true latent z [n, 2]: the poster's 2-arm pinwheel (other 2-D toys work too)."""
    if args.dataset == "pinwheel":
        return common.pinwheel_sample(n, num_arms=args.arms, generator=generator)
    return common.toy_sample(args.dataset, n, generator)


def toy_batch(args, g, n, device, generator=None):
    """x = g(z) + sigma * noise, z from the true latent -> (x [n, 2], z [n, 2]); the noise is drawn on
    the device unless a CPU generator is given."""
    z = toy_latent(args, n, generator).to(device)
    if generator is None:
        noise = torch.randn(n, 2, device=device)
    else:
        noise = torch.randn(n, 2, generator=generator).to(device)
    with torch.no_grad():
        return g(z) + args.sigma * noise, z


def image_data(args, split="train", collective=True):
    """uint8 [N, C, S, S] (CelebA: read lazily); mnist/fashion padded to 32 x 32 for the networks.
    collective=False: a read by rank 0 alone (common.load_images)."""
    return common.load_images(args.dataset, args.data_dir, split, pad_to_32=args.dataset in ("mnist", "fashion"),
                              collective=collective)


# ======================================================================================
# Networks
# ======================================================================================

def generator(nz, out_ch, ngf, size, start=4):
    """The authors' generator g_beta: z [B, nz] -> image [B, out_ch, size, size] in (-1, 1);
    LeakyReLU 0.2, no normalisation. A start x start transposed conv to 8 ngf channels, then
    stride-2 4 x 4 transposed convs halving the width up to `size`. start=4 (authors' SVHN,
    CelebA-64): the last of them outputs the image; start=8 (authors' CIFAR-10): they end at
    2 ngf channels and a 3 x 3 transposed conv outputs the image."""
    n_up = int(math.log2(size // start))
    width = 8 * ngf
    layers = [nn.Unflatten(1, (nz, 1, 1)), nn.ConvTranspose2d(nz, width, start, 1, 0)]
    for i in range(n_up):
        cout = out_ch if (start == 4 and i == n_up - 1) else width // 2
        layers += [nn.LeakyReLU(0.2), nn.ConvTranspose2d(width, cout, 4, 2, 1)]
        width = cout
    if start != 4:
        layers += [nn.LeakyReLU(0.2), nn.ConvTranspose2d(width, out_ch, 3, 1, 1)]
    return nn.Sequential(*layers, nn.Tanh())


def x_encoder(out_dim, in_ch, ndf, size):
    """The authors' x-encoder of q: image [B, in_ch, size, size] -> [B, out_dim]. A 3 x 3 conv to
    ndf channels, then stride-2 4 x 4 convs (2, 4, 8, 8, ... x ndf) down to 4 x 4, each followed by
    InstanceNorm (affine) and LeakyReLU 0.2, then a 4 x 4 conv to out_dim."""
    layers = [nn.Conv2d(in_ch, ndf, 3, 1, 1), nn.InstanceNorm2d(ndf, affine=True), nn.LeakyReLU(0.2)]
    width = ndf
    for i in range(int(math.log2(size // 4))):
        cout = ndf * 2 ** min(i + 1, 3)
        layers += [nn.Conv2d(width, cout, 4, 2, 1), nn.InstanceNorm2d(cout, affine=True), nn.LeakyReLU(0.2)]
        width = cout
    return nn.Sequential(*layers, nn.Conv2d(width, out_dim, 4, 1, 0), nn.Flatten())


class ContextLinear(nn.Module):
    """One layer of q's noise predictor (authors): W h * sigmoid(G c) + B c + S h, with the context
    c = SiLU(Linear(SiLU(ctx))) and a linear skip S."""

    def __init__(self, d_in, d_out, d_ctx):
        super().__init__()
        self.linear, self.skip = nn.Linear(d_in, d_out), nn.Linear(d_in, d_out)
        self.ctx = nn.Sequential(nn.SiLU(), nn.Linear(d_ctx, d_out), nn.SiLU())
        self.gate, self.shift = nn.Linear(d_out, d_out), nn.Linear(d_out, d_out, bias=False)

    def forward(self, h, ctx):
        c = self.ctx(ctx)
        return self.linear(h) * torch.sigmoid(self.gate(c)) + self.shift(c) + self.skip(h)


class EpsNet(nn.Module):
    """q's noise predictor eps_hat(z_lambda, lambda, c) = z_lambda + U(...) (residual, as the authors).

    z [B, nz], logsnr [B], c [B, nxemb] (x-encoding or prior embedding) -> [B, nz]. Input: Fourier
    features [sin 2 pi zB, cos 2 pi zB, z] with a learned B [nz, nz/2]; ContextLinear layers of
    widths w/2, w, w (down), w (middle), w, w/2, nz (up, each fed the matching down output),
    LeakyReLU 0.01 between them; context = [time embedding, c]."""

    def __init__(self, nz, nxemb, width, ntemb=128):
        super().__init__()
        self.ntemb = ntemb
        self.B = nn.Parameter(torch.randn(nz, max(nz // 2, 1)))
        self.t_mlp = nn.Sequential(nn.Linear(ntemb, ntemb), nn.SiLU(), nn.Linear(ntemb, ntemb))
        d_in, d_ctx, half = nz + 2 * self.B.shape[1], ntemb + nxemb, width // 2
        self.down = nn.ModuleList([ContextLinear(d_in, half, d_ctx), ContextLinear(half, width, d_ctx),
                                   ContextLinear(width, width, d_ctx)])
        self.mid = ContextLinear(width, width, d_ctx)
        self.up = nn.ModuleList([ContextLinear(2 * width, width, d_ctx), ContextLinear(2 * width, half, d_ctx),
                                 ContextLinear(2 * half, nz, d_ctx)])

    def forward(self, z, logsnr, c):
        # the authors' time input: t of the unclipped cosine schedule, arctan(exp(-lambda / 2)) / (pi / 2)
        t = torch.atan(torch.exp(-0.5 * logsnr.clamp(-20, 20))) / (0.5 * math.pi)
        ctx = torch.cat([self.t_mlp(common.timestep_embedding(1000 * t, self.ntemb)), c], 1)
        zb = 2 * math.pi * z @ self.B
        h = torch.cat([torch.sin(zb), torch.cos(zb), z], 1)
        skips = []
        for layer in self.down:
            h = layer(h, ctx)
            skips.append(h)
            h = F.leaky_relu(h, 0.01)
        h = self.mid(h, ctx)
        for layer in self.up:
            h = layer(F.leaky_relu(torch.cat([h, skips.pop()], 1), 0.01), ctx)
        return z + h


class DiffusionSampler(nn.Module):
    """q_phi(z | x): encoder(x) -> condition; prior_emb(fresh N(0, I) noise) is the condition of
    the unconditional (prior) branch, as in the authors' code (no learned null token)."""

    def __init__(self, nz, encoder, nxemb, width, logsnr_range=(-5.1, 9.8)):
        super().__init__()
        self.nz, self.logsnr_range = nz, logsnr_range
        self.encoder = encoder
        self.prior_emb = common.mlp([nz, 128, nxemb], act=lambda: nn.LeakyReLU(0.01))
        self.eps_net = EpsNet(nz, nxemb, width)

    def condition(self, x=None, n=None, p_mask=0.0, amp="none"):
        """[B, nxemb] fp32: the x-encoding, each row replaced with probability p_mask (x None:
        always) by the prior embedding of fresh noise."""
        dev = x.device if x is not None else next(self.parameters()).device
        with common.autocast(amp, dev):
            if x is None:
                return self.prior_emb(torch.randn(n, self.nz, device=dev)).float()
            c = self.encoder(x).float()
            if p_mask > 0:
                keep = torch.rand(len(x), 1, device=dev) >= p_mask
                c = torch.where(keep, c, self.prior_emb(torch.randn(len(x), self.nz, device=dev)).float())
        return c

    def eps(self, z, logsnr, c, amp="none"):
        """eps_hat [B, nz] in fp32 (the network under --amp's autocast)."""
        with common.autocast(amp, z.device):
            return self.eps_net(z, logsnr, c).float()


def build_networks(args):
    """{"g", "E", "q"} at the configured size (CPU); the toy's g is the fixed true generator."""
    if args.dataset in IMAGE_SETS:
        ch, size, _ = common.image_shape(args.dataset, pad_to_32=True)
        g = generator(args.nz, ch, args.ngf, size, start=8 if args.dataset == "cifar10" else 4)
        encoder = x_encoder(args.nxemb, ch, args.ndf, size)
    else:
        g = toy_generator()
        encoder = common.mlp([2, 128, 128, 128, args.nxemb], act=nn.ReLU)
    # the prior's energy E = -f_alpha: nz -> 200 -> 200 -> 1, LeakyReLU 0.2 (authors)
    E = common.mlp([args.nz, 200, 200, 1], act=lambda: nn.LeakyReLU(0.2))
    q = DiffusionSampler(args.nz, encoder, args.nxemb, args.q_width, (args.logsnr_min, args.logsnr_max))
    return {"g": g, "E": E, "q": q}


def build_model(args):
    """build_networks plus q's slow copy "q_slow"."""
    nets = build_networks(args)
    return {**nets, "q_slow": common.make_ema(nets["q"])}


def build_optimizers(model, args):
    """AdamW for q, Adam for g and E, betas (0.5, 0.999) (authors; Pang et al. alike); the toy's g has none."""
    opts = {"q": torch.optim.AdamW(model["q"].parameters(), args.q_lr, betas=(0.5, 0.999), weight_decay=args.q_wd),
            "E": torch.optim.Adam(model["E"].parameters(), args.e_lr, betas=(0.5, 0.999))}
    if any(p.requires_grad for p in model["g"].parameters()):
        opts["g"] = torch.optim.Adam(model["g"].parameters(), args.g_lr, betas=(0.5, 0.999))
    return opts


# ======================================================================================
# Objective
# ======================================================================================

def energy(E, z):
    """E_alpha(z) = -f_alpha(z), [B], fp32 (a log-density term)."""
    return E(z).squeeze(1)


def log_prior(z, E):
    """log p_alpha(z) + log Z = f_alpha(z) + log N(z; 0, I) + const (Background, p_alpha)."""
    return -energy(E, z) - 0.5 * (z ** 2).sum(1)


def generate_x(g, z, amp="none"):
    """g_beta(z) in fp32 (the network under --amp's autocast)."""
    with common.autocast(amp, z.device):
        return g(z).float()


def log_joint(z, x, g, E, sigma, amp="none"):
    """log p_theta(x, z) = log p_beta(x | z) + log p_alpha(z) + const: the unnormalised posterior."""
    return -((x - generate_x(g, z, amp)) ** 2).flatten(1).sum(1) / (2 * sigma ** 2) + log_prior(z, E)


def logsnr_schedule(t, logsnr_min=-5.1, logsnr_max=9.8):
    """Continuous cosine log-SNR schedule, clipped: lambda(0) = logsnr_max, lambda(1) = logsnr_min."""
    b = math.atan(math.exp(-0.5 * logsnr_max))
    a = math.atan(math.exp(-0.5 * logsnr_min)) - b
    return -2.0 * torch.log(torch.tan(a * t + b))


def q_loss(q, x, z, p_mask=0.0, amp="none"):
    """Diffusion-based amortization: E_{eps, lambda} ||eps_hat(z_lambda) - eps||^2 (authors: 0.5 * sum,
    continuous t ~ U(0, 1)), on target samples z [B, nz]; x None trains the prior branch only."""
    c = q.condition(x, len(z), p_mask, amp)
    lam = logsnr_schedule(torch.rand(len(z), device=z.device), *q.logsnr_range)
    alpha, sigma = torch.sigmoid(lam).sqrt()[:, None], torch.sigmoid(-lam).sqrt()[:, None]  # alpha^2 + sigma^2 = 1
    eps = torch.randn_like(z)
    eps_hat = q.eps(alpha * z + sigma * eps, lam, c, amp)
    return 0.5 * ((eps - eps_hat) ** 2).sum(1).mean()


# ======================================================================================
# Sampler
# ======================================================================================

@torch.no_grad()
def q_sample(q, x=None, n=None, n_steps=100, amp="none"):
    """Ancestral sampling of q on the grid t_i = i / (n_steps - 1), i = n_steps-1 .. 0, with the
    'large' variance sigma^2_{t|s} (authors); the last step returns the z-prediction.
    x [B, ...] -> z [B, nz] from q(z | x); x None -> n samples of the prior branch. fp32 updates."""
    c = q.condition(x, n, amp=amp)
    n = len(c)
    z = torch.randn(n, q.nz, device=c.device)
    for i in reversed(range(n_steps)):
        t = torch.full((n,), i / (n_steps - 1), device=c.device)
        s = torch.full((n,), max(i - 1, 0) / (n_steps - 1), device=c.device)
        lam_t, lam_s = logsnr_schedule(t, *q.logsnr_range), logsnr_schedule(s, *q.logsnr_range)
        alpha_t, sigma2_t = torch.sigmoid(lam_t).sqrt()[:, None], torch.sigmoid(-lam_t)[:, None]
        z0_hat = (z - sigma2_t.sqrt() * q.eps(z, lam_t, c, amp)) / alpha_t
        if i == 0:
            return z0_hat
        alpha_s, sigma2_s = torch.sigmoid(lam_s).sqrt()[:, None], torch.sigmoid(-lam_s)[:, None]
        sigma2_ts = sigma2_t * (1 - torch.exp(lam_t - lam_s))[:, None]  # variance of z_t given z_s
        mean = (alpha_t / alpha_s) * (sigma2_s / sigma2_t) * z + alpha_s * sigma2_ts / sigma2_t * z0_hat
        z = mean + sigma2_ts.sqrt() * torch.randn_like(z)
    return z


def sample_posterior(z0, x, g, E, sigma, n_steps, s, noise=True, trace=False, amp="none"):
    """Short-run posterior Langevin on log p(x, z) from z0 (U = ||x - g(z)||^2/(2 sigma^2) + E(z) + ||z||^2/2)."""
    return common.langevin(lambda z: log_joint(z, x, g, E, sigma, amp), z0, n_steps, s,
                           noise_scale=1.0 if noise else 0.0, trace=trace)


def sample_prior(z0, E, n_steps, s, mala=False):
    """Short-run prior Langevin on log p_alpha from z0 (U = E(z) + ||z||^2/2); mala: with the
    Metropolis-Hastings correction, so that the chains keep p_alpha whatever the step."""
    return common.langevin(lambda z: log_prior(z, E), z0, n_steps, s, mh=mala)


def chain_start(x, q, args):
    """Amortizing MCMC (a): the posterior chains start from the sampler q (in training the current
    q_{phi_{k-1}}, its slow copy as the authors) under DAMC, from N(0, I) under the LEBM baseline."""
    if args.sampler == "damc":
        return q_sample(q, x=x, n_steps=args.q_steps, amp=args.amp)
    return torch.randn(len(x), args.nz, device=x.device)


# ======================================================================================
# Training
# ======================================================================================

def set_learning_rates(opts, args, step):
    """Every lr_decay_every iterations all lrs times lr_decay, floor lr_min (authors; Pang et al.:
    0.998 per epoch, no floor)."""
    factor = args.lr_decay ** (step // args.lr_decay_every)
    base = {"q": args.q_lr, "g": args.g_lr, "E": args.e_lr}
    for name, opt in opts.items():
        for group in opt.param_groups:
            group["lr"] = max(base[name] * factor, args.lr_min)


def optimizer_step(opt, module, loss, clip):
    """One step on loss; clip > 0 caps the gradient norm."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for p in module.parameters() if p.requires_grad]
    common.average_gradients(params)
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()


def damc_iteration(x, model, opts, args, step):
    """One DAMC iteration (authors' order). Changes q, g, E and their optimisers; the slow copy
    only on iterations with (step + 1) % slow_every == 0. Returns a dict of scalar tensors
    (no host sync: the caller reads them at log intervals)."""
    g, E, q, q_slow = model["g"], model["E"], model["q"], model["q_slow"]
    set_learning_rates(opts, args, step)
    z0 = chain_start(x, q_slow, args)
    # ... K_T q_{phi_{k-1}}: T-step short-run posterior Langevin (target of the sampler and of g, E).
    z_pos, info = sample_posterior(z0, x, g, E, args.sigma, args.post_steps, args.post_step_size, trace=True,
                                   amp=args.amp)
    # prior samples for delta_alpha: DAMC: short-run prior Langevin from [z0, N(0, I)] (2B chains,
    # authors); LEBM: B fresh chains from N(0, I) (Pang et al.)
    start = torch.cat([z0, torch.randn_like(z0)]) if args.sampler == "damc" else torch.randn_like(z0)
    z_neg = sample_prior(start, E, args.prior_steps, args.prior_step_size, args.prior_mala)
    # Amortizing MCMC (b) = Diffusion-based amortization: phi^(i+1) <- phi^(i) - eta grad DDPM loss,
    # i = 0..M-1, on (x, z_pos) with the condition dropped w.p. p_mask; phi_k^(0) <- phi_{k-1}^(M).
    loss_q = torch.zeros((), device=x.device)
    for _ in range(args.q_updates):
        loss_q = q_loss(q, x, z_pos, args.p_mask, args.amp)
        optimizer_step(opts["q"], q, loss_q, args.grad_clip)
    # Background: delta_beta = E_{p(z|x)}[grad_beta log p_beta(x|z)]; per-image summed squared
    # error (authors), the 1/(2 sigma^2) factor left to Adam.
    recon = ((x - generate_x(g, z_pos, args.amp)) ** 2).flatten(1).sum(1).mean()
    if "g" in opts:
        optimizer_step(opts["g"], g, recon, args.grad_clip)
    # Background: delta_alpha = E_{p(z|x)}[grad f] - E_{p(z)}[grad f]; with E = -f the loss to descend is
    # mean E(z+) - mean E(z-) (posterior samples' energy down, prior samples' up).
    e_pos, e_neg = energy(E, z_pos).mean(), energy(E, z_neg).mean()
    loss_e = e_pos - e_neg
    optimizer_step(opts["E"], E, loss_e, args.grad_clip)
    # The slow copy follows q every slow_every iterations (not a per-step EMA; authors).
    if (step + 1) % args.slow_every == 0:
        common.ema_update(q_slow, q, 1 - args.slow_rate)
    return {"loss_q": loss_q.detach(), "recon": recon.detach(), "loss_e": loss_e.detach(), "e_data": e_pos.detach(),
            "e_sample": e_neg.detach(), "grad_norm": info["grad_norm"][-1].mean() if len(info["grad_norm"]) else
            torch.zeros((), device=x.device)}


# ======================================================================================
# Evaluation
# ======================================================================================

def recon_steps(args):
    """Noise-free posterior steps of a reconstruction: --recon-steps after q(x) under DAMC (authors);
    the LEBM baseline's own inference, --post-steps from N(0, I)."""
    return args.recon_steps if args.sampler == "damc" else args.post_steps


def recon_mse(x, z0, g, E, sigma, n_steps, s, amp="none"):
    """Per-image reconstruction MSE [B]: z0 refined by n_steps noise-free posterior steps,
    then mean over pixels of (g(z) - x)^2 in [-1, 1] (authors' evaluation)."""
    z = sample_posterior(z0, x, g, E, sigma, n_steps, s, noise=False, amp=amp)
    with torch.no_grad():
        return ((generate_x(g, z, amp) - x) ** 2).flatten(1).mean(1)


def exact_posterior_grid(g, E, lim=4.0, n=300):
    """The toy model's posterior on an n x n midpoint grid over [-lim, lim]^2: returns
    (grid [n*n, 2], log p_alpha(grid) + const, g(grid), cell width) for `exact_posterior_sample`."""
    h = 2 * lim / n
    axis = -lim + h * (torch.arange(n) + 0.5)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
    grid = grid.to(next(E.parameters()).device)
    with torch.no_grad():
        return grid, log_prior(grid, E), g(grid), h


def grid_sample(grid_info, log_mass, n):
    """n exact draws from the density whose log mass on the grid is log_mass: a cell by its mass,
    then a uniform position inside it."""
    grid, h = grid_info[0], grid_info[3]
    idx = torch.multinomial(torch.softmax(log_mass.double(), 0).float(), n, replacement=True)
    return grid[idx] + h * (torch.rand(n, 2, device=grid.device) - 0.5)


def exact_posterior_sample(x, grid_info, sigma, n):
    """n exact draws from p(z | x) (x [2]): grid_sample with the cells weighted by p(z) p(x | z)."""
    _, log_pz, gz, _ = grid_info
    return grid_sample(grid_info, log_pz - ((x - gz) ** 2).sum(1) / (2 * sigma ** 2), n)


def true_grid_log_mass(args, grid_info, n_r=3000, n_t=300):
    """log of the TRUE latent's probability of each grid cell [n*n] (cells of exact_posterior_grid),
    renormalised on the grid. pinwheel: common.pinwheel_sample's Gaussian (r, t) (radial std 0.3,
    tangential std 0.1, rate 0.25) pushed through its map z = 2 R(2 pi arm / arms + 0.25 e^r) (r, t),
    integrated by a midpoint rule over r, t within 6 std (n_r x n_t points per arm) and binned into the
    cells; the pinwheel's mass outside [-4, 4]^2 is 4e-4. Other toys: common.toy_log_prob at the cell centres."""
    grid, h = grid_info[0], grid_info[3]
    if args.dataset != "pinwheel":
        return torch.log_softmax(common.toy_log_prob(args.dataset, grid.cpu()).to(grid.device), 0)
    r_std, t_std, rate = 0.3, 0.1, 0.25
    dr, dt = 12 * r_std / n_r, 12 * t_std / n_t
    r = 1.0 + dr * (torch.arange(n_r, dtype=torch.float64) + 0.5 - n_r / 2)
    t = dt * (torch.arange(n_t, dtype=torch.float64) + 0.5 - n_t / 2)
    r, t = torch.meshgrid(r, t, indexing="ij")
    w = (torch.exp(-0.5 * ((r - 1) / r_std) ** 2 - 0.5 * (t / t_std) ** 2)).flatten()  # unnormalised N x N
    lim, n = -grid[0, 0].item() + h / 2, round(math.sqrt(len(grid)))
    mass = torch.zeros(n * n, dtype=torch.float64)
    for arm in range(args.arms):
        angle = arm * 2 * math.pi / args.arms + rate * torch.exp(r)
        z1 = 2 * (torch.cos(angle) * r - torch.sin(angle) * t).flatten()
        z2 = 2 * (torch.sin(angle) * r + torch.cos(angle) * t).flatten()
        i, j = torch.floor((z1 + lim) / h).long(), torch.floor((z2 + lim) / h).long()
        inside = (i >= 0) & (i < n) & (j >= 0) & (j < n)  # the grid is indexed [i (z1), j (z2)]
        mass += torch.bincount(i[inside] * n + j[inside], weights=w[inside], minlength=n * n)
    return (mass / mass.sum()).log().float().to(grid.device)


def grid_log_px(x, log_mass, gz, sigma, chunk=128):
    """Exact log p(x) [..., K] of observations x [K, 2] under priors given by their normalised log mass
    on the grid [..., M] (g(grid) [M, 2] the likelihood's mean): log sum_c mass_c N(x; g(z_c), sigma^2 I)."""
    out = []
    for xb in x.split(chunk):  # fp32 with exact differences (no |a|^2 + |b|^2 - 2ab): 1e-6 nats of rounding
        d2 = torch.cdist(xb.float(), gz.float(), compute_mode="donot_use_mm_for_euclid_dist") ** 2
        log_lik = -d2 / (2 * sigma ** 2) - math.log(2 * math.pi * sigma ** 2)
        out.append(torch.logsumexp(log_mass.float()[..., None, :] + log_lik, -1))
    return torch.cat(out, -1)


def reference_log_px(grid_info, true_log_mass, x_held, sigma):
    """log p(x) [2, K] of the held-out observations x_held [K, 2] under the TRUE prior and under
    N(0, I), both exact on the grid (fixed over training: computed once)."""
    grid, gz = grid_info[0], grid_info[2]
    log_mass_gauss = torch.log_softmax(-0.5 * (grid.double() ** 2).sum(1), 0)
    return grid_log_px(x_held, torch.stack([true_log_mass.float(), log_mass_gauss.float()]), gz, sigma)


def prior_fit_eval(grid_info, reference, x_held, z_true, sigma):
    """How close the learned prior (its log density on the grid in grid_info) is to the true latent, with g
    and sigma at the truth. log_px_gap: mean over the held-out x [K, 2] of log p(x) under the learned prior
    minus under the true one (reference = reference_log_px), in nats an estimate of -KL(p_true(x) ||
    p_model(x)), so <= 0 up to grid and sampling error; log_px_gap_gaussian: the same for N(0, I);
    prior_mmd: MMD^2 between the learned prior's exact grid draws and the true latents z_true [N, 2].
    Returns (metrics, those draws)."""
    log_mass = torch.log_softmax(grid_info[1].double(), 0)  # the midpoint rule: a cell's mass prop. to its density
    log_px = grid_log_px(x_held, log_mass, grid_info[2], sigma)
    z_ebm = grid_sample(grid_info, log_mass, len(z_true))
    return {"log_px_gap": (log_px - reference[0]).mean().item(),
            "log_px_gap_gaussian": (reference[1] - reference[0]).mean().item(),
            "prior_mmd": common.mmd_rbf(z_ebm, z_true)}, z_ebm


def toy_posterior_eval(model, args, x_eval, grid_info):
    """Mean over the observations x_eval [K, 2] of MMD^2 (common.mmd_rbf) to exact posterior samples,
    of DAMC's q(z | x) alone and of post_steps short-run Langevin chains from N(0, I) (the LEBM
    sampler). Also returns the samples pooled over x, for the picture."""
    g, E, q = model["g"], model["E"], model["q"]
    m = args.eval_z
    x_rep = x_eval.repeat_interleave(m, 0)
    z_q = q_sample(q, x=x_rep, n_steps=args.q_steps, amp=args.amp)
    z_ld = sample_posterior(torch.randn_like(z_q), x_rep, g, E, args.sigma, args.post_steps, args.post_step_size)
    z_ex = torch.cat([exact_posterior_sample(x, grid_info, args.sigma, m) for x in x_eval])

    def dist(z):  # mean over x of MMD^2 to that x's exact draws
        return float(np.mean([common.mmd_rbf(z_x, z_ex_x) for z_x, z_ex_x in zip(z.split(m), z_ex.split(m))]))
    return {"post_dist_damc": dist(z_q), "post_dist_langevin": dist(z_ld)}, (z_ex, z_q, z_ld)


def generate(model, args, n, device, batch=250):
    """n >= 1 samples drawn by this process: (x_q, z_q) from q's prior branch through g (None when q
    is not trained: the LEBM baseline on images) and (x_ebm, z_ebm) from EBM-prior Langevin."""
    zq, ze = [], []
    for k in range(0, n, batch):
        b = min(batch, n - k)
        if args.q_updates > 0:
            zq.append(q_sample(model["q"], n=b, n_steps=args.q_steps, amp=args.amp))
        ze.append(sample_prior(torch.randn(b, args.nz, device=device), model["E"], args.eval_prior_steps,
                               args.eval_prior_step_size, args.prior_mala))
    zq = torch.cat(zq) if zq else None
    ze = torch.cat(ze)
    with torch.no_grad():
        xe = torch.cat([generate_x(model["g"], z, args.amp) for z in ze.split(batch)])
        xq = torch.cat([generate_x(model["g"], z, args.amp) for z in zq.split(batch)]) if zq is not None else None
    return xq, zq, xe, ze


def image_eval(model, args, device):
    """A collective under torchrun: every rank draws its share of the FID samples; rank 0 gathers
    them and computes fid_q, fid_ebm and mse_recon. Returns (metrics, arrays) on rank 0, None elsewhere."""
    samples = generate(model, args, common.rank_share(max(args.fid_samples, 64)), device)
    xq, zq, xe, ze = [common.gather_rows(s) if s is not None else None for s in samples]
    if not common.is_main():
        return None
    metrics = {}
    if args.fid_samples > 0:  # against --fid-split, its statistics cached under DATA_DIR/fid_stats
        for name, x in (("fid_q", xq), ("fid_ebm", xe)):
            if x is not None:
                metrics[name] = common.fid_vs_data(x[:args.fid_samples], args.dataset, args.data_dir,
                                                   args.fid_split, device)
    if args.recon_images > 0:
        test = image_data(args, "test", collective=False)
        errs, starts = [], []
        for k in range(0, args.recon_images, 100):
            xb = common.to_float(test[k:min(k + 100, args.recon_images)]).to(device)
            z0 = chain_start(xb, model["q"], args)
            if args.sampler == "damc":  # q(x) + recon_steps noise-free steps (authors); also q(x) alone
                starts.append(recon_mse(xb, z0, model["g"], model["E"], args.sigma, 0, args.post_step_size, args.amp))
            errs.append(recon_mse(xb, z0, model["g"], model["E"], args.sigma, recon_steps(args), args.post_step_size,
                                  args.amp))
        metrics["mse_recon"] = torch.cat(errs).mean().item()
        if starts:  # q's draw alone, before any posterior step: how much of the chain q amortises
            metrics["mse_recon_start"] = torch.cat(starts).mean().item()
    arrays = {"x": xe.cpu().numpy(), "z": ze.cpu().numpy()}
    if xq is not None:
        arrays.update(x_q=xq.cpu().numpy(), z_q=zq.cpu().numpy())
    return metrics, arrays


def save_image_picture(path, model, args, x, device):
    """Rows: q prior -> g (2 rows, when q is trained), EBM prior -> g (2 rows), data (1 row),
    its reconstruction (1 row)."""
    xq, _, xe, _ = generate(model, args, 16, device)
    xr = x[:8]
    z = sample_posterior(chain_start(xr, model["q"], args), xr, model["g"], model["E"], args.sigma, recon_steps(args),
                         args.post_step_size, noise=False, amp=args.amp)
    with torch.no_grad():
        rows = ([xq] if xq is not None else []) + [xe, xr, generate_x(model["g"], z, args.amp)]
        common.save_image_grid(path, torch.cat(rows).cpu(), nrow=8)


# ======================================================================================
# Main
# ======================================================================================

def checkpoint_state(model, opts, args, step, batches, dist_history):
    return {"script": "damc_prior", "args": vars(args), "step": step,
            **{name: m.state_dict() for name, m in model.items()},
            **{"opt_" + name: o.state_dict() for name, o in opts.items()},
            "rng": common.rng_state(), "batches": batches.state_dict() if batches is not None else None,
            "dist_history": dist_history}


def main(argv=None):
    args = get_args(argv)
    if not args.print_config:
        check_eval_protocol(args)  # at once: before networks, data, folder and training
    toy = args.dataset not in IMAGE_SETS
    rank, world = common.init_distributed()
    common.seed_everything(args.seed)
    nets = build_networks(args)
    common.print_config(args, nets)  # exits here under --print-config: no data read, no folder touched
    # a checkpoint of another model or objective is refused before data, folder or training
    ckpt = Path(args.out or f"runs/damc_prior-{args.dataset}") / "checkpoint.pt"
    resuming = (args.resume or args.eval_only) and ckpt.exists()
    state = common.load_checkpoint(ckpt, "damc_prior", args, must_match=MUST_MATCH) if resuming else None
    model = {**nets, "q_slow": common.make_ema(nets["q"])}
    common.seed_everything(args.seed + rank)
    device = common.pick_device(args.device)
    data = None if toy else image_data(args, "train")
    out = common.prepare_out_dir(args, "damc_prior")
    for m in model.values():
        m.to(device)
        common.broadcast_params(m)
    common.compile_nets(args.compile, *model.values())
    opts = build_optimizers(model, args)
    batches = None if toy else common.Batches(data, args.batch_size // world, seed=args.seed, device=device,
                                                workers=min(4, os.cpu_count() or 1))
    if toy:  # fixed observations for the posterior distance, and for the prior's fit held-out observations,
        # true latents and the true prior's mass on the grid: the same for every run of the toy
        x_eval = toy_batch(args, model["g"], args.eval_x, device, torch.Generator().manual_seed(1))[0]
        x_held = toy_batch(args, model["g"], args.eval_prior_x, device, torch.Generator().manual_seed(2))[0]
        z_true = toy_latent(args, 2 * args.eval_prior_x, torch.Generator().manual_seed(3)).to(device)
        grid_info = exact_posterior_grid(model["g"], model["E"])
        reference = reference_log_px(grid_info, true_grid_log_mass(args, grid_info), x_held, args.sigma)
    start, dist_history = 0, []
    if state is not None:
        for name, m in model.items():
            common.load_state(m, state[name], name)
        for name, o in opts.items():
            o.load_state_dict(state["opt_" + name])
        if batches is not None and state["batches"] is not None:
            batches.load_state_dict(state["batches"])
        common.set_rng_state(state["rng"])
        start, dist_history = state["step"], state["dist_history"]

    def fork_rng():  # evaluation must not shift the training noise (resume equality)
        return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])

    def evaluate_toy(step):
        with fork_rng():
            grid_info = exact_posterior_grid(model["g"], model["E"])
            dists, pooled = toy_posterior_eval(model, args, x_eval, grid_info)
            fit, z_ebm = prior_fit_eval(grid_info, reference, x_held, z_true, args.sigma)
            dists.update(fit)
            if common.is_main():  # the latents: true, EBM prior (exact grid draws), the three posteriors
                common.save_toy_panels(out / f"samples_{step}.png", [
                    ("true latent", z_true), ("EBM prior", z_ebm), ("exact posterior", pooled[0]),
                    ("DAMC q(z|x)", pooled[1]), ("short-run LD", pooled[2])], lim=4.0, axis="z")
        dist_history.append({"step": step, **dists})
        return dists, pooled

    stop = common.StopFlag()
    logger = common.Logger(out, args.steps, initial=start)
    for step in range(start, start if args.eval_only else args.steps):
        if toy:
            x = toy_batch(args, model["g"], args.batch_size // world, device)[0]
        else:
            x = common.to_float(next(batches))
            x = common.random_flip(x) if args.flip else x
        stats = damc_iteration(x, model, opts, args, step)
        logger.update()
        last = step + 1 == args.steps
        dists = evaluate_toy(step + 1)[0] if toy and (step + 1) % args.eval_every == 0 and not last else {}
        if (step + 1) % args.log_every == 0 or last or dists:
            values = {k: v.item() for k, v in stats.items()}
            common.check_finite(step + 1, "--q-lr, --e-lr, --g-lr, --post-step-size, --prior-step-size", **values)
            logger.log(step + 1, args.batch_size, **values, **dists)
        stopping = stop.should_stop(step)  # every rank agrees (torchrun)
        if stopping or (step + 1) % args.ckpt_every == 0 or last:
            common.save_checkpoint(out / "checkpoint.pt",
                                   checkpoint_state(model, opts, args, step + 1, batches, dist_history))
            if not toy and common.is_main():
                with fork_rng():
                    save_image_picture(out / f"samples_{step + 1}.png", model, args, x, device)
            if stopping:
                logger.close()
                return
    logger.close()
    # ---- final evaluation
    if toy:
        if not common.is_main():
            return
        dists, pooled = evaluate_toy(start if args.eval_only else args.steps)
        with torch.no_grad():
            z_ebm = sample_prior(torch.randn(1000, 2, device=device), model["E"], args.eval_prior_steps,
                                 args.eval_prior_step_size, args.prior_mala)
            x_model = model["g"](z_ebm) + args.sigma * torch.randn_like(z_ebm)
        x_data, _ = toy_batch(args, model["g"], 1000, device)
        metrics = {**dists, "mmd": common.mmd_rbf(x_model, x_data)}
        if len(dist_history) > 1:
            curves = {k: [h[k] for h in dist_history] for k in dists if k.startswith("post_dist")}
            common.save_line_plot(out / "post_dist.png", curves, x=[h["step"] for h in dist_history],
                                  xlabel="training step", ylabel="MMD$^2$ to the exact posterior", log_y=True,
                                  title="posterior samples: DAMC's q vs. short-run Langevin")
        arrays = {"x": x_model.cpu().numpy(), "z": z_ebm.cpu().numpy(), "z_post_exact": pooled[0].cpu().numpy(),
                  "z_post_damc": pooled[1].cpu().numpy(), "z_post_langevin": pooled[2].cpu().numpy()}
    else:
        result = image_eval(model, args, device)  # every rank draws its share of the samples
        if result is None:
            return
        metrics, arrays = result
    if args.eval_only:
        np.savez(out / "samples.npz", **arrays)
    common.write_metrics(out, metrics)


if __name__ == "__main__":
    common.main_guard(main)

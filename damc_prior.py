"""Learning Energy-Based Prior Model with Diffusion-Amortized MCMC (Yu et al., NeurIPS 2023).
https://arxiv.org/abs/2310.03218  (the text beside this repository is the poster; the details
come from the authors' code, summarised in NOTES.md section 3)

What is implemented
- The latent-space EBM (LEBM, Pang et al. 2020): prior p_alpha(z) = exp(f_alpha(z)) N(0, I) / Z
  with an MLP energy E = -f, generator x = g_beta(z) + N(0, sigma^2 I) (DCGAN-style), learned
  with the poster's "Background" gradients delta_alpha and delta_beta.
- The DAMC sampler q_phi: a small conditional diffusion model over z (epsilon prediction,
  cosine log-SNR schedule, Fourier features, residual MLP) conditioned on an x-encoding, whose
  unconditional branch (condition dropped) samples the prior; 100-step ancestral sampling.
- The DAMC iteration ("Amortizing MCMC" + "Diffusion-based amortization"): q's slow copy starts
  the chains, short-run posterior / prior Langevin refines them, q is fitted M times to the
  refined posterior samples, then g, then E are updated.
- `--sampler langevin`: the short-run LEBM baseline (all chains start from N(0, I)); q is still
  distilled from its posterior samples (so fid_q exists) but never starts a chain.
- The poster's toy ("Amortizing long-run MCMC"): a 2-arm pinwheel latent through a fixed random
  MLP generator (noise 0.25). Fixed: g and sigma (the true likelihood). Learned: the EBM prior E
  and q. Over training, q's posterior samples and short-run Langevin's (50 steps from N(0, I))
  are compared with the exact posterior of the *current* model, computed on a grid.
- Evaluation: fid_q (q's prior branch -> g), fid_ebm (100-step EBM-prior Langevin -> g),
  mse_recon (q(x) + 10 noise-free posterior steps, per-pixel mean in [-1, 1]); toy: post_dist_damc,
  post_dist_langevin (mean over observations x of the RBF-MMD^2 to the exact posterior), mmd.

Langevin convention (poster, authors' code): with U = -log pi,
    z <- z - s^2/2 grad U(z) + s w = z + s^2/2 grad log pi(z) + s w,  w ~ N(0, I)
which is common.langevin's "s" convention.

Offline demo (toy; ~3 min of CPU time, one core):   python damc_prior.py
    expect post_dist_damc ~0.01 against post_dist_langevin ~0.11 (seed 0: 0.0111 vs 0.1109).
Images (CPU-sized defaults):  python damc_prior.py --dataset fashion --steps 1000 --fid-samples 500
Full reproduction (GPU):      python damc_prior.py --dataset cifar10 --preset paper
Short-run baseline:           add --sampler langevin
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# ======================================================================================
# Arguments
# ======================================================================================

IMAGE_SETS = ["mnist", "fashion", "svhn", "cifar10", "celeba"]
# (nz, ngf) of the authors' generators; fashion has no authors' setting: MNIST's is used.
PAPER_SIZES = {"mnist": (8, 128), "fashion": (8, 128), "svhn": (100, 64), "cifar10": (128, 128),
               "celeba": (100, 128)}
PRESETS = {name: {"nz": nz, "ngf": ngf, "ndf": 64, "nxemb": 1024, "q_width": 256, "batch_size": 128,
                  "steps": 1000000, "fid_samples": 50000, "recon_images": 10000}
           for name, (nz, ngf) in PAPER_SIZES.items()}
PRESETS["pinwheel"] = {"batch_size": 500, "q_lr": 2e-4, "steps": 10000}  # authors' toy batch and lr
# Per-kind defaults for flags left at None: the toy script's settings differ (NOTES.md).
KIND_DEFAULTS = {
    "toy": {"sigma": 0.25, "post_steps": 50, "p_mask": 0.1, "slow_rate": 0.75, "q_wd": 1e-2,
            "nxemb": 128, "q_width": 128, "q_lr": 1e-3},
    "image": {"sigma": 0.1, "post_steps": 30, "p_mask": 0.2, "slow_rate": 0.005, "q_wd": 1e-4,
              "nxemb": 256, "q_width": 256, "q_lr": 2e-4},
}


def build_parser():
    p = common.base_parser("DAMC: latent EBM prior learned with diffusion-amortized MCMC",
                           dataset="pinwheel", steps=1000, batch_size=64, fid_samples=500)
    a = p.add_argument
    a("--sampler", default="damc", choices=["damc", "langevin"],
      help="damc: chains start from q's slow copy (the paper); langevin: from N(0, I) (LEBM baseline)")
    a("--nz", type=int, default=None, help="latent dim (default: authors' per data set: cifar10 128, svhn 100, "
      "celeba 100, mnist/fashion 8; toy 2)")
    a("--ngf", type=int, default=16, help="generator width (paper: 128, svhn 64; 16 keeps CPU runs short)")
    a("--ndf", type=int, default=16, help="width of q's x-encoder (paper: 64; 16 keeps CPU runs short)")
    a("--nxemb", type=int, default=None, help="size of q's x-embedding (paper: 1024 images, 128 toy; default 256/128)")
    a("--q-width", type=int, default=None, help="q's MLP width: layers w/2, w, w (paper: 256; toy default 128)")
    a("--sigma", type=float, default=None, help="generator noise std (paper: 0.1 images, 0.25 toy)")
    a("--post-steps", type=int, default=None, help="posterior Langevin steps (paper: 30 images, 50 toy)")
    a("--post-step-size", type=float, default=0.1, help="posterior Langevin s (paper: 0.1)")
    a("--prior-steps", type=int, default=60, help="prior Langevin steps in training (paper: 60)")
    a("--prior-step-size", type=float, default=0.4, help="prior Langevin s (paper: 0.4; 1.6 at CIFAR-10 evaluation)")
    a("--eval-prior-steps", type=int, default=100, help="prior Langevin steps for fid_ebm (paper: 100)")
    a("--recon-steps", type=int, default=10, help="noise-free posterior steps after q(x) for mse_recon (paper: 10)")
    a("--recon-images", type=int, default=500, help="test images for mse_recon (paper: the whole test set)")
    a("--q-steps", type=int, default=100, help="ancestral sampling steps of q (paper: 100)")
    a("--q-updates", type=int, default=6, help="M: q updates per iteration on the refined samples (paper: 6)")
    a("--p-mask", type=float, default=None, help="probability of dropping x to train q's prior branch "
      "(paper: 0.2 images, 0.1 toy)")
    a("--slow-rate", type=float, default=None, help="slow copy <- rate*q + (1-rate)*copy every --slow-every steps "
      "(paper: 0.005 images, 0.75 toy; raise it for runs of a few thousand steps)")
    a("--slow-every", type=int, default=10, help="iterations between slow-copy updates (paper: 10)")
    a("--q-lr", type=float, default=None, help="AdamW lr of q (paper: 2e-4; toy default 1e-3 for a short run)")
    a("--q-wd", type=float, default=None, help="AdamW weight decay of q (paper: 1e-4 images, 1e-2 toy)")
    a("--g-lr", type=float, default=2e-4, help="Adam lr of g (paper: 2e-4)")
    a("--e-lr", type=float, default=1e-4, help="Adam lr of the prior energy (paper: 1e-4)")
    a("--grad-clip", type=float, default=100.0, help="gradient-norm clip for q, g, E (paper: 100)")
    a("--lr-decay", type=float, default=0.99, help="all lrs times this every --lr-decay-every steps (paper: 0.99)")
    a("--lr-decay-every", type=int, default=1000, help="paper: 1000")
    a("--lr-min", type=float, default=1e-5, help="floor of the lr decay (paper: 1e-5)")
    a("--logsnr-min", type=float, default=-5.1, help="log-SNR at t = 1 (paper: -5.1)")
    a("--logsnr-max", type=float, default=9.8, help="log-SNR at t = 0 (paper: 9.8)")
    a("--arms", type=int, default=2, help="toy: arms of the pinwheel latent (poster: 2)")
    a("--eval-every", type=int, default=250, help="toy: steps between posterior-distance evaluations")
    a("--eval-x", type=int, default=16, help="toy: observations x the posterior distance is averaged over")
    a("--eval-z", type=int, default=128, help="toy: posterior samples per x and method")
    return p


def resolve_defaults(args):
    """Fill the flags left at None from the per-kind defaults and the authors' sizes."""
    if args.dataset not in IMAGE_SETS and args.dataset not in common.TOYS:
        raise common.UserError(f"damc_prior.py supports {', '.join(common.TOYS + IMAGE_SETS)}, not {args.dataset}")
    kind = "image" if args.dataset in IMAGE_SETS else "toy"
    for key, value in KIND_DEFAULTS[kind].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.nz is None:
        args.nz = PAPER_SIZES[args.dataset][0] if kind == "image" else 2
    if kind == "toy" and args.nz != 2:
        raise common.UserError("the toy's latent is 2-D: drop --nz")
    common.check_positive(args, "ngf", "ndf", "nxemb", "q_width", "sigma", "post_step_size", "prior_step_size",
                          "q_updates", "slow_every", "q_lr", "g_lr", "e_lr", "grad_clip", "lr_decay",
                          "lr_decay_every", "lr_min", "slow_rate", "eval_every", "eval_x", "eval_z", "arms")
    if args.q_steps < 2:
        raise common.UserError(f"--q-steps must be at least 2 (got {args.q_steps})")
    for name in ("post_steps", "prior_steps", "eval_prior_steps", "recon_steps", "recon_images", "q_wd"):
        if getattr(args, name) < 0:
            raise common.UserError(f"--{name.replace('_', '-')} must be >= 0 (got {getattr(args, name)})")
    if not 0 <= args.p_mask < 1 or args.slow_rate > 1:
        raise common.UserError("--p-mask must lie in [0, 1) and --slow-rate in (0, 1]")
    return args


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
    """x = g(z) + sigma * noise with z from the true latent distribution -> (x [n, 2], z [n, 2])."""
    z = toy_latent(args, n, generator).to(device)
    noise = torch.randn(n, 2, generator=generator).to(device)
    with torch.no_grad():
        return g(z) + args.sigma * noise, z


def image_data(args, split="train"):
    """uint8 [N, C, S, S]; mnist/fashion padded to 32 x 32 for the DCGAN networks."""
    return torch.as_tensor(common.load_images(args.dataset, args.data_dir, split,
                                              pad_to_32=args.dataset in ("mnist", "fashion")))


# ======================================================================================
# Networks
# ======================================================================================

class EpsNet(nn.Module):
    """q's noise predictor eps_hat(z_t, t, c) = z_t + MLP (residual, as the authors).

    z_t [B, nz], t [B] in [0, 1], c [B, nxemb] (x-encoding or prior embedding) -> [B, nz].
    Input: learned Fourier features [sin 2 pi zB, cos 2 pi zB, z]; hidden widths w/2, w, w,
    each layer modulated (scale and shift) by the time + condition embedding."""

    def __init__(self, nz, nxemb, width, ntemb=128, n_fourier=16):
        super().__init__()
        self.ntemb = ntemb
        self.B = nn.Parameter(torch.randn(nz, n_fourier))
        self.t_mlp = nn.Sequential(nn.Linear(ntemb, ntemb), nn.SiLU(), nn.Linear(ntemb, ntemb))
        dims = [nz + 2 * n_fourier, width // 2, width, width]
        self.layers = nn.ModuleList(nn.Linear(dims[i], dims[i + 1]) for i in range(3))
        self.films = nn.ModuleList(nn.Linear(ntemb + nxemb, 2 * dims[i + 1]) for i in range(3))
        self.out = nn.Linear(width, nz)

    def forward(self, z, t, c):
        temb = self.t_mlp(common.timestep_embedding(1000 * t, self.ntemb))
        ctx = F.silu(torch.cat([temb, c], 1))
        zb = 2 * math.pi * z @ self.B
        h = torch.cat([torch.sin(zb), torch.cos(zb), z], 1)
        for layer, film in zip(self.layers, self.films):
            scale, shift = film(ctx).chunk(2, 1)
            h_new = F.leaky_relu(layer(h) * (1 + scale) + shift, 0.2)
            h = h_new + h if h_new.shape == h.shape else h_new
        return z + self.out(h)


class DiffusionSampler(nn.Module):
    """q_phi(z | x): encoder(x) -> condition; prior_emb(fresh N(0, I) noise) is the condition of
    the unconditional (prior) branch, as in the authors' code (no learned null token)."""

    def __init__(self, nz, encoder, nxemb, width, logsnr_range=(-5.1, 9.8)):
        super().__init__()
        self.nz, self.logsnr_range = nz, logsnr_range
        self.encoder = encoder
        self.prior_emb = common.mlp([nz, 128, nxemb], act=lambda: nn.LeakyReLU(0.2))
        self.eps_net = EpsNet(nz, nxemb, width)

    def condition(self, x=None, n=None, p_mask=0.0):
        """[B, nxemb]: the x-encoding, each row replaced with probability p_mask (x None: always)
        by the prior embedding of fresh noise."""
        if x is None:
            dev = next(self.parameters()).device
            return self.prior_emb(torch.randn(n, self.nz, device=dev))
        c = self.encoder(x)
        if p_mask > 0:
            keep = (torch.rand(len(x), 1, device=x.device) >= p_mask).float()
            c = keep * c + (1 - keep) * self.prior_emb(torch.randn(len(x), self.nz, device=x.device))
        return c


def build_model(args):
    """{"g", "E", "q", "q_slow"}; the toy's g is the fixed true generator (no parameters learned)."""
    if args.dataset in IMAGE_SETS:
        ch, size = (1, 32) if args.dataset in ("mnist", "fashion") else (3, 64 if args.dataset == "celeba" else 32)
        g = common.dcgan_generator(args.nz, ch, args.ngf, size, norm=False)
        encoder = common.dcgan_encoder(args.nxemb, ch, args.ndf, size, norm="instance")
    else:
        g = toy_generator()
        encoder = common.mlp([2, 128, 128, 128, args.nxemb], act=nn.ReLU)
    # the prior's energy E = -f_alpha: nz -> 200 -> 200 -> 1, LeakyReLU 0.2 (authors)
    E = common.mlp([args.nz, 200, 200, 1], act=lambda: nn.LeakyReLU(0.2))
    q = DiffusionSampler(args.nz, encoder, args.nxemb, args.q_width, (args.logsnr_min, args.logsnr_max))
    return {"g": g, "E": E, "q": q, "q_slow": common.make_ema(q)}


def build_optimizers(model, args):
    """AdamW for q, Adam for g and E, betas (0.5, 0.999) (authors); the toy's g has none."""
    opts = {"q": torch.optim.AdamW(model["q"].parameters(), args.q_lr, betas=(0.5, 0.999), weight_decay=args.q_wd),
            "E": torch.optim.Adam(model["E"].parameters(), args.e_lr, betas=(0.5, 0.999))}
    if any(p.requires_grad for p in model["g"].parameters()):
        opts["g"] = torch.optim.Adam(model["g"].parameters(), args.g_lr, betas=(0.5, 0.999))
    return opts


# ======================================================================================
# Objective
# ======================================================================================

def energy(E, z):
    """E_alpha(z) = -f_alpha(z), [B]."""
    return E(z).squeeze(1)


def log_prior(z, E):
    """log p_alpha(z) + log Z = f_alpha(z) + log N(z; 0, I) + const (Background, p_alpha)."""
    return -energy(E, z) - 0.5 * (z ** 2).sum(1)


def log_joint(z, x, g, E, sigma):
    """log p_theta(x, z) = log p_beta(x | z) + log p_alpha(z) + const: the unnormalised posterior."""
    return -((x - g(z)) ** 2).flatten(1).sum(1) / (2 * sigma ** 2) + log_prior(z, E)


def logsnr_schedule(t, logsnr_min=-5.1, logsnr_max=9.8):
    """Continuous cosine log-SNR schedule, clipped: lambda(0) = logsnr_max, lambda(1) = logsnr_min."""
    b = math.atan(math.exp(-0.5 * logsnr_max))
    a = math.atan(math.exp(-0.5 * logsnr_min)) - b
    return -2.0 * torch.log(torch.tan(a * t + b))


def q_loss(q, x, z, p_mask=0.0):
    """Diffusion-based amortization: E_{eps, lambda} ||eps_hat(z_lambda) - eps||^2 (authors: 0.5 * sum,
    continuous t ~ U(0, 1)), on target samples z [B, nz]; x None trains the prior branch only."""
    c = q.condition(x, len(z), p_mask)
    t = torch.rand(len(z), device=z.device)
    lam = logsnr_schedule(t, *q.logsnr_range)[:, None]
    alpha, sigma = torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()  # VP: alpha^2 + sigma^2 = 1
    eps = torch.randn_like(z)
    eps_hat = q.eps_net(alpha * z + sigma * eps, t, c)
    return 0.5 * ((eps - eps_hat) ** 2).sum(1).mean()


# ======================================================================================
# Sampler
# ======================================================================================

@torch.no_grad()
def q_sample(q, x=None, n=None, n_steps=100):
    """Ancestral sampling of q on the grid t_i = i / (n_steps - 1), i = n_steps-1 .. 0, with the
    'large' variance sigma^2_{t|s} (authors); the last step returns the z-prediction.
    x [B, ...] -> z [B, nz] from q(z | x); x None -> n samples of the prior branch."""
    c = q.condition(x, n)
    n = len(c)
    z = torch.randn(n, q.nz, device=c.device)
    for i in reversed(range(n_steps)):
        t = torch.full((n,), i / (n_steps - 1), device=c.device)
        s = torch.full((n,), max(i - 1, 0) / (n_steps - 1), device=c.device)
        lam_t, lam_s = logsnr_schedule(t, *q.logsnr_range)[:, None], logsnr_schedule(s, *q.logsnr_range)[:, None]
        alpha_t, sigma2_t = torch.sigmoid(lam_t).sqrt(), torch.sigmoid(-lam_t)
        z0_hat = (z - sigma2_t.sqrt() * q.eps_net(z, t, c)) / alpha_t
        if i == 0:
            return z0_hat
        alpha_s, sigma2_s = torch.sigmoid(lam_s).sqrt(), torch.sigmoid(-lam_s)
        sigma2_ts = sigma2_t * (1 - torch.exp(lam_t - lam_s))  # variance of z_t given z_s
        mean = (alpha_t / alpha_s) * (sigma2_s / sigma2_t) * z + alpha_s * sigma2_ts / sigma2_t * z0_hat
        z = mean + sigma2_ts.sqrt() * torch.randn_like(z)
    return z


def sample_posterior(z0, x, g, E, sigma, n_steps, s, noise=True, trace=False):
    """Short-run posterior Langevin on log p(x, z) from z0 (U = ||x - g(z)||^2/(2 sigma^2) + E(z) + ||z||^2/2)."""
    return common.langevin(lambda z: log_joint(z, x, g, E, sigma), z0, n_steps, s,
                           noise_scale=1.0 if noise else 0.0, trace=trace)


def sample_prior(z0, E, n_steps, s):
    """Short-run prior Langevin on log p_alpha from z0 (U = E(z) + ||z||^2/2)."""
    return common.langevin(lambda z: log_prior(z, E), z0, n_steps, s)


# ======================================================================================
# Training
# ======================================================================================

def set_learning_rates(opts, args, step):
    """Authors' decay: every lr_decay_every iterations all lrs times lr_decay, floor lr_min."""
    factor = args.lr_decay ** (step // args.lr_decay_every)
    base = {"q": args.q_lr, "g": args.g_lr, "E": args.e_lr}
    for name, opt in opts.items():
        for group in opt.param_groups:
            group["lr"] = max(base[name] * factor, args.lr_min)


def optimizer_step(opt, module, loss, clip):
    opt.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for p in module.parameters() if p.requires_grad]
    common.average_gradients(params)
    torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()


def damc_iteration(x, model, opts, args, step):
    """One DAMC iteration (authors' order). Changes q, g, E and their optimisers; the slow copy
    only on iterations with (step + 1) % slow_every == 0. Returns a dict of scalar tensors."""
    g, E, q, q_slow = model["g"], model["E"], model["q"], model["q_slow"]
    set_learning_rates(opts, args, step)
    # Amortizing MCMC (a): start the chains from the current sampler q_{phi_{k-1}} (its slow copy,
    # authors), or from N(0, I) for the LEBM baseline.
    if args.sampler == "damc":
        z0 = q_sample(q_slow, x=x, n_steps=args.q_steps)
    else:
        z0 = torch.randn(len(x), args.nz, device=x.device)
    # ... K_T q_{phi_{k-1}}: T-step short-run posterior Langevin (target of the sampler and of g, E).
    z_pos, info = sample_posterior(z0, x, g, E, args.sigma, args.post_steps, args.post_step_size, trace=True)
    # prior samples for delta_alpha: short-run prior Langevin from [z0, N(0, I)] (2B chains, authors)
    z_neg = sample_prior(torch.cat([z0, torch.randn_like(z0)]), E, args.prior_steps, args.prior_step_size)
    # Amortizing MCMC (b) = Diffusion-based amortization: phi^(i+1) <- phi^(i) - eta grad DDPM loss,
    # i = 0..M-1, on (x, z_pos) with the condition dropped w.p. p_mask; phi_k^(0) <- phi_{k-1}^(M).
    for _ in range(args.q_updates):
        loss_q = q_loss(q, x, z_pos, args.p_mask)
        optimizer_step(opts["q"], q, loss_q, args.grad_clip)
    # Background: delta_beta = E_{p(z|x)}[grad_beta log p_beta(x|z)]; per-image summed squared
    # error (authors), the 1/(2 sigma^2) factor left to Adam.
    recon = ((x - g(z_pos)) ** 2).flatten(1).sum(1).mean()
    if "g" in opts:
        optimizer_step(opts["g"], g, recon, args.grad_clip)
    # Background: delta_alpha = E_{p(z|x)}[grad f] - E_{p(z)}[grad f]; with E = -f we descend
    # mean E(z_pos) - mean E(z_neg).
    e_pos, e_neg = energy(E, z_pos).mean(), energy(E, z_neg).mean()
    optimizer_step(opts["E"], E, e_pos - e_neg, args.grad_clip)
    # The slow copy follows q every slow_every iterations (not a per-step EMA; authors).
    if (step + 1) % args.slow_every == 0:
        common.ema_update(q_slow, q, 1 - args.slow_rate)
    return {"loss_q": loss_q.detach(), "recon": recon.detach(), "e_data": e_pos.detach(),
            "e_sample": e_neg.detach(), "grad_norm": info["grad_norm"][-1].mean() if len(info["grad_norm"]) else
            torch.zeros(())}


# ======================================================================================
# Evaluation
# ======================================================================================

def recon_mse(x, z0, g, E, sigma, n_steps, s):
    """Per-image reconstruction MSE [B]: z0 refined by n_steps noise-free posterior steps,
    then mean over pixels of (g(z) - x)^2 in [-1, 1] (authors' evaluation)."""
    z = sample_posterior(z0, x, g, E, sigma, n_steps, s, noise=False)
    with torch.no_grad():
        return ((g(z) - x) ** 2).flatten(1).mean(1)


def exact_posterior_grid(g, E, lim=4.0, n=300):
    """The toy model's posterior on an n x n midpoint grid over [-lim, lim]^2: returns
    (grid [n*n, 2], log p_alpha(grid) + const, g(grid), cell width) for `exact_posterior_sample`."""
    h = 2 * lim / n
    axis = -lim + h * (torch.arange(n) + 0.5)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
    grid = grid.to(next(E.parameters()).device)
    with torch.no_grad():
        return grid, log_prior(grid, E), g(grid), h


def exact_posterior_sample(x, grid_info, sigma, n):
    """n exact draws from p(z | x) (x [2]): a grid cell with probability prop. to p(z)p(x|z),
    then a uniform position inside it."""
    grid, log_pz, gz, h = grid_info
    logw = log_pz - ((x - gz) ** 2).sum(1) / (2 * sigma ** 2)
    idx = torch.multinomial(torch.softmax(logw.double(), 0).float(), n, replacement=True)
    return grid[idx] + h * (torch.rand(n, 2, device=grid.device) - 0.5)


def toy_posterior_eval(model, args, x_eval):
    """Mean over the observations x_eval [K, 2] of MMD^2 (common.mmd_rbf) between each
    sampler's posterior samples and exact ones. DAMC: q(z | x) alone (100 ancestral steps);
    Langevin: post_steps short-run chains from N(0, I) (the LEBM sampler). Also returns the
    samples pooled over x, for the picture."""
    g, E, q = model["g"], model["E"], model["q"]
    m = args.eval_z
    x_rep = x_eval.repeat_interleave(m, 0)
    z_q = q_sample(q, x=x_rep, n_steps=args.q_steps)
    z_ld = sample_posterior(torch.randn_like(z_q), x_rep, g, E, args.sigma, args.post_steps, args.post_step_size)
    grid_info = exact_posterior_grid(g, E)
    z_ex = torch.cat([exact_posterior_sample(x, grid_info, args.sigma, m) for x in x_eval])
    d_q, d_ld = [], []
    for k in range(len(x_eval)):
        rows = slice(k * m, (k + 1) * m)
        d_q.append(common.mmd_rbf(z_q[rows], z_ex[rows]))
        d_ld.append(common.mmd_rbf(z_ld[rows], z_ex[rows]))
    return {"post_dist_damc": float(np.mean(d_q)), "post_dist_langevin": float(np.mean(d_ld))}, (z_ex, z_q, z_ld)


def toy_picture(path, model, args, pooled):
    """Panels: true latent, EBM prior (Langevin), exact posterior, DAMC q, short-run Langevin."""
    z_ex, z_q, z_ld = pooled
    n = len(z_ex)
    z_true = toy_latent(args, n).to(z_ex.device)
    z_ebm = sample_prior(torch.randn_like(z_ex), model["E"], args.eval_prior_steps, args.prior_step_size)
    common.save_toy_panels(path, [("true latent", z_true), ("EBM prior", z_ebm), ("exact posterior", z_ex),
                                  ("DAMC q(z|x)", z_q), ("short-run LD", z_ld)], lim=4.0)


def generate(model, args, n, device, batch=250):
    """(x_q, z_q) from q's prior branch through g and (x_ebm, z_ebm) from EBM-prior Langevin."""
    g, E, q = model["g"], model["E"], model["q"]
    zq, ze = [], []
    for k in range(0, n, batch):
        b = min(batch, n - k)
        zq.append(q_sample(q, n=b, n_steps=args.q_steps))
        ze.append(sample_prior(torch.randn(b, args.nz, device=device), E, args.eval_prior_steps,
                               args.prior_step_size))
    zq, ze = torch.cat(zq), torch.cat(ze)
    with torch.no_grad():
        xq = torch.cat([g(z) for z in zq.split(batch)])
        xe = torch.cat([g(z) for z in ze.split(batch)])
    return xq, zq, xe, ze


def image_eval(model, args, device):
    metrics = {}
    xq, zq, xe, ze = generate(model, args, max(args.fid_samples, 64), device)
    if args.fid_samples > 0:
        metrics["fid_q"] = common.fid_vs_data(xq[:args.fid_samples], args.dataset, args.data_dir, "test", device)
        metrics["fid_ebm"] = common.fid_vs_data(xe[:args.fid_samples], args.dataset, args.data_dir, "test", device)
    if args.recon_images > 0:
        test = image_data(args, "test")[:args.recon_images]
        errs = []
        for xb in test.split(100):
            xb = common.to_float(xb).to(device)
            if args.sampler == "damc":  # q(x) + recon_steps noise-free steps (authors)
                err = recon_mse(xb, q_sample(model["q"], x=xb, n_steps=args.q_steps), model["g"], model["E"],
                              args.sigma, args.recon_steps, args.post_step_size)
            else:  # LEBM's own inference: post_steps noise-free steps from N(0, I)
                err = recon_mse(xb, torch.randn(len(xb), args.nz, device=device), model["g"], model["E"],
                              args.sigma, args.post_steps, args.post_step_size)
            errs.append(err)
        metrics["mse_recon"] = torch.cat(errs).mean().item()
    return metrics, {"x": xe.cpu().numpy(), "z": ze.cpu().numpy(), "x_q": xq.cpu().numpy(), "z_q": zq.cpu().numpy()}


def save_image_picture(path, model, args, x, device):
    """Rows: q prior -> g (2 rows), EBM prior -> g (2 rows), data (1 row), its reconstruction (1 row)."""
    xq, _, xe, _ = generate(model, args, 16, device)
    z0 = q_sample(model["q"], x=x[:8], n_steps=args.q_steps) if args.sampler == "damc" else \
        torch.randn(8, args.nz, device=device)
    z = sample_posterior(z0, x[:8], model["g"], model["E"], args.sigma, args.recon_steps, args.post_step_size,
                         noise=False)
    with torch.no_grad():
        common.save_image_grid(path, torch.cat([xq, xe, x[:8], model["g"](z)]).cpu(), nrow=8)


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
    args = resolve_defaults(common.parse_args(build_parser(), PRESETS, argv))
    toy = args.dataset not in IMAGE_SETS
    rank, world = common.init_distributed()
    common.seed_everything(args.seed)
    model = build_model(args)
    common.seed_everything(args.seed + rank)
    device = common.pick_device(args.device)
    data = None if toy else image_data(args, "train")
    out = common.prepare_out_dir(args, "damc_prior")
    for m in model.values():
        m.to(device)
        common.broadcast_params(m)
    opts = build_optimizers(model, args)
    batches = None if toy else common.Batches(data, args.batch_size // world, seed=args.seed)
    # fixed observations for the toy's posterior distance, the same for every run of the toy
    x_eval = toy_batch(args, model["g"], args.eval_x, device, torch.Generator().manual_seed(1))[0] if toy else None
    start, dist_history = 0, []
    if args.resume or args.eval_only:
        state = common.load_checkpoint(out / "checkpoint.pt", "damc_prior", args,
                                       must_match=("dataset", "nz", "ngf", "ndf", "nxemb", "q_width"))
        for name, m in model.items():
            common.load_state(m, state[name], name)
        for name, o in opts.items():
            o.load_state_dict(state["opt_" + name])
        if batches is not None and state["batches"] is not None:
            batches.load_state_dict(state["batches"])
        common.set_rng_state(state["rng"])
        start, dist_history = state["step"], state.get("dist_history", [])

    def fork_rng():  # evaluation must not shift the training noise (resume equality)
        return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])

    def evaluate_toy(step):
        with fork_rng():
            dists, pooled = toy_posterior_eval(model, args, x_eval)
            if common.is_main():
                toy_picture(out / f"samples_{step}.png", model, args, pooled)
        dist_history.append({"step": step, **dists})
        return dists, pooled

    stop = common.StopFlag()
    logger = common.Logger(out, args.steps, initial=start)
    for step in range(start, start if args.eval_only else args.steps):
        if toy:
            x = toy_batch(args, model["g"], args.batch_size // world, device)[0]
        else:
            x = common.to_float(next(batches)).to(device)
        stats = damc_iteration(x, model, opts, args, step)
        logger.update()
        last = step + 1 == args.steps
        dists = evaluate_toy(step + 1)[0] if toy and (step + 1) % args.eval_every == 0 and not last else {}
        if (step + 1) % args.log_every == 0 or last or dists:
            values = {k: v.item() for k, v in stats.items()}
            common.check_finite(step + 1, "--q-lr, --e-lr, --g-lr, --post-step-size, --prior-step-size", **values)
            logger.log(step + 1, args.batch_size, **values, **dists)
        stopping = stop.should_stop()  # every rank agrees (torchrun)
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
    if not common.is_main():
        return
    # ---- final evaluation
    if toy:
        dists, pooled = evaluate_toy(start if args.eval_only else args.steps)
        with torch.no_grad():
            z_ebm = sample_prior(torch.randn(1000, 2, device=device), model["E"], args.eval_prior_steps,
                                 args.prior_step_size)
            x_model = model["g"](z_ebm) + args.sigma * torch.randn_like(z_ebm)
        x_data, _ = toy_batch(args, model["g"], 1000, device)
        metrics = {**dists, "mmd": common.mmd_rbf(x_model, x_data)}
        if len(dist_history) > 1:
            common.save_line_plot(out / "post_dist.png", {k: [h[k] for h in dist_history] for k in dists},
                                  title="MMD^2 to exact posterior")
        arrays = {"x": x_model.cpu().numpy(), "z": z_ebm.cpu().numpy(), "z_post_exact": pooled[0].cpu().numpy(),
                  "z_post_damc": pooled[1].cpu().numpy(), "z_post_langevin": pooled[2].cpu().numpy()}
    else:
        metrics, arrays = image_eval(model, args, device)
    if args.eval_only:
        np.savez(out / "samples.npz", **arrays)
    common.write_metrics(out, metrics)


if __name__ == "__main__":
    common.main_guard(main)

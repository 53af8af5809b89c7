"""Tests of latent_tilt.py: each piece against an independent answer, plus in-process smoke runs
(the paper path, --preset paper, is in test_presets_latent_tilt.py)."""
import contextlib
import json
import math
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import common  # noqa: E402
import latent_tilt  # noqa: E402
from fakedata import write_fake  # noqa: E402


@contextlib.contextmanager
def own_signal_handlers():
    """main() installs StopFlag's SIGINT/SIGTERM handlers; the test process gets its own back."""
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, handlers[0]), signal.signal(signal.SIGTERM, handlers[1])


def run(*argv, ok=True):
    """latent_tilt.py ARGV in-process, through common.main_guard as the command line runs it."""
    code = 0
    with own_signal_handlers():
        try:
            common.main_guard(lambda: latent_tilt.main(list(argv)))
        except SystemExit as e:
            code = e.code
    assert (code in (0, None)) == ok, code


# ---------------------------------------------------------------- base models

def _perturbed_glow():
    torch.manual_seed(0)
    glow = latent_tilt.Glow((1, 4, 4), levels=2, depth=2, hidden=8).double()
    glow.log_prob(torch.randn(16, 1, 4, 4, dtype=torch.float64))  # actnorm's data-dependent init
    with torch.no_grad():  # leave the identity start (zero-initialised couplings) behind
        for p in glow.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return glow


def test_glow_inverts():
    glow = _perturbed_glow()
    x = torch.randn(5, 1, 4, 4, dtype=torch.float64)
    z, _ = glow.encode(x)
    assert z.shape == (5, 16)
    assert torch.allclose(glow.inverse(z), x, atol=1e-4)
    assert not torch.allclose(z, squeeze_all(x), atol=1e-2)  # the flow is not a mere reshuffle


def squeeze_all(x):
    return latent_tilt.squeeze(latent_tilt.squeeze(x)).flatten(1)


def test_glow_logdet_matches_autograd_jacobian():
    glow = _perturbed_glow()
    x = torch.randn(1, 1, 4, 4, dtype=torch.float64)
    _, logdet = glow.encode(x)
    J = torch.autograd.functional.jacobian(lambda v: glow.encode(v.view(1, 1, 4, 4))[0].flatten(), x.flatten())
    brute = torch.linalg.slogdet(J)[1]
    assert abs(logdet.item() - brute.item()) < 1e-8
    assert abs(brute.item()) > 0.1  # non-trivial volume change


def test_loaded_actnorm_keeps_its_loaded_statistics():
    """A loaded GLOW must not redo actnorm's data-dependent init on its next batch, and one that
    loads an uninitialised state must do it (the flag that skips the init follows the buffer)."""
    trained = _perturbed_glow()
    fresh = latent_tilt.Glow((1, 4, 4), levels=2, depth=2, hidden=8).double()
    fresh.load_state_dict(trained.state_dict())
    x = 3 + torch.randn(4, 1, 4, 4, dtype=torch.float64)
    assert torch.allclose(fresh.log_prob(x), trained.log_prob(x))
    trained.load_state_dict(latent_tilt.Glow((1, 4, 4), levels=2, depth=2, hidden=8).double().state_dict())
    trained.log_prob(x)  # initialises on x: zero mean per channel after the first actnorm
    first = trained.levels[0][0]
    assert first.initialised.item() == 1 and first.loc.abs().min() > 0.5


def test_uniform_model_scores_exactly_8_bits_per_dim():
    """A density uniform on [-1, 1)^D puts 2^-D 128^-D = 256^-D on every 8-bit image: 8 bits/dim.
    The dequantised points must land in the image's own bin of width 1/128."""
    seen = []

    class Uniform:
        def log_prob(self, x):
            seen.append(x)
            return torch.full((x.shape[0],), -x[0].numel() * math.log(2), dtype=torch.float64)
    torch.manual_seed(0)
    y = torch.randint(0, 256, (6, 3, 4, 4)).double()
    bpd = latent_tilt.bits_per_dim(Uniform(), y / 127.5 - 1)
    assert torch.allclose(bpd, torch.full((6,), 8.0, dtype=torch.float64), atol=1e-12)
    x_deq = seen[0]
    assert x_deq.min() >= -1 and x_deq.max() < 1 and torch.equal(torch.floor((x_deq + 1) * 128), y)


def test_glf_flow_inverts():
    torch.manual_seed(0)
    c = latent_tilt.VectorCoupling(6, 16)
    with torch.no_grad():
        for p in c.parameters():
            p.add_(0.3 * torch.randn_like(p))
    z = torch.randn(7, 6)
    u, logdet = c(z)
    assert torch.allclose(c.inverse(u), z, atol=1e-5)
    J = torch.autograd.functional.jacobian(lambda v: c(v[None])[0][0], z[0])
    assert abs(torch.linalg.slogdet(J)[1].item() - logdet[0].item()) < 1e-4


def test_glf_encoder_gets_no_gradient_from_the_flow_nll():
    """GLF's stop-gradient: the encoder learns from the reconstruction alone; the flow from its NLL."""
    torch.manual_seed(0)
    glf = latent_tilt.GLF(nn.Linear(6, 4), nn.Linear(4, 6), "mse", nz=4, couplings=2, hidden=8)
    with torch.no_grad():
        for p in glf.flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.rand(5, 6) * 2 - 1
    enc = list(glf.enc.parameters())
    full = torch.autograd.grad(glf.loss(x), enc + list(glf.flow.parameters()))
    rec = torch.autograd.grad(latent_tilt.reconstruction_nll(glf.dec(glf.enc(x)), x, "mse").mean(), enc)
    for a, b in zip(full, rec):
        assert torch.allclose(a, b, atol=1e-6)
    assert all(g.abs().sum() > 0 for g in full[len(enc):])  # the flow does learn
    # ... and without the stop-gradient the encoder would get a (non-zero) share of the NLL
    assert sum(g.abs().sum() for g in torch.autograd.grad(glf.flow_nll(glf.enc(x)).mean(), enc)) > 1e-3


# ---------------------------------------------------------------- samplers

def test_latent_langevin_with_zero_energy_samples_the_prior():
    """E = 0: Eq. 8 is Langevin on N(0, I); from a far start it must reach mean 0, variance 1
    (up to the discretisation's 1 / (1 - eps / 4))."""
    torch.manual_seed(0)
    zero_E = lambda x: torch.zeros(x.shape[0])
    G = lambda z: z
    z = latent_tilt.sample_latent(zero_E, G, torch.full((4000, 2), 3.0), 1500, 0.01)
    assert z.mean(0).abs().max() < 0.06
    assert (z.var(0) - 1 / (1 - 0.01 / 4)).abs().max() < 0.08


def test_latent_langevin_samples_the_tilted_prior():
    """E(x) = c x, G(z) = a z + b: p(z) exp(-E(G(z))) = N(-a c, 1) exactly."""
    torch.manual_seed(0)
    a, b, c = 2.0, 0.5, 0.4
    z = latent_tilt.sample_latent(lambda x: c * x[:, 0], lambda z: a * z + b, torch.randn(4000, 1), 1500, 0.01)
    assert abs(z.mean().item() - (-a * c)) < 0.06
    assert abs(z.var().item() - 1.0) < 0.08


def test_exact_grid_sampler_draws_the_tilted_gaussian():
    """exact_tilt_sample (the toys' ebm_*_exact) on E(x) = c . x, G(z) = a z + b, whose tilted
    prior p(z) exp(-E(G(z))) is N(-a c, I) in closed form: mean and covariance of the draws."""
    a, b, c = 1.5, 0.3, torch.tensor([0.4, -0.8])
    log_p = latent_tilt.latent_log_p(lambda x: x @ c, lambda z: a * z + b)
    z = latent_tilt.exact_tilt_sample(log_p, 20000, torch.Generator().manual_seed(0), "cpu")
    torch.testing.assert_close(z.mean(0), -a * c, atol=0.03, rtol=0)
    torch.testing.assert_close(torch.cov(z.T), torch.eye(2), atol=0.05, rtol=0)


def test_untrained_toy_energy_is_the_untilted_base():
    """The toy energy's output layer starts at zero: the early stop's step-0 candidate is the base."""
    E = latent_tilt.ToyEnergy(32, 8.0)
    assert E(torch.randn(100, 2)).abs().max() == 0


def test_pixel_langevin_is_du_mordatch_on_their_0_1_scale():
    """Du & Mordatch's code, on u = (x + 1) / 2: u <- u + 0.005 w, then u <- clip(u - 10 clip(grad_u E,
    -0.01, 0.01), 0, 1), step by step; grad_u E = 2 grad_x E (a missing factor 2, a flipped sign or
    a clip in the wrong scale fails)."""
    args = latent_tilt.get_args(["--dataset", "fashion", "--preset", "small", "--stage", "pixel"])[0]
    assert (args.pixel_step, args.pixel_noise, args.pixel_grad_clip) == (10.0, 0.005, 0.01)
    c, k = 0.003, torch.linspace(-0.02, 0.02, 16).view(1, 1, 4, 4)
    E = lambda x: (0.5 * c * x ** 2 - k * x).flatten(1).sum(1)  # grad_x E = c x - k
    torch.manual_seed(0)
    x0 = torch.rand(3, 1, 4, 4) * 2 - 1
    x0[:, 0, 3, 3] = 0.99  # u = 0.995, pushed up by 10 * 0.01: the [0, 1] clip must bind
    torch.manual_seed(1)
    u = (x0 + 1) / 2
    for _ in range(2):  # the noise first, then the gradient at the noisy point (their order)
        u = u + 0.005 * torch.randn_like(u)
        grad_u = 2 * (c * (2 * u - 1) - k)
        u = (u - 10 * grad_u.clamp(-0.01, 0.01)).clamp(0, 1)
    expect = 2 * u - 1
    torch.manual_seed(1)
    got = latent_tilt.sample_pixels(E, x0, args, 2)
    assert torch.allclose(got, expect, atol=1e-6)
    assert (expect.abs() == 1).any() and (expect.abs() < 1).any()
    grad_u = 2 * (c * x0 - k)  # both regimes occur: clipped and not
    assert (grad_u.abs() > 0.01).any() and (grad_u.abs() < 0.01).any()


# ---------------------------------------------------------------- the objective (Eq. 5 / 7) and its regulariser

class QuadraticEnergy(nn.Module):
    """E_theta(x) = t1 x + t2 x^2 on scalars x [B]."""

    def __init__(self, t1, t2):
        super().__init__()
        self.theta = nn.Parameter(torch.tensor([t1, t2], dtype=torch.float64))

    def forward(self, x):
        return self.theta[0] * x + self.theta[1] * x ** 2


def test_training_loss_gradient_is_eq7_plus_the_regulariser_by_hand():
    """The training path's loss (ebm_loss, alpha = 0.1 as in Appendix B.2). p(z) = N(0, 1),
    G(z) = a z + b: the tilted model in x is N(m, v) with 1/v = 1/a^2 + 2 t2, m = v (b/a^2 - t1).
    Its model points are equally weighted quantiles of N(m, v). By hand, with Gaussian moments
    M_k: d loss / d theta_k = mean_data phi_k - E_model phi_k + 2 alpha (mean_data[E phi_k] +
    E_model[E phi_k]), phi = (x, x^2); and the alpha-free part equals the gradient of the exact
    NLL, mean_data E + log Z with log Z in closed form (Eq. 5 / 7)."""
    a, b, t1, t2, alpha = 1.5, -0.3, 0.7, 0.2, 0.1
    E = QuadraticEnergy(t1, t2)
    x_data = torch.tensor([-1.0, 0.2, 0.5, 2.0], dtype=torch.float64)
    v = 1 / (1 / a ** 2 + 2 * t2)
    m = v * (b / a ** 2 - t1)
    n = 200001
    q = (torch.arange(1, n + 1, dtype=torch.float64) - 0.5) / n
    x_model = m + math.sqrt(v) * torch.special.ndtri(q)
    loss, e_data, e_model = latent_tilt.ebm_loss(E, x_data, x_model, alpha)
    (grad,) = torch.autograd.grad(loss, E.theta)

    M1, M2, M3, M4 = m, m ** 2 + v, m ** 3 + 3 * m * v, m ** 4 + 6 * m ** 2 * v + 3 * v ** 2
    e = t1 * x_data + t2 * x_data ** 2
    by_hand = torch.tensor([
        x_data.mean() - M1 + 2 * alpha * ((e * x_data).mean() + t1 * M2 + t2 * M3),
        (x_data ** 2).mean() - M2 + 2 * alpha * ((e * x_data ** 2).mean() + t1 * M3 + t2 * M4)], dtype=torch.float64)
    assert torch.allclose(grad, by_hand, atol=1e-5), (grad, by_hand)

    theta = E.theta.detach().clone().requires_grad_(True)  # Eq. 5 / 7: the NLL's gradient
    s2 = a ** 2
    A, B = 1 / s2 + 2 * theta[1], b / s2 - theta[0]
    log_Z = -0.5 * torch.log(s2 * A) + B ** 2 / (2 * A) - b ** 2 / (2 * s2)
    (nll_grad,) = torch.autograd.grad((theta[0] * x_data + theta[1] * x_data ** 2).mean() + log_Z, theta)
    reg = by_hand - torch.tensor([x_data.mean() - M1, (x_data ** 2).mean() - M2], dtype=torch.float64)
    assert torch.allclose(by_hand - reg, nll_grad, atol=1e-10)
    assert nll_grad.abs().min() > 0.05 and reg.abs().min() > 0.05  # both terms matter


def test_regulariser_caps_the_energy_gap_at_one_over_alpha():
    """mle_loss over free energies: stationary (and convex) at E_data = -1/(2 alpha),
    E_model = +1/(2 alpha), so the largest gap the regulariser allows is 1/alpha."""
    for alpha in (0.1, 0.01):
        e = torch.tensor([-1 / (2 * alpha), 1 / (2 * alpha)], dtype=torch.float64, requires_grad=True)
        (grad,) = torch.autograd.grad(latent_tilt.mle_loss(e[:1], e[1:], alpha), e)
        assert torch.allclose(grad, torch.zeros(2, dtype=torch.float64), atol=1e-12)
        moved = torch.tensor([-1 / (2 * alpha) - 0.5, 1 / (2 * alpha) + 0.5], dtype=torch.float64)
        assert latent_tilt.mle_loss(moved[:1], moved[1:], alpha) > latent_tilt.mle_loss(e[:1].detach(), e[1:].detach(), alpha)


def test_keep_best_keeps_a_copy_of_the_best_energy_and_stops_after_patience():
    E = nn.Linear(1, 1)
    track = {"step": 0, "best": None, "best_step": 0, "bad": 0, "stopped": False, "best_E": None}

    def score(step, value, weight):
        with torch.no_grad():
            E.weight.fill_(weight)
        return latent_tilt.keep_best(track, value, step, E, patience=2)
    score(0, 5.0, 1.0)
    score(50, 3.0, 2.0)  # best so far
    score(100, 3.0, 3.0)  # a tie is no improvement
    assert track["bad"] == 1 and not track["stopped"]
    score(150, 2.5, 4.0)  # improves: the count starts again
    assert (track["best_step"], track["bad"]) == (150, 0)
    score(200, 2.6, 5.0)
    assert not track["stopped"]
    score(250, 9.0, 6.0)
    assert track["stopped"] and track["best_step"] == 150 and track["best"] == 2.5
    assert track["best_E"]["weight"].item() == 4.0  # a copy, not the live weights (now 6)
    never = {"step": 0, "best": 1.0, "best_step": 0, "bad": 0, "stopped": False, "best_E": None}
    for step in range(1, 20):
        latent_tilt.keep_best(never, 2.0, step, E, patience=0)
    assert not never["stopped"] and never["bad"] == 19


def test_bf16_autocast_keeps_losses_close_and_langevin_in_fp32():
    """--amp bf16 on this CPU: the EBM and VAE losses within 2% of fp32 (bf16 keeps 8 mantissa
    bits, ~0.4% per operation); a latent Langevin step keeps z in fp32 and within 1e-3."""
    args = latent_tilt.get_args(["--dataset", "fashion", "--preset", "small", "--ngf", "16", "--ch", "8"])[0]
    torch.manual_seed(0)
    G, E = latent_tilt.build_base(args, 1).eval(), latent_tilt.build_energy(args, 1)
    cpu = torch.device("cpu")
    bf16 = lambda: common.autocast("bf16", cpu)
    x = torch.rand(8, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        x_model = G.decode(torch.randn(8, args.nz))
    l32, e32, _ = latent_tilt.ebm_loss(E, x, x_model, 0.1)
    l16, e16, _ = latent_tilt.ebm_loss(E, x, x_model, 0.1, bf16)
    assert e16.dtype == torch.float32 and l16.dtype == torch.float32
    assert abs(l16.item() - l32.item()) < 0.02 * (e32.abs().mean().item() + abs(l32.item()))
    torch.manual_seed(1)
    v32 = G.loss(x)
    torch.manual_seed(1)
    v16 = G.loss(x, bf16)
    assert v16.dtype == torch.float32 and abs(v16.item() - v32.item()) < 0.02 * abs(v32.item())
    z0 = torch.randn(4, args.nz)
    torch.manual_seed(2)
    z32 = latent_tilt.sample_latent(E, G.decode, z0, 1, args.eps)
    torch.manual_seed(2)
    z16 = latent_tilt.sample_latent(E, G.decode, z0, 1, args.eps, amp=bf16)
    assert z16.dtype == torch.float32 and torch.allclose(z16, z32, atol=1e-3)
    assert (z32 - z0).abs().max() > 0.05  # the step moved


def test_energy_net_matches_appendix_b2():
    args = latent_tilt.get_args(["--dataset", "fashion"])[0]
    E = latent_tilt.build_energy(args, 1)
    widths = [blk.conv2.out_channels for blk in E.blocks]
    assert widths == [64, 64, 64, 128, 128, 128]
    assert E.head.in_features == 128 and E.head.out_features == 1
    x = torch.randn(2, 1, 32, 32)
    assert E(x).shape == (2,)


# ---------------------------------------------------------------- arguments and the --stage ebm hard edges

def fake_base_checkpoint(path, dataset, base, **arch):
    """A finished base's checkpoint as --stage base writes it (args only; no weights needed
    to resolve the configuration)."""
    args = latent_tilt.get_args(["--dataset", dataset, "--preset", "small", "--stage", "base", "--base", base,
                                 *[t for k, v in arch.items() for t in ("--" + k.replace("_", "-"), str(v))]])[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"script": "latent_tilt", "args": vars(args), "phase": "base", "step": args.base_steps,
                "base": {}}, path)
    return path


def test_stage_ebm_reads_the_base_before_resolving_its_defaults(tmp_path, capsys):
    ckpt = fake_base_checkpoint(tmp_path / "glow" / "checkpoint.pt", "fashion", "glow", glow_depth=2)
    args, _ = latent_tilt.get_args(["--dataset", "fashion", "--preset", "small", "--stage", "ebm",
                                    "--base-ckpt", str(ckpt)])
    assert args.base == "glow" and args.glow_depth == 2 and args.nz == 100
    assert args.steps == 200 and args.out.endswith("latent_tilt-fashion-glow-ebm")  # GLOW's, not the VAE's
    with pytest.raises(common.UserError, match="holds a glow base, not --base vae"):
        latent_tilt.get_args(["--dataset", "fashion", "--stage", "ebm", "--base", "vae", "--base-ckpt", str(ckpt)])
    # --print-config reports the base the checkpoint describes, touching neither data nor --out
    with pytest.raises(SystemExit) as e, own_signal_handlers():
        latent_tilt.main(["--dataset", "fashion", "--preset", "small", "--stage", "ebm", "--base-ckpt", str(ckpt),
                          "--print-config", "--data-dir", str(tmp_path / "nodata"), "--out", str(tmp_path / "o")])
    assert e.value.code == 0 and not (tmp_path / "o").exists() and not (tmp_path / "nodata").exists()
    cfg = json.loads(capsys.readouterr().out)
    glow = latent_tilt.Glow((1, 28, 28), 2, 2, args.glow_hidden)
    assert cfg["base"] == "glow" and cfg["params"]["base"] == common.param_count(glow)


def test_toy_energy_width_is_its_own_flag(tmp_path):
    """--stage ebm copies --hidden from the base; the energy's width is --e-hidden."""
    ckpt = fake_base_checkpoint(tmp_path / "vae" / "checkpoint.pt", "25gaussians", "vae", hidden=16)
    args, _ = latent_tilt.get_args(["--stage", "ebm", "--base-ckpt", str(ckpt), "--hidden", "64",
                                    "--e-hidden", "96"])
    assert args.hidden == 16 and args.e_hidden == 96
    assert latent_tilt.build_energy(args, 2).net[0].out_features == 96
    assert latent_tilt.build_base(args, 2).enc[0].out_features == 16


def test_checkpoints_and_pictures_are_spaced_by_each_stage_length():
    args = latent_tilt.get_args([])[0]  # the default toy run: 10000 VAE steps, 2000 EBM steps
    assert (args.base_ckpt_every, args.ckpt_every) == (1000, 200)  # 10 pictures each
    args = latent_tilt.get_args(["--base-steps", "50", "--steps", "7", "--ckpt-every", "3"])[0]
    assert (args.base_ckpt_every, args.ckpt_every) == (5, 3)


# ---------------------------------------------------------------- smoke runs (in-process)

CONVENTION_FILES = ["args.json", "log.jsonl", "checkpoint.pt", "metrics.json"]


def check_files(folder, keys):
    for f in CONVENTION_FILES:
        assert (folder / f).exists(), f
    assert list(folder.glob("samples_*.png"))
    metrics = json.loads((folder / "metrics.json").read_text())
    for k in keys:
        assert k in metrics, (k, metrics)


def test_toy_smoke_resume_and_eval_only(tmp_path, capsys):
    flags = ["--base-steps", "3", "--log-every", "1", "--eval-every", "2", "--langevin-steps", "3",
             "--sample-steps", "3", "--hidden", "16", "--e-hidden", "16", "--stop-samples", "50", "--batch-size", "32",
             "--ckpt-every", "2", "--base-ckpt-every", "3", "--eval-samples", "300"]
    run("--steps", "4", "--out", str(tmp_path / "full"), *flags)
    run("--steps", "2", "--out", str(tmp_path / "half"), *flags)
    run("--steps", "4", "--out", str(tmp_path / "half"), "--resume", *flags)
    rows = lambda f: [r for r in map(json.loads, (tmp_path / f / "log.jsonl").read_text().splitlines()) if "loss" in r]
    full, half = rows("full"), rows("half")
    assert [r["step"] for r in half] == [1, 2, 3, 4]
    assert [r["loss"] for r in full] == [r["loss"] for r in half]
    assert all(r["langevin_grad"] > 0 and 0 <= r["accept"] <= 1 for r in full)  # toys: MALA chains
    keys = ["base_hq_frac", "ebm_hq_frac", "base_modes", "ebm_modes", "base_mmd", "ebm_mmd"]
    check_files(tmp_path / "full", keys)
    assert (tmp_path / "full" / "tilt.png").exists()
    capsys.readouterr()
    run("--out", str(tmp_path / "full"), "--eval-only", *flags)
    with np.load(tmp_path / "full" / "samples.npz") as f:
        assert f["x"].shape == (300, 2) and f["z"].shape == (300, 2)
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("metrics: ")  # refusals: test_cli.py


TINY_IMG = ["--dataset", "fashion", "--preset", "small", "--base-steps", "2", "--steps", "2", "--log-every", "1",
            "--ngf", "8", "--ch", "4", "--num-blocks", "1", "--langevin-steps", "2", "--sample-steps", "2",
            "--batch-size", "4", "--base-batch-size", "8", "--fid-samples", "0", "--eval-every", "0",
            "--glow-depth", "1", "--glow-hidden", "8", "--flow-hidden", "16"]


@pytest.fixture(scope="module")
def fake_fashion(tmp_path_factory):
    return str(write_fake(tmp_path_factory.mktemp("data"), "fashion", n_train=32, n_test=16))


@pytest.mark.parametrize("base", ["vae", pytest.param("glow", marks=pytest.mark.slow),
                                  pytest.param("glf", marks=pytest.mark.slow)])
def test_image_bases_then_ebm_stage(tmp_path, base, fake_fashion):
    img = [*TINY_IMG, "--data-dir", fake_fashion]
    run("--stage", "base", "--base", base, "--out", str(tmp_path / "b"), *img)
    check_files(tmp_path / "b", ["base_bpd"] if base == "glow" else ["mse_recon"])
    run("--stage", "ebm", "--base-ckpt", str(tmp_path / "b" / "checkpoint.pt"), "--out", str(tmp_path / "e"), *img)
    check_files(tmp_path / "e", ["ebm_steps"])
    for f in ["tilt.png", "langevin_traj.png", "samples_000002.png"]:
        assert (tmp_path / "e" / f).exists(), f
    run("--stage", "ebm", "--base", base, "--out", str(tmp_path / "e"), "--eval-only", *img)
    assert (tmp_path / "e" / "samples.npz").exists()


@pytest.mark.slow
def test_pixel_ebm_saves_and_resumes_buffer(tmp_path, fake_fashion):
    flags = ["--stage", "pixel", "--buffer-size", "16", *TINY_IMG, "--data-dir", fake_fashion]
    run("--out", str(tmp_path / "p"), *flags)
    state = torch.load(tmp_path / "p" / "checkpoint.pt", weights_only=True)
    assert state["buffer"].shape == (16, 1, 32, 32)
    run("--out", str(tmp_path / "p"), "--resume", *flags, "--steps", "3")
    state2 = torch.load(tmp_path / "p" / "checkpoint.pt", weights_only=True)
    assert state2["step"] == 3
    check_files(tmp_path / "p", [])
    log = [json.loads(r) for r in (tmp_path / "p" / "log.jsonl").read_text().splitlines()]
    assert all(r["langevin_grad"] > 0 and "accept" not in r for r in log if "loss" in r)  # unadjusted chains


def _two_ranks(rank, path, port):
    """One of 2 gloo ranks: the replay buffer and the early-stop score across ranks."""
    import os
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        n = 7  # shares 4 + 3
        mine = torch.full((common.rank_share(n), 2), float(rank)) + torch.arange(common.rank_share(n))[:, None]
        full = common.gather_rows(mine)
        if rank == 0:
            torch.save(full, path)
        torch.distributed.barrier()
        restored = latent_tilt.buffer_share(torch.load(path, weights_only=True))
        assert torch.equal(restored, mine), (rank, restored, mine)
        score = latent_tilt.share_from_main(10.0 + rank if rank == 0 else None, torch.device("cpu"))
        assert score == 10.0
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # two processes
def test_buffer_is_saved_from_every_rank_and_each_resumes_its_own(tmp_path):
    import random
    torch.multiprocessing.spawn(_two_ranks, args=(str(tmp_path / "buffer.pt"), random.randint(20000, 40000)),
                                nprocs=2)


@pytest.mark.slow  # ~75 s; the sign of Eq. 5 / 7 and the latent sampler have fast tests above
def test_short_toy_run_raises_hq_frac(tmp_path):
    """Section 5.1 / Figure 5.1 in miniature, with the toy defaults (MALA chains, batch 512): a
    2000-step VAE on 25 Gaussians (hq_frac ~0.06, bridges of spurious mass) tilted by 300 EBM
    steps gains a large share of samples within 4 std of a mode (it gives 0.28), moves closer
    to the data in MMD, and the chains' samples agree with exact draws of the learned tilt. A
    wrong sign in Eq. 5 / 7 or a broken latent sampler fails this."""
    run("--base-steps", "2000", "--steps", "300", "--eval-every", "0", "--out", str(tmp_path / "t"))
    m = json.loads((tmp_path / "t" / "metrics.json").read_text())
    assert m["ebm_hq_frac"] > 3 * m["base_hq_frac"] and m["ebm_mmd"] < m["base_mmd"], m
    assert abs(m["ebm_hq_frac"] - m["ebm_hq_frac_exact"]) < 0.05, m
    assert m["ebm_modes"] >= m["base_modes"] and m["ebm_best_step"] == 300


def test_dcgan_nets_shapes():
    for size in (32, 64):
        x = latent_tilt.dcgan_generator(10, 3, 16, size)(torch.randn(2, 10))
        assert x.shape == (2, 3, size, size) and x.abs().max() <= 1
        assert latent_tilt.dcgan_encoder(7, 3, 16, size)(x).shape == (2, 7)


def test_replay_buffer_write_back_gives_each_slot_one_whole_chain_the_last_that_drew_it():
    buffer = torch.zeros(6, 1, 2, 2)
    idx = torch.tensor([4, 1, 4, 0, 1, 4])
    x = torch.arange(1.0, 7.0)[:, None, None, None].expand(6, 1, 2, 2)  # chain k is the constant image k + 1
    latent_tilt.write_back(buffer, idx, x)
    assert buffer.flatten(1).tolist() == [[4.0] * 4, [5.0] * 4, [0.0] * 4, [0.0] * 4, [6.0] * 4, [0.0] * 4]

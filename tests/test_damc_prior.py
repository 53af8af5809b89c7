"""Tests of damc_prior.py: each piece against an independent answer, plus in-process smoke runs."""
import argparse
import json
import math
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
import damc_prior  # noqa: E402
from fakedata import write_fake  # noqa: E402


class LinearEnergy(nn.Module):
    """E(z) = a . z, shape [B, 1]: the prior exp(-a . z) N(z; 0, I) / Z is exactly N(-a, I)."""

    def __init__(self, a):
        super().__init__()
        self.a = nn.Parameter(torch.as_tensor(a, dtype=torch.float32))

    def forward(self, z):
        return (z @ self.a)[:, None]


A = [0.8, -0.5]


def small_args(*extra, **over):
    argv = ["--dataset", "fashion", "--nz", "4", "--ngf", "4", "--ndf", "4", "--nxemb", "16", "--q-width", "16",
            "--q-steps", "3", "--post-steps", "2", "--prior-steps", "2", "--q-updates", "2", "--p-mask", "0.5",
            *extra]
    for k, v in over.items():
        argv += ["--" + k.replace("_", "-"), str(v)]
    return damc_prior.get_args(argv)


# ---------------------------------------------------------------- Langevin chains and the exact grid

def test_posterior_chain_matches_exact_gaussian_posterior():
    # g(z) = W z, E(z) = a . z: p(z | x) = N(S (W^T x / sigma^2 - a), S), S = (I + W^T W / sigma^2)^-1
    torch.manual_seed(0)
    W = torch.tensor([[1.0, 0.5], [-0.3, 0.8], [0.6, -0.4]])
    sigma, a = 1.0, torch.tensor(A)
    g = nn.Linear(2, 3, bias=False)
    g.weight.data.copy_(W)
    x = torch.tensor([1.5, -0.5, 0.7])
    S = torch.linalg.inv(torch.eye(2) + W.T @ W / sigma ** 2)
    mean = S @ (W.T @ x / sigma ** 2 - a)
    n = 2000
    z = damc_prior.sample_posterior(torch.full((n, 2), 3.0), x.expand(n, 3), g, LinearEnergy(A), sigma,
                                    n_steps=600, s=0.15)
    assert torch.allclose(z.mean(0), mean, atol=0.05), (z.mean(0), mean)
    assert torch.allclose(torch.cov(z.T), S, atol=0.05), (torch.cov(z.T), S)


def test_prior_chain_reaches_the_closed_form_prior_of_a_linear_energy():
    # exp(-a . z) N(0, I) = N(-a, I): a flipped sign of E in log p_alpha would give N(+a, I)
    torch.manual_seed(1)
    z = damc_prior.sample_prior(torch.full((4000, 2), 3.0), LinearEnergy(A), n_steps=800, s=0.15)
    assert torch.allclose(z.mean(0), -torch.tensor(A), atol=0.06), z.mean(0)
    assert torch.allclose(torch.cov(z.T), torch.eye(2), atol=0.08)


def test_mala_prior_chain_is_exact_at_a_step_where_plain_langevin_is_biased():
    # N(-a, I) again, at s = 1.2: unadjusted Langevin's stationary variance is 1 / (1 - s^2 / 4) = 1.56
    # per axis; --prior-mala's Metropolis correction keeps the prior's variance 1 and mean -a
    torch.manual_seed(2)
    start = torch.full((4000, 2), 3.0)
    ula = damc_prior.sample_prior(start, LinearEnergy(A), n_steps=300, s=1.2)
    mala = damc_prior.sample_prior(start, LinearEnergy(A), n_steps=300, s=1.2, mala=True)
    assert torch.allclose(ula.var(0), torch.full((2,), 1 / (1 - 1.2 ** 2 / 4)), atol=0.12), ula.var(0)
    assert torch.allclose(mala.mean(0), -torch.tensor(A), atol=0.06), mala.mean(0)
    assert torch.allclose(torch.cov(mala.T), torch.eye(2), atol=0.1), torch.cov(mala.T)


def test_exact_grid_reaches_the_prior_and_posterior_of_a_linear_energy():
    # g = identity, E = a . z: prior N(-a, I); posterior N((x - sigma^2 a) / (1 + sigma^2), sigma^2 / (1 + sigma^2) I)
    torch.manual_seed(0)
    g = nn.Linear(2, 2, bias=False)
    g.weight.data.copy_(torch.eye(2))
    sigma, a = 0.5, torch.tensor(A)
    grid, log_pz, gz, h = info = damc_prior.exact_posterior_grid(g, LinearEnergy(A), lim=6.0, n=200)
    prior_mean = (torch.softmax(log_pz.double(), 0)[:, None] * grid.double()).sum(0)
    assert torch.allclose(prior_mean.float(), -a, atol=0.01), prior_mean
    x = torch.tensor([1.0, -0.5])
    z = damc_prior.exact_posterior_sample(x, info, sigma, 20000)
    assert torch.allclose(z.mean(0), (x - sigma ** 2 * a) / (1 + sigma ** 2), atol=0.02), z.mean(0)
    assert torch.allclose(z.var(0), torch.full((2,), sigma ** 2 / (1 + sigma ** 2)), atol=0.01)


def test_grid_log_px_is_the_closed_form_marginal_of_a_linear_gaussian():
    # g = identity, prior N(-a, I): p(x) = N(x; -a, (1 + sigma^2) I); a dropped normaliser of the
    # likelihood or of the prior's mass would shift every value
    g = nn.Linear(2, 2, bias=False)
    g.weight.data.copy_(torch.eye(2))
    sigma, a = 0.25, torch.tensor(A)
    grid, log_pz, gz, h = damc_prior.exact_posterior_grid(g, LinearEnergy(A), lim=6.0, n=300)
    x = torch.tensor([[0.0, 0.0], [1.0, -0.5], [-2.0, 1.5]])
    got = damc_prior.grid_log_px(x, torch.log_softmax(log_pz, 0), gz, sigma)
    var = 1 + sigma ** 2
    want = -((x + a) ** 2).sum(1) / (2 * var) - math.log(2 * math.pi * var)
    assert torch.allclose(got, want, atol=1e-3), (got, want)


class GridEnergy(nn.Module):
    """E(z) = -log m(cell of z) - ||z||^2 / 2 for a log mass m on the grid of exact_posterior_grid
    (lim 4, n 300): then exp(-E(z)) N(z; 0, I) is m, up to the constant the metric must ignore."""

    def __init__(self, log_mass, shift=0.0, lim=4.0, n=300):
        super().__init__()
        self.log_mass, self.shift, self.lim, self.n = log_mass, shift, lim, n
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, z):
        i, j = ((z + self.lim) / (2 * self.lim / self.n)).floor().long().clamp(0, self.n - 1).unbind(1)
        return (-self.log_mass[i * self.n + j] - 0.5 * (z ** 2).sum(1) + self.shift)[:, None]


@pytest.fixture(scope="module")
def pinwheel_truth():
    args = damc_prior.get_args([])
    g = damc_prior.toy_generator()
    info = damc_prior.exact_posterior_grid(g, LinearEnergy([0.0, 0.0]))
    true_log_mass = damc_prior.true_grid_log_mass(args, info)
    x = damc_prior.toy_batch(args, g, 200, "cpu", torch.Generator().manual_seed(2))[0]
    z = damc_prior.toy_latent(args, 200, torch.Generator().manual_seed(3))
    return args, g, true_log_mass, x, z, damc_prior.reference_log_px(info, true_log_mass, x, args.sigma)


def test_true_pinwheel_mass_matches_a_histogram_of_its_samples(pinwheel_truth):
    args, _, true_log_mass, _, _, _ = pinwheel_truth
    z = damc_prior.toy_latent(args, 400000, torch.Generator().manual_seed(0))
    cell = ((z + 4) / (8 / 300)).floor().long()
    cell = cell[((cell >= 0) & (cell < 300)).all(1)]  # 4e-4 of the mass lies outside [-4, 4]^2
    hist = torch.zeros(300, 300).index_put_((cell[:, 0], cell[:, 1]), torch.ones(len(cell)), accumulate=True)
    # compared on 30 x 30 blocks of 10 x 10 cells: Monte-Carlo error about 1e-3 per block
    blocks = lambda m: m.reshape(30, 10, 30, 10).sum((1, 3))
    quad = blocks(true_log_mass.exp().reshape(300, 300).double())
    assert abs(quad.sum().item() - 1) < 1e-6
    assert (blocks(hist.double()) / len(z) - quad).abs().max() < 3e-3


def test_log_px_gap_is_zero_at_the_true_prior_and_negative_for_standard_normal(pinwheel_truth):
    args, g, true_log_mass, x, z, reference = pinwheel_truth
    for shift in (0.0, 3.0):  # the energy's additive constant must not matter (normalised on the grid)
        info = damc_prior.exact_posterior_grid(g, GridEnergy(true_log_mass, shift))
        fit, draws = damc_prior.prior_fit_eval(info, reference, x, z, args.sigma)
        assert abs(fit["log_px_gap"]) < 1e-5, fit  # a flipped sign of E in log p_alpha gives a large gap
        assert fit["prior_mmd"] < 0.02 and draws.shape == z.shape
    # E = 0: the learned prior is N(0, I), so its gap is log_px_gap_gaussian, about -0.75 nats
    fit, _ = damc_prior.prior_fit_eval(damc_prior.exact_posterior_grid(g, LinearEnergy([0.0, 0.0])), reference,
                                       x, z, args.sigma)
    assert fit["log_px_gap"] == pytest.approx(fit["log_px_gap_gaussian"], abs=1e-5)
    assert -1.2 < fit["log_px_gap_gaussian"] < -0.4 and fit["prior_mmd"] > 0.05


# ---------------------------------------------------------------- the sampler q

def test_cosine_logsnr_schedule_hits_its_clip_values():
    lam = damc_prior.logsnr_schedule(torch.tensor([0.0, 0.5, 1.0]), -5.1, 9.8)
    assert abs(lam[0].item() - 9.8) < 1e-4 and abs(lam[2].item() + 5.1) < 1e-4
    # between the clips it is the cosine schedule -2 log tan(pi t / 2) mapped onto [t0, t1]
    t0 = 2 / math.pi * math.atan(math.exp(-9.8 / 2))
    t1 = 2 / math.pi * math.atan(math.exp(5.1 / 2))
    expected = -2 * math.log(math.tan(math.pi / 2 * (t0 + 0.5 * (t1 - t0))))
    assert abs(lam[1].item() - expected) < 1e-4
    t = torch.linspace(0, 1, 101)
    assert (damc_prior.logsnr_schedule(t).diff() < 0).all()


class OracleEps(nn.Module):
    """The exact noise prediction for data z0 ~ N(m, s^2 I) under the VP forward process
    z = alpha z0 + sigma eps (alpha^2 = sigmoid(lambda), sigma^2 = sigmoid(-lambda)):
    E[eps | z] = sigma (z - alpha m) / (alpha^2 s^2 + sigma^2)."""

    def __init__(self, m, s):
        super().__init__()
        self.m, self.s = m, s

    def forward(self, z, logsnr, c):
        a2, s2 = torch.sigmoid(logsnr)[:, None], torch.sigmoid(-logsnr)[:, None]
        return s2.sqrt() * (z - a2.sqrt() * self.m) / (a2 * self.s ** 2 + s2)


M, SD = torch.tensor([1.5, -0.7]), 0.5


def oracle_q():
    q = damc_prior.DiffusionSampler(2, nn.Identity(), nxemb=4, width=4)
    q.eps_net = OracleEps(M, SD)
    return q


def test_q_sampler_on_the_oracle_epsilon_of_a_gaussian_gives_that_gaussian():
    torch.manual_seed(0)
    z = damc_prior.q_sample(oracle_q(), n=4000, n_steps=100)
    assert torch.allclose(z.mean(0), M, atol=0.04), z.mean(0)
    assert torch.allclose(z.std(0), torch.full((2,), SD), rtol=0.05), z.std(0)


def test_q_loss_at_the_oracle_is_its_closed_form():
    # at the exact E[eps | z_lambda] the loss 0.5 E||eps - eps_hat||^2 is 0.5 nz E_t[Var(eps | z_lambda)],
    # Var = alpha^2 s^2 / (alpha^2 s^2 + sigma^2) per coordinate, t ~ U(0, 1) (midpoint quadrature)
    torch.manual_seed(0)
    loss = damc_prior.q_loss(oracle_q(), None, M + SD * torch.randn(50000, 2)).item()
    t = (torch.arange(20000, dtype=torch.float64) + 0.5) / 20000
    lam = damc_prior.logsnr_schedule(t, -5.1, 9.8)
    a2, s2 = torch.sigmoid(lam), torch.sigmoid(-lam)
    expected = (0.5 * 2 * a2 * SD ** 2 / (a2 * SD ** 2 + s2)).mean().item()
    assert loss == pytest.approx(expected, rel=0.03)


# ---------------------------------------------------------------- the DAMC iteration

def _snapshot(model):
    return {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in model.items()}


def test_one_damc_iteration_changes_q_g_E_and_nothing_else():
    torch.manual_seed(0)
    args = small_args()
    model = damc_prior.build_model(args)
    opts = damc_prior.build_optimizers(model, args)
    x = torch.rand(8, 1, 32, 32) * 2 - 1
    x0 = x.clone()
    before = _snapshot(model)
    damc_prior.damc_iteration(x, model, opts, args, step=0)
    after = _snapshot(model)
    last_bias = f"{len(model['E']) - 1}.bias"  # E's constant: its gradient 1 - 1 = 0 in mean E(z+) - mean E(z-)
    for name in ("q", "g", "E"):  # every other parameter tensor moved
        for k in before[name]:
            same = torch.equal(before[name][k], after[name][k])
            assert same == (name == "E" and k == last_bias), (name, k)
    for k in before["q_slow"]:  # the slow copy waits for its update step
        assert torch.equal(before["q_slow"][k], after["q_slow"][k]), k
    assert torch.equal(x, x0)
    # the update step of the slow copy: (step + 1) % slow_every == 0 moves it by slow_rate towards q
    damc_prior.damc_iteration(x, model, opts, args, step=args.slow_every - 1)
    for k, v in model["q_slow"].state_dict().items():
        expected = (1 - args.slow_rate) * before["q_slow"][k] + args.slow_rate * model["q"].state_dict()[k]
        assert torch.allclose(v, expected, atol=1e-6), k


def _record(monkeypatch, name, log):
    original = getattr(damc_prior, name)

    def wrapper(z0, *a, **kw):
        out = original(z0, *a, **kw)
        log.append((z0.clone(), (out[0] if isinstance(out, tuple) else out).clone()))
        return out
    monkeypatch.setattr(damc_prior, name, wrapper)


@pytest.mark.parametrize("sampler", ["damc", "langevin"])
def test_chains_start_from_the_slow_copy_or_from_standard_normal(monkeypatch, sampler):
    torch.manual_seed(0)
    args = small_args(sampler=sampler)
    model = damc_prior.build_model(args)
    with torch.no_grad():  # q moves away from its slow copy: the chains must follow the copy
        for p in model["q"].parameters():
            p.add_(0.5 * torch.randn_like(p))
    opts = damc_prior.build_optimizers(model, args)
    x = torch.rand(8, 1, 32, 32) * 2 - 1
    posterior, prior = [], []
    _record(monkeypatch, "sample_posterior", posterior)
    _record(monkeypatch, "sample_prior", prior)
    torch.manual_seed(1)
    damc_prior.damc_iteration(x, model, opts, args, step=0)
    torch.manual_seed(1)  # the same draws, taken by hand
    if sampler == "damc":
        expected = damc_prior.q_sample(model["q_slow"], x=x, n_steps=args.q_steps)
        torch.manual_seed(1)
        assert not torch.allclose(damc_prior.q_sample(model["q"], x=x, n_steps=args.q_steps), expected)
    else:
        expected = torch.randn(8, args.nz)
    assert torch.equal(posterior[0][0], expected)
    # prior chains: DAMC [z0, N(0, I)] (2B, authors); LEBM B fresh N(0, I) chains (Pang et al.)
    z_neg0 = prior[0][0]
    assert len(z_neg0) == (16 if sampler == "damc" else 8)
    if sampler == "damc":
        assert torch.equal(z_neg0[:8], expected)


def test_one_E_step_lowers_the_energy_gap_of_its_samples(monkeypatch):
    # delta_alpha descends mean E(z+) - mean E(z-): after the step the posterior samples' energy is lower
    # relative to the prior samples' (a flipped sign of the E loss raises it)
    torch.manual_seed(0)
    args = small_args(e_lr=1e-2)
    model = damc_prior.build_model(args)
    opts = damc_prior.build_optimizers(model, args)
    posterior, prior = [], []
    _record(monkeypatch, "sample_posterior", posterior)
    _record(monkeypatch, "sample_prior", prior)
    E0 = common.make_ema(model["E"])
    stats = damc_prior.damc_iteration(torch.rand(8, 1, 32, 32) * 2 - 1, model, opts, args, step=0)
    z_pos, z_neg = posterior[0][1], prior[0][1]

    def gap(E):
        with torch.no_grad():
            return (damc_prior.energy(E, z_pos).mean() - damc_prior.energy(E, z_neg).mean()).item()
    assert stats["loss_e"].item() == pytest.approx(gap(E0), abs=1e-5)
    assert gap(model["E"]) < gap(E0) - 1e-4, (gap(E0), gap(model["E"]))


def test_toy_iteration_keeps_the_true_generator_fixed():
    torch.manual_seed(0)
    args = damc_prior.get_args(["--q-steps", "3", "--post-steps", "2", "--prior-steps", "2", "--q-width", "16"])
    model = damc_prior.build_model(args)
    opts = damc_prior.build_optimizers(model, args)
    assert set(opts) == {"q", "E"}
    before = _snapshot(model)
    x, _ = damc_prior.toy_batch(args, model["g"], 16, "cpu")
    damc_prior.damc_iteration(x, model, opts, args, step=0)
    after = _snapshot(model)
    assert all(torch.equal(before["g"][k], after["g"][k]) for k in before["g"])
    assert not all(torch.equal(before["E"][k], after["E"][k]) for k in before["E"])


def test_lr_decay_schedule():
    args = small_args()
    model = damc_prior.build_model(args)
    opts = damc_prior.build_optimizers(model, args)
    damc_prior.set_learning_rates(opts, args, 2500)
    assert opts["g"].param_groups[0]["lr"] == pytest.approx(2e-4 * 0.99 ** 2)
    damc_prior.set_learning_rates(opts, args, 10 ** 6)
    assert opts["E"].param_groups[0]["lr"] == pytest.approx(1e-5)


def test_toy_defaults_mala_prior_chains_and_a_faster_energy():
    toy = damc_prior.get_args([])
    assert (toy.prior_mala, toy.e_lr) == (True, 1e-3)
    assert (small_args().prior_mala, small_args().e_lr) == (False, 1e-4)  # images: the paper's
    assert damc_prior.get_args(["--no-prior-mala", "--e-lr", "1e-4"]).prior_mala is False


def test_langevin_sampler_resolves_to_pang_et_al_and_explicit_flags_win():
    args = small_args(sampler="langevin")
    assert (args.sigma, args.post_steps, args.e_lr, args.g_lr, args.grad_clip, args.lr_decay) == \
        (0.3, 2, 2e-5, 1e-4, 0.0, 0.998)  # --post-steps 2 was given
    assert args.lr_decay_every == math.ceil(60000 / 64)  # one epoch of Fashion-MNIST
    assert args.q_updates == 2 and small_args(sampler="langevin", sigma=0.2).sigma == 0.2
    paper = damc_prior.get_args(["--dataset", "svhn", "--sampler", "langevin"])
    assert (paper.batch_size, paper.lr_decay_every, paper.eval_prior_steps) == (100, 733, 60)


# ---------------------------------------------------------------- mixed precision (--amp bf16)

def test_bf16_losses_within_tolerance_of_fp32_and_langevin_stays_fp32():
    # bf16 keeps 8 significant bits (relative rounding 2^-9 = 0.2% per operation): through the
    # networks the losses stay within 2% of fp32; the Langevin state and log-densities are fp32
    torch.manual_seed(0)
    args = small_args()
    model = damc_prior.build_model(args)
    g, E, q = model["g"], model["E"], model["q"]
    x, z = torch.rand(8, 1, 32, 32) * 2 - 1, torch.randn(8, args.nz)
    with common.autocast("bf16", torch.device("cpu")):
        assert g(z).dtype == torch.bfloat16  # autocast is really on
    out = {}
    for amp in ("none", "bf16"):
        torch.manual_seed(1)
        lq = damc_prior.q_loss(q, x, z, 0.5, amp)
        recon = ((x - damc_prior.generate_x(g, z, amp)) ** 2).flatten(1).sum(1).mean()
        lj = damc_prior.log_joint(z, x, g, E, args.sigma, amp)
        torch.manual_seed(2)
        z1 = damc_prior.sample_posterior(z, x, g, E, args.sigma, 1, args.post_step_size, amp=amp)
        torch.manual_seed(3)
        zq = damc_prior.q_sample(q, x=x, n_steps=3, amp=amp)
        out[amp] = (lq, recon, lj, z1, zq)
        assert all(t.dtype == torch.float32 for t in out[amp])
    for k in range(3):
        assert not torch.equal(out["none"][k], out["bf16"][k])
        assert torch.allclose(out["bf16"][k], out["none"][k], rtol=0.02, atol=1e-3), k
    assert torch.allclose(out["bf16"][3], out["none"][3], atol=1e-2)  # one step: z + s^2/2 grad + s w
    # q's 3-step sampler divides eps_hat by alpha_1 = 0.08 at its first step: 5% of its norm
    assert (out["bf16"][4] - out["none"][4]).norm() < 0.05 * out["none"][4].norm()


def test_bf16_iteration_keeps_fp32_parameters():
    torch.manual_seed(0)
    args = small_args("--amp", "bf16")
    model = damc_prior.build_model(args)
    opts = damc_prior.build_optimizers(model, args)
    stats = damc_prior.damc_iteration(torch.rand(8, 1, 32, 32) * 2 - 1, model, opts, args, step=0)
    assert all(math.isfinite(v.item()) and v.dtype == torch.float32 for v in stats.values())
    assert all(p.dtype == torch.float32 for m in model.values() for p in m.parameters())


# ---------------------------------------------------------------- evaluation

def test_reconstruction_mse_matches_a_hand_computation():
    torch.manual_seed(0)
    W = torch.randn(6, 2)
    g = nn.Linear(2, 6, bias=False)
    g.weight.data.copy_(W)
    x = torch.randn(5, 6)
    z0 = torch.randn(5, 2)
    sigma, s, a = 0.5, 0.3, torch.tensor(A)
    # 0 steps: mean over pixels of (W z0 - x)^2, per image
    by_hand = ((z0 @ W.T - x) ** 2).mean(1)
    assert torch.allclose(damc_prior.recon_mse(x, z0, g, LinearEnergy(A), sigma, 0, s), by_hand, atol=1e-6)
    # 1 noise-free step: z1 = z0 + s^2/2 (W^T (x - W z0) / sigma^2 - a - z0)
    z1 = z0 + s ** 2 / 2 * ((x - z0 @ W.T) @ W / sigma ** 2 - a - z0)
    by_hand = ((z1 @ W.T - x) ** 2).mean(1)
    assert torch.allclose(damc_prior.recon_mse(x, z0, g, LinearEnergy(A), sigma, 1, s), by_hand, atol=1e-5)


# ---------------------------------------------------------------- runs (in-process)

TINY_TOY = ["--steps", "4", "--batch-size", "16", "--q-width", "8", "--nxemb", "8", "--q-steps", "3",
            "--post-steps", "2", "--prior-steps", "2", "--eval-prior-steps", "2", "--eval-x", "3", "--eval-z", "8",
            "--eval-every", "2", "--eval-prior-x", "8", "--log-every", "1", "--slow-every", "1",
            "--lr-decay-every", "1"]


def run(argv, capsys):
    damc_prior.main([str(a) for a in argv])
    return capsys.readouterr().out


def losses(path):
    # training losses only: the posterior and prior distances are evaluated on a schedule of the run's own length
    return [{k: v for k, v in json.loads(line).items() if k not in ("seconds", "samples_per_s")
             and not k.startswith(("post_dist", "log_px_gap", "prior_mmd"))} for line in open(path)]


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """One uninterrupted 4-step toy run, shared by the smoke, resume and refusal tests."""
    out = tmp_path_factory.mktemp("toy") / "run"
    damc_prior.main([*TINY_TOY, "--out", str(out)])
    return out


def test_toy_smoke_files_and_eval_only(toy_run, capsys):
    out = toy_run
    for f in ("args.json", "log.jsonl", "checkpoint.pt", "metrics.json", "samples_2.png", "samples_4.png"):
        assert (out / f).exists(), f
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"post_dist_damc", "post_dist_langevin", "mmd", "log_px_gap", "log_px_gap_gaussian",
            "prior_mmd"} <= set(metrics)
    assert all(math.isfinite(v) for v in metrics.values())
    rows = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and "post_dist_damc" in rows[1]
    # (a fresh run into the same folder is refused, naming --resume: tests/test_cli.py)
    last = run([*TINY_TOY, "--out", out, "--eval-only"], capsys).strip().splitlines()[-1]
    assert last.startswith("metrics:") and "post_dist_damc" in last and "post_dist_langevin" in last
    with np.load(out / "samples.npz") as f:
        assert f["x"].shape[1] == 2 and f["z"].shape[1] == 2 and len(f["z_post_damc"]) == 3 * 8


def test_resume_reproduces_an_uninterrupted_run(toy_run, tmp_path, capsys):
    a = toy_run
    run([*TINY_TOY, "--out", tmp_path / "b", "--steps", "2"], capsys)
    run([*TINY_TOY, "--out", tmp_path / "b", "--resume"], capsys)
    assert losses(a / "log.jsonl") == losses(tmp_path / "b" / "log.jsonl")
    ca = torch.load(a / "checkpoint.pt", weights_only=True)
    cb = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    # every model and optimiser state (lr schedule included) and the RNG end up identical
    for key in ("g", "E", "q", "q_slow", "opt_q", "opt_E", "rng"):
        flat_a, flat_b = torch.utils._pytree.tree_flatten(ca[key])[0], torch.utils._pytree.tree_flatten(cb[key])[0]
        assert len(flat_a) == len(flat_b) and all(
            torch.equal(u, v) if torch.is_tensor(u) else u == v for u, v in zip(flat_a, flat_b)), key
    assert ca["opt_q"]["param_groups"][0]["lr"] == pytest.approx(1e-3 * 0.99 ** 3)


@pytest.mark.parametrize("flag", [["--sampler", "langevin"], ["--sigma", "0.3"], ["--q-width", "16"],
                                  ["--post-steps", "5"], ["--p-mask", "0.3"]])
def test_resume_refuses_a_different_model_or_objective(toy_run, flag):
    for mode in ("--resume", "--eval-only"):
        with pytest.raises(common.UserError, match=f"trained with {flag[0]} ") as e:
            damc_prior.main([*TINY_TOY, "--out", str(toy_run), mode, *flag])
        assert "\n" not in str(e.value)


def test_bad_flag_gives_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        common.main_guard(lambda: damc_prior.main(["--post-step-size", "-1", "--out", str(tmp_path / "x")]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.strip().count("\n") == 0 and "--post-step-size" in err
    assert not (tmp_path / "x").exists()


TINY_IMAGE = ["--dataset", "fashion", "--steps", "2", "--batch-size", "8", "--nz", "4", "--ngf", "4", "--ndf", "4",
              "--nxemb", "16", "--q-width", "16", "--q-steps", "3", "--post-steps", "2", "--prior-steps", "2",
              "--eval-prior-steps", "2", "--recon-steps", "2", "--recon-images", "20", "--log-every", "1"]


@pytest.mark.parametrize("sampler", ["damc", "langevin"])
def test_image_smoke_without_fid(tmp_path, capsys, sampler):
    data = write_fake(tmp_path / "data", "fashion", n_train=32, n_test=24)
    out = tmp_path / "run"
    argv = [*TINY_IMAGE, "--sampler", sampler, "--fid-samples", "0", "--data-dir", data, "--out", out]
    assert run(argv, capsys).strip().splitlines()[-1].startswith("metrics: mse_recon=")
    for f in ("args.json", "log.jsonl", "checkpoint.pt", "metrics.json", "samples_2.png"):
        assert (out / f).exists(), f
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 < metrics["mse_recon"] < 4
    assert ("mse_recon_start" in metrics) == (sampler == "damc")  # q's draw alone: DAMC only
    if sampler == "damc":  # with no refining step, mse_recon scores the very draw mse_recon_start scores
        assert metrics["mse_recon"] != metrics["mse_recon_start"]  # 2 refining steps move z
        run([*argv, "--eval-only", "--recon-steps", "0"], capsys)
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["mse_recon"] == pytest.approx(metrics["mse_recon_start"], rel=1e-6)
    if sampler == "langevin":  # q is not trained: no q rows, no fid_q / x_q
        assert json.loads((out / "log.jsonl").read_text().splitlines()[-1])["loss_q"] == 0
        return
    run([*argv, "--eval-only"], capsys)
    with np.load(out / "samples.npz") as f:
        assert f["x"].shape[1:] == (1, 32, 32) and f["z"].shape[1] == 4 and f["z_q"].shape[1] == 4
        assert np.abs(f["x"]).max() <= 1


def test_a_reconstruction_takes_its_samplers_own_number_of_steps():
    # DAMC: q(x) then --recon-steps (authors); the LEBM baseline: --post-steps from N(0, I), in the metric
    # and in the picture alike.
    args = argparse.Namespace(sampler="damc", recon_steps=10, post_steps=20)
    assert damc_prior.recon_steps(args) == 10
    args.sampler = "langevin"
    assert damc_prior.recon_steps(args) == 20

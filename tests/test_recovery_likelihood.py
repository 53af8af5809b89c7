"""Tests of recovery_likelihood.py: each piece against an independent answer, plus smoke runs."""
import argparse
import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import recovery_likelihood as rl  # noqa: E402

SCRIPT = str(ROOT / "recovery_likelihood.py")


def test_schedule_matches_notes_T6():
    sch = rl.diffusion_schedule(6)
    sigma = [0.01, 0.324, 0.516, 0.632, 0.713, 0.773, 0.9997]  # NOTES.md section 1
    sigmabar = [0.01, 0.324, 0.586, 0.778, 0.898, 0.960, 1.0]
    assert np.allclose(sch["sigma"].numpy(), sigma, atol=1e-3)
    assert np.allclose(sch["sigmabar"].numpy(), sigmabar, atol=1e-3)
    # the definitions tie the arrays together
    assert torch.allclose(sch["sigma"] ** 2 + sch["a"] ** 2, torch.ones(7, dtype=torch.float64))
    assert torch.allclose(sch["abar"], torch.cumprod(sch["a"], 0))


def test_schedule_T1000_is_one_ddpm_step_per_level():
    sch = rl.diffusion_schedule(1000)
    betas = np.linspace(1e-4, 0.02, 1000)
    assert len(sch["a"]) == 1001
    assert np.allclose(sch["sigma"][:1000].numpy() ** 2, betas)  # one DDPM beta per level
    assert sch["sigmabar"][-1].item() == pytest.approx(1.0)
    assert (sch["sigmabar"][1:] > sch["sigmabar"][:-1]).all()


def test_step_size_rule():
    sch = rl.make_schedule(6, 2e-4, 0.3)
    base = rl.diffusion_schedule(6)
    t = torch.arange(6)
    expect = (base["sigmabar"][t] / base["sigmabar"][0] * 2e-4 * base["sigma"][t + 1] ** 2).sqrt()
    assert torch.allclose(sch["s"].double(), expect, rtol=1e-5)  # cap inactive at the paper's b^2
    capped = rl.make_schedule(6, 3e-2, 0.3)
    assert (capped["s"] <= 0.3 * capped["sigma"][1:] + 1e-7).all()
    assert capped["a_prev"][6] == 1 and capped["recovery"][6] == 0
    floored = rl.make_schedule(6, 2e-4, 0.3, step_floor=0.3)  # --net resnet's floor: 0.3 sigma_{t+1} above level 0
    assert floored["s"][0] == sch["s"][0] and torch.allclose(floored["s"][1:], 0.3 * floored["sigma"][2:])


def test_q_sample_pairs_top_level_starts_nearly_at_noise():
    """(R1) at every level, the top included: x_{t+1} = a_{t+1} x_t + sigma_{t+1} e', with the forward
    a_T = prod_{i=501..999} sqrt(1 - beta_i) ~ 0.023 at T = 6 (DDPM's betas, NOTES.md), so the top
    chains start nearly at N(0, I); a_prev = 1 scales the top level's y only."""
    sch = rl.make_schedule(6, 2e-4, 0.3)
    x, t = torch.rand(6, 3, 4, 4) * 2 - 1, torch.arange(6)
    torch.manual_seed(0)
    x_t, x_next = rl.q_sample_pairs(x, t, sch)
    torch.manual_seed(0)
    e, e2 = torch.randn_like(x), torch.randn_like(x)
    col = lambda v: v[t].reshape(-1, 1, 1, 1).double()  # noqa: E731
    torch.testing.assert_close(x_t.double(), col(sch["abar"]) * x + col(sch["sigmabar"]) * e, rtol=1e-5, atol=1e-6)
    a_T = np.sqrt(np.prod(1 - np.linspace(1e-4, 0.02, 1000)[501:]))
    a = torch.tensor([math.sqrt(1 - sch["sigma"][k].item() ** 2) for k in range(1, 6)] + [a_T]).double()
    expect = col(a) * x_t.double() + col(sch["sigma"][1:]) * e2
    torch.testing.assert_close(x_next.double(), expect, rtol=1e-4, atol=1e-4)
    assert a_T == pytest.approx(0.0228, abs=2e-4) and sch["a_prev"][6] == 1


def test_loss_gradient_is_the_exact_recovery_likelihood_gradient(monkeypatch):
    """(R4) against a closed form. Data N(0, v I) in D dimensions and the Gaussian family
    f(y, t) = -s_t^2 theta_t ||y||^2 / 2 (level t of y: N(0, I / theta_t)). The recovery likelihood
    log p(y+ | x_{t+1}) = -theta ||y+||^2 / 2 - ||y+ - x_{t+1}||^2 / (2 sigma^2) - log Z(x_{t+1}) has
    d/dtheta = -||y+||^2 / 2 + E[||y-||^2] / 2, y- ~ p(. | x_{t+1}) = N(c x_{t+1} / sigma^2, c I),
    c = 1 / (theta + 1 / sigma^2) (top level: N(0, I / theta)); over the data its mean is
    g_t = (D / 2) [c^2 (V + sigma^2) / sigma^4 + c - V] (top: (D / 2) (1 / theta - V)), V =
    a_{t+1}^2 (abar_t^2 v + sigmabar_t^2) the variance of y+. With exact conditional draws in place of
    Langevin, the loss's gradient must be -(n_t / B) (sigma_1 / sigma_{t+1}) s_t^2 g_t: descent on L is
    ascent on the recovery likelihood, weighted as the authors' code weights it, in units of the raw f."""
    torch.manual_seed(0)
    T, D, B, v = 6, 16, 60000, 0.5
    sch = rl.make_schedule(T, 2e-4, 0.3)
    sd = {k: sch[k].double() for k in ("a_prev", "abar", "sigmabar", "sigma", "s")}
    V = sd["a_prev"][1:] ** 2 * (sd["abar"][:T] ** 2 * v + sd["sigmabar"][:T] ** 2)
    theta = torch.nn.Parameter((0.5 / V).float())  # a model twice as wide as the data: a clear gradient

    def f(y, t):
        return -sch["s"][t] ** 2 * theta[t] * (y ** 2).sum(1) / 2

    def exact_sample(f, start, x_next, t, sch, n_steps, noise_scale, trace=False):
        th, sig2, rec = theta.detach()[t, None], sch["sigma"][t + 1, None] ** 2, sch["recovery"][t + 1, None]
        c = 1 / (th + rec / sig2)
        return c * rec * x_next / sig2 + c.sqrt() * torch.randn_like(x_next), {"grad_norm": torch.zeros(1, len(t))}
    monkeypatch.setattr(rl, "recovery_sample", exact_sample)
    loss, diag = rl.training_step(f, math.sqrt(v) * torch.randn(B, D), sch, 30)
    loss.backward()
    th, sig2 = theta.detach().double(), sd["sigma"][1:] ** 2
    c = 1 / (th + 1 / sig2)
    g = D / 2 * (c ** 2 * (V + sig2) / sig2 ** 2 + c - V)
    g[T - 1] = D / 2 * (1 / th[T - 1] - V[T - 1])
    weight = sd["sigma"][1] / sd["sigma"][1:]
    X = ((diag["f_pos"] - diag["f_neg"]).double() / (sd["s"][diag["t"]] ** 2 * th[diag["t"]]))  # per example
    for level in range(T):
        mine = diag["t"] == level
        n_t = int(mine.sum())
        expect = -(n_t / B) * weight[level] * sd["s"][level] ** 2 * g[level]
        se = (n_t ** 0.5 / B) * weight[level] * sd["s"][level] ** 2 * X[mine].std()
        assert abs(expect) > 10 * se  # the test can tell the sign
        assert theta.grad[level].item() == pytest.approx(expect.item(), abs=4 * se.item()), level


@pytest.mark.parametrize("level", [0, 2, 5])
def test_recovery_sampler_draws_exact_gaussian_conditional(level):
    """Data N(mu, v I): every marginal is Gaussian, so with the exact f plugged in the recovery
    chain must reach p(y_t | x_{t+1}) = N(m, c), where unadjusted Langevin with step s has the
    stationary variance c / (1 - s^2 / (4 c)) exactly (AR(1) recursion)."""
    torch.manual_seed(0)
    T, sch = 6, rl.make_schedule(6, 3e-2, 0.3)
    mu, v = torch.tensor([0.5, -1.0]), 0.3 ** 2
    a_y = sch["a_prev"][level + 1]
    m_y = a_y * sch["abar"][level] * mu
    v_y = a_y ** 2 * (sch["abar"][level] ** 2 * v + sch["sigmabar"][level] ** 2)
    s2 = sch["s"][level] ** 2

    def f(y, t):  # exact level energy, times s_t^2 because the sampler divides by it
        return s2 * (-((y - m_y) ** 2).sum(1) / (2 * v_y))

    n = 20000
    t = torch.full((n,), level)
    x_next = torch.tensor([1.0, 0.2]).expand(n, 2)
    if level == T - 1:  # top level: the marginal itself
        m, c = m_y.expand(n, 2), v_y
        start = torch.randn(n, 2)
    else:
        sig2 = sch["sigma"][level + 1] ** 2
        c = 1 / (1 / v_y + 1 / sig2)
        m = c * (m_y / v_y + x_next / sig2)
        start = x_next
    y = rl.recovery_sample(f, start, x_next, t, sch, 300, 1.0)
    c_ula = c / (1 - s2 / (4 * c))
    assert torch.allclose(y.mean(0), m[0], atol=4 * math.sqrt(c_ula / n))
    assert y.var(0).numpy() == pytest.approx([c_ula.item()] * 2, rel=0.03)  # SE of a variance: 1%


@pytest.mark.parametrize("step_floor,k", [(0.0, 30), (0.3, 30), (0.42, 15)])
def test_chains_reach_the_gaussian_conditional(step_floor, k):
    """Exact draws y_t ~ p(y_t | x_{t+1}) lie at E||y_t - x_{t+1}||^2 = D sigma_{t+1}^2 (as the
    data's y+ do). With data N(0, v I) and the exact f plugged in, the K-step chain from x_{t+1}
    is a linear AR(1) recursion y <- alpha y + beta x_{t+1} + s e, alpha = 1 - s^2 P / 2 (P the
    conditional precision), beta = s^2 / (2 sigma^2), so y_K - x_{t+1} = c x_{t+1} + noise with
    c = alpha^K - 1 + beta (1 - alpha^K) / (1 - alpha) and noise variance s^2 (1 - alpha^2K) / (1 - alpha^2).
    The sampler must match that closed form. At the paper's steps (b^2 = 2e-4) 30 steps cover
    less than half of sigma^2 at levels 1-4, so a learned f must make up the rest; with the
    --net resnet's floor s_t = 0.3 sigma_{t+1} they cover more than 90%, and so do the 15 steps of --net unet
    at its floor and cap of 0.42 sigma_{t+1}."""
    torch.manual_seed(0)
    sch, v, n, d = rl.make_schedule(6, 2e-4, max(0.3, step_floor), step_floor=step_floor), 0.3, 4000, 16
    for level in range(1, 5):
        a, sig2, s2 = sch["a_prev"][level + 1], sch["sigma"][level + 1] ** 2, sch["s"][level] ** 2
        v_y = a ** 2 * (sch["abar"][level] ** 2 * v + sch["sigmabar"][level] ** 2)  # level-t marginal of y

        def f(y, t):  # exact level energy, times s_t^2 because the sampler divides by it
            return s2 * (-(y ** 2).sum(1) / (2 * v_y))
        x_next = (v_y + sig2).sqrt() * torch.randn(n, d)
        y = rl.recovery_sample(f, x_next, x_next, torch.full((n,), level), sch, k, 1.0)
        reach = (((y - x_next) ** 2).mean() / sig2).item()
        alpha, beta = 1 - s2.double() * (1 / v_y.double() + 1 / sig2.double()) / 2, s2.double() / (2 * sig2.double())
        c = alpha ** k - 1 + beta * (1 - alpha ** k) / (1 - alpha)
        exact = ((c ** 2 * (v_y + sig2) + s2 * (1 - alpha ** (2 * k)) / (1 - alpha ** 2)) / sig2).item()
        assert reach == pytest.approx(exact, rel=0.03)  # MC standard error ~0.5%
        if step_floor == 0:
            assert exact < 0.5  # the paper's steps: under half the way
        else:
            assert exact > 0.9


def test_drift_cap():
    """A steep linear energy moves each chain exactly cap * sigma_{t+1} * sqrt(D) per step (noise
    off); a gentle one (drift below the cap) gives the same chain bit for bit as no cap."""
    torch.manual_seed(0)
    capped, free = rl.make_schedule(6, 2e-4, 0.3, drift_cap=0.1), rl.make_schedule(6, 2e-4, 0.3)
    for level in (0, 5):
        t = torch.full((4,), level)
        start, x_next = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
        steep = lambda y, t: 1e3 * y.flatten(1).sum(1)  # noqa: E731
        y = rl.recovery_sample(steep, start, start if level == 5 else x_next, t, capped, 10, 0.0)
        expect = 10 * 0.1 * capped["sigma"][level + 1].item() * 8  # sqrt(D) = 8
        assert (y - start).flatten(1).norm(dim=1).numpy() == pytest.approx([expect] * 4, rel=1e-4)
        gentle = lambda y, t: 1e-6 * y.flatten(1).sum(1)  # noqa: E731
        torch.manual_seed(1)
        a = rl.recovery_sample(gentle, start, x_next, t, capped, 10, 1.0)
        torch.manual_seed(1)
        b = rl.recovery_sample(gentle, start, x_next, t, free, 10, 1.0)
        assert torch.equal(a, b)


def test_true_density_of_x0():
    x = common.toy_sample("8gaussians", 500)
    assert torch.allclose(rl.true_log_prob_x0("8gaussians", x, 0.0), common.toy_log_prob("8gaussians", x))
    # convolution with N(0, 0.05^2): closed form against a Monte Carlo average of the clean density
    g = torch.Generator().manual_seed(0)
    mc = torch.stack([common.toy_log_prob("8gaussians", x - 0.05 * torch.randn(x.shape, generator=g))
                      for _ in range(4000)])
    mc = torch.logsumexp(mc, 0) - math.log(4000)
    diff = rl.true_log_prob_x0("8gaussians", x, 0.05) - mc  # MC error per point ~0.01
    assert diff.abs().max() < 0.06 and abs(diff.mean()) < 0.005


def test_mode_weight_split_recovers_known_weights():
    """Plug in an 8-Gaussian mixture with unequal weights as the level-0 model."""
    sch = rl.make_schedule(6, 3e-2, 0.3)
    means, std = common.toy_modes("8gaussians")
    w = torch.tensor([0.3, 0.05, 0.1, 0.1, 0.15, 0.1, 0.1, 0.1], dtype=torch.float64)
    a1, s2 = sch["a_prev"][1], sch["s"][0] ** 2

    def f(y, t):
        x = (y / a1).double()
        lp = torch.logsumexp(-torch.cdist(x, means.double()) ** 2 / (2 * std ** 2) + w.log(), 1)
        return (s2 * lp).float()

    masses, kl = rl.mode_weight_split(f, sch, "8gaussians", 4.0, 400)
    assert np.allclose(masses, w.numpy(), atol=1e-4)
    assert kl == pytest.approx(float((1 / 8 * torch.log(1 / 8 / w)).sum()), abs=1e-4)


@pytest.fixture(scope="module")
def trained_toy():
    """A small model trained in-process for 150 steps; mmd of its samples before and after."""
    torch.manual_seed(0)
    args = rl.get_args(["--out", "unused", "--steps", "150"])
    sch = rl.make_schedule(args.T, args.b_square, args.step_cap)
    model = rl.make_model(args, 2)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    data = common.toy_sample("8gaussians", 1000)

    def mmd():
        x = rl.progressive_sample(model, 1000, (2,), sch, args.n_steps, 0.99, "cpu")
        return common.mmd_rbf(x, data)
    before = mmd()
    for step in range(150):
        for group in opt.param_groups:
            group["lr"] = rl.learning_rate(args, step)
        loss, _ = rl.training_step(model, common.toy_sample("8gaussians", 128), sch, args.n_steps)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, sch, before, mmd()


def test_training_lowers_mmd(trained_toy):
    _, _, before, after = trained_toy
    assert after < 0.3 * before, (before, after)


def test_ais_log_z_matches_quadrature(trained_toy):
    """AIS is consistent, so it must agree with quadrature up to its Monte Carlo error; the
    tolerance is 5 delta-method standard errors, floored at the 0.15 nats the issue asks for
    (the delta method underestimates the spread when the weights are heavy-tailed)."""
    model, sch, _, _ = trained_toy
    torch.manual_seed(1)
    log_z, se, ess = rl.ais_log_z(model, 1000, (2,), sch, 50, "cpu")
    exact = rl.log_z_grid(lambda p: rl.log_g(model, p, 0, sch), lim=4.0, n=400)
    assert abs(log_z - exact) < max(0.15, 5 * se), (log_z, exact, se, ess)


def test_ais_exact_for_gaussian_levels():
    """Levels that are exact Gaussians N(0, c_t I) with known normalisers: AIS must return
    log Z_0 = log (2 pi c_0) for f = s_t^2 * (-|y|^2 / (2 c_t)) up to the y -> x scaling."""
    torch.manual_seed(0)
    sch = rl.make_schedule(6, 3e-2, 0.3)
    c = torch.tensor([0.2, 0.3, 0.5, 0.7, 0.9, 1.0])

    def f(y, t):
        return sch["s"][t] ** 2 * (-(y ** 2).sum(1) / (2 * c[t]))
    log_z, se, _ = rl.ais_log_z(f, 2000, (2,), sch, 20, "cpu")
    # g_0(x) = exp(-|a_1 x|^2 / (2 c_0)): Z = 2 pi c_0 / a_1^2
    exact = math.log(2 * math.pi * c[0] / sch["a_prev"][1] ** 2)
    assert log_z == pytest.approx(exact, abs=max(0.03, 4 * se))


def test_ais_rejected_non_finite_proposals_leave_the_chain_finite(monkeypatch):
    """AIS's MALA step is a select: proposals that are inf or NaN (here the proposal noise of 10 of the
    2000 particles is inf / NaN at every step) are rejected and never enter the chain, so log Z stays
    finite and right for exact Gaussian levels (as below). A blend a * new + (1 - a) * old would turn
    those particles into NaN (0 * inf) and log Z with them."""
    torch.manual_seed(0)
    sch = rl.make_schedule(6, 3e-2, 0.3)
    c = torch.tensor([0.2, 0.3, 0.5, 0.7, 0.9, 1.0])
    randn_like = torch.randn_like

    def poisoned(x, **kw):
        e = randn_like(x, **kw)
        e[:5], e[5:10] = float("inf"), float("nan")
        return e
    monkeypatch.setattr(torch, "randn_like", poisoned)
    log_z, se, _ = rl.ais_log_z(lambda y, t: sch["s"][t] ** 2 * (-(y ** 2).sum(1) / (2 * c[t])), 2000, (2,), sch,
                                20, "cpu")
    assert math.isfinite(log_z) and math.isfinite(se)
    assert log_z == pytest.approx(math.log(2 * math.pi * c[0] / sch["a_prev"][1] ** 2), abs=max(0.03, 4 * se))


def test_bits_per_dim_bounds_a_known_discrete_entropy():
    """(R7) on data whose NLL is known: every pixel an independent Gaussian of std 20 on the 0..255
    scale rounded to an integer, whose entropy H is a sum over the 256 levels. The level-0 model, the
    normalised Gaussian N(0, abar_0^2 s^2 + sigmabar_0^2) per dimension (s^2 the data's variance in
    [-1, 1] units; log Z_0 = 0), has the bound 0.5 log2(2 pi e (abar_0^2 s^2 + sigmabar_0^2)) +
    log2(127.5 / abar_0) per dimension in closed form, which lies above H by less than 0.005 bits.
    bits_per_dim must return it; the entropy of the noise in place of the lattice term would land 2.4
    bits below H, an impossible 'bound'."""
    torch.manual_seed(0)
    sch = rl.make_schedule(6, 2e-4, 0.3)
    k = torch.arange(256, dtype=torch.float64)
    P = torch.special.ndtr((k + 0.5 - 127.5) / 20) - torch.special.ndtr((k - 0.5 - 127.5) / 20)
    P = P / P.sum()
    H = -(P * P.log2()).sum().item()
    s2 = ((P * (k - 127.5) ** 2).sum() / 127.5 ** 2).item()
    abar0, sigmabar0, a1 = sch["abar"][0].item(), sch["sigmabar"][0].item(), sch["a_prev"][1]
    var = abar0 ** 2 * s2 + sigmabar0 ** 2
    bound = 0.5 * math.log2(2 * math.pi * math.e * var) + math.log2(127.5 / abar0)
    assert 0 < bound - H < 0.005
    pixels = torch.multinomial(P.float(), 4000 * 1024, replacement=True).reshape(4000, 1, 32, 32)
    x = pixels.float() / 127.5 - 1

    def f(y, t):  # s_0^2 log N(y / a_1; 0, var I): level 0's g_0 is that normalised density
        x0 = y / a1
        return sch["s"][t] ** 2 * (-(x0 ** 2).flatten(1).sum(1) / (2 * var) - 0.5 * 1024 * math.log(2 * math.pi * var))
    bpd = rl.bits_per_dim(f, x, sch, 0.0, batch=1000)
    se = bpd.std().item() / math.sqrt(len(bpd))
    assert bpd.mean().item() == pytest.approx(bound, abs=4 * se) and bpd.mean().item() > H
    assert se < 1e-3


@pytest.mark.parametrize("net", ["resnet", "unet"])
def test_amp_bf16_loss_within_tolerance_and_fp32_chains(net):
    """--amp bf16 autocasts the network's forward pass only: on the same draws the training loss is
    within 2% of the energies' scale (mean |f(y+)|) of the fp32 loss (bf16 keeps 8 bits of mantissa,
    ~0.4% per operation), the network really ran in bf16, and the Langevin state, the loss and the
    log-densities stay fp32."""
    torch.manual_seed(0)
    args = rl.get_args(["--dataset", "fashion", "--net", net, "--ch", "8", "--ch-mult", "1,2"])
    model = rl.make_model(args, 1).eval()  # eval: spectral norm's power iteration frozen, the same f both times
    sch = rl.make_schedule(args.T, args.b_square, args.step_cap, drift_cap=args.drift_cap, step_floor=args.step_floor)
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    dtypes = []
    conv.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    x, f16 = torch.rand(8, 1, 32, 32) * 2 - 1, rl.with_amp(model, "bf16", "cpu")
    torch.manual_seed(1)
    loss32, d32 = rl.training_step(model, x, sch, 3)
    assert set(dtypes) == {torch.float32}
    torch.manual_seed(1)
    loss16, d16 = rl.training_step(f16, x, sch, 3)
    assert torch.bfloat16 in dtypes and loss16.dtype == torch.float32
    assert abs(loss16.item() - loss32.item()) < 0.02 * d32["f_pos"].abs().mean().item()
    loss16.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    y, info = rl.recovery_sample(f16, x, x, torch.full((8,), 2), sch, 2, 1.0, trace=True)
    assert y.dtype == torch.float32 and info["log_p"].dtype == torch.float32


def test_draw_samples_shares_the_work_and_gathers_equally_often(monkeypatch):
    """Under torchrun each rank draws its share of n (common.rank_share) and every rank calls the
    collective gather_rows equally often, also when the shares need different numbers of chunks (2
    ranks, n = 201, chunks of 100: rank 0 draws 100 + 1, rank 1 100 + 0)."""
    calls = {0: [], 1: []}
    for rank in (0, 1):
        monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
        monkeypatch.setattr(common, "rank_share", lambda n, r=rank: n // 2 + (r < n % 2))
        monkeypatch.setattr(common, "is_main", lambda r=rank: r == 0)
        monkeypatch.setattr(common, "gather_rows", lambda x, r=rank: calls[r].append(len(x)) or (x if r == 0 else None))
        monkeypatch.setattr(rl, "progressive_sample", lambda f, k, shape, *a: torch.zeros(k, *shape))
        args = argparse.Namespace(n_steps=1, sample_noise=1.0)
        x = rl.draw_samples(None, 201, (2,), None, args, "cpu", chunk=100)
        assert (x is None) == (rank == 1)
    assert calls == {0: [100, 1], 1: [100, 0]}


def test_mlp_level_table_equals_per_example_vectors():
    """EnergyMLP gathers its level vectors from a table of all T levels when T <= B (no host sync) and
    computes them per example otherwise: the same function either way."""
    torch.manual_seed(0)
    net = rl.EnergyMLP(16, 3, 4.0, n_levels=6)
    y, t = torch.randn(10, 2), torch.randint(6, (10,))
    torch.testing.assert_close(net(y, t), torch.cat([net(y[i:i + 3], t[i:i + 3]) for i in range(0, 10, 3)]))


def test_resnet_energy_shapes_and_gradient():
    torch.manual_seed(0)
    args = rl.get_args(["--dataset", "fashion", "--net", "resnet", "--ch", "8", "--ch-mult", "1,2"])
    net = rl.make_model(args, 1)
    sch = rl.make_schedule(6, 2e-4, 0.3)
    loss, diag = rl.training_step(net, torch.rand(4, 1, 32, 32) * 2 - 1, sch, 2)
    loss.backward()
    assert torch.isfinite(loss) and diag["f_pos"].shape == (4,)
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


def test_resnet_energy_is_piecewise_linear():
    """With leaky-ReLU (authors' code) f is piecewise linear in y: its Hessian is 0 almost
    everywhere (double backprop gives a zero Hessian-vector product), and grad f is piecewise
    constant."""
    torch.manual_seed(0)
    net = rl.make_model(rl.get_args(["--dataset", "fashion", "--net", "resnet", "--ch", "8", "--ch-mult", "1,2"]), 1)
    net.eval()  # freeze the spectral-norm power iteration: f must be the same function at y and y + h v
    net.double()
    y, v = torch.randn(2, 1, 32, 32, dtype=torch.float64), torch.randn(2, 1, 32, 32, dtype=torch.float64)
    t = torch.tensor([0, 3])
    y.requires_grad_(True)
    grad = torch.autograd.grad(net(y, t).sum(), y, create_graph=True)[0]
    hvp = torch.autograd.grad((grad * v).sum(), y, allow_unused=True)[0]
    assert hvp is None or hvp.abs().max() == 0


@pytest.mark.parametrize("level", [2, 5])
def test_unet_energy_with_zero_u_is_the_noise_gaussian(level):
    """--net unet: f / s_t^2 = -||y - U||^2 / (2 v_t). With U's output layer zeroed (U = 0) level t
    is N(0, v_t I), v_t = (a_{t+1} sigmabar_t)^2 from NOTES.md's sigma and sigmabar (a = 1 at the
    top), so the recovery chain must reach the closed-form Gaussian conditional (or, at the top,
    N(0, v_5 I)) with unadjusted Langevin's variance c / (1 - s^2 / (4 c)), as above."""
    torch.manual_seed(0)
    args = rl.get_args(["--dataset", "fashion", "--ch", "8", "--ch-mult", "1,2"])
    assert (args.net, args.n_steps, args.drift_cap) == ("unet", 15, 0.0)
    net = rl.make_model(args, 1)
    torch.nn.init.zeros_(net.unet.out[-1].weight), torch.nn.init.zeros_(net.unet.out[-1].bias)
    sigma = [0.01, 0.324, 0.516, 0.632, 0.713, 0.773, 0.9997]  # NOTES.md, T = 6
    sigmabar = [0.01, 0.324, 0.586, 0.778, 0.898, 0.960]
    a = 1.0 if level == 5 else math.sqrt(1 - sigma[level + 1] ** 2)
    v = (a * sigmabar[level]) ** 2
    sch = rl.make_schedule(6, args.b_square, args.step_cap, step_floor=args.step_floor)
    n, t = 16, torch.full((16,), level)
    x_next = torch.full((n, 1, 32, 32), 0.5)
    y = torch.randn(n, 1, 32, 32)
    s2 = sch["s"][level] ** 2
    log_p = net(y, t) / s2
    assert torch.allclose(log_p, -(y ** 2).flatten(1).sum(1) / (2 * v), rtol=3e-3)  # v from NOTES to 3 digits
    with torch.no_grad():
        if level == 5:
            m, c, start = 0.0, v, torch.randn(n, 1, 32, 32)
        else:
            sig2 = sch["sigma"][level + 1] ** 2
            c = 1 / (1 / v + 1 / sig2)
            m, start = c * 0.5 / sig2, x_next
        for p in net.parameters():
            p.requires_grad_(False)
        y = rl.recovery_sample(net, start, x_next, t, sch, 60, 1.0)  # mixed: >= 0.18 of the variance per step
    c_ula = c / (1 - s2 / (4 * c))
    assert y.mean().item() == pytest.approx(float(m), abs=4 * math.sqrt(c_ula / y.numel()))
    assert y.var().item() == pytest.approx(float(c_ula), rel=0.05)  # 16384 draws: SE of the variance ~1.1%


def run(capsys, *argv, check=True):
    """rl.main(argv) in-process, as `python recovery_likelihood.py ARGV` runs it (common.main_guard);
    returns (exit code, stdout, stderr)."""
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    code = 0
    try:
        common.main_guard(lambda: rl.main(list(argv)))
    except SystemExit as e:
        code = e.code
    finally:
        signal.signal(signal.SIGINT, handlers[0]), signal.signal(signal.SIGTERM, handlers[1])
    captured = capsys.readouterr()
    if check:
        assert code == 0, captured.err[-2000:]
    return code, captured.out, captured.err


TINY = ["--log-every", "1", "--ckpt-every", "2", "--eval-samples", "200", "--test-points", "200",
        "--ais-particles", "50", "--ais-steps", "5", "--batch-size", "64", "--n-steps", "5",
        "--lr-decay", "none"]  # a cosine schedule depends on --steps, which the 2 + 2 resume changes


def losses(path):
    return [json.loads(line)["loss"] for line in open(path / "log.jsonl")]


def test_smoke_files_resume_and_eval_only(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CI", "1")
    full, part = tmp_path / "full", tmp_path / "part"
    _, stdout, _ = run(capsys, "--steps", "4", "--out", str(full), *TINY)
    assert stdout.strip().splitlines()[-1].startswith("metrics:")
    for name in ("args.json", "log.jsonl", "checkpoint.pt", "samples_4.png", "metrics.json"):
        assert (full / name).exists(), name
    metrics = json.loads((full / "metrics.json").read_text())
    for key in ("mmd", "nll", "nll_exact", "nll_true", "kl_mode_weights", "hq_frac", "modes"):
        assert key in metrics
    log = [json.loads(line) for line in open(full / "log.jsonl")]
    assert {"e_data_t0", "e_sample_t5", "langevin_grad_t3"} <= set(log[0])
    run(capsys, "--steps", "2", "--out", str(part), *TINY)
    # a flag that changes the objective's negatives (the chain length) must match the checkpoint's
    code, _, err = run(capsys, "--steps", "4", "--out", str(part), "--resume", *TINY, "--n-steps", "6", check=False)
    assert code == 2 and "trained with --n-steps 5, not 6" in err and len(err.strip().splitlines()) == 1
    run(capsys, "--steps", "4", "--out", str(part), "--resume", *TINY)
    assert losses(part) == losses(full)
    run(capsys, "--out", str(full), "--eval-only", "--long-run", "2", *TINY)
    assert np.load(full / "samples.npz")["x"].shape == (200, 2)
    assert (full / "long_run.png").exists() and (full / "long_run_energy.png").exists()
    energies = json.loads((full / "long_run.json").read_text())  # K * 2 = 10 steps at each of the 6 levels
    assert sorted(energies) == [f"level{t}" for t in range(6)] and all(len(e) == 10 for e in energies.values())
    metrics = json.loads((full / "metrics.json").read_text())  # the long-run samples scored like the short-run
    assert {"mmd_long_run", "hq_frac_long_run", "modes_long_run"} <= set(metrics)
    assert abs(metrics["mmd_long_run"] - metrics["mmd"]) < 0.5 and 0 <= metrics["hq_frac_long_run"] <= 1


FASHION = ["--dataset", "fashion"]


@pytest.mark.parametrize("argv,expect", [
    (FASHION, dict(net="unet", ch=16, n_steps=15, step_floor=0.42, step_cap=0.42, drift_cap=0.0, batch_size=64,
                   b_square=2e-4, lr=5e-4, lr_decay="cosine", ema=0.999)),
    (FASHION + ["--net", "resnet"], dict(net="resnet", ch=32, n_steps=30, step_floor=0.3, step_cap=0.3,
                                         drift_cap=0.1)),
    (["--dataset", "cifar10"],  # the default preset for a data set the paper reports: the authors' configuration
     dict(preset="paper", net="resnet", ch=128, ch_mult="1,2,2,2", num_blocks=8, n_steps=30, b_square=2e-4,
          step_floor=0.0, drift_cap=0.0, lr=1e-4, lr_decay="none", warmup=1000, batch_size=256, beta1=0.9, ema=0.999,
          fid_samples=50000, fid_split="train", sample_noise=0.99)),
    (["--dataset", "cifar10", "--preset", "small"], dict(net="unet", ch=16, batch_size=64, fid_split="test")),
    (["--dataset", "celeba", "--preset", "paper"], dict(net="resnet", ch_mult="1,2,2,2,4", num_blocks=6,
                                                        batch_size=128, beta1=0.5, step_floor=0.0)),
    (["--dataset", "lsun_bedroom", "--preset", "paper"], dict(ch_mult="1,2,2,2,4,4", num_blocks=5, batch_size=64)),
    (["--net", "resnet"], dict(net="mlp", batch_size=256, b_square=3e-2, step_cap=0.3, step_floor=0.0,
                               drift_cap=0.0, n_steps=30, ema=0.995)),  # toys: the MLP whatever --net says
])
def test_resolved_defaults(argv, expect):
    args = rl.get_args(argv)
    assert {k: getattr(args, k) for k in expect} == expect


def test_step_floor_above_the_cap_is_refused():
    with pytest.raises(common.UserError, match="--step-floor 0.5 is above --step-cap 0.42.*lower --step-floor or raise --step-cap"):
        rl.get_args(FASHION + ["--step-floor", "0.5"])
    assert rl.get_args(FASHION + ["--step-floor", "0.5", "--step-cap", "0.5"]).step_floor == 0.5


def test_long_run_stages_end_at_each_level_chain_end():
    """--long-run: `stages` snapshots per level at steps round(k K / stages), the last one the
    chain's end, for any K (here 15, which 4 does not divide)."""
    torch.manual_seed(0)
    sch = rl.make_schedule(6, 3e-2, 0.3)
    f = lambda y, t: -(y ** 2).sum(1)
    snaps, energies = rl.long_run(f, 5, (2,), sch, 15, 1.0, "cpu", stages=4)
    assert len(snaps) == 6 * 4 and all(len(e) == 15 for e in energies.values())
    torch.manual_seed(0)
    x0 = rl.progressive_sample(f, 5, (2,), sch, 15, 1.0, "cpu")  # the same chain, same noise
    torch.testing.assert_close(snaps[-1], x0)


def test_torchrun_two_processes(tmp_path, capsys):
    """Data-parallel training under torchrun (gloo on CPU): it trains, checkpoints both ranks'
    random streams (which differ: each rank draws its own levels and noise) and evaluates; the
    checkpoint then resumes in one process (fewer ranks than wrote it)."""
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", SCRIPT,
                        "--steps", "2", "--out", "d", *TINY], cwd=tmp_path, capture_output=True, text=True,
                       env={**env, "CI": "1", "OMP_NUM_THREADS": "1"}, timeout=300)
    # torch's rare gloo teardown abort after a finished run is not ours (as in test_common)
    teardown = (tmp_path / "d" / "metrics.json").exists() and "terminate called without an active exception" in r.stderr
    assert r.returncode == 0 or teardown, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1].startswith("metrics: ")
    state = torch.load(tmp_path / "d" / "checkpoint.pt", weights_only=True)
    ranks = state["rng"]["ranks"]
    assert state["step"] == 2 and len(ranks) == 2 and not torch.equal(ranks[0]["torch"], ranks[1]["torch"])
    assert "mmd" in json.loads((tmp_path / "d" / "metrics.json").read_text())
    run(capsys, "--steps", "3", "--out", str(tmp_path / "d"), "--resume", *TINY)
    assert torch.load(tmp_path / "d" / "checkpoint.pt", weights_only=True)["step"] == 3


@pytest.mark.parametrize("argv,words", [(["--b-square", "-1"], "--b-square"), (["--drift-cap", "-1"], "--drift-cap"),
                                        (["--dataset", "cifar10", "--data-dir", "nowhere"], "cifar")])
def test_one_line_errors(tmp_path, capsys, monkeypatch, argv, words):
    monkeypatch.chdir(tmp_path)  # --data-dir nowhere: relative to here

    def offline(*a, **k):
        raise OSError("network is unreachable")
    monkeypatch.setattr(common.urllib.request, "urlopen", offline)
    code, _, err = run(capsys, "--steps", "1", "--out", str(tmp_path / "run"), *argv, check=False)
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(not Path(common.FASHION_SYSTEM_DIR).exists(),
                    reason="Fashion-MNIST not installed (apt dataset-fashion-mnist)")
def test_fashion_smoke(tmp_path, capsys):
    """The image default (--net unet) end to end, logged at every step: a fresh network's large
    |loss| in the warm-up must not be taken for a runaway."""
    _, stdout, _ = run(capsys, "--dataset", "fashion", "--steps", "2", "--ch", "8", "--ch-mult", "1,2",
                       "--out", str(tmp_path / "f"), "--fid-samples", "0", "--log-every", "1", "--test-points", "20",
                       "--ais-particles", "4", "--ais-steps", "2", "--n-steps", "3")
    # with 4 AIS particles in 1024 dimensions the ESS is ~1: bpd is withheld, not printed as a number
    assert "ais_ess=" in stdout and "bpd not reported" in stdout
    assert "bpd=" not in stdout and "log_z=" not in stdout
    assert (tmp_path / "f" / "samples_2.png").exists()


def test_runaway_check():
    rl.check_runaway(10, -3.27, 1024)  # the largest |loss| of a fashion run whose excursion recovered
    with pytest.raises(common.Diverged, match="step 800.*--lr"):
        rl.check_runaway(800, -5.81, 1024)  # the smallest first logged |loss| above 3.3 of a run that ran away
    # the limit grows with D (f sums over pixels): CIFAR-10 (3072) 15, LSUN 128 (49152) 240; toys keep 5
    rl.check_runaway(10, 14.9, 3 * 32 * 32)
    rl.check_runaway(10, 239.0, 3 * 128 * 128)
    with pytest.raises(common.Diverged, match="> 15"):
        rl.check_runaway(10, 15.1, 3 * 32 * 32)
    with pytest.raises(common.Diverged, match="> 5"):
        rl.check_runaway(10, 5.1, 2)


def test_log_z_grid_of_a_gaussian():
    log_f = lambda x: -0.5 * (x ** 2).sum(1) / 0.25  # unnormalised N(0, 0.25 I): Z = 2 pi 0.25
    assert rl.log_z_grid(log_f, lim=4, n=200) == pytest.approx(math.log(2 * math.pi * 0.25), abs=1e-6)


def test_long_run_metrics_score_the_long_run_samples():
    """evaluate_long_run scores x_long against the data at level 0 (data + sigmabar_0 noise):
    exact draws from it give MMD ~ 0 and every mode; points all on one wrong spot give a large
    MMD, no high-quality sample and no mode."""
    torch.manual_seed(0)
    args = rl.get_args(["--dataset", "25gaussians", "--eval-samples", "2000"])
    sch = rl.make_schedule(6, 3e-2, 0.3)
    data = common.toy_sample("25gaussians", 2000)
    good = rl.evaluate_long_run(args, sch, "cpu", data + float(sch["sigmabar"][0]) * torch.randn_like(data), True)
    assert set(good) == {"mmd_long_run", "hq_frac_long_run", "modes_long_run"}
    assert abs(good["mmd_long_run"]) < 0.005 and good["modes_long_run"] == 25 and good["hq_frac_long_run"] > 0.9
    bad = rl.evaluate_long_run(args, sch, "cpu", torch.full((2000, 2), 3.0), True)
    assert bad["mmd_long_run"] > 0.1 and bad["hq_frac_long_run"] == 0 and bad["modes_long_run"] == 0

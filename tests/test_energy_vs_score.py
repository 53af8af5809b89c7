"""Tests of energy_vs_score.py: each piece against an independent answer (finite
differences, explicit Jacobians, closed forms), plus subprocess smoke runs."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import energy_vs_score as evs  # noqa: E402

SCHED = evs.ddpm_schedule()


@pytest.fixture(autouse=True)
def _float64():
    """The numerical tests run in float64 (subprocess runs are float32)."""
    with evs.float64():
        yield


def _args(**kw):
    return evs.parse_args([f"--{k.replace('_', '-')}={v}" for k, v in kw.items()])


def _randomise(net, scale=0.2, seed=0):
    """Random weights everywhere (the U-Net zero-initialises its last convs, which would
    make some gradients vanish identically and the tests trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return net


def _net(name, kind, seed=0):
    """A small float64 network: 'toy' (MLP on R^2) or 'image' (1 x 4 x 4 U-Net / ResNet)."""
    torch.manual_seed(seed)
    if kind == "toy":
        args, shape = _args(ch=16, depth=2), (2,)
    else:
        args, shape = _args(dataset="fashion", ch=8, ch_mult="1,2", num_res_blocks=1, c_blocks=1,
                            dropout=0.0), (1, 4, 4)
    return _randomise(evs.build_net(name, args, shape).double().eval(), seed=seed), shape


def _inputs(shape, n=3, t_val=200, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *shape), generator=g, dtype=torch.float64)
    t = torch.full((n,), t_val, dtype=torch.long)
    return x, t, SCHED["sigma"][t]


class _Detached(torch.nn.Module):
    """The pitfall of NOTES.md: a network that detaches its input."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, t):
        return self.net(x.detach(), t)


def _fd_grad_E(name, net, x, t, sigma, h=1e-6):
    """Central finite differences of E(x, t) in every coordinate (float64)."""
    grad = torch.zeros_like(x)
    flat = grad.view(len(x), -1)
    for i in range(flat.shape[1]):
        dx = torch.zeros_like(x).view(len(x), -1)
        dx[:, i] = h
        dx = dx.view_as(x)
        with torch.no_grad():
            flat[:, i] = (evs.energy(name, net, x + dx, t, sigma) - evs.energy(name, net, x - dx, t, sigma)) / (2 * h)
    return grad


@pytest.mark.parametrize("kind", ["toy", "image"])
@pytest.mark.parametrize("name", ["B", "C"])
def test_eps_hat_is_sigma_times_fd_gradient_of_energy(name, kind):
    net, shape = _net(name, kind)
    x, t, sigma = _inputs(shape)
    eps = evs.eps_hat(name, net, x, t, sigma)
    ref = sigma.view(-1, *[1] * len(shape)) * _fd_grad_E(name, net, x, t, sigma)
    assert torch.allclose(eps, ref, rtol=1e-6, atol=1e-7 * ref.abs().max().item())
    if name == "B":
        # Eq. 6's second term is not negligible here, so a detached input would be caught:
        # it turns B into A, which this check must reject.
        eps_detached = evs.eps_hat("B", _Detached(net), x, t, sigma)
        assert torch.allclose(eps_detached, evs.eps_hat("A", net, x, t, sigma))
        assert (eps_detached - ref).abs().max() > 1e-2 * ref.abs().max()


def _eps_fn(name, net, t_val, create_graph=True):
    """z [N, ...] -> eps_hat(z, t_val) with the level repeated N times."""
    def fn(z):
        t = torch.full((len(z),), t_val, dtype=torch.long)
        return evs.eps_hat(name, net, z, t, SCHED["sigma"][t], create_graph=create_graph)
    return fn


def _jacobian(fn, x):
    """Full Jacobian per example [B, d, d] of fn at x [B, ...]: row i is e_i^T J, one
    backward pass on d copies of the example (the networks act on examples separately)."""
    out = []
    for xi in x:
        d = xi.numel()
        xs = xi.expand(d, *xi.shape).clone().requires_grad_(True)
        with torch.enable_grad():
            (rows,) = torch.autograd.grad(fn(xs), xs, torch.eye(d, dtype=x.dtype).view(d, *xi.shape))
        out.append(rows.reshape(d, d))
    return torch.stack(out)


@pytest.mark.parametrize("kind", ["toy", "image"])
def test_jacobians_symmetric_for_B_and_C_not_A(kind):
    ratios = {}
    for name in "ABC":
        net, shape = _net(name, kind)
        x, t, sigma = _inputs(shape, n=2)
        J = _jacobian(_eps_fn(name, net, 200), x)
        ratios[name] = ((J - J.transpose(1, 2)).norm() / J.norm()).item()
        assert J.norm() > 1e-3  # a vanishing Jacobian would make the symmetry test empty
    assert ratios["B"] < 1e-12 and ratios["C"] < 1e-12, ratios
    assert ratios["A"] > 1e-3, ratios


def test_asymmetry_estimators_match_exact_jacobian():
    """Hutchinson (jvp/vjp) and loop-circulation estimates of ||J - J^T||_F / ||J||_F agree
    with the explicit Jacobian for A, and read ~0 for B and C."""
    torch.manual_seed(0)
    for name in "ABC":
        net, shape = _net(name, "image")
        x, t, sigma = _inputs(shape, n=2, t_val=50)
        fn = _eps_fn(name, net, 50)
        J = _jacobian(fn, x)
        exact = ((J - J.transpose(1, 2)).flatten(1).norm(dim=1) / J.flatten(1).norm(dim=1))
        g = torch.Generator().manual_seed(0)
        if name == "A":  # 100 probes per example: 50 copies of each example, 2 probes each
            xs = x.repeat_interleave(50, 0)
            est, J_norm = evs.jacobian_asymmetry(fn, xs, n_probes=2, generator=g)
            num = ((est * J_norm) ** 2).view(2, 50).mean(1)
            assert torch.allclose(J_norm.pow(2).view(2, 50).mean(1).sqrt(), J.flatten(1).norm(dim=1), rtol=0.1)
            assert torch.allclose((num / J_norm.pow(2).view(2, 50).mean(1)).sqrt(), exact, rtol=0.15)
            # circulation over many random loops: E[c^2] d (d - 1) = ||J - J^T||_F^2
            d = x[0].numel()
            xs = x[:1].expand(100, *shape)
            c = evs.loop_circulation(_eps_fn(name, net, 50, False), xs, radius=1e-3, generator=g)
            from_loops = (d * (d - 1) * c.pow(2).mean()).sqrt() / J[0].norm()
            assert abs(from_loops.item() / exact[0].item() - 1) < 0.3
        else:
            est, _ = evs.jacobian_asymmetry(fn, x, n_probes=2, generator=g)
            assert est.max() < 1e-12
            c = evs.loop_circulation(_eps_fn(name, net, 50, False), x, radius=0.01, generator=g)
            assert c.abs().max() < 1e-8 * J.norm()


def test_B_loss_trains_every_parameter_of_f_through_grad_E():
    """B's loss reaches every parameter of f through grad_x E (double backprop), and its
    parameter gradient is the derivative of the loss (finite differences in a random
    direction of parameter space)."""
    net, shape = _net("B", "image")
    net.train()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, *shape, generator=g, dtype=torch.float64)
    t = torch.tensor([30, 400])
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    sched = {k: v for k, v in SCHED.items()}

    def loss_fn():
        return evs.ddpm_loss("B", net, sched, x0, t, eps)

    net.zero_grad()
    loss = loss_fn()
    loss.backward()
    for pname, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname
    direction = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in net.parameters()]
    analytic = sum((p.grad * v).sum() for p, v in zip(net.parameters(), direction)).item()
    h = 1e-6
    with torch.no_grad():
        for p, v in zip(net.parameters(), direction):
            p.add_(h * v)
    plus = loss_fn().item()
    with torch.no_grad():
        for p, v in zip(net.parameters(), direction):
            p.sub_(2 * h * v)
    minus = loss_fn().item()
    assert abs((plus - minus) / (2 * h) - analytic) < 1e-5 * max(1.0, abs(analytic))
    # the pitfall "loss on the raw network output": A's loss has a different gradient
    net.zero_grad()
    evs.ddpm_loss("A", net, sched, x0, t, eps).backward()
    grad_A = torch.cat([p.grad.flatten() for p in net.parameters()]).clone()
    net.zero_grad()
    loss_fn().backward()
    grad_B = torch.cat([p.grad.flatten() for p in net.parameters()])
    assert (grad_A - grad_B).norm() > 1e-3 * grad_B.norm()


def test_schedule_and_forward_marginals_match_closed_form():
    T = 1000
    beta = [1e-4 + (0.02 - 1e-4) * i / (T - 1) for i in range(T)]
    abar = np.cumprod([1 - b for b in beta])
    assert np.allclose(SCHED["alpha_bar"].numpy(), abar, rtol=1e-12)
    assert math.isclose(SCHED["beta"][0].item(), 1e-4) and math.isclose(SCHED["beta"][-1].item(), 0.02)
    g = torch.Generator().manual_seed(0)
    n = 200000
    x0 = torch.tensor([[1.5, -0.7]]).expand(n, 2)
    for t_val in [0, 99, 499, 999]:
        t = torch.full((n,), t_val)
        x_t = evs.q_sample(SCHED, x0, t, torch.randn(n, 2, generator=g))
        mean, var = math.sqrt(abar[t_val]) * x0[0], 1 - abar[t_val]
        se = math.sqrt(var / n)
        assert (x_t.mean(0).double() - mean.double()).abs().max() < 5 * se
        assert abs(x_t.var(0).double().mean().item() / var - 1) < 0.01


def _gaussian_recursion(mu, s2, n_steps, var):
    """Mean and variance of the sampler's output, propagated exactly (the model is linear
    for Gaussian data), independent of the sampler's code path."""
    S, beta, abar, abar_prev = evs.respaced(SCHED, n_steps)
    m, v = 0.0, 1.0
    for k in reversed(range(len(S))):
        sig = (1 - abar[k]).sqrt()
        a = sig / (abar[k] * s2 + 1 - abar[k])
        c1 = 1 / (1 - beta[k]).sqrt()
        c2 = c1 * beta[k] / sig
        m = c1 * m - c2 * (a * m - a * abar[k].sqrt() * mu)
        v = (c1 - c2 * a) ** 2 * v
        if k > 0:
            v = v + (beta[k] if var == "large" else beta[k] * (1 - abar_prev[k]) / (1 - abar[k]))
    return float(m), float(v)


@pytest.mark.parametrize("n_steps,var", [(1000, "large"), (100, "small")])
def test_ancestral_sampler_with_exact_eps_reproduces_gaussian(n_steps, var):
    mu, s = 0.5, 0.3
    abar, sigma = SCHED["alpha_bar"].float(), SCHED["sigma"].float()

    def exact_eps(x, t):  # eps = -sigma_t grad log N(x; sqrt(abar) mu, abar s^2 + sigma^2)
        ab, sg = abar[t][:, None], sigma[t][:, None]
        return sg * (x - ab.sqrt() * mu) / (ab * s * s + sg * sg)

    n = 4000
    x = evs.sample(exact_eps, (n, 2), SCHED, n_steps, var, generator=torch.Generator().manual_seed(0))
    m_ref, v_ref = _gaussian_recursion(mu, s * s, n_steps, var)
    assert abs(x.mean().item() - m_ref) < 5 * s / math.sqrt(2 * n)
    assert abs(x.var().item() / v_ref - 1) < 4 * math.sqrt(2 / (2 * n))
    if n_steps == 1000:  # the full DDPM sampler reproduces the data distribution
        assert abs(m_ref - mu) < 1e-3 and abs(math.sqrt(v_ref) / s - 1) < 0.01
        assert abs(x.std().item() / s - 1) < 0.03


def test_respacing_with_all_steps_is_ddpm():
    S, beta, abar, abar_prev = evs.respaced(SCHED, 1000)
    assert torch.equal(S, torch.arange(1000)) and torch.allclose(beta, SCHED["beta"], rtol=1e-10)
    S, beta, abar, _ = evs.respaced(SCHED, 10)
    assert S[0] == 0 and S[-1] == 999 and len(S) == 10
    assert torch.allclose(torch.cumprod(1 - beta, 0), abar, rtol=1e-12)


def test_A_and_B_share_f_and_its_initial_weights():
    args = _args(model="all", ch=16, depth=2)
    models = evs.build_models(args, (2,), torch.device("cpu"))
    sa, sb = models["A"]["net"].state_dict(), models["B"]["net"].state_dict()
    assert type(models["A"]["net"]) is type(models["B"]["net"])
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------ subprocess runs

TINY = ["--eval-samples", "64", "--sample-steps", "5", "--diag-batch", "8", "--diag-probes", "1",
        "--diag-t", "1,1000", "--batch-size", "32", "--ch", "16", "--log-every", "1", "--ckpt-every", "2"]


def _run(tmp_path, *extra, ok=True):
    r = subprocess.run([sys.executable, str(ROOT / "energy_vs_score.py"), *TINY, *extra],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    if ok:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def _losses(folder):
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("model", ["A", "B", "C"])
def test_smoke_each_model_writes_every_file(tmp_path, model):
    out = tmp_path / "run"
    r = _run(tmp_path, "--model", model, "--steps", "4", "--out", str(out))
    for f in ["args.json", "log.jsonl", "checkpoint.pt", "samples_2.png", "samples_4.png", "metrics.json"]:
        assert (out / f).exists(), f
    metrics = json.loads((out / "metrics.json").read_text())
    for k in ["mmd", "loglik", "asym", "s_per_step", "peak_mem", "loss"]:
        assert f"{model}_{k}" in metrics, k
    assert r.stdout.strip().splitlines()[-1].startswith("metrics:")
    if model != "A":  # the run-folder rules are the same for every model: checked once
        return
    _run(tmp_path, "--model", model, "--steps", "4", "--out", str(out), "--eval-only")
    with np.load(out / "samples.npz") as f:
        assert f["x"].shape == (64, 2) and np.isfinite(f["x"]).all()
    # (a fresh run into the same folder is refused, naming --resume: tests/test_cli.py)


def test_resume_all_reproduces_uninterrupted_losses(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    _run(tmp_path, "--model", "all", "--steps", "4", "--out", str(full))
    _run(tmp_path, "--model", "all", "--steps", "2", "--out", str(part))
    _run(tmp_path, "--model", "all", "--steps", "4", "--out", str(part), "--resume")
    a, b = _losses(full), _losses(part)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for k in ("loss_A", "loss_B", "loss_C"):
            assert ra[k] == rb[k], (ra, rb)
    metrics = json.loads((full / "metrics.json").read_text())
    assert {f"{m}_mmd" for m in "ABC"} <= set(metrics)


def test_diagnose_untrained_models(tmp_path):
    out = tmp_path / "diag"
    r = _run(tmp_path, "--model", "all", "--steps", "0", "--diagnose", "--out", str(out))
    assert "asym_t1" in r.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["A_asym_t1"] > 1e-4 and metrics["A_circ_t1000"] > 1e-4
    for m in "BC":  # written rounded to 6 decimals by common.write_metrics
        assert metrics[f"{m}_asym_t1"] < 1e-6 and metrics[f"{m}_circ_t1000"] < 1e-6


def test_bad_flag_gives_one_line_error(tmp_path):
    r = _run(tmp_path, "--lr", "-1", "--steps", "1", "--out", str(tmp_path / "x"), ok=False)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "--lr" in r.stderr


@pytest.mark.slow
def test_smoke_fashion_B(tmp_path):
    out = tmp_path / "fashion"
    _run(tmp_path, "--dataset", "fashion", "--model", "B", "--steps", "2", "--ch", "8", "--batch-size", "4",
         "--fid-samples", "0", "--diag-batch", "2", "--out", str(out))
    assert (out / "samples_2.png").exists() and "B_asym" in json.loads((out / "metrics.json").read_text())

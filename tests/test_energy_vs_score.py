"""Tests of energy_vs_score.py: each piece against an independent answer (finite
differences, explicit Jacobians, closed forms), plus tiny runs (one subprocess, the rest
in-process)."""
import contextlib
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
    """A small float64 network: 'toy' (MLP on R^2) or 'image' (1 x 4 x 4 U-Net with
    self-attention at both levels (4 and 2 px) and in the middle / ResNet)."""
    torch.manual_seed(seed)
    if kind == "toy":
        args, shape = _args(ch=16, depth=2), (2,)
    else:
        args, shape = _args(dataset="fashion", ch=8, ch_mult="1,2", num_res_blocks=1, c_blocks=1,
                            dropout=0.0), (1, 4, 4)
        args.attn_res = "4,2"  # the resolutions of this 4 px net (the args were checked at 28 px)
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
    assert sum(isinstance(m, common.Attention) for m in net.modules()) == 7  # 2 down, middle, 4 up
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
    nets = evs.build_models(args, (2,))
    sa, sb = nets["A"].state_dict(), nets["B"].state_dict()
    assert type(nets["A"]) is type(nets["B"])
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------ DDPM's initialisation and sampler

def test_ddpm_init_is_glorot_uniform_with_zero_biases_and_near_zero_last_layers():
    """DDPM's variance_scaling(scale, 'fan_avg', 'uniform'): U(-l, l), l = sqrt(3 scale /
    fan_avg), fan_avg = (fan_in + fan_out) / 2; scale 1 everywhere, 1e-10 on the output conv,
    each residual block's conv2 and each attention's output; q, k, v as separate C x C layers."""
    args = _args(dataset="cifar10", preset="small", ch=32, ch_mult="1,2", num_res_blocks=1, attn_res="16")
    net = evs.build_net("A", args, (3, 32, 32))
    limit = lambda w, scale: math.sqrt(3 * scale / ((w[0].numel() + w.shape[0] * w[0, 0].numel()) / 2))
    near_zero = {id(net.out[-1].weight)} | {id(m.conv2.weight) for m in net.modules()
                                            if isinstance(m, common.UNetResBlock)}
    near_zero |= {id(m.proj.weight) for m in net.modules() if isinstance(m, common.Attention)}
    qkv = {id(m.qkv.weight) for m in net.modules() if isinstance(m, common.Attention)}
    # the output conv; 2 down + 2 middle + 4 up blocks; attention at 16 px (1 down, 2 up) + the middle's
    assert len(near_zero) == 1 + 8 + 4 and len(qkv) == 4
    checked = 0
    for m in net.modules():
        if not isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            continue
        assert torch.equal(m.bias, torch.zeros_like(m.bias))
        parts = m.weight.chunk(3) if id(m.weight) in qkv else [m.weight]
        for w in parts:
            scale = 1e-10 if id(m.weight) in near_zero else 1.0
            bound = limit(w, scale)
            assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound  # the whole uniform range
            if w.numel() >= 4000:  # variance of U(-l, l) = l^2 / 3 (PyTorch's default is 1/3 of it)
                assert abs(w.var().item() / (bound ** 2 / 3) - 1) < 0.1
                checked += 1
    assert checked >= 10
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert net(x, torch.tensor([0, 999])).abs().max() < 1e-3  # f starts near 0: A's eps_hat ~ x


def test_clipped_sampler_mean_is_the_posterior_mean_at_the_clipped_x0():
    """With --clip-x0 each ancestral step's mean is the mean of q(x_{t-1} | x_t, x0_hat) at
    x0_hat = clip((x_t - sigma_t eps) / sqrt(alpha_bar_t), -1, 1), here by the product of the
    two Gaussians q(x_{t-1} | x0) and q(x_t | x_{t-1}); the sampler's noise is replayed."""
    shape, seed = (64, 2), 0
    seen = []

    def eps_fn(x, t):  # pushes x0_hat out of [-1, 1] for part of the points
        eps = -1.5 * x + 0.3
        seen.append((x.clone(), eps.clone()))
        return eps

    x_end = evs.sample(eps_fn, shape, SCHED, 10, "large", generator=torch.Generator().manual_seed(seed),
                       clip_x0=True)
    S, beta, abar, abar_prev = evs.respaced(SCHED, 10)
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(shape, generator=g)
    assert torch.equal(seen[0][0], x_T)
    outputs = [x for x, _ in seen[1:]] + [x_end]
    n_clipped = 0
    for step, k in enumerate(reversed(range(len(S)))):
        x, eps = seen[step]
        x0 = (x - (1 - abar[k]).sqrt() * eps) / abar[k].sqrt()
        n_clipped += int((x0.abs() > 1).sum())
        x0 = x0.clamp(-1, 1)
        if k == 0:  # alpha_bar_prev = 1: the posterior is the point x0
            mean = x0
        else:
            prec = 1 / (1 - abar_prev[k]) + (1 - beta[k]) / beta[k]
            mean = (abar_prev[k].sqrt() * x0 / (1 - abar_prev[k]) + (1 - beta[k]).sqrt() * x / beta[k]) / prec
            mean = mean + beta[k].sqrt() * torch.randn(shape, generator=g)  # --var large
        assert torch.allclose(outputs[step], mean, rtol=1e-9, atol=1e-9), k
    assert n_clipped > 0
    # nothing clipped: the same as Eq. 3's mean
    x, eps = torch.randn(5, 2, dtype=torch.float64) * 0.1, torch.randn(5, 2, dtype=torch.float64) * 0.1
    b, ab, abp = float(beta[3]), float(abar[3]), float(abar_prev[3])
    eq3 = (x - b / math.sqrt(1 - ab) * eps) / math.sqrt(1 - b)
    assert torch.allclose(evs.reverse_mean(x, eps, b, ab, abp, clip_x0=True), eq3, rtol=1e-12)
    assert torch.allclose(evs.reverse_mean(x, eps, b, ab, abp, clip_x0=False), eq3, rtol=1e-12)


def test_B_double_backprop_runs_attention_on_the_math_kernel():
    """The fused SDPA kernels have no double backward: B's training loss (create_graph) must
    run f's attention on the math kernel; A's forward may use any kernel."""
    net, shape = _net("B", "image")
    flags = []
    for m in net.modules():
        if isinstance(m, common.Attention):
            m.register_forward_pre_hook(lambda mod, inp: flags.append(
                (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled())))
    x0, t, sigma = _inputs(shape, n=2)
    evs.ddpm_loss("B", net, SCHED, x0, t, torch.randn_like(x0)).backward()
    assert flags and all(f == (False, False) for f in flags)
    flags.clear()
    evs.ddpm_loss("A", net, SCHED, x0, t, torch.randn_like(x0))
    assert flags and all(f == (True, True) for f in flags)


@contextlib.contextmanager
def _float32():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def test_bf16_autocast_loss_within_tolerance_of_fp32():
    """--amp bf16 autocasts the network only: each model's loss within 1% of fp32 (bf16 keeps
    8 significant bits, 0.4% per rounding; the differences here are 0.01-0.12%); E, grad_x E
    and the sampler's state stay fp32."""
    with _float32():
        args = _args(dataset="fashion", ch=16, ch_mult="1,2", num_res_blocks=1, c_blocks=1, dropout=0.0)
        args.attn_res = "8"
        g = torch.Generator().manual_seed(0)
        x0 = torch.rand(4, 1, 16, 16, generator=g) * 2 - 1
        t = torch.tensor([0, 10, 300, 900])
        eps = torch.randn(x0.shape, generator=g)
        sched = {k: v.float() for k, v in SCHED.items()}
        for name in "ABC":
            torch.manual_seed(0)
            net = _randomise(evs.build_net(name, args, (1, 16, 16)), scale=0.05)
            fp32 = evs.ddpm_loss(name, net, sched, x0, t, eps).item()
            loss = evs.ddpm_loss(name, net, sched, x0, t, eps, amp="bf16")
            assert loss.dtype == torch.float32 and abs(loss.item() / fp32 - 1) < 0.01, (name, loss.item(), fp32)
            assert abs(loss.item() / fp32 - 1) > 0  # bf16 did run
            loss.backward()
            assert all(torch.isfinite(p.grad).all() for p in net.parameters())
            if name != "A":
                E = evs.energy(name, net, x0, t, sched["sigma"][t], amp="bf16")
                assert E.dtype == torch.float32
            x = evs.sample(evs.model_eps_fn(name, net, sched, "bf16"), (2, 1, 16, 16), sched, 2)
            assert x.dtype == torch.float32 and torch.isfinite(x).all()


def test_draw_samples_shares_the_work_over_ranks(monkeypatch):
    """Under torchrun each rank draws its share of n (common.rank_share) from its own stream,
    in chunks of --sample-batch, and calls the collective gather_rows exactly once; rank 0
    gets all n (9 over 2 ranks, in chunks of 2: rank 0 draws 5, rank 1 draws 4)."""
    args = _args(model="A", ch=8, depth=1, sample_batch=2)
    net = evs.build_net("A", args, (2,))
    gathered, draws = {}, {}
    for rank in (0, 1):
        monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.distributed, "get_rank", lambda r=rank: r)
        monkeypatch.setattr(common, "rank_share", lambda n, r=rank: n // 2 + (r < n % 2))
        monkeypatch.setattr(common, "gather_rows", lambda x, r=rank: gathered.setdefault(r, []).append(x.clone())
                            or (x if r == 0 else None))
        x = evs.draw_samples("A", net, SCHED, args, (2,), 9, torch.device("cpu"), 3)
        assert (x is None) == (rank == 1)
        draws[rank] = gathered[rank][0]
    assert [len(v) for v in gathered.values()] == [1, 1]  # one collective per rank
    assert len(draws[0]) == 5 and len(draws[1]) == 4
    assert not torch.allclose(draws[0][:4], draws[1])  # each rank its own noise


# ------------------------------------------------------------------ argument checks (one-line errors)

@pytest.mark.parametrize("argv,needle", [
    (["--dataset", "fashion", "--ch-mult", "1,2,2,2"], "--pad-to-32"),  # 28 -> 14 -> 7 -> 4
    (["--dataset", "fashion", "--preset", "paper", "--no-pad-to-32"], "28 -> 14 -> 7 -> 4"),
    (["--dataset", "fashion", "--preset", "paper", "--attn-res", "14"], "32, 16, 8, 4"),
    (["--dataset", "cifar10", "--pad-to-32"], "--pad-to-32"),
    (["--clip-x0"], "drop it"),
    (["--model", "B", "--compile"], "double backward"),
    (["--model", "C", "--compile"], "double backward"),
])
def test_unrunnable_configurations_are_refused_at_start_up(argv, needle):
    with pytest.raises(common.UserError) as e:
        evs.parse_args(argv)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_fashion_28px_small_default_and_model_C_alone_need_no_padding():
    assert evs.parse_args(["--dataset", "fashion"]).ch_mult == "1,2,2"  # 28 -> 14 -> 7 fits
    evs.parse_args(["--dataset", "fashion", "--model", "C", "--ch-mult", "1,2,2,2"])  # avg-pools: 28 -> 3


# ------------------------------------------------------------------ tiny runs

TINY = ["--eval-samples", "64", "--sample-steps", "5", "--diag-batch", "8", "--diag-probes", "1",
        "--diag-t", "1,1000", "--batch-size", "32", "--ch", "16", "--log-every", "1", "--ckpt-every", "2"]


def _main(*argv):
    """main() in-process in float32 (the file's fixture makes float64 the default), with the
    test process's own signal handlers restored afterwards."""
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        with _float32():
            evs.main([*TINY, *map(str, argv)])
    finally:
        signal.signal(signal.SIGINT, handlers[0]), signal.signal(signal.SIGTERM, handlers[1])


def _losses(folder):
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


def test_smoke_subprocess_writes_every_file(tmp_path):
    """The one real process: `python energy_vs_score.py` end to end; then --eval-only."""
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, str(ROOT / "energy_vs_score.py"), *TINY, "--model", "A", "--steps", "4",
                        "--out", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1].startswith("metrics:")
    _main("--model", "A", "--steps", 4, "--out", out, "--eval-only")
    for f in ["args.json", "log.jsonl", "checkpoint.pt", "samples_2.png", "samples_4.png", "metrics.json"]:
        assert (out / f).exists(), f
    metrics = json.loads((out / "metrics.json").read_text())
    for k in ["mmd", "loglik", "asym", "s_per_step", "peak_mem", "loss"]:
        assert f"A_{k}" in metrics, k
    with np.load(out / "samples.npz") as f:
        assert f["x"].shape == (64, 2) and np.isfinite(f["x"]).all()
    # (a fresh run into the same folder is refused, naming --resume: tests/test_cli.py)


def test_resume_all_reproduces_uninterrupted_losses(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    _main("--model", "all", "--steps", 4, "--out", full)
    _main("--model", "all", "--steps", 2, "--out", part)
    _main("--model", "all", "--steps", 4, "--out", part, "--resume")
    a, b = _losses(full), _losses(part)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for k in ("loss_A", "loss_B", "loss_C"):
            assert ra[k] == rb[k], (ra, rb)
    metrics = json.loads((full / "metrics.json").read_text())
    assert {f"{m}_mmd" for m in "ABC"} <= set(metrics) and {f"{m}_asym" for m in "BC"} <= set(metrics)
    # a resume or evaluation must not change a model or the objective
    assert set(evs.MUST_MATCH) >= {"dataset", "model", "ch", "ch_mult", "num_res_blocks", "attn_res", "c_blocks",
                                   "depth", "dropout", "pad_to_32", "T", "beta_1", "beta_T"}
    for flag, value in [("--T", 1001), ("--beta-1", 2e-4), ("--beta-T", 0.03), ("--depth", 2), ("--ch", 8),
                        ("--model", "A"), ("--dropout", 0.1)]:
        with pytest.raises(common.UserError) as e:
            _main("--model", "all", "--steps", 4, "--out", full, "--eval-only", flag, value)
        assert flag in str(e.value) and "--out" in str(e.value)


def test_diagnose_untrained_models(tmp_path):
    out = tmp_path / "diag"
    _main("--model", "all", "--steps", 0, "--diagnose", "--out", out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["A_asym_t1"] > 1e-4 and metrics["A_circ_t1000"] > 1e-4
    for m in "BC":  # written rounded to 6 decimals by common.write_metrics
        assert metrics[f"{m}_asym_t1"] < 1e-6 and metrics[f"{m}_circ_t1000"] < 1e-6


def test_bad_flag_gives_one_line_error(tmp_path):
    with pytest.raises(common.UserError) as e:
        _main("--lr", -1, "--steps", 1, "--out", tmp_path / "x")
    assert "--lr" in str(e.value) and "\n" not in str(e.value) and not (tmp_path / "x").exists()


@pytest.mark.slow
def test_smoke_fashion_B(tmp_path):
    out = tmp_path / "fashion"
    _main("--dataset", "fashion", "--model", "B", "--steps", 2, "--ch", 8, "--batch-size", 4,
          "--fid-samples", 0, "--diag-batch", 2, "--out", out)
    assert (out / "samples_2.png").exists() and "B_asym" in json.loads((out / "metrics.json").read_text())

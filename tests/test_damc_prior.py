"""Tests of damc_prior.py: each piece against an independent answer, plus smoke runs."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import damc_prior  # noqa: E402


class ZeroEnergy(nn.Module):
    """E(z) = 0 for every z, shape [B, 1] (p_alpha = N(0, I))."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, z):
        return 0 * z[:, :1] * self.dummy


def small_args(**over):
    argv = ["--dataset", "fashion", "--nz", "4", "--ngf", "8", "--ndf", "8", "--nxemb", "16", "--q-width", "16",
            "--q-steps", "3", "--post-steps", "2", "--prior-steps", "2", "--q-updates", "2", "--p-mask", "0.5"]
    for k, v in over.items():
        argv += ["--" + k.replace("_", "-"), str(v)]
    return damc_prior.resolve_defaults(common.parse_args(damc_prior.build_parser(), damc_prior.PRESETS, argv))


# ---------------------------------------------------------------- Langevin chains

def test_posterior_chain_matches_exact_gaussian_posterior():
    # g(z) = W z, E = 0: p(z | x) = N(S W^T x / sigma^2, S), S = (I + W^T W / sigma^2)^-1
    torch.manual_seed(0)
    W = torch.tensor([[1.0, 0.5], [-0.3, 0.8], [0.6, -0.4]])
    sigma = 1.0
    g = nn.Linear(2, 3, bias=False)
    g.weight.data.copy_(W)
    x = torch.tensor([1.5, -0.5, 0.7])
    S = torch.linalg.inv(torch.eye(2) + W.T @ W / sigma ** 2)
    mean = S @ W.T @ x / sigma ** 2
    n = 4000
    z = damc_prior.sample_posterior(torch.full((n, 2), 3.0), x.expand(n, 3), g, ZeroEnergy(), sigma,
                                    n_steps=1500, s=0.08)
    assert torch.allclose(z.mean(0), mean, atol=0.05), (z.mean(0), mean)
    assert torch.allclose(torch.cov(z.T), S, atol=0.04), (torch.cov(z.T), S)


def test_prior_chain_is_standard_normal_when_energy_is_zero():
    torch.manual_seed(1)
    z = damc_prior.sample_prior(torch.full((4000, 2), -3.0), ZeroEnergy(), n_steps=1000, s=0.1)
    assert z.mean(0).abs().max() < 0.06
    assert torch.allclose(torch.cov(z.T), torch.eye(2), atol=0.07)


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


def _two_blobs(n):
    sign = torch.randint(2, (n, 1)).float() * 2 - 1
    return torch.cat([1.5 * sign, torch.zeros(n, 1)], 1) + 0.3 * torch.randn(n, 2)


def test_q_trained_briefly_reproduces_a_known_2d_distribution():
    torch.manual_seed(0)
    q = damc_prior.DiffusionSampler(2, nn.Identity(), nxemb=16, width=64)
    before = common.mmd_rbf(damc_prior.q_sample(q, n=500, n_steps=50), _two_blobs(500))
    opt = torch.optim.Adam(q.parameters(), 2e-3)
    for _ in range(600):
        loss = damc_prior.q_loss(q, None, _two_blobs(256))
        opt.zero_grad()
        loss.backward()
        opt.step()
    z = damc_prior.q_sample(q, n=1000, n_steps=50)
    after = common.mmd_rbf(z, _two_blobs(1000))
    assert after < 0.01 < before, (before, after)
    assert abs((z[:, 0] > 0).float().mean().item() - 0.5) < 0.1  # both blobs, in proportion


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


def test_toy_iteration_keeps_the_true_generator_fixed():
    torch.manual_seed(0)
    args = damc_prior.resolve_defaults(common.parse_args(damc_prior.build_parser(), damc_prior.PRESETS,
                                                         ["--q-steps", "3", "--post-steps", "2",
                                                          "--prior-steps", "2", "--q-width", "16"]))
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


# ---------------------------------------------------------------- evaluation

def test_reconstruction_mse_matches_a_hand_computation():
    torch.manual_seed(0)
    W = torch.randn(6, 2)
    g = nn.Linear(2, 6, bias=False)
    g.weight.data.copy_(W)
    x = torch.randn(5, 6)
    z0 = torch.randn(5, 2)
    sigma, s = 0.5, 0.3
    # 0 steps: mean over pixels of (W z0 - x)^2, per image
    by_hand = ((z0 @ W.T - x) ** 2).mean(1)
    assert torch.allclose(damc_prior.recon_mse(x, z0, g, ZeroEnergy(), sigma, 0, s), by_hand, atol=1e-6)
    # 1 noise-free step: z1 = z0 + s^2/2 (W^T (x - W z0) / sigma^2 - z0)
    z1 = z0 + s ** 2 / 2 * ((x - z0 @ W.T) @ W / sigma ** 2 - z0)
    by_hand = ((z1 @ W.T - x) ** 2).mean(1)
    assert torch.allclose(damc_prior.recon_mse(x, z0, g, ZeroEnergy(), sigma, 1, s), by_hand, atol=1e-5)


def test_exact_grid_posterior_sampler_matches_a_gaussian():
    # g = identity-like linear map, E = 0: posterior N(x / (1 + sigma^2), sigma^2 / (1 + sigma^2) I)
    torch.manual_seed(0)
    g = nn.Linear(2, 2, bias=False)
    g.weight.data.copy_(torch.eye(2))
    sigma = 0.5
    E = common.mlp([2, 1])
    nn.init.zeros_(E[0].weight), nn.init.zeros_(E[0].bias)
    info = damc_prior.exact_posterior_grid(g, E, lim=4.0, n=200)
    x = torch.tensor([1.0, -0.5])
    z = damc_prior.exact_posterior_sample(x, info, sigma, 20000)
    assert torch.allclose(z.mean(0), x / 1.25, atol=0.02)
    assert torch.allclose(z.var(0), torch.full((2,), 0.25 / 1.25), atol=0.01)


# ---------------------------------------------------------------- smoke runs

TINY_TOY = ["--steps", "4", "--batch-size", "16", "--q-width", "16", "--nxemb", "16", "--q-steps", "4",
            "--post-steps", "3", "--prior-steps", "3", "--eval-prior-steps", "3", "--eval-x", "3", "--eval-z", "16",
            "--eval-every", "2", "--log-every", "1", "--slow-every", "1", "--lr-decay-every", "1"]


def run(args, cwd, check=True):
    r = subprocess.run([sys.executable, str(ROOT / "damc_prior.py"), *args], cwd=cwd, capture_output=True,
                       text=True, timeout=300)
    if check:
        assert r.returncode == 0, r.stderr[-2000:]
    return r


def losses(path):
    # training losses only: the posterior distances are evaluated on a schedule of the run's own length
    return [{k: v for k, v in json.loads(line).items() if k not in ("seconds", "samples_per_s")
             and not k.startswith("post_dist")} for line in open(path)]


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """One uninterrupted 4-step toy run, shared by the smoke and resume tests."""
    out = tmp_path_factory.mktemp("toy") / "run"
    r = run([*TINY_TOY, "--out", str(out)], out.parent)
    return out, r.stdout


def test_toy_smoke_files_and_eval_only(toy_run, tmp_path):
    out, stdout = toy_run
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("metrics:") and "post_dist_damc" in last and "post_dist_langevin" in last
    for f in ("args.json", "log.jsonl", "checkpoint.pt", "metrics.json", "samples_2.png", "samples_4.png"):
        assert (out / f).exists(), f
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"post_dist_damc", "post_dist_langevin", "mmd"} <= set(metrics)
    assert all(math.isfinite(v) for v in metrics.values())
    rows = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and "post_dist_damc" in rows[1]
    # (a fresh run into the same folder is refused, naming --resume: tests/test_cli.py)
    run([*TINY_TOY, "--out", str(out), "--eval-only"], tmp_path)
    with np.load(out / "samples.npz") as f:
        assert f["x"].shape[1] == 2 and f["z"].shape[1] == 2 and len(f["z_post_damc"]) == 3 * 16


def test_resume_reproduces_an_uninterrupted_run(toy_run, tmp_path):
    a = toy_run[0]
    run([*TINY_TOY, "--out", str(tmp_path / "b"), "--steps", "2"], tmp_path)
    run([*TINY_TOY, "--out", str(tmp_path / "b"), "--resume"], tmp_path)
    assert losses(a / "log.jsonl") == losses(tmp_path / "b" / "log.jsonl")
    ca = torch.load(a / "checkpoint.pt", weights_only=True)
    cb = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    # every model and optimiser state (lr schedule included) and the RNG end up identical
    for key in ("g", "E", "q", "q_slow", "opt_q", "opt_E", "rng"):
        flat_a, flat_b = torch.utils._pytree.tree_flatten(ca[key])[0], torch.utils._pytree.tree_flatten(cb[key])[0]
        assert len(flat_a) == len(flat_b) and all(
            torch.equal(u, v) if torch.is_tensor(u) else u == v for u, v in zip(flat_a, flat_b)), key
    assert ca["opt_q"]["param_groups"][0]["lr"] == pytest.approx(1e-3 * 0.99 ** 3)


def test_bad_flag_gives_one_line_error(tmp_path):
    r = run(["--post-step-size", "-1", "--out", str(tmp_path / "x")], tmp_path, check=False)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "--post-step-size" in r.stderr


TINY_IMAGE = ["--dataset", "fashion", "--steps", "2", "--batch-size", "8", "--nz", "4", "--ngf", "8", "--ndf", "8",
              "--nxemb", "16", "--q-width", "16", "--q-steps", "3", "--post-steps", "2", "--prior-steps", "2",
              "--eval-prior-steps", "2", "--recon-steps", "2", "--recon-images", "20", "--log-every", "1"]


def test_image_smoke_without_fid(tmp_path):
    if not Path(common.FASHION_SYSTEM_DIR).exists():
        pytest.skip("Fashion-MNIST is not installed")
    out = tmp_path / "run"
    r = run([*TINY_IMAGE, "--fid-samples", "0", "--out", str(out)], tmp_path)
    assert r.stdout.strip().splitlines()[-1].startswith("metrics: mse_recon=")
    for f in ("args.json", "log.jsonl", "checkpoint.pt", "metrics.json", "samples_2.png"):
        assert (out / f).exists(), f
    assert 0 < json.loads((out / "metrics.json").read_text())["mse_recon"] < 4
    run([*TINY_IMAGE, "--fid-samples", "0", "--out", str(out), "--eval-only"], tmp_path)
    with np.load(out / "samples.npz") as f:
        assert f["x"].shape[1:] == (1, 32, 32) and f["z"].shape[1] == 4 and f["z_q"].shape[1] == 4
        assert np.abs(f["x"]).max() <= 1


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["damc", "langevin"])
def test_image_smoke_prints_fid_and_mse(tmp_path, sampler):
    if not Path(common.FASHION_SYSTEM_DIR).exists():
        pytest.skip("Fashion-MNIST is not installed")
    out = tmp_path / "run"
    r = run([*TINY_IMAGE, "--sampler", sampler, "--fid-samples", "10", "--data-dir", str(tmp_path / "data"),
             "--out", str(out)], tmp_path)
    last = r.stdout.strip().splitlines()[-1]
    for key in ("fid_q", "fid_ebm", "mse_recon"):
        assert key in last
    assert (out / "samples_2.png").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 < metrics["mse_recon"] < 4 and metrics["fid_q"] > 0

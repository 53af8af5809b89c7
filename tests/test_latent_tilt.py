"""Tests of latent_tilt.py: each piece against an independent answer, plus smoke runs."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import latent_tilt  # noqa: E402

FASHION = Path(common.FASHION_SYSTEM_DIR).exists()
needs_fashion = pytest.mark.skipif(not FASHION, reason="Fashion-MNIST not installed (apt dataset-fashion-mnist)")


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


def test_glf_flow_inverts_and_vae_shapes():
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


def test_mle_gradient_with_exact_expectations_matches_analytic():
    """1-D: p(z) = N(0, 1), G(z) = a z + b, E_theta(x) = t1 x + t2 x^2. The model expectation
    of Eq. 7 by quadrature in z; the analytic gradient from the closed-form log Z."""
    a, b = 1.5, -0.3
    theta = torch.tensor([0.7, 0.2], dtype=torch.float64, requires_grad=True)
    E = lambda x: theta[0] * x + theta[1] * x ** 2
    x_data = torch.tensor([-1.0, 0.2, 0.5, 2.0], dtype=torch.float64)
    z = torch.linspace(-12, 12, 20001, dtype=torch.float64)
    with torch.no_grad():  # weights of the tilted prior p(z) exp(-E(G(z))) on the grid
        logw = -0.5 * z ** 2 - E(a * z + b)
        w = torch.softmax(logw, 0)
    loss = latent_tilt.mle_loss(E(x_data), E(a * z + b), alpha=0.0, weights=w)
    (grad,) = torch.autograd.grad(loss, theta)
    # -log p(x) = E(x) + log Z - log p_G(x); log Z = log E_{x ~ N(b, a^2)} exp(-E(x)) in closed form
    m, s2 = b, a ** 2
    A, B = 1 / s2 + 2 * theta[1], m / s2 - theta[0]
    log_Z = -0.5 * torch.log(s2 * A) + B ** 2 / (2 * A) - m ** 2 / (2 * s2)
    (analytic,) = torch.autograd.grad(E(x_data).mean() + log_Z, theta)
    assert torch.allclose(grad, analytic, atol=1e-6), (grad, analytic)
    assert analytic.abs().min() > 0.05


def test_energy_net_matches_appendix_b2():
    args = latent_tilt.resolve_defaults(common.parse_args(latent_tilt.build_parser(), latent_tilt.PRESETS,
                                                          ["--dataset", "fashion", "--preset", "paper"]))
    E = latent_tilt.build_energy(args, 1)
    widths = [blk.conv2.out_channels for blk in E.blocks]
    assert widths == [64, 64, 64, 128, 128, 128]
    assert E.head.in_features == 128 and E.head.out_features == 1
    x = torch.randn(2, 1, 32, 32)
    assert E(x).shape == (2,)


def run(tmp_path, *flags, ok=True):
    r = subprocess.run([sys.executable, str(ROOT / "latent_tilt.py"), *flags], cwd=tmp_path,
                       capture_output=True, text=True, timeout=600)
    assert (r.returncode == 0) == ok, r.stderr[-2000:]
    return r


CONVENTION_FILES = ["args.json", "log.jsonl", "checkpoint.pt", "metrics.json"]


def check_files(folder, keys):
    for f in CONVENTION_FILES:
        assert (folder / f).exists(), f
    assert list(folder.glob("samples_*.png"))
    metrics = json.loads((folder / "metrics.json").read_text())
    for k in keys:
        assert k in metrics, (k, metrics)


def test_toy_smoke_resume_and_eval_only(tmp_path):
    flags = ["--base-steps", "3", "--log-every", "1", "--eval-every", "2", "--langevin-steps", "3",
             "--sample-steps", "3", "--hidden", "16", "--stop-samples", "50", "--batch-size", "32"]
    run(tmp_path, "--steps", "4", "--out", str(tmp_path / "full"), *flags)
    run(tmp_path, "--steps", "2", "--out", str(tmp_path / "half"), *flags)
    run(tmp_path, "--steps", "4", "--out", str(tmp_path / "half"), "--resume", *flags)
    rows = lambda f: [r for r in map(json.loads, (tmp_path / f / "log.jsonl").read_text().splitlines()) if "loss" in r]
    full, half = rows("full"), rows("half")
    assert [r["step"] for r in half] == [1, 2, 3, 4]
    assert [r["loss"] for r in full] == [r["loss"] for r in half]
    keys = ["base_hq_frac", "ebm_hq_frac", "base_modes", "ebm_modes", "base_mmd", "ebm_mmd"]
    check_files(tmp_path / "full", keys)
    assert (tmp_path / "full" / "tilt.png").exists() and list((tmp_path / "full").glob("samples_*.png"))
    r = run(tmp_path, "--out", str(tmp_path / "full"), "--eval-only", *flags)
    with __import__("numpy").load(tmp_path / "full" / "samples.npz") as f:
        assert f["x"].shape == (2000, 2) and f["z"].shape == (2000, 2)
    assert r.stdout.strip().splitlines()[-1].startswith("metrics: ")  # refusals: test_cli.py


TINY_IMG = ["--dataset", "fashion", "--base-steps", "2", "--steps", "2", "--log-every", "1", "--ngf", "8",
            "--ch", "4", "--num-blocks", "1", "--langevin-steps", "2", "--sample-steps", "2", "--batch-size", "4",
            "--base-batch-size", "8", "--fid-samples", "0", "--eval-every", "0", "--glow-depth", "1",
            "--glow-hidden", "8", "--flow-hidden", "16"]


@needs_fashion
@pytest.mark.parametrize("base", ["vae", pytest.param("glow", marks=pytest.mark.slow),
                                  pytest.param("glf", marks=pytest.mark.slow)])
def test_image_bases_then_ebm_stage(tmp_path, base):
    run(tmp_path, "--stage", "base", "--base", base, "--out", str(tmp_path / "b"), *TINY_IMG)
    check_files(tmp_path / "b", ["base_bpd"] if base == "glow" else ["mse_recon"])
    run(tmp_path, "--stage", "ebm", "--base", base, "--base-ckpt", str(tmp_path / "b" / "checkpoint.pt"),
        "--out", str(tmp_path / "e"), *TINY_IMG)
    check_files(tmp_path / "e", ["ebm_steps"])
    for f in ["tilt.png", "langevin_traj.png", "samples_000002.png"]:
        assert (tmp_path / "e" / f).exists(), f
    run(tmp_path, "--stage", "ebm", "--base", base, "--out", str(tmp_path / "e"), "--eval-only", *TINY_IMG)
    assert (tmp_path / "e" / "samples.npz").exists()


@needs_fashion
@pytest.mark.slow
def test_pixel_ebm_saves_and_resumes_buffer(tmp_path):
    flags = ["--stage", "pixel", "--buffer-size", "16", *TINY_IMG]
    run(tmp_path, "--out", str(tmp_path / "p"), *flags)
    state = torch.load(tmp_path / "p" / "checkpoint.pt", weights_only=True)
    assert state["buffer"].shape == (16, 1, 32, 32)
    run(tmp_path, "--out", str(tmp_path / "p"), "--resume", *flags, "--steps", "3")
    state2 = torch.load(tmp_path / "p" / "checkpoint.pt", weights_only=True)
    assert state2["step"] == 3
    check_files(tmp_path / "p", [])


@pytest.mark.slow  # ~35 s; the sign of Eq. 5 / 7 and the latent sampler have fast tests above
def test_short_toy_run_raises_hq_frac(tmp_path):
    """Section 5.1 / Figure 5.1 in miniature: a 2000-step VAE on 25 Gaussians (hq_frac ~0.04, bridges of
    spurious mass) tilted by 300 EBM steps gains a large share of samples within 4 std of a mode, and
    moves closer to the data in MMD. A wrong sign in Eq. 5 / 7 or a broken latent sampler fails this."""
    run(tmp_path, "--base-steps", "2000", "--steps", "300", "--eval-every", "0", "--out", str(tmp_path / "t"))
    m = json.loads((tmp_path / "t" / "metrics.json").read_text())
    assert m["ebm_hq_frac"] > 1.3 * m["base_hq_frac"] and m["ebm_mmd"] < m["base_mmd"], m
    assert m["ebm_modes"] >= m["base_modes"] and m["ebm_best_step"] == 300

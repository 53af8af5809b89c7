"""The paper path of latent_tilt.py (--preset paper, the default for mnist, fashion, cifar10).

(a) parameter counts of the full-size networks against a layer-by-layer count of the paper's
description (Appendix B; no code by the authors is public, so the description is the
reference: where it leaves a detail open, the count says which choice the script made);
(b) --print-config shows the paper's values and explicit flags win; (c) two training steps
and an evaluation at each preset's structure (levels, depths, blocks, image size, padding,
reference split) with small widths, batches, chains and sample counts, on tiny fake files in
the official formats, for the VAE, GLOW and GLF bases and the pixel EBM; (d) a FID protocol
the reference split cannot serve fails in one line at start-up. All in-process.

FID in (c) runs its whole path (samples -> padding -> reference split -> cached statistics
-> Frechet distance) with a stand-in for the Inception features (a fixed random projection
to 16 dimensions, as test_common does): with 2048-d features every score costs an
eigendecomposition of a 2048 x 2048 matrix (~3 s on 2 idle cores) besides Inception's ~0.16 s
per image. One run with the real features is marked slow; Inception itself is tested in
test_common.
"""
import contextlib
import json
import signal
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import common  # noqa: E402
import latent_tilt as lt  # noqa: E402
from fakedata import write_fake  # noqa: E402

PAPER = ["mnist", "fashion", "cifar10"]  # every data set with a preset (Table 1)
CHANNELS = {"mnist": 1, "fashion": 1, "cifar10": 3}


@contextlib.contextmanager
def own_signal_handlers():
    """main() installs StopFlag's SIGINT/SIGTERM handlers; the test process gets its own back."""
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, handlers[0]), signal.signal(signal.SIGTERM, handlers[1])


def print_config(argv, capsys, tmp_path):
    """--print-config in-process, the networks built at full size (on the CPU: a fraction of a
    second each; the meta device would be slower, spectral norm's power iterations there run
    through Python decompositions); neither the data nor --out is touched."""
    capsys.readouterr()
    out, data = tmp_path / "out", tmp_path / "data"
    with pytest.raises(SystemExit) as e, own_signal_handlers():
        lt.main([*argv, "--print-config", "--data-dir", str(data), "--out", str(out)])
    assert e.value.code == 0
    assert not out.exists() and not data.exists()
    return json.loads(capsys.readouterr().out)


# ------------------------------------------------------------------ (a) parameter counts

def conv(k, cin, cout):
    return k * k * cin * cout + cout


def linear(i, o):
    return i * o + o


def energy_params(c, ch=64, blocks=3, sn=False):
    """Appendix B.2: 3 res blocks of 64 channels, 3 of 128, global sum pooling, a FC layer. Open
    in the paper, chosen here: a 3x3 stem conv; each block two 3x3 convs and, where the width
    changes, a 3x3 shortcut conv; the pixel EBM's spectrally normalised blocks add a gain per
    channel."""
    n, cin = conv(3, c, ch), ch
    for width in (ch, 2 * ch):
        for _ in range(blocks):
            n += conv(3, cin, width) + conv(3, width, width) + (conv(3, cin, width) if cin != width else 0)
            n += width if sn else 0
            cin = width
    return n + linear(cin, 1)


def dcgan_params(c, nz, enc_out, ngf=64):
    """Appendix B.1: a DCGAN decoder at 32 x 32 (z -> 4x4x256 -> 8x8x128 -> 16x16x64 -> 32x32xc,
    4x4 transposed convs, batch norm) and the symmetric encoder (batch norm after its 2nd and 3rd
    convs) ending in a 4x4 conv to enc_out (2 nz for the VAE's mean and log-variance)."""
    dec = conv(4, nz, 4 * ngf) + conv(4, 4 * ngf, 2 * ngf) + conv(4, 2 * ngf, ngf) + conv(4, ngf, c)
    dec += 2 * (4 + 2 + 1) * ngf
    enc = conv(4, c, ngf) + conv(4, ngf, 2 * ngf) + conv(4, 2 * ngf, 4 * ngf) + conv(4, 4 * ngf, enc_out)
    enc += 2 * (2 + 4) * ngf
    return dec + enc


def glow_params(c, levels, depth, hidden):
    """Appendix B.1: `levels` blocks of `depth` flow steps (actnorm, invertible 1x1 conv, affine
    coupling), a squeeze before each block and half the channels split off after each but the
    last, with Glow's learned prior on them (a 3x3 conv from the other half to a mean and a log
    scale). The paper's coupling net is a 3-layer Highway net of `hidden` channels; the script uses
    Glow's plain 3-layer net (3x3, 1x1, 3x3 convs) of the same width, counted here."""
    n = 0
    for i in range(levels):
        c *= 4
        half = c // 2
        step = 2 * c + c * c + conv(3, half, hidden) + conv(1, hidden, hidden) + conv(3, hidden, 2 * (c - half))
        n += depth * step
        if i < levels - 1:
            n += conv(3, c - half, 2 * half)  # the split prior
            c -= c // 2
    return n


GLOW = {"mnist": (2, 16, 64), "fashion": (2, 16, 64), "cifar10": (3, 32, 256)}  # Appendix B.1


def expected_params(dataset, base):
    c = CHANNELS[dataset]
    if base == "vae":
        return dcgan_params(c, 100, 200)  # latent 100
    if base == "glf":  # latent 64; 4 couplings, each one FC layer of 256 units
        return dcgan_params(c, 64, 64) + 4 * (linear(32, 256) + linear(256, 64))
    return glow_params(c, *GLOW[dataset])


@pytest.mark.parametrize("dataset", PAPER)
@pytest.mark.parametrize("base", ["vae", "glow", "glf"])
def test_full_size_networks_match_the_papers_description(dataset, base, tmp_path, capsys):
    cfg = print_config(["--dataset", dataset, "--base", base], capsys, tmp_path)
    for got, want in [(cfg["params"]["base"], expected_params(dataset, base)),
                      (cfg["params"]["energy"], energy_params(CHANNELS[dataset]))]:
        assert abs(got - want) <= 0.01 * want, (got, want)
    pixel = print_config(["--dataset", dataset, "--stage", "pixel"], capsys, tmp_path)
    want = energy_params(CHANNELS[dataset], sn=True)
    assert abs(pixel["params"]["energy"] - want) <= 0.01 * want


def test_published_sizes_as_a_sanity_check():
    """Round numbers a reader can check by eye: the energy net is ~1.1 M parameters, the
    CIFAR-10 GLOW ~16 M (the paper shrank Glow's 44 M 'to fit in a single GPU')."""
    assert 1.0e6 < energy_params(3) < 1.2e6
    assert 15e6 < glow_params(3, 3, 32, 256) < 17e6


# ------------------------------------------------------------------ (b) --print-config

@pytest.mark.parametrize("dataset", PAPER)
def test_print_config_shows_the_papers_values(dataset, tmp_path, capsys):
    cfg = print_config(["--dataset", dataset], capsys, tmp_path)
    appendix_b = dict(preset="paper", ngf=64, nz=100, ch=64, num_blocks=3, eps=0.01, langevin_steps=60,
                      sample_steps=100, alpha=0.1, fid_samples=10000, fid_split="test", base_lr=1e-3,
                      base_batch_size=128, base_steps=120000 if dataset != "cifar10" else 100000, steps=1000)
    assert {k: cfg[k] for k in appendix_b} == appendix_b
    glow = print_config(["--dataset", dataset, "--base", "glow"], capsys, tmp_path)
    levels, depth, hidden = GLOW[dataset]
    assert (glow["glow_levels"], glow["glow_depth"], glow["glow_hidden"]) == (levels, depth, hidden)
    assert (glow["base_batch_size"], glow["base_lr"], glow["steps"]) == (64, 5e-4, 200)  # Appendix B.1; 200 EBM steps
    assert glow["base_steps"] == (120000 if dataset != "cifar10" else 200000)  # 128 (256) epochs of 64
    glf = print_config(["--dataset", dataset, "--base", "glf"], capsys, tmp_path)
    assert (glf["nz"], glf["flow_couplings"], glf["flow_hidden"], glf["steps"]) == (64, 4, 256, 200)
    pixel = print_config(["--dataset", dataset, "--stage", "pixel"], capsys, tmp_path)
    assert pixel["steps"] == (20000 if dataset != "cifar10" else 100000)  # Appendix B.2
    du_mordatch = (pixel["pixel_step"], pixel["pixel_noise"], pixel["pixel_grad_clip"], pixel["buffer_size"],
                   pixel["reinit"])
    assert du_mordatch == (10, 0.005, 0.01, 10000, 0.05)


def test_explicit_flags_win_however_given(tmp_path, capsys):
    cfg = print_config(["--dataset", "fashion", "--base", "glow", "--batch-size=32", "--ngf", "32",
                        "--base-batch-size", "100", "--fid-split=train"], capsys, tmp_path)
    assert cfg["batch_size"] == 32 and cfg["base_batch_size"] == 100 and cfg["fid_split"] == "train"
    assert cfg["ngf"] == 32  # the parser's default value, but given: it counts
    assert {"batch_size", "ngf", "base_batch_size"} <= set(cfg["given"])
    small = print_config(["--dataset", "fashion", "--preset", "small"], capsys, tmp_path)
    assert (small["ngf"], small["ch"], small["num_blocks"], small["fid_samples"]) == (32, 16, 1, 500)
    with pytest.raises(SystemExit) as e:  # prefixes are refused (allow_abbrev=False)
        lt.get_args(["--dataset", "fashion", "--batch", "32"])
    assert e.value.code == 2


# ------------------------------------------------------------------ (c) the paper's structure runs

SMALL = ["--base-steps", "2", "--steps", "2", "--batch-size", "4", "--base-batch-size", "4", "--ngf", "8",
         "--ch", "4", "--glow-hidden", "8", "--flow-hidden", "16", "--langevin-steps", "1", "--sample-steps", "1",
         "--fid-samples", "8", "--stop-samples", "8", "--eval-every", "0", "--buffer-size", "16", "--log-every", "1",
         "--ckpt-every", "2", "--base-ckpt-every", "2"]


def watch_features(monkeypatch, features):
    """common.inception_features -> `features`, recording each batch's shape and checking that
    what is scored is an image batch in [-1, 1] at the reference's 32 x 32."""
    seen = []

    def watched(x, batch_size=100, device="cpu", model=None):
        x = torch.as_tensor(x).cpu()
        assert x.shape[-2:] == (32, 32) and x.shape[1] in (1, 3), x.shape
        assert torch.isfinite(x).all() and x.min() >= -1 and x.max() <= 1
        seen.append(tuple(x.shape))
        return features(x, batch_size=batch_size, device=device, model=model)
    monkeypatch.setattr(common, "inception_features", watched)
    return seen


@pytest.fixture
def stand_in_inception(monkeypatch):
    """Inception features -> a fixed random projection of the pixels to 16 dimensions."""
    W = torch.randn(3 * 32 * 32, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return watch_features(monkeypatch, lambda x, **k: (x.double().flatten(1) @ W[: x[0].numel()]).numpy())


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    for dataset in PAPER:
        write_fake(root, dataset, n_train=16, n_test=12)
    return root


# The early stop (FID of --stop-samples against the TRAIN split) is scored in the VAE runs.
EARLY_STOP = ["--eval-every", "2"]
CASES = [("fashion", "vae", EARLY_STOP), ("fashion", "glow", []), ("fashion", "glf", []), ("fashion", "pixel", []),
         ("mnist", "vae", EARLY_STOP), ("cifar10", "vae", EARLY_STOP), ("cifar10", "glow", []),
         ("cifar10", "glf", []), ("cifar10", "pixel", [])]


@pytest.mark.parametrize("dataset,base,extra", CASES)
def test_paper_structure_trains_and_evaluates_on_fake_files(dataset, base, extra, fake_root, stand_in_inception,
                                                            tmp_path, capsys):
    check_structure_run(dataset, base, extra, fake_root, stand_in_inception, tmp_path, capsys)


@pytest.mark.slow  # ~4 s on 2 idle cores: Inception on 24 images, two 2048 x 2048 eigendecompositions
def test_paper_structure_with_the_real_inception_features(fake_root, monkeypatch, tmp_path, capsys):
    seen = watch_features(monkeypatch, common.inception_features)
    check_structure_run("fashion", "vae", [], tmp_path / "own_stats", seen, tmp_path, capsys, fresh_root=True)


def check_structure_run(dataset, base, extra, root, seen, tmp_path, capsys, fresh_root=False):
    if fresh_root:
        write_fake(root, dataset, n_train=16, n_test=12)
    out = tmp_path / "run"
    stage = ["--stage", "pixel"] if base == "pixel" else ["--base", base]
    with own_signal_handlers():
        lt.main(["--dataset", dataset, *stage, *SMALL, *extra, "--data-dir", str(root), "--out", str(out)])
    printed = capsys.readouterr().out
    args = json.loads((out / "args.json").read_text())
    assert args["preset"] == "paper" and args["fid_split"] == "test" and args["num_blocks"] == 3
    assert (args["glow_levels"], args["glow_depth"]) == GLOW[dataset][:2]
    metrics = json.loads((out / "metrics.json").read_text())
    c = CHANNELS[dataset]
    # one reference for every base, the EBM and the pixel EBM: each scored batch is 8 images at 32 x 32
    assert seen and set(seen) == {(8, c, 32, 32)}
    if base == "pixel":
        assert torch.isfinite(torch.tensor(metrics["fid"]))
        assert torch.load(out / "checkpoint.pt", weights_only=True)["buffer"].shape == (16, c, 32, 32)
    else:
        assert all(torch.isfinite(torch.tensor(metrics[k])) for k in ("base_fid", "ebm_fid"))
        assert "base_bpd" in metrics if base == "glow" else "mse_recon" in metrics
        if extra == EARLY_STOP:
            assert (root / "fid_stats" / f"{dataset}_train_32x32_8.npz").exists()  # the early stop's
            assert "step 2: sample score" in printed
    assert (root / "fid_stats" / f"{dataset}_test_32x32_8.npz").exists()  # Table 1's: the test set
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2
    assert printed.strip().splitlines()[-1].startswith("metrics:")


# ------------------------------------------------------------------ (d) a protocol the data cannot serve

@pytest.mark.parametrize("dataset,flags,message", [
    ("fashion", ["--fid-samples", "10001"], "--fid-samples 10001 exceeds the 10000 images of fashion/test"),
    ("mnist", ["--stage", "pixel", "--fid-samples", "10001"], "10000 images of mnist/test"),
    ("cifar10", ["--base", "glow", "--fid-samples", "10001"], "10000 images of cifar10/test"),
    ("cifar10", ["--stop-samples", "50001"], "--stop-samples 50001 exceeds the 50000 images of cifar10/train")])
def test_fid_protocol_the_split_cannot_serve_fails_at_start_up(dataset, flags, message, tmp_path, monkeypatch,
                                                               capsys):
    out = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["latent_tilt.py", "--dataset", dataset, *flags,
                                      "--data-dir", str(tmp_path / "data"), "--out", str(out)])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e, own_signal_handlers():
        common.main_guard(lt.main)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and message in err, err
    assert not out.exists() and not (tmp_path / "data").exists()  # before the data, the folder and training

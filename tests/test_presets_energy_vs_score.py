"""The paper path of energy_vs_score.py (--preset paper), for every data set with a preset.

(a) parameter counts of the full-size networks against DDPM's published size and an
independent layer-by-layer count; (b) --print-config shows the paper's values and explicit
flags win; (c) two training steps and an evaluation (FID included) at each preset's
structure with small widths, on tiny fake files in the official formats; (d) a FID protocol
the reference split cannot serve fails in one line at start-up. All in-process.
"""
import contextlib
import json
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import common  # noqa: E402
import energy_vs_score as evs  # noqa: E402
from fakedata import write_fake  # noqa: E402

# every data set with a preset; celeba (64 px, not in the paper) is the slowest to build: -m slow
PAPER = ["cifar10", "mnist", "fashion", pytest.param("celeba", marks=pytest.mark.slow)]


def _preset_flag(dataset):
    """cifar10 is the paper's data set (--preset paper is its default); the other presets
    are ours, not the paper's, and apply when asked for."""
    return [] if dataset in evs.REPORTED else ["--preset", "paper"]


@contextlib.contextmanager
def _own_signal_handlers():
    """main() installs StopFlag's SIGINT/SIGTERM handlers; the test process gets its own back."""
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, handlers[0]), signal.signal(signal.SIGTERM, handlers[1])


def _print_config(argv, capsys, tmp_path):
    """--print-config in-process (the script builds the full-size networks on the meta
    device: the same parameters, without memory or initialisation time). Also checks that
    neither the data folder nor the output folder was touched."""
    capsys.readouterr()
    out, data = tmp_path / "out", tmp_path / "data"
    with pytest.raises(SystemExit) as e:
        evs.main([*argv, "--print-config", "--data-dir", str(data), "--out", str(out)])
    assert e.value.code == 0
    assert not out.exists() and not data.exists()
    return json.loads(capsys.readouterr().out)


# ------------------------------------------------------------------ (a), (b)

def ddpm_unet_params(in_ch, ch, ch_mult, num_res_blocks, attn_levels):
    """DDPM's U-Net (Ho et al., diffusion_tf/models/unet.py) counted layer by layer from its
    description, independently of common.UNet: conv3x3 = 9 cin cout + cout, dense and 1x1
    (nin) = cin cout + cout, GroupNorm = 2c; a residual block = norm, conv, temb dense
    (4 ch -> cout), norm, conv, and a 1x1 shortcut when cin != cout; attention = norm + q, k,
    v, proj; attn_levels: indices of the levels with attention (the middle block always has one)."""
    conv = lambda cin, cout: 9 * cin * cout + cout
    dense = lambda cin, cout: cin * cout + cout
    block = lambda cin, cout: (2 * cin + conv(cin, cout) + dense(4 * ch, cout) + 2 * cout + conv(cout, cout)
                               + (dense(cin, cout) if cin != cout else 0))
    attn = lambda c: 2 * c + 4 * dense(c, c)
    n = dense(ch, 4 * ch) + dense(4 * ch, 4 * ch) + conv(in_ch, ch)
    skips, cin = [ch], ch
    for i, m in enumerate(ch_mult):
        for _ in range(num_res_blocks):
            n += block(cin, ch * m) + (attn(ch * m) if i in attn_levels else 0)
            cin = ch * m
            skips.append(cin)
        if i < len(ch_mult) - 1:  # stride-2 conv
            n += conv(cin, cin)
            skips.append(cin)
    n += 2 * block(cin, cin) + attn(cin)
    for i, m in reversed(list(enumerate(ch_mult))):
        for _ in range(num_res_blocks + 1):
            n += block(cin + skips.pop(), ch * m) + (attn(ch * m) if i in attn_levels else 0)
            cin = ch * m
        if i > 0:  # nearest upsampling + conv
            n += conv(cin, cin)
    return n + 2 * cin + conv(cin, in_ch)


def energy_resnet_params(in_ch, ch, ch_mult, blocks):
    """Model C's g (common.EnergyResNet with a time embedding) counted from its description:
    temb dense ch -> 4ch -> 4ch, conv_in, per block conv, conv, temb dense (4ch -> cout) and a
    3x3 shortcut conv when cin != cout, head dense 4ch -> channels of the last level."""
    conv = lambda cin, cout: 9 * cin * cout + cout
    dense = lambda cin, cout: cin * cout + cout
    n = dense(ch, 4 * ch) + dense(4 * ch, 4 * ch) + conv(in_ch, ch)
    cin = ch
    for m in ch_mult:
        for _ in range(blocks):
            n += conv(cin, ch * m) + conv(ch * m, ch * m) + dense(4 * ch, ch * m)
            n += conv(cin, ch * m) if cin != ch * m else 0
            cin = ch * m
    return n + dense(4 * ch, cin)


# (channels, U-Net levels with attention at 16 px) per preset
STRUCTURE = {"cifar10": (3, 32, {1}), "mnist": (1, 32, {1}), "fashion": (1, 32, {1}), "celeba": (3, 64, {2})}


@pytest.mark.parametrize("dataset", PAPER)
def test_paper_config_and_full_size_parameter_counts(dataset, capsys, tmp_path):
    cfg = _print_config(["--dataset", dataset, *_preset_flag(dataset)], capsys, tmp_path)
    # (b) DDPM's CIFAR-10 settings (Ho et al. 2020, App. B; the paper: "otherwise we follow
    # the same setup"), and DDPM's FID protocol: 50k samples vs. the 50k training images
    expected = dict(preset="paper", model="all", ch=128, num_res_blocks=2, attn_res="16", dropout=0.1, lr=2e-4,
                    batch_size=128, warmup=5000, grad_clip=1.0, ema=0.9999, steps=300000, T=1000, beta_1=1e-4,
                    beta_T=0.02, var="large", sample_steps=1000, clip_x0=True, fid_samples=50000,
                    fid_split="train", ckpt_every=10000, c_blocks=8)
    expected["ch_mult"] = "1,2,2,2,4" if dataset == "celeba" else "1,2,2,2"
    expected["pad_to_32"] = dataset in ("mnist", "fashion")
    assert {k: cfg[k] for k in expected} == expected
    in_ch, size, attn_levels = STRUCTURE[dataset]
    assert common.image_shape(dataset, cfg["pad_to_32"]) == (in_ch, size, size)
    assert [size // 2 ** i for i in sorted(attn_levels)] == [16]
    # (a) f of A and B: DDPM's U-Net; the independent count, and DDPM's 35.7M at CIFAR-10
    ch_mult = tuple(int(m) for m in expected["ch_mult"].split(","))
    unet = ddpm_unet_params(in_ch, 128, ch_mult, 2, attn_levels)
    assert cfg["params"]["A"] == cfg["params"]["B"] == unet
    if dataset == "cifar10":
        assert abs(unet / 35.7e6 - 1) < 0.01  # DDPM's paper: "35.7 million parameters"
    # C: the paper gives no size ("a standard feedforward ResNet"); ours is --c-blocks 8,
    # chosen to be comparable with the U-Net (within 5%), as the help string states
    assert cfg["params"]["C"] == energy_resnet_params(in_ch, 128, ch_mult, 8)
    assert abs(cfg["params"]["C"] / unet - 1) < 0.05


def test_preset_names_every_value_that_differs_from_the_small_defaults():
    for dataset, preset in evs.PRESETS.items():
        assert set(evs.IMAGE_DEFAULTS) <= set(preset), dataset


def test_explicit_flags_win_and_unreported_data_sets_default_small(capsys, tmp_path):
    cfg = _print_config(["--dataset", "cifar10", "--batch-size=32", "--fid-samples", "100", "--ch-mult=1,2,2",
                         "--model", "A"], capsys, tmp_path / "a")
    assert cfg["preset"] == "paper" and cfg["batch_size"] == 32 and cfg["ch_mult"] == "1,2,2"
    assert cfg["fid_samples"] == 100  # the flag's default value, given explicitly: it counts
    assert cfg["ch"] == 128 and {"batch_size", "fid_samples", "ch_mult"} <= set(cfg["given"])
    with pytest.raises(SystemExit) as e:  # prefixes are refused (allow_abbrev=False)
        evs.parse_args(["--dataset", "cifar10", "--batch", "32"])
    assert e.value.code == 2
    capsys.readouterr()
    cfg = _print_config(["--dataset", "fashion", "--model", "A"], capsys, tmp_path / "b")
    assert cfg["preset"] == "small" and cfg["ch"] == 16 and cfg["pad_to_32"] is False
    assert cfg["fid_split"] == "test"


# ------------------------------------------------------------------ (c) the paper path runs

SMALL = ["--steps", "2", "--batch-size", "2", "--ch", "8", "--sample-steps", "2", "--fid-samples", "8",
         "--eval-samples", "8", "--sample-batch", "8", "--diag-t", "1000", "--diag-batch", "1", "--diag-probes", "1",
         "--log-every", "1"]


def _stand_in_features(images, **kwargs):
    """16 cheap features per image in place of Inception's 2048 (the 2048 x 2048 eigenvalue
    problem of each FID takes seconds on a loaded CPU); everything around it (the samples,
    the reference split, its cached statistics, the Frechet distance) is the real code."""
    x = images.float().clamp(-1, 1)
    pooled = torch.nn.functional.adaptive_avg_pool2d(x.mean(1, keepdim=True), 4).flatten(1)
    return pooled.double().numpy()


# cifar10: the paper's comparison (A, B, C); the real Inception network once (mnist, model A,
# the cheapest); C on the padded 28 px images; the energy U-Net B at 64 px
RUNS = [("cifar10", "all", False), ("mnist", "A", True), ("fashion", "C", False),
        pytest.param("celeba", "B", False, marks=pytest.mark.slow)]


@pytest.mark.parametrize("dataset,model,inception", RUNS)
def test_paper_structure_trains_and_evaluates_on_fake_files(dataset, model, inception, tmp_path, capsys,
                                                            monkeypatch):
    if not inception:
        monkeypatch.setattr(common, "inception_features", _stand_in_features)
    root = write_fake(tmp_path / "data", dataset, n_train=10, n_test=4)
    out = tmp_path / "run"
    with _own_signal_handlers():
        evs.main(["--dataset", dataset, *_preset_flag(dataset), "--model", model, *SMALL,
                  "--data-dir", str(root), "--out", str(out)])
    args = json.loads((out / "args.json").read_text())
    assert args["preset"] == "paper" and args["num_res_blocks"] == 2 and args["attn_res"] == "16"
    assert args["fid_split"] == "train" and args["clip_x0"] is True and args["c_blocks"] == 8
    metrics = json.loads((out / "metrics.json").read_text())
    names = "ABC" if model == "all" else model
    for name in names:
        assert metrics[f"{name}_fid"] > 0 and metrics[f"{name}_asym"] >= 0
    in_ch, size, _ = STRUCTURE[dataset]
    # the reference statistics: 8 TRAINING images at the model's size (28 px padded to 32)
    with np.load(root / "fid_stats" / f"{dataset}_train_{size}x{size}_8.npz") as f:
        assert f["mu"].shape == ((2048,) if inception else (16,))
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["step"] == 2
    assert state["models"][names[0]]["net"]["conv_in.weight"].shape[:2] == (8, in_ch)
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("metrics:")


# ------------------------------------------------------------------ (d) a protocol the data cannot serve

UNSERVABLE = [("cifar10", ["--fid-samples", "50001"], "50000 images of cifar10/train"),
              ("mnist", ["--fid-samples", "60001"], "60000 images of mnist/train"),
              ("fashion", ["--fid-split", "test", "--fid-samples", "10001"], "10000 images of fashion/test"),
              ("celeba", ["--fid-samples", "11"], "10 images of celeba/train")]


@pytest.mark.parametrize("dataset,extra,have", UNSERVABLE)
def test_fid_protocol_the_split_cannot_serve_fails_at_start_up(dataset, extra, have, tmp_path, monkeypatch, capsys):
    root = tmp_path / "data"
    if dataset == "celeba":  # a folder data set: its split is counted
        write_fake(root, dataset, n_train=10, n_test=2)
    out = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["energy_vs_score.py", "--dataset", dataset, *_preset_flag(dataset), *extra,
                                      "--data-dir", str(root), "--out", str(out)])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e, _own_signal_handlers():
        common.main_guard(evs.main)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and have in err and "--fid-samples" in err
    assert not out.exists()  # before the output folder, the data and training

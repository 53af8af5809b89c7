"""The paper path of recovery_likelihood.py (--preset paper): the authors' network at full size,
the resolved configuration, a 2-step run at each preset's structure on tiny fake files in the
official formats, and the FID protocol's start-up check. Everything runs in-process."""
import json
import signal
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import common  # noqa: E402
import fakedata  # noqa: E402
import recovery_likelihood as rl  # noqa: E402


def run_main(argv, capsys):
    """rl.main(argv) as `python recovery_likelihood.py ARGV` runs it; returns (exit code, stdout, stderr)."""
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    code = 0
    try:
        common.main_guard(lambda: rl.main(argv))
    except SystemExit as e:
        code = e.code
    finally:
        signal.signal(signal.SIGINT, handlers[0]), signal.signal(signal.SIGTERM, handlers[1])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def print_config(argv, capsys, tmp_path):
    """--print-config's JSON; it must neither read data (--data-dir does not exist) nor touch --out."""
    out = tmp_path / "never_written"
    code, stdout, err = run_main([*argv, "--data-dir", str(tmp_path / "no_data"), "--out", str(out),
                                  "--print-config"], capsys)
    assert code == 0, err
    assert not out.exists()
    return json.loads(stdout)


def authors_param_count(in_ch, ch, ch_mult, num_blocks):
    """Trainable weights of the authors' energy network (their network.py, net_res_temb2, as their
    CIFAR-10 / CelebA / LSUN runs configure it: conv shortcuts, a per-channel scale g on each block's
    second conv, no attention, no normalisation), counted layer by layer from its description: the
    time embedding ch -> 4ch -> 4ch, conv_in, per block conv1 + temb_proj + conv2 (+ g) (+ a 3x3
    shortcut when the width changes), the head's dense 4ch -> ch * ch_mult[-1]. Its dense_out layer
    is created but never called, so Keras never builds its weights."""
    temb = 4 * ch
    n = (ch * temb + temb) + (temb * temb + temb) + (temb * ch * ch_mult[-1] + ch * ch_mult[-1])
    n += 9 * in_ch * ch + ch
    cin = ch
    for m in ch_mult:
        for _ in range(num_blocks):
            cout = ch * m
            n += (9 * cin * cout + cout) + (temb * cout + cout) + (9 * cout * cout + cout) + cout
            n += 9 * cin * cout + cout if cin != cout else 0
            cin = cout
    return n


# data set -> (ch_mult, blocks, batch, beta1): NOTES.md 1 and the authors' README's commands
PAPER = {"cifar10": ((1, 2, 2, 2), 8, 256, 0.9), "celeba": ((1, 2, 2, 2, 4), 6, 128, 0.5),
         "lsun_church": ((1, 2, 2, 2, 4, 4), 2, 64, 0.5), "lsun_bedroom": ((1, 2, 2, 2, 4, 4), 5, 64, 0.5)}


@pytest.mark.parametrize("dataset", list(PAPER))
def test_paper_network_and_configuration(dataset, capsys, tmp_path):
    """The default for a data set the paper reports is --preset paper: the authors' network at full
    size (its parameter count, from their layer list, must match within 1%: it matches exactly) and
    the paper's training and evaluation settings."""
    ch_mult, blocks, batch, beta1 = PAPER[dataset]
    config = print_config(["--dataset", dataset, "--steps", "1000"], capsys, tmp_path)
    expect = authors_param_count(3, 128, ch_mult, blocks)
    assert config["params"]["energy"] == pytest.approx(expect, rel=0.01)
    assert config["params"]["energy"] == expect
    paper = dict(preset="paper", net="resnet", ch=128, ch_mult=",".join(map(str, ch_mult)), num_blocks=blocks,
                 sn=True, T=6, n_steps=30, b_square=2e-4, step_floor=0.0, drift_cap=0.0, lr=1e-4,
                 beta1=beta1, warmup=1000, lr_decay="none", ema=0.999, batch_size=batch, flip=True,
                 sample_noise=0.99, fid_samples=50000, fid_split="train", amp="none", steps=1000)
    assert {k: config[k] for k in paper} == paper
    # the step cap the preset carries never binds at b^2 = 2e-4: (R3) exactly
    sch, base = rl.make_schedule(6, 2e-4, config["step_cap"]), rl.diffusion_schedule(6)
    rule = (base["sigmabar"][:6] / base["sigmabar"][0] * 2e-4 * base["sigma"][1:] ** 2).sqrt()
    assert sch["s"].double().sub(rule).abs().max() < 1e-6


def test_presets_name_every_value_that_differs_from_small():
    paper, small = rl.get_args(["--dataset", "cifar10"]), rl.get_args(["--dataset", "cifar10", "--preset", "small"])
    assert (paper.preset, small.preset, small.net, small.fid_split) == ("paper", "small", "unet", "test")
    for dataset in PAPER:
        paper = rl.get_args(["--dataset", dataset])
        small = rl.get_args(["--dataset", dataset, "--preset", "small"])
        differ = {k for k in vars(paper) if k not in ("preset", "given") and getattr(paper, k) != getattr(small, k)}
        assert differ <= set(rl.PRESETS[dataset]), differ - set(rl.PRESETS[dataset])


def test_explicit_flags_win(capsys, tmp_path):
    """Explicit flags beat the preset in every spelling; a flag given with the parser's default
    value still counts as given; prefixes are refused (allow_abbrev=False)."""
    config = print_config(["--dataset", "celeba", "--batch-size=32", "--beta1", "0.9", "--num-blocks", "1",
                           "--fid-split", "test", "--fid-samples", "8"], capsys, tmp_path)
    assert (config["batch_size"], config["beta1"], config["num_blocks"]) == (32, 0.9, 1)
    assert (config["fid_split"], config["fid_samples"], config["lr"]) == ("test", 8, 1e-4)
    assert {"batch_size", "beta1", "num_blocks"} <= set(config["given"])
    assert config["params"]["energy"] == authors_param_count(3, 128, (1, 2, 2, 2, 4), 1)
    with pytest.raises(SystemExit) as e:
        rl.get_args(["--dataset", "cifar10", "--batch", "32"])
    assert e.value.code == 2 and "--batch" in capsys.readouterr().err
    small = print_config(["--dataset", "fashion"], capsys, tmp_path)  # not in the paper: small
    assert (small["preset"], small["net"], small["fid_split"], small["fid_samples"]) == ("small", "unet", "test", 500)


@pytest.mark.parametrize("dataset", ["cifar10", "celeba", "lsun_church"])
def test_paper_structure_trains_and_evaluates(dataset, capsys, tmp_path, monkeypatch):
    """Two steps and the whole evaluation at the preset's structure (ch_mult, blocks, image size,
    levels, reference split) with the widths, batch, chains and sample counts made small, on tiny
    files in the official formats: no traceback, FID on a few samples against the training split.
    For the folder data sets the Frechet distance itself (an eigendecomposition of a 2048 x 2048
    product, ~5 CPU-seconds, tested in test_common and here on CIFAR-10) is replaced by its mean
    term; everything before it (samples, reference split, Inception features, cache) runs."""
    if dataset != "cifar10":
        def mean_term(mu1, sigma1, mu2, sigma2):
            assert mu1.shape == mu2.shape == (2048,) and sigma1.shape == sigma2.shape == (2048, 2048)
            return float(((mu1 - mu2) ** 2).sum())
        monkeypatch.setattr(common, "frechet_distance", mean_term)
    data = fakedata.write_fake(tmp_path / "data", dataset, n_train=16, n_test=8)
    out, n = tmp_path / "run", 8 if dataset == "cifar10" else 4  # the Inception net costs ~0.1 s per image here
    argv = ["--dataset", dataset, "--data-dir", str(data), "--out", str(out), "--steps", "2", "--ch", "4",
            "--batch-size", "4", "--n-steps", "1", "--fid-samples", str(n), "--test-points", "4",
            "--ais-particles", "2", "--ais-steps", "1", "--log-every", "1", "--ckpt-every", "2"]
    argv += ["--long-run", "2"] if dataset == "celeba" else []  # its samples' FID, fid_long_run
    code, stdout, err = run_main(argv, capsys)
    assert code == 0 and "Traceback" not in err, err
    assert stdout.strip().splitlines()[-1].startswith("metrics: ")
    args = json.loads((out / "args.json").read_text())
    ch_mult, blocks, _, _ = PAPER[dataset]
    assert (args["preset"], args["ch_mult"], args["num_blocks"], args["fid_split"], args["T"]) == \
        ("paper", ",".join(map(str, ch_mult)), blocks, "train", 6)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["step"] == 2 and metrics["fid"] > 0
    assert ("fid_long_run" in metrics) == (dataset == "celeba")
    _, h, w = common.image_shape(dataset)
    assert (data / "fid_stats" / f"{dataset}_train_{h}x{w}_{n}.npz").exists()  # the reference: n training images
    assert (out / "samples_2.png").exists()


@pytest.mark.parametrize("dataset,n,have", [("cifar10", 50001, 50000), ("celeba", 17, 16), ("lsun_church", 22, 21)])
def test_fid_samples_the_split_cannot_serve_fail_at_start_up(dataset, n, have, capsys, tmp_path):
    """One line, before any training or output folder: FID compares equally many images."""
    # CIFAR-10's split sizes are known constants; the folders' are counted (LSUN: 90% of the files train)
    data = tmp_path if dataset == "cifar10" else fakedata.write_fake(tmp_path / "data", dataset, n_train=16, n_test=8)
    out = tmp_path / "run"
    code, _, err = run_main(["--dataset", dataset, "--data-dir", str(data), "--out", str(out),
                             "--fid-samples", str(n), "--ch", "4"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1
    assert f"--fid-samples {n} exceeds the {have} images of {dataset}/train" in lines[0]
    assert not out.exists()

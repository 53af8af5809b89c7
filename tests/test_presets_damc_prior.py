"""The paper path of damc_prior.py (--preset paper): full-size networks against the authors'
parameter counts, the resolved configuration, a 2-step run at the preset's structure on tiny fake
files in the official formats, and the start-up check of the FID protocol."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import common  # noqa: E402
import damc_prior  # noqa: E402
from fakedata import write_fake  # noqa: E402

# Parameter counts of the authors' networks (github.com/yuPeiyu98/Diffusion-Amortized-MCMC), counted
# by instantiating their code at the settings of train_gen_recon.py: g = _netG_cifar10 / _netG_svhn /
# _netG_celeba64 (nz, ngf = 128/128, 100/64, 100/128), E = _netE (nz -> 200 -> 200 -> 1), q = _netQ_U
# (nxemb 1024, ntemb 128, nif 64, nf 4; it holds an unused 1 x nxemb parameter `xemb`, which ours
# lacks). Toy: toy_example.py's G (2 -> 128 x 3 -> 2) and _netQ_U_toy (nxemb 128, nf 4). The
# authors' toy has no EBM prior: its E is the paper's prior MLP (nz -> 200 -> 200 -> 1) at nz = 2.
AUTHORS = {"cifar10": {"g": 18883075, "E": 66201, "q": 14439808},
           "svhn": {"g": 3447683, "E": 60601, "q": 14359224},
           "celeba": {"g": 12656515, "E": 60601, "q": 18555064},
           "pinwheel": {"g": 33666, "E": 41001, "q": 1746066}}
IMAGES = ["cifar10", "svhn", "celeba"]


def paper_argv(dataset):
    return ["--dataset", dataset] + (["--preset", "paper"] if dataset == "pinwheel" else [])


def print_config(argv, capsys):
    with pytest.raises(SystemExit) as e:
        damc_prior.main([*argv, "--print-config"])
    assert e.value.code == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("dataset", sorted(AUTHORS))
def test_full_size_networks_match_the_authors_parameter_counts(dataset):
    args = damc_prior.get_args(paper_argv(dataset))
    assert args.preset == "paper"
    nets = damc_prior.build_networks(args)  # no forward pass
    for name, count in AUTHORS[dataset].items():
        assert common.param_count(nets[name]) == pytest.approx(count, rel=0.01), name


@pytest.mark.parametrize("dataset", IMAGES)
def test_print_config_shows_the_papers_values_without_touching_data(dataset, tmp_path, capsys):
    config = print_config(["--dataset", dataset, "--data-dir", str(tmp_path / "none"), "--out",
                           str(tmp_path / "run")], capsys)
    assert config["preset"] == "paper"
    expected = {**damc_prior.PRESETS[dataset], "nz": damc_prior.LATENT_DIM[dataset], "sampler": "damc",
                "sigma": 0.1, "post_steps": 30, "post_step_size": 0.1, "prior_steps": 60, "prior_step_size": 0.4,
                "eval_prior_steps": 100, "q_steps": 100, "q_updates": 6, "p_mask": 0.2, "slow_rate": 0.005,
                "slow_every": 10, "q_lr": 2e-4, "g_lr": 2e-4, "e_lr": 1e-4, "q_wd": 1e-4, "grad_clip": 100.0,
                "lr_decay": 0.99, "lr_decay_every": 1000, "lr_min": 1e-5, "flip": True, "prior_mala": False,
                "amp": "none"}
    assert {k: config[k] for k in expected} == expected
    assert (config["batch_size"], config["fid_samples"], config["fid_split"]) == (128, 50000, "train")
    assert config["eval_prior_step_size"] == (1.6 if dataset == "cifar10" else 0.4)  # authors' README
    assert config["params"] == {name: common.param_count(net) for name, net in
                                damc_prior.build_networks(damc_prior.get_args(["--dataset", dataset])).items()}
    assert not (tmp_path / "none").exists() and not (tmp_path / "run").exists()


def test_explicit_flags_win_over_the_preset(capsys):
    # --flag=value counts as given, and so does a flag given with its default value (--ngf 8)
    config = print_config(["--dataset", "svhn", "--batch-size=32", "--ngf", "8", "--fid-split=test",
                           "--fid-samples", "10000"], capsys)
    assert (config["batch_size"], config["ngf"], config["fid_split"], config["fid_samples"]) == (32, 8, "test", 10000)
    assert (config["ndf"], config["nxemb"], config["nz"]) == (64, 1024, 100)  # the rest stays the paper's
    assert {"batch_size", "ngf", "fid_split", "fid_samples"} <= set(config["given"])
    with pytest.raises(SystemExit) as e:  # prefixes are refused (allow_abbrev=False)
        damc_prior.get_args(["--dataset", "svhn", "--batch", "32"])
    assert e.value.code == 2


def test_lebm_baseline_and_toy_presets(capsys):
    lebm = print_config(["--dataset", "cifar10", "--sampler", "langevin"], capsys)
    assert {k: lebm[k] for k in damc_prior.LEBM} == damc_prior.LEBM  # Pang et al.'s settings
    assert (lebm["batch_size"], lebm["lr_decay_every"], lebm["fid_split"]) == (100, 500, "train")
    lebm = print_config(["--dataset", "cifar10", "--sampler", "langevin", "--sigma", "0.2", "--batch-size", "64"],
                        capsys)
    assert (lebm["sigma"], lebm["batch_size"], lebm["lr_decay_every"]) == (0.2, 64, math.ceil(50000 / 64))
    toy = print_config(["--preset", "paper"], capsys)  # pinwheel: the authors' toy settings
    assert {k: toy[k] for k in damc_prior.PRESETS["pinwheel"]} == damc_prior.PRESETS["pinwheel"]
    assert (toy["sigma"], toy["post_steps"], toy["p_mask"], toy["slow_rate"], toy["q_wd"]) == \
        (0.25, 50, 0.1, 0.75, 1e-2)
    assert print_config([], capsys)["preset"] == "small"  # the toy's default
    assert print_config(["--dataset", "fashion"], capsys)["preset"] == "small"  # no paper result on Fashion/MNIST
    with pytest.raises(common.UserError, match="--preset paper has no setting for 'mnist'"):
        damc_prior.get_args(["--dataset", "mnist", "--preset", "paper"])


# the preset's structure (image size, generator / encoder layout, latent size, FID reference split,
# flips, evaluation step size), with widths, batch, chain lengths and sample counts small
SMALL = ["--steps", "2", "--batch-size", "4", "--ngf", "2", "--ndf", "2", "--nxemb", "8", "--q-width", "8",
         "--q-steps", "2", "--post-steps", "2", "--prior-steps", "2", "--eval-prior-steps", "2", "--recon-steps", "1",
         "--recon-images", "4", "--fid-samples", "8", "--log-every", "1"]


@pytest.mark.parametrize("dataset", IMAGES)
def test_two_steps_and_evaluation_at_the_paper_structure(dataset, tmp_path, capsys, monkeypatch):
    # CIFAR-10 computes the whole FID. SVHN and CelebA run the same path with stand-ins for the two
    # costly pieces (tested in test_common): the Inception net (~0.1-0.2 s per image on a CPU) gives
    # the first 2048 pixels as features, and the Frechet distance (a 2048 x 2048 eigenvalue problem,
    # seconds) scores the mean term alone.
    if dataset != "cifar10":
        size = common.image_shape(dataset)[1]

        def features(images, *args, **kwargs):
            assert images.shape[1:] == (3, size, size) and images.dtype == torch.float32
            assert images.abs().max() <= 1
            return images.flatten(1)[:, :2048].double().numpy()

        def mean_term(mu1, sigma1, mu2, sigma2):
            assert mu1.shape == mu2.shape == (2048,) and sigma1.shape == sigma2.shape == (2048, 2048)
            return float(((mu1 - mu2) ** 2).sum())
        monkeypatch.setattr(common, "inception_features", features)
        monkeypatch.setattr(common, "frechet_distance", mean_term)
    data = write_fake(tmp_path / "data", dataset, n_train=16, n_test=8)
    out = tmp_path / "run"
    damc_prior.main(["--dataset", dataset, "--data-dir", str(data), "--out", str(out), *SMALL])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("metrics: fid_q=")
    args = json.loads((out / "args.json").read_text())
    assert (args["preset"], args["fid_split"], args["flip"]) == ("paper", "train", True)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"fid_q", "fid_ebm", "mse_recon", "mse_recon_start"} and all(math.isfinite(v) for v in metrics.values())
    size = common.image_shape(dataset)[1]
    assert (data / "fid_stats" / f"{dataset}_train_{size}x{size}_8.npz").exists()  # against training images


def test_fid_samples_the_reference_split_cannot_serve_fail_at_start_up(tmp_path):
    none = str(tmp_path / "none")
    with pytest.raises(common.UserError, match="--fid-samples 50001 exceeds the 50000 images of cifar10/train") as e:
        damc_prior.main(["--dataset", "cifar10", "--fid-samples", "50001", "--data-dir", none,
                         "--out", str(tmp_path / "run")])
    assert "\n" not in str(e.value)
    with pytest.raises(common.UserError, match="exceeds the 10000 images of cifar10/test"):
        damc_prior.main(["--dataset", "cifar10", "--fid-split", "test", "--data-dir", none, "--out",
                         str(tmp_path / "run")])
    with pytest.raises(common.UserError, match="--recon-images 10001 exceeds the 10000 images of cifar10/test"):
        damc_prior.main(["--dataset", "cifar10", "--recon-images", "10001", "--data-dir", none, "--out",
                         str(tmp_path / "run")])
    data = write_fake(tmp_path / "data", "celeba", n_train=6, n_test=2)  # a folder data set: counted
    with pytest.raises(common.UserError, match="--fid-samples 7 exceeds the 6 images of celeba/train"):
        damc_prior.main(["--dataset", "celeba", "--fid-samples", "7", "--data-dir", str(data), "--out",
                         str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()  # before the output folder (and before data and training)

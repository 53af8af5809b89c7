"""The paper path of every script: each `--preset paper` a script advertises resolves, reports
its networks' sizes and refuses, in one line and before touching data or the output folder,
an FID protocol its reference split cannot serve.

The deeper checks live beside this file, one per script (tests/test_presets_SCRIPT.py): the
full-size parameter counts against the authors' code (or the paper's description), the
paper's values in the resolved configuration, and two training steps plus an evaluation at
each preset's structure (levels, blocks, attention, image size, padding, reference split) on
tiny files in the official formats.
"""
import importlib
import json
import signal
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402

# script -> the data sets its paper reports (where --preset paper is the default)
PAPER_DATA = {"recovery_likelihood": ["cifar10", "celeba", "lsun_church", "lsun_bedroom"],
              "energy_vs_score": ["cifar10"],
              "damc_prior": ["cifar10", "svhn", "celeba"],
              "latent_tilt": ["mnist", "fashion", "cifar10"]}
CASES = [(script, data) for script, sets in PAPER_DATA.items() for data in sets]


def run(script, argv, capsys):
    """SCRIPT.main() as the command line runs it: (exit code, stdout, stderr)."""
    module = importlib.import_module(script)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    code = 0
    try:
        common.main_guard(lambda: module.main(argv))
    except SystemExit as e:
        code = e.code
    finally:
        signal.signal(signal.SIGINT, handlers[0]), signal.signal(signal.SIGTERM, handlers[1])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("script,dataset", CASES)
def test_paper_preset_is_the_default_and_explicit_flags_win(script, dataset, capsys, tmp_path):
    where = ["--data-dir", str(tmp_path / "absent"), "--out", str(tmp_path / "run")]
    code, out, err = run(script, ["--dataset", dataset, *where, "--batch-size=32", "--print-config"], capsys)
    config = json.loads(out)
    assert code in (0, None) and config["preset"] == "paper" and config["batch_size"] == 32, err
    assert config["fid_samples"] >= 10000 and all(n > 10 ** 4 for n in config["params"].values())
    code, _, err = run(script, ["--dataset", dataset, *where, "--batch", "32"], capsys)
    assert code == 2 and "unrecognized arguments: --batch" in err  # a prefix is not taken for a flag
    assert not (tmp_path / "run").exists() and not (tmp_path / "absent").exists()  # nothing read or written


@pytest.mark.parametrize("script,dataset", CASES)
def test_a_protocol_the_split_cannot_serve_fails_at_start_up(script, dataset, capsys, tmp_path):
    if dataset in common.FOLDER_DATASETS:  # a folder data set is counted: give it a small one
        sys.path.insert(0, str(ROOT / "tests"))
        from fakedata import write_fake
        write_fake(tmp_path / "data", dataset, n_train=4, n_test=2)
    t0 = time.time()
    code, _, err = run(script, ["--dataset", dataset, "--data-dir", str(tmp_path / "data"),
                                "--out", str(tmp_path / "run"), "--fid-samples", "1000000"], capsys)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "--fid-samples 1000000 exceeds" in lines[0], err
    assert time.time() - t0 < 30 and not (tmp_path / "run").exists()  # before any training or output

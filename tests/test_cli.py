"""Hard inputs and faults, for all four scripts.

Bad input must exit non-zero with one line naming the fix (no traceback); SIGINT, SIGKILL
and a diverging run must lose nothing. Argument, data and checkpoint errors and the resumed
runs run the script's main() in-process (through common.main_guard, exactly as `python
SCRIPT.py` does); the interrupted runs and the NaN cases run real processes.
"""
import importlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402

# Per script: flags for a tiny, fast run; a flag that changes the network's shapes; the
# script's Langevin step-size flag (or learning rate where it has no sampler step); flags
# that make training diverge.
SCRIPTS = {
    "recovery_likelihood": {
        "tiny": ["--batch-size", "64", "--n-steps", "5", "--eval-samples", "200", "--test-points", "200",
                 "--ais-particles", "50", "--ais-steps", "5", "--lr-decay", "none"],
        "arch": ["--hidden", "32"], "step": "--b-square", "nan": ["--lr", "1e30"]},
    "energy_vs_score": {
        "tiny": ["--model", "A", "--eval-samples", "64", "--sample-steps", "5", "--diag-batch", "8",
                 "--diag-probes", "2", "--diag-t", "1,1000", "--batch-size", "32", "--ch", "16"],
        "arch": ["--ch", "32"], "step": "--lr", "nan": ["--lr", "1e30", "--grad-clip", "1e30"]},
    "damc_prior": {
        "tiny": ["--batch-size", "16", "--q-width", "16", "--nxemb", "16", "--q-steps", "4", "--post-steps", "3",
                 "--prior-steps", "3", "--eval-prior-steps", "3", "--eval-x", "3", "--eval-z", "16",
                 "--eval-every", "2", "--eval-prior-x", "16", "--slow-every", "1", "--lr-decay-every", "1"],
        "arch": ["--q-width", "32"], "step": "--post-step-size", "nan": ["--prior-step-size", "1e12", "--no-prior-mala"]},
    "latent_tilt": {
        "tiny": ["--base-steps", "3", "--eval-every", "2", "--patience", "0", "--langevin-steps", "3", "--sample-steps", "3",
                 "--hidden", "16", "--stop-samples", "50", "--batch-size", "32"],
        "arch": ["--hidden", "32"], "step": "--eps", "nan": ["--lr", "1e30"]},
}
NAMES = [name for name in SCRIPTS if (ROOT / f"{name}.py").exists()]


def run_in_process(name, argv, monkeypatch, capsys):
    """Run SCRIPT's main() as the command line does; returns (exit code, stderr)."""
    module = importlib.import_module(name)
    monkeypatch.setattr(sys, "argv", [f"{name}.py", *argv])
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    code = 0
    try:
        common.main_guard(module.main)
    except SystemExit as e:
        code = e.code
    finally:
        signal.signal(signal.SIGINT, handlers[0]), signal.signal(signal.SIGTERM, handlers[1])
    return code, capsys.readouterr().err


def assert_one_line_error(code, err, *needles):
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code not in (0, None), err
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def run(name, argv, cwd, **kw):
    return subprocess.run([sys.executable, str(ROOT / f"{name}.py"), *argv], cwd=cwd, capture_output=True,
                          text=True, timeout=600, **kw)


def checkpoint_step(out):
    return torch.load(Path(out) / "checkpoint.pt", map_location="cpu", weights_only=True)["step"]


# --------------------------------------------------------------------------------------
# Bad input: one line naming the fix
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_argument_errors(name, tmp_path, monkeypatch, capsys):
    tiny, out = SCRIPTS[name]["tiny"], ["--out", str(tmp_path / "run")]
    cases = [
        (["--dataset", "imagenet"], ["unknown dataset"]),
        (["--steps", "-1"], ["--steps"]),
        (["--batch-size", "0"], ["--batch-size"]),
        ([SCRIPTS[name]["step"], "-0.1"], [SCRIPTS[name]["step"]]),
        (["--resume"], ["--out"]),
        (["--eval-only"], ["--out"]),
    ]
    for argv, needles in cases:
        code, err = run_in_process(name, [*tiny, *out, *argv], monkeypatch, capsys)
        assert_one_line_error(code, err, *needles)


@pytest.mark.parametrize("name", NAMES)
def test_absent_data_set_that_cannot_be_downloaded(name, tmp_path, monkeypatch, capsys):
    def offline(*a, **k):
        raise OSError("network is unreachable")
    monkeypatch.setattr(common.urllib.request, "urlopen", offline)
    argv = [*SCRIPTS[name]["tiny"], "--dataset", "cifar10", "--data-dir", str(tmp_path / "data"),
            "--out", str(tmp_path / "run"), "--steps", "1", "--preset", "small"]
    code, err = run_in_process(name, argv, monkeypatch, capsys)
    assert_one_line_error(code, err, "cifar-10-python.tar.gz", "--data-dir")


@pytest.mark.parametrize("name", NAMES)
def test_unwritable_output_folder(name, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code, err = run_in_process(name, [*SCRIPTS[name]["tiny"], "--out", str(blocker / "run"), "--steps", "1"],
                               monkeypatch, capsys)
    assert_one_line_error(code, err, "--out")


@pytest.mark.parametrize("name", NAMES)
def test_corrupt_and_foreign_checkpoints(name, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"\x00 this is not a checkpoint")
    argv = [*SCRIPTS[name]["tiny"], "--out", str(out), "--steps", "2"]
    code, err = run_in_process(name, [*argv, "--resume"], monkeypatch, capsys)
    assert_one_line_error(code, err, "new --out")
    code, err = run_in_process(name, argv, monkeypatch, capsys)  # a fresh run into it
    assert_one_line_error(code, err, "--resume")
    other = next(n for n in NAMES if n != name)
    torch.save({"script": other, "args": {}, "step": 1}, out / "checkpoint.pt")
    code, err = run_in_process(name, [*argv, "--resume"], monkeypatch, capsys)
    assert_one_line_error(code, err, other)


# --------------------------------------------------------------------------------------
# Faults: nothing is lost
# --------------------------------------------------------------------------------------

def wait_for(predicate, proc, timeout=240):
    t0 = time.time()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"exited early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.2)


def log_steps(out):
    path = Path(out) / "log.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def start_long_run(name, argv, cwd, out, logged):
    """Start a run far longer than the test and return once it has logged `logged` steps."""
    proc = subprocess.Popen([sys.executable, str(ROOT / f"{name}.py"), *argv, "--steps", "100000"], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: len(log_steps(out)) >= logged, proc)
    return proc


@pytest.mark.parametrize("name", NAMES)
def test_sigint_saves_and_resume_continues(name, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    argv = [*SCRIPTS[name]["tiny"], "--out", str(out), "--log-every", "1", "--ckpt-every", "1000"]
    # latent_tilt logs its 3 base steps (~1 ms each) first: wait for 2 EBM steps, else the
    # signal can land in EBM step 1 and the checkpoint holds step 1
    proc = start_long_run(name, argv, tmp_path, out, logged=5 if name == "latent_tilt" else 2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    step = checkpoint_step(out)
    assert step >= 2
    # An incompatible configuration is refused in one line ...
    code, err = run_in_process(name, [*argv, *SCRIPTS[name]["arch"], "--steps", str(step + 1), "--resume"],
                               monkeypatch, capsys)
    assert_one_line_error(code, err, "new --out")
    # ... and the same one continues from the saved step.
    code, err = run_in_process(name, [*argv, "--steps", str(step + 1), "--resume"], monkeypatch, capsys)
    assert code in (0, None), err[-2000:]
    assert checkpoint_step(out) == step + 1 and log_steps(out)[-1] == step + 1


@pytest.mark.parametrize("name", NAMES)
def test_sigkill_keeps_the_last_periodic_checkpoint(name, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    argv = [*SCRIPTS[name]["tiny"], "--out", str(out), "--log-every", "1", "--ckpt-every", "1"]
    proc = start_long_run(name, argv, tmp_path, out, logged=3)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    step = checkpoint_step(out)  # intact: loads with weights_only
    assert step >= 1
    code, err = run_in_process(name, [*argv, "--steps", str(step + 1), "--resume"], monkeypatch, capsys)
    assert code in (0, None), err[-2000:]
    assert checkpoint_step(out) == step + 1


@pytest.mark.parametrize("name", NAMES)
def test_divergence_stops_with_the_knobs_and_keeps_the_good_checkpoint(name, tmp_path):
    out = tmp_path / "run"
    r = run(name, [*SCRIPTS[name]["tiny"], *SCRIPTS[name]["nan"], "--out", str(out), "--log-every", "1",
                   "--ckpt-every", "1", "--steps", "50"], tmp_path)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert "Traceback" not in r.stderr and "diverged" in lines[-1] and "--" in lines[-1], r.stderr[-2000:]
    if (out / "checkpoint.pt").exists():  # whatever was saved is from before the divergence
        state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
        assert state["step"] < 50

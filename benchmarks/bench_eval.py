"""Benchmark of the DTU-style point-cloud evaluation (`mvsnb.metrics.evaluate_cloud`).

Times the evaluation of synthetic predictions of 0.25M, 0.5M, 1M and 2M points (4M with --full) against a
synthetic scene's ground truth, and a naive baseline written here in the style of the public DTU evaluators: the
same protocol, but the thinning is a Python loop over radius-neighbour lists (build every point's neighbour list
with a KD-tree, then visit the points in a random order and drop the neighbours of each kept point). The baseline
runs only at the sizes given by --baseline-sizes (default 0.25M, 0.5M, 1M: its neighbour lists are Python lists,
about 1 GB at 1M points at this density); ratios are reported only where both ran, nothing is extrapolated.

Each size runs in fresh Python processes (one for mvsnb, one for the baseline), so the peak RSS column is that
run's own; it includes the imported libraries (torch and Open3D among them), shown as `base RSS`, measured before
the first timed run. The voxel approximation runs after the exact method in the same process (no RSS of its own).
Both methods use the same random processing order, so their accuracy / completeness must agree (the target is
≤ 0.5 %; 0 is expected). The voxel approximation (`downsample="grid"`) is timed too, and its accuracy /
completeness difference from the exact greedy thinning is reported.

    python benchmarks/bench_eval.py            # default: about 2-3 minutes on 2 loaded cores
    python benchmarks/bench_eval.py --full     # adds 4M points
    python benchmarks/bench_eval.py --smoke    # 20k points, one run of each: a seconds-long check that it runs

Writes benchmarks/out/bench_eval.json (or --out) with the machine (`_common.machine_info`) and the hardware bounds
of the other benchmarks. The evaluation is KD-tree work on the CPU: `--device` is accepted for the common command
line and recorded, a GPU is not used. The machine may be shared: the load average is recorded before and after.
"""
from __future__ import annotations
import argparse, json, os, platform, resource, statistics, subprocess, sys, tempfile, time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path: sys.path.insert(0, str(HERE))
PRED = dict(noise=0.01, spread=0.02, holes=8, hole_radius=0.15, outliers=0.01)  # scene units (scene scale 1)


def _rss_mb() -> float:
    "Peak resident memory of this process, MB (Linux VmHWM: unlike ru_maxrss it is not inherited from the parent)."
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"): return int(line.split()[1]) / 1024.0
    except OSError: pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ------------------------------------------------------------------------------------------- the naive baseline
def baseline_evaluate(pred_ply, scene_dir, seed: int = 0, workers: int = -1) -> dict:
    "The public evaluators' approach: Python greedy thinning loop over neighbour lists, then KD-tree distances."
    import numpy as np, torch
    from scipy.spatial import cKDTree
    from mvsnb.io import read_ply
    from mvsnb.synthetic import in_observation_mask
    from mvsnb.metrics import CloudEvalConfig
    t0 = time.perf_counter()
    cfg = CloudEvalConfig()
    P = read_ply(pred_ply).points.astype(np.float64)
    G = read_ply(Path(scene_dir) / "gt" / "points.ply").points.astype(np.float64)
    with np.load(Path(scene_dir) / "gt" / "obs_mask.npz") as z: obs = {k: z[k] for k in z.files}
    box = obs["bbox"]; diag = float(np.linalg.norm(box[1] - box[0]))
    r, cap, tau = cfg.density_rel * diag, cfg.max_dist_rel * diag, cfg.threshold_rel * diag
    P = P[((P >= box[0]) & (P <= box[1])).all(1)]

    def greedy_loop(X):
        nbrs = cKDTree(X).query_ball_point(X, r, workers=workers)
        keep = np.ones(len(X), bool)
        for i in np.random.default_rng(seed).permutation(len(X)):
            if keep[i]:
                keep[nbrs[i]] = False
                keep[i] = True
        return X[keep]

    Pd, Gd = greedy_loop(P), greedy_loop(G)
    ev = in_observation_mask(torch.from_numpy(Pd), obs).numpy()
    d_acc = cKDTree(Gd).query(Pd[ev], workers=workers)[0]
    d_comp = cKDTree(Pd).query(Gd, workers=workers)[0]
    acc, comp = d_acc[d_acc < cap].mean(), d_comp[d_comp < cap].mean()
    prec, rec = (d_acc < tau).mean(), (d_comp < tau).mean()
    return dict(accuracy=float(acc), completeness=float(comp), precision=float(prec), recall=float(rec),
                fscore=float(2 * prec * rec / (prec + rec)), n_pred_down=len(Pd), time_s=time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------------- one worker
def worker(spec: dict) -> list:
    "Run each (method, repeats) of `spec['methods']` in this process, in order; times, metrics and peak RSS of each."
    from mvsnb.metrics import evaluate_cloud
    import mvsnb.io, mvsnb.synthetic, scipy.spatial  # imported lazily by both methods: keep them out of the timings
    base, out = _rss_mb(), []
    workers = spec.get("workers", -1)
    if spec.get("threads"):
        import torch; torch.set_num_threads(spec["threads"])
    keep = ("accuracy", "completeness", "precision", "recall", "fscore", "n_pred_down")
    for method, repeats in spec["methods"]:
        times, res = [], None
        for _ in range(repeats):
            t = time.perf_counter()
            if method == "baseline": res = baseline_evaluate(spec["pred"], spec["scene"], workers=workers)
            else: res = evaluate_cloud(spec["pred"], spec["scene"], downsample=method, workers=workers)
            times.append(time.perf_counter() - t)
        # the peak RSS is this process's high-water mark: it belongs to the first method only
        out.append(dict(method=method, times=times, median_s=statistics.median(times),
                        peak_rss_mb=_rss_mb() if not out else None, base_rss_mb=base, metrics={k: res[k] for k in keep}))
    return out


def run_worker(spec: dict, timeout: float) -> list:
    out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                         timeout=timeout, env={**os.environ, "MPLBACKEND": "Agg"})
    if out.returncode != 0: raise RuntimeError(f"worker {spec['methods']} {spec['n']} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------- driver
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--full", action="store_true", help="add 4M points")
    ap.add_argument("--smoke", action="store_true", help="20k points, one run of each method: a seconds-long check that the script runs")
    ap.add_argument("--device", default="auto", help="recorded only: the evaluation runs on the CPU (KD-trees)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads and KD-tree workers (0: all)")
    ap.add_argument("--sizes", type=float, nargs="*", help="prediction sizes in millions (overrides the defaults)")
    ap.add_argument("--baseline-sizes", type=float, nargs="*", help="sizes (millions) at which the baseline runs")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of mvsnb per size (median reported)")
    ap.add_argument("--baseline-repeats", type=int, default=1, help="timed runs of the baseline per size")
    ap.add_argument("--grid-repeats", type=int, default=1, help="timed runs of the voxel approximation per size")
    ap.add_argument("--no-grid", action="store_true", help="skip the voxel-approximation rows")
    ap.add_argument("--out", default="", help="JSON file to write (default benchmarks/out/bench_eval.json)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker: print(json.dumps(worker(json.loads(a.worker)))); return
    import _common as C
    if a.smoke: a.repeats = a.baseline_repeats = a.grid_repeats = 1
    if a.threads:
        import torch; torch.set_num_threads(a.threads)
    machine = C.machine_info("cpu")
    machine["device_requested"] = a.device
    C.print_machine(machine, "bench_eval: DTU-style point-cloud evaluation against a Python greedy-thinning loop")

    import numpy as np
    from mvsnb.synthetic import make_scene, write_scene
    from mvsnb.io import write_ply
    from mvsnb.metrics import perturbed_cloud
    sizes = [int(s * 1e6) for s in (a.sizes or ([0.02] if a.smoke else [0.25, 0.5, 1, 2, 4] if a.full else [0.25, 0.5, 1, 2]))]
    base_sizes = {int(s * 1e6) for s in (a.baseline_sizes or ([0.02] if a.smoke else [0.25, 0.5, 1]))}
    load0, t_start = os.getloadavg(), time.perf_counter()
    print(f"cores {os.cpu_count()}, load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench_eval_"))
    scene = make_scene(views=5, seed=0)
    sdir = write_scene(scene, tmp / "scene")
    G, N = scene.points.double().numpy(), scene.point_normals.double().numpy()
    rows = []
    for n in sizes:
        pred = perturbed_cloud(G, N, n, bbox=scene.obs_mask["bbox"], seed=n, **PRED)
        ply = write_ply(tmp / f"pred_{n}.ply", pred.astype(np.float32))
        groups = [[("greedy", a.repeats)] + ([] if a.no_grid else [("grid", a.grid_repeats)])]  # grid: same process
        groups += [[("baseline", a.baseline_repeats)]] if n in base_sizes else []
        for methods in groups:
            spec = dict(methods=methods, n=n, pred=str(ply), scene=str(sdir), threads=a.threads, workers=a.threads or -1)
            for r in run_worker(spec, timeout=1800):
                rows.append(dict(size=n, n_points=len(pred), **r))
                rss = "    (same process)" if r["peak_rss_mb"] is None else f"peak RSS {r['peak_rss_mb']:7.0f} MB"
                print(f"  {r['method']:8s} {n / 1e6:5.2f}M  median {r['median_s']:7.2f} s  {rss}  "
                      f"acc {r['metrics']['accuracy']:.6f} comp {r['metrics']['completeness']:.6f}", flush=True)
        ply.unlink()
    load1 = os.getloadavg()

    def row(n, m): return next((x for x in rows if x["size"] == n and x["method"] == m), None)
    summary = []
    print(f"\n{'size':>6} {'method':>9} {'median s':>9} {'peak RSS MB':>12} {'base RSS MB':>12} {'ratio':>7} "
          f"{'acc Δ%':>8} {'comp Δ%':>8}")
    for n in sizes:
        g = row(n, "greedy")
        for m in ("greedy", "grid", "baseline"):
            x = row(n, m)
            if x is None: continue
            b = row(n, "baseline")
            ratio = b["median_s"] / x["median_s"] if b is not None and m != "baseline" else None
            dacc = 100 * (x["metrics"]["accuracy"] / g["metrics"]["accuracy"] - 1)
            dcomp = 100 * (x["metrics"]["completeness"] / g["metrics"]["completeness"] - 1)
            summary.append(dict(size=n, method=m, median_s=x["median_s"], peak_rss_mb=x["peak_rss_mb"],
                                base_rss_mb=x["base_rss_mb"], speedup_vs_baseline=ratio,
                                acc_diff_pct_vs_greedy=dacc, comp_diff_pct_vs_greedy=dcomp))
            rss = "           -" if x["peak_rss_mb"] is None else f"{x['peak_rss_mb']:12.0f}"
            print(f"{n / 1e6:5.2f}M {m:>9} {x['median_s']:9.2f} {rss} {x['base_rss_mb']:12.0f} "
                  f"{'' if ratio is None else f'{ratio:6.1f}x':>7} {dacc:+8.3f} {dcomp:+8.3f}")
    checks = [s for s in summary if s["method"] == "baseline"]
    same = all(abs(s["acc_diff_pct_vs_greedy"]) <= 0.5 and abs(s["comp_diff_pct_vs_greedy"]) <= 0.5 for s in checks)
    fast = all(s["speedup_vs_baseline"] >= 5 for s in summary if s["method"] == "greedy" and s["speedup_vs_baseline"])
    print(f"\nexact greedy vs baseline: accuracy/completeness within 0.5 %: {same}; >= 5x faster at every shared size: {fast}")
    print(f"load average before {load0[0]:.2f}, after {load1[0]:.2f}; wall {time.perf_counter() - t_start:.0f} s")
    out = Path(a.out or HERE / "out" / "bench_eval.json"); out.parent.mkdir(parents=True, exist_ok=True)
    import numpy, scipy, mvsnb
    machine.update(loadavg_after=list(os.getloadavg()), uptime_after=C.uptime_text())
    out.write_text(json.dumps(dict(
        benchmark="bench_eval", date=time.strftime("%Y-%m-%d %H:%M:%S"), machine=machine, hardware_bounds=C.hardware_bounds("cpu"),
        args={k: v for k, v in vars(a).items() if k != "worker"}, wall_s=time.perf_counter() - t_start,
        cores=os.cpu_count(), load_before=load0,
        load_after=load1, python=platform.python_version(), numpy=numpy.__version__, scipy=scipy.__version__,
        mvsnb=mvsnb.__version__, prediction=dict(PRED, scene="make_scene(views=5, seed=0)", gt_points=len(G)),
        repeats=a.repeats, baseline_repeats=a.baseline_repeats, rows=rows, summary=summary,
        baseline_same_metrics=same, greedy_5x_faster=fast), indent=1))
    print(f"wrote {out}")
    import shutil; shutil.rmtree(tmp, ignore_errors=True)
    return out


if __name__ == "__main__":
    main()

"""PatchMatch MVS iterations (`mvsnb.patchmatch`): the random initialisation and every red+black sweep of a full
run, and the kernel inside them, the bilateral-NCC scoring of plane hypotheses (`photometric_cost`), against a
per-pixel numpy loop written here.

Input: the reference view and 4 sources of a synthetic scene (`mvsnb.synthetic.make_scene(views=5)`), default
`PatchMatchConfig` (5x5 window, dilation 2, ACMH pattern: 8 propagation + 4 refinement hypotheses per pixel and
half-sweep, best-2-of-4 views), `iterations=2` per run (the per-sweep time is the median over sweeps and runs).

The scoring comparison uses what one half-sweep scores: one checkerboard colour (half the pixels) x 12 random plane
hypotheses. mvsnb scores all of them at once; the baseline loops over pixels and hypotheses in Python and, per
source view, maps the 25 window samples through the plane homography, samples the source bilinearly and computes
the weighted NCC with numpy (vectorised over the window only), on the first 48 pixels of the colour (its cost is
linear in the count, so the ratio is of the throughput, hypotheses scored per second, measured in the same run).
Both must give the same costs on those pixels (max |difference| reported).

Sizes: 64x80 and 128x160 (--full: 256x320; a GPU also 512x640). Bandwidth model of the scoring: every window
sample of every (hypothesis, source) reads 4 bilinear taps and its weight, 4 bytes each.

    python benchmarks/bench_patchmatch.py [--full]
"""
from __future__ import annotations
import time
import _common as C

HYPS = 12  # scored per pixel and half-sweep: 8 propagation regions (ACMH pattern) + 4 refinements
SUBSET = 48  # pixels the per-pixel baseline scores


def make_cases(args, device):
    sizes = [(64, 80), (128, 160)] + ([(256, 320)] if args.full else [])
    if device.startswith("cuda"): sizes = [(128, 160), (256, 320), (512, 640)]
    if args.smoke: sizes = [(32, 40)]
    return [dict(label=f"{H}x{W}", H=H, W=W, iterations=1 if args.smoke else 2) for H, W in sizes]


_SCENES = {}


def batch_for(H, W, device):
    from mvsnb.synthetic import make_scene
    if (H, W) not in _SCENES: _SCENES[(H, W)] = make_scene(views=5, height=H, width=W, seed=0)
    b = _SCENES[(H, W)].mvs_batch(0)
    return {k: b[k].to(device) for k in ("images", "K", "w2c", "depth_min", "depth_max")}


# ------------------------------------------------------------------------------------------------ the naive baseline
def _bilinear(img, x, y):
    "Zero-padded bilinear samples of img (H,W) at float positions; and which lie inside [0,W-1]x[0,H-1]."
    import numpy as np
    H, W = img.shape
    inside = (x >= 0) & (x <= W - 1) & (y >= 0) & (y <= H - 1)
    x0, y0 = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    ax, ay = x - x0, y - y0
    out = np.zeros_like(x)
    for dy, dx, wgt in ((0, 0, (1 - ax) * (1 - ay)), (0, 1, ax * (1 - ay)), (1, 0, (1 - ax) * ay), (1, 1, ax * ay)):
        xi, yi = x0 + dx, y0 + dy
        ok = (xi >= 0) & (xi < W) & (yi >= 0) & (yi < H)
        out[ok] += wgt[ok] * img[yi[ok], xi[ok]]
    return out, inside


def naive_cost(data: dict, cfg, pixels, depth, normal):
    "Per pixel and hypothesis (Python loops): per source, the window through the plane homography, weighted NCC, best-K."
    import numpy as np
    ref, srcs, Kinv, A, b = data["ref"], data["srcs"], data["Kinv"], data["A"], data["b"]
    H, W = ref.shape
    r = (np.arange(cfg.window) - cfg.window // 2) * cfg.dilation
    du, dv = np.meshgrid(r, r)
    du, dv = du.ravel().astype(np.float64), dv.ravel().astype(np.float64)
    spatial = (du ** 2 + dv ** 2) / (2 * cfg.sigma_spatial ** 2)
    out = np.zeros((len(pixels), depth.shape[0]))
    for i, p in enumerate(pixels):
        u, v = p % W, p // W
        q = np.stack([u + du, v + dv, np.ones_like(du)])  # 3,W2
        win, inside = _bilinear(ref, q[0], q[1])
        w_ref = np.exp(-(win - ref[v, u]) ** 2 / (2 * cfg.sigma_color ** 2) - spatial) * inside
        rays = Kinv @ q  # 3,W2
        for j in range(depth.shape[0]):
            n = normal[:, j, i]
            rho = depth[j, i] * (n @ rays[:, cfg.window ** 2 // 2])
            inv_z = (n @ rays) / rho
            costs = []
            for s in range(len(srcs)):
                h = A[s] @ q + b[s][:, None] * inv_z  # 3,W2
                ok = (h[2] > 1e-6) & (inv_z > 0)
                x, y = np.where(ok, h[0] / np.where(ok, h[2], 1), -2.0), np.where(ok, h[1] / np.where(ok, h[2], 1), -2.0)
                smp, ins = _bilinear(srcs[s], np.clip(x, -2, max(H, W) + 1), np.clip(y, -2, max(H, W) + 1))
                wt = w_ref * (ins & ok)
                sw = max(wt.sum(), 1e-12)
                ma, mb = (wt * win).sum() / sw, (wt * smp).sum() / sw
                va, vb = max((wt * win * win).sum() / sw - ma * ma, 0), max((wt * smp * smp).sum() / sw - mb * mb, 0)
                ncc = np.clip(((wt * smp * win).sum() / sw - ma * mb) / np.sqrt((va + cfg.ncc_eps) * (vb + cfg.ncc_eps)), -1, 1)
                costs.append(1 - ncc if wt.sum() >= cfg.min_view_weight * w_ref.sum() else cfg.invalid_cost)
            out[i, j] = np.mean(sorted(costs)[:min(cfg.top_k, len(costs))])
    return out


# ------------------------------------------------------------------------------------------------ one case
def run_case(spec, bench):
    import numpy as np, torch
    from mvsnb.patchmatch import (PatchMatchConfig, PatchMatchHooks, patchmatch, prepare_context, random_hypotheses,
                                  photometric_cost, checkerboard_masks, single_thread, SINGLE_THREAD_BELOW)
    dev, H, W = bench.device, spec["H"], spec["W"]
    batch = batch_for(H, W, dev)
    S = batch["images"].shape[1] - 1
    size = f"{H}x{W}"
    # 1. full runs: initialisation and sweeps
    cfg = PatchMatchConfig(iterations=spec["iterations"])
    runs, marks = [], []

    def mark(ctx, state, it):
        C.sync(dev); marks.append(time.perf_counter())

    def run():
        marks.clear(); t0 = time.perf_counter()
        out = patchmatch(batch["images"], batch["K"], batch["w2c"], batch["depth_min"], batch["depth_max"], cfg, seed=0,
                         hooks=PatchMatchHooks(on_sweep=mark))
        runs.append([t0] + marks)  # start, after the initialisation, after each sweep
        return out

    m = bench.measure(run, warmup=0, repeats=1 if H * W >= 128 * 160 and not dev.startswith("cuda") else None)
    inits = [r[1] - r[0] for r in runs]
    sweeps = [float(d) for r in runs for d in np.diff(r[1:])]
    threads = 1 if (dev == "cpu" and S * H * W < SINGLE_THREAD_BELOW) else torch.get_num_threads()
    bench.add(m, op="patchmatch run", impl="mvsnb", size=size, iterations=cfg.iterations, threads=threads,
              init_s=float(np.median(inits)), sweep_s=float(np.median(sweeps)), work=H * W * cfg.iterations, unit="px-sweeps/s")
    sweep_row = dict(op="sweep", impl="mvsnb", size=size, median_s=float(np.median(sweeps)), repeats=len(sweeps), threads=threads,
                     work=H * W, unit="px/s")
    sweep_row["throughput"] = H * W / sweep_row["median_s"]
    bench.rows.append(sweep_row)
    # 2. the scoring kernel: one colour x HYPS hypotheses
    ctx = prepare_context(batch["images"], batch["K"], batch["w2c"], batch["depth_min"], batch["depth_max"], PatchMatchConfig())
    idx = checkerboard_masks(H, W, dev)[0].flatten().nonzero()[:, 0]
    gen = torch.Generator(device=dev).manual_seed(1)
    depth, normal = random_hypotheses(ctx, idx, HYPS, gen)
    W2 = ctx.offsets.shape[0]
    evals = len(idx) * HYPS
    with single_thread(dev == "cpu" and S * H * W < SINGLE_THREAD_BELOW):
        m = bench.measure(lambda: photometric_cost(ctx, idx, depth, normal)[0])
    bench.add(m, op="score", impl="mvsnb", size=size, pixels=len(idx), hyps=HYPS, evaluations=evals, threads=threads,
              work=evals, unit="hyps/s", bytes=evals * S * W2 * 5 * 4)
    sub = idx[:SUBSET]
    ref_cost = photometric_cost(ctx, sub, depth[:, :, :SUBSET], normal[:, :, :, :SUBSET])[0][0].cpu().double().numpy().T  # M,D
    data = dict(ref=ctx.gray_ref[0, 0].cpu().double().numpy(), srcs=ctx.gray_src[0, :, 0].cpu().double().numpy(),
                Kinv=torch.linalg.inv(ctx.K_ref[0]).cpu().double().numpy(),
                A=(ctx.K_src[0] @ ctx.T_src_ref[0, :, :3, :3] @ torch.linalg.inv(ctx.K_ref[0])).cpu().double().numpy(),
                b=(ctx.K_src[0] @ ctx.T_src_ref[0, :, :3, 3:])[..., 0].cpu().double().numpy())
    d_np, n_np = depth[0, :, :SUBSET].cpu().double().numpy(), normal[0, :, :, :SUBSET].cpu().double().numpy()
    m = bench.measure(lambda: naive_cost(data, ctx.config, sub.cpu().numpy(), d_np, n_np), repeats=1, warmup=0)
    diff = float(np.abs(bench.last_output - ref_cost).max())
    bench.add(m, op="score", impl="baseline", size=size, pixels=len(sub), hyps=HYPS, evaluations=len(sub) * HYPS, threads=1,
              work=len(sub) * HYPS, unit="hyps/s", max_abs_diff_vs_mvsnb=diff)


def report(bench):
    rows = bench.rows
    sp = []
    for r in rows:  # throughput ratio: the baseline scored a subset of the pixels
        if r["op"] != "score" or r["impl"] != "mvsnb": continue
        b = next(x for x in rows if x["op"] == "score" and x["impl"] == "baseline" and x["size"] == r["size"])
        r["speedup"] = r["throughput"] / b["throughput"]
        sp.append(dict(size=r["size"], speedup=r["speedup"], mvsnb_s=r["median_s"], baseline_s_per_hyp=1 / b["throughput"],
                       max_abs_diff=b["max_abs_diff_vs_mvsnb"]))
    cols = [("size", "size", ""), ("op", "op", ""), ("impl", "impl", ""), ("threads", "threads", ""), ("median s", "median_s", ".4f"),
            ("runs", "repeats", ""), ("init s", "init_s", ".3f"), ("sweep s", "sweep_s", ".3f"), ("evaluations", "evaluations", ""),
            ("throughput", "throughput", ".3g"), ("unit", "unit", ""), ("GB/s", "gbps", ".2f"), ("bw frac", "bw_frac", ".3f"),
            ("RSS Δ MB", "rss_delta_mb", ".0f"), ("GPU MB", "gpu_peak_mb", ".0f"), ("speed-up", "speedup", ".0f")]
    bench.table(cols, title=f"PatchMatch on {bench.device}: full runs, sweeps and the scoring kernel")
    summary = []
    if sp:
        big = sp[-1]
        sw = next(r for r in rows if r["op"] == "sweep" and r["size"] == big["size"])
        summary.append(dict(kernel="patchmatch", what=f"hypothesis scoring, {big['size']} (throughput ratio)", speedup=big["speedup"],
                            mvsnb_s=big["mvsnb_s"], bw_frac=next(r for r in rows if r["op"] == "score" and r["impl"] == "mvsnb" and r["size"] == big["size"]).get("bw_frac")))
        summary.append(dict(kernel="patchmatch", what=f"one red+black sweep, {big['size']}", mvsnb_s=sw["median_s"]))
    notes = [f"scoring: mvsnb and the per-pixel loop agree to {max(s['max_abs_diff'] for s in sp):.1e} (max |cost difference|)" if sp else "",
             f"the baseline scores the first {SUBSET} pixels of the colour only; the speed-up is the ratio of hypotheses scored per second"]
    return summary, [n for n in notes if n], dict(speedups=sp)


def main(argv=None):
    return C.main("bench_patchmatch", __doc__, make_cases, run_case, report, argv=argv)


if __name__ == "__main__":
    main()

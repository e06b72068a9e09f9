"""One full training step of each backbone: forward, unsupervised loss, backward and the Adam update.

Backbones at their papers' settings: `cascade` = `CascadeMVSNet` preset `casmvsnet` (48/32/8 hypotheses, FPN
width 8) with Khot et al.'s loss (`khot`); `cvp` = `CVPMVSNet` preset `cvpmvsnet` (2 pyramid levels, 48 + 8
hypotheses) with Self-supervised CVP-MVSNet's probability-synthesis loss (`selfsup_cvp`, perceptual term off).
Inputs: a synthetic scene (`mvsnb.synthetic.make_scene`), reference + 2 sources, batch 1. On the CPU at 64x80
(128x160 with --full; `--smoke` uses the `tiny` presets at 32x40), on a GPU at 512x640 with mixed precision (the training loop's default,
`TrainConfig.amp`), 64x80 for comparison.

The naive baseline is the same step with the cost volumes built by the per-plane Python loop of
`bench_warp.naive_cost_volume` (patched into the backbones' modules), so the ratio is what the vectorised plane
sweep saves in a whole step. FLOPs of one step are counted once with `torch.utils.flop_counter.FlopCounterMode`
(convolutions and matmuls; `grid_sample` and elementwise work are not counted), so `flop_frac` is a lower bound of
the fraction of the probe's matmul rate. `RSS Δ` / `GPU MB` is the memory of one training sample (batch 1).

    python benchmarks/bench_train_step.py [--full] [--device cuda]
"""
from __future__ import annotations
import _common as C

BACKBONES = {"cascade": ("casmvsnet", "khot"), "cvp": ("cvpmvsnet", "selfsup_cvp")}


def make_cases(args, device):
    cuda = device.startswith("cuda")
    sizes = [(512, 640), (64, 80)] if cuda else [(64, 80)] + ([(128, 160)] if args.full else [])
    if args.smoke: sizes = [(32, 40)]
    return [dict(label=f"{bb} {H}x{W} {impl}", backbone=bb, preset="tiny" if args.smoke else BACKBONES[bb][0], H=H, W=W,
                 impl=impl, amp=cuda) for H, W in sizes for bb in BACKBONES for impl in ("mvsnb", "baseline")]


_SCENES = {}


def batch_for(H, W, device):
    import torch
    from mvsnb.synthetic import make_scene
    if (H, W) not in _SCENES: _SCENES[(H, W)] = make_scene(views=3, height=H, width=W, seed=0)
    b = _SCENES[(H, W)].mvs_batch(0)
    return {k: b[k].to(device) for k in ("images", "K", "w2c", "depth_min", "depth_max")}


def _naive_cost(feats, K, w2c, depth_hyps, mode="variance", groups=8, view_weights=None, chunk=None):
    from bench_warp import naive_cost_volume
    if mode != "variance" or view_weights is not None: raise NotImplementedError("baseline: variance cost only")
    return naive_cost_volume(feats, K, w2c, depth_hyps)


def run_case(spec, bench, repeats=None):
    import torch
    from mvsnb.train import build_model, build_loss
    import mvsnb.models.cascade as cascade_mod, mvsnb.models.cvp as cvp_mod
    dev = bench.device
    preset, loss_name = spec["preset"], BACKBONES[spec["backbone"]][1]
    torch.manual_seed(0)
    model = build_model(spec["backbone"], preset).to(dev).train()
    loss_fn = build_loss(loss_name)
    if isinstance(loss_fn, torch.nn.Module): loss_fn = loss_fn.to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=spec["amp"])
    batch = batch_for(spec["H"], spec["W"], dev)

    def step():
        with torch.autocast(device_type=dev.split(":")[0], dtype=torch.float16, enabled=spec["amp"]):
            out = model(batch["images"], batch["K"], batch["w2c"], batch["depth_min"], batch["depth_max"])
            loss, _ = loss_fn(out, batch)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt); scaler.update()
        return float(loss.detach())

    saved = cascade_mod.cost_volume, cvp_mod.cost_volume
    if spec["impl"] == "baseline": cascade_mod.cost_volume = cvp_mod.cost_volume = _naive_cost
    try:
        from torch.utils.flop_counter import FlopCounterMode
        with FlopCounterMode(display=False) as fc: step()  # the warm-up step: Adam's state exists from here on
        flops = fc.get_total_flops()
        m = bench.measure(step, warmup=0, repeats=repeats)
    finally: cascade_mod.cost_volume, cvp_mod.cost_volume = saved
    params = sum(p.numel() for p in model.parameters())
    bench.add(m, op="train step", backbone=spec["backbone"], preset=preset, loss=loss_name, size=f"{spec['H']}x{spec['W']}",
              impl=spec["impl"], amp=spec["amp"], params=params, flops=flops, work=spec["H"] * spec["W"], unit="px/s",
              loss_value=bench.last_output)


def report(bench):
    cols = [("backbone", "backbone", ""), ("size", "size", ""), ("impl", "impl", ""), ("median s", "median_s", ".3f"),
            ("samples/s", lambda r: 1 / r["median_s"], ".2f"), ("Mpx/s", lambda r: r["throughput"] / 1e6, ".3f"),
            ("GFLOP/step", lambda r: r["flops"] / 1e9 if r.get("flops") else None, ".2f"), ("GFLOP/s", "gflops", ".2f"),
            ("flop frac", "flop_frac", ".3f"), ("RSS Δ MB", "rss_delta_mb", ".0f"), ("GPU MB", "gpu_peak_mb", ".0f"),
            ("speed-up", "speedup", ".2f")]
    sp = bench.speedups(("backbone", "size"))
    bench.table(cols, title=f"one training step (B=1, 3 views) on {bench.device}")
    summary = []
    for r in bench.rows:
        if r["impl"] != "mvsnb": continue
        summary.append(dict(kernel="train step", what=f"{r['backbone']} {r['preset']} {r['size']}", mvsnb_s=r["median_s"],
                            speedup=r.get("speedup"), flop_frac=r.get("flop_frac"),
                            memory_mb=r.get("gpu_peak_mb") if r.get("gpu_peak_mb") is not None else r.get("rss_delta_mb")))
    notes = ["memory per training sample = peak above the resident memory before the timed steps (CPU: RSS, GPU: allocated); "
             "weights, Adam state and inputs are already resident then"]
    return summary, notes, {}


def main(argv=None):
    return C.main("bench_train_step", __doc__, make_cases, run_case, report, argv=argv)


if __name__ == "__main__":
    main()

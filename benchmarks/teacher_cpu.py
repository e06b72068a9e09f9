"""CPU teacher benchmark (issue 3, "done means"): does a ≤ 5-minute CPU run of the unsupervised teacher halve the
depth error of the untrained network on the synthetic scene, for both backbones?

What it does, per backbone (cascade = CasMVSNet-style, cvp = CVP-MVSNet-style):
  1. builds the synthetic scene (`mvsnb.synthetic.make_scene`, default 5 views at 64x80, seed 0);
  2. trains the unsupervised teacher with `mvsnb.train.train` on that scene's images and cameras only
     (photometric self-supervision; every view is a reference once, with its best `num_views - 1` sources);
  3. evaluates the untrained network (same seed → the same initial weights) and the trained one against the GT
     depth on the GT masks: mean / median absolute error, the mean as a fraction of the depth range, % of pixels
     within 1 / 2 / 5 % of the depth range;
  4. runs the zero-training winner-take-all NCC plane sweep (`mvsnb.models.planesweep.plane_sweep_ncc`) on the
     same views at the same resolution, scored the same way.

Evaluation views: by default the **training views** (the same scene, the same reference/source sets). Training
never sees the GT, and fitting the images of the scene one reconstructs is how self-supervised MVS is used
(test-time optimisation), but it is stated in the table. `--unseen-seed S` adds rows for a different scene
(`make_scene(seed=S)`) the network never trained on.

Run:  .venv/bin/python benchmarks/teacher_cpu.py --unseen-seed 1     (3 runs; ~6-10 min on 2 shared cores)
      .venv/bin/python benchmarks/teacher_cpu.py --runs cvp_selfsup --set lr=0.001 --json out.json
"""
from __future__ import annotations
import argparse, dataclasses, json, platform, sys, time
import torch
from mvsnb.core import seed_everything
from mvsnb.data import SceneDataset
from mvsnb.synthetic import make_scene
from mvsnb.models.planesweep import plane_sweep_ncc
from mvsnb.train import train_config, train, build_model, validate, collate_views, depth_metrics

# Training settings found for the 5-minute CPU budget (2 shared cores, one torch thread).
# Each run: a backbone with an unsupervised loss preset (mvsnb.losses.unsup). "cvp_selfsup" is the CVP backbone with
# its own paper's loss (Self-sup CVP's probability-weighted synthesis, perceptual term off: no VGG weights offline);
# "cvp_khot" is the same backbone with Khot et al.'s warping loss.
SETTINGS = {
    "cascade": dict(model="cascade", model_preset="tiny", loss="khot", lr=3e-3, steps=300, schedule="cosine",
                    min_lr_factor=0.1),
    "cvp_selfsup": dict(model="cvp", model_preset="tiny", loss="selfsup_cvp", lr=3e-3, steps=400, schedule="cosine",
                        min_lr_factor=0.1),
    "cvp_khot": dict(model="cvp", model_preset="tiny", loss="khot", lr=3e-3, steps=400, schedule="cosine",
                     min_lr_factor=0.1),
}
REL = [0.01, 0.02, 0.05]


def evaluate(model, ds, cfg):
    "GT depth metrics with the network seeing exactly the training views (no held-out view)."
    cfg = dataclasses.replace(cfg, val_holdout_view=0, val_rel_thresholds=REL, batch_size=1)
    return validate(model, ds, cfg, "cpu")


@torch.no_grad()
def plane_sweep_metrics(ds, num_depth, window):
    sums, n = {}, 0
    for i in range(len(ds)):
        b = collate_views([ds[i]])
        out = plane_sweep_ncc(b["images"], b["K"], b["w2c"], b["depth_min"], b["depth_max"], num_depth=num_depth, window=window)
        m = depth_metrics(out["depth"], b["depth_gt"], b["mask_gt"], b["depth_max"] - b["depth_min"], rel_thresholds=REL)
        m.pop("n_px")
        for k, v in m.items(): sums[k] = sums.get(k, 0) + v
        n += 1
    return {k: v / n for k, v in sums.items()}


def row(name, m, train_s="", ratio=""):
    return (f"| {name} | {train_s} | {m['mae']:.4f} | {m['median_ae']:.4f} | {m['mae_rel']:.4f} | "
            f"{m['within_rel_0.01']:.1f} | {m['within_rel_0.02']:.1f} | {m['within_rel_0.05']:.1f} | {ratio} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", default=list(SETTINGS), choices=list(SETTINGS), help="which runs (see SETTINGS)")
    ap.add_argument("--height", type=int, default=64); ap.add_argument("--width", type=int, default=80)
    ap.add_argument("--scene-views", type=int, default=5, help="cameras in the synthetic scene")
    ap.add_argument("--num-views", type=int, default=3, help="views per sample: reference + sources")
    ap.add_argument("--scene-seed", type=int, default=0); ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=0, help="override the steps of every backbone")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                    help="override a TrainConfig field for every backbone, e.g. --set lr=1e-3 --set loss='\"khot\"'")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--ps-planes", type=int, default=64, help="plane-sweep hypotheses")
    ap.add_argument("--ps-window", type=int, default=5, help="plane-sweep NCC window")
    ap.add_argument("--unseen-seed", type=int, default=None, help="also evaluate on make_scene(seed=this)")
    ap.add_argument("--budget", type=float, default=300.0, help="training seconds allowed per backbone (checked)")
    ap.add_argument("--json", default="", help="write all numbers here")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    scene = make_scene(views=a.scene_views, height=a.height, width=a.width, seed=a.scene_seed)
    train_ds = SceneDataset(scene, num_views=a.num_views)
    evals = {"training views": train_ds}
    if a.unseen_seed is not None:
        evals[f"unseen scene seed {a.unseen_seed}"] = SceneDataset(
            make_scene(views=a.scene_views, height=a.height, width=a.width, seed=a.unseen_seed), num_views=a.num_views)
    results = {"args": vars(a), "env": {"torch": str(torch.__version__), "python": platform.python_version(),
                                        "threads": a.threads}, "depth_range": [scene.depth_min, scene.depth_max], "rows": []}
    lines = []
    for ev_name, ev in evals.items():
        t = time.time(); ps = plane_sweep_metrics(ev, a.ps_planes, a.ps_window)
        results["rows"].append(dict(eval=ev_name, method="plane_sweep_ncc", seconds=time.time() - t, **ps))
        lines.append((ev_name, row(f"NCC plane sweep, WTA, D={a.ps_planes}, {a.ps_window}x{a.ps_window} (no training)", ps)))
    ok = True
    for bb in a.runs:
        s = dict(SETTINGS[bb])
        if a.steps: s["steps"] = a.steps
        for kv in a.set:
            k, v = kv.split("=", 1)
            try: s[k] = json.loads(v)
            except json.JSONDecodeError: s[k] = v  # a bare string

        cfg = train_config("tiny_cpu", **s, seed=a.seed, num_threads=a.threads, log_every=25, ckpt_every=10 ** 9,
                           val_every=0, progress=False)
        seed_everything(a.seed)
        untrained = build_model(cfg.model, cfg.model_preset, cfg.model_overrides)
        before = {n: evaluate(untrained, ev, cfg) for n, ev in evals.items()}
        res = train(cfg, train_ds)
        train_s = res.wall_s
        after = {n: evaluate(res.model, ev, cfg) for n, ev in evals.items()}
        for n in evals:
            ratio = after[n]["mae"] / before[n]["mae"]
            ok &= ratio < 0.5 or n != "training views"
            results["rows"].append(dict(eval=n, method=f"{bb} untrained", **before[n]))
            results["rows"].append(dict(eval=n, method=f"{bb} trained", train_s=train_s, steps=res.step, settings=s,
                                        mae_ratio=ratio, **after[n]))
            lines.append((n, row(f"{bb} untrained", before[n])))
            lines.append((n, row(f"{bb} trained ({s['loss']}, {res.step} steps, lr {s['lr']:g} {s['schedule']})",
                                 after[n], f"{train_s:.0f}", f"{ratio:.2f}")))
        if train_s > a.budget: ok = False; print(f"!! {bb}: training took {train_s:.0f} s > budget {a.budget:.0f} s")
        print(f"{bb}: done in {train_s:.0f} s", file=sys.stderr)
    rng = scene.depth_max - scene.depth_min
    print(f"\nSynthetic scene seed {a.scene_seed}: {a.scene_views} views at {a.height}x{a.width}, depth range "
          f"{scene.depth_min:.3f}..{scene.depth_max:.3f} (width {rng:.3f}); samples: every view as reference with its "
          f"best {a.num_views - 1} sources; {a.threads} torch thread(s). GT used for evaluation only.")
    hdr = ("| method | train s | MAE | median AE | MAE / depth range | % within 1% | % within 2% | % within 5% | MAE / untrained |\n"
           "|---|---|---|---|---|---|---|---|---|")
    for ev_name in evals:
        print(f"\nEvaluated on: {ev_name}\n{hdr}")
        for n, l in lines:
            if n == ev_name: print(l)
    print(f"\ndone-means (trained MAE < 0.5 x untrained on the training views, training ≤ {a.budget:.0f} s): {'PASS' if ok else 'FAIL'}")
    if a.json:
        with open(a.json, "w") as f: json.dump(results, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Write RUN/report.md from the metrics.json files of a `make demo` run folder (see tools/demo.sh).

Every stage gets the metrics that need no ground truth (held-out-view photometric error, cross-view agreement);
the ground-truth columns appear only when the evaluated scene has `gt/` (the synthetic scene), next to them."""
import json, sys
from pathlib import Path

EVALS = [("teacher (unsupervised, khot)", "50_eval_teacher"),
         ("control: teacher + 2× its steps more of khot", "50_eval_control"),
         ("student on SPSR labels (pseudo_l1 + 0.3·khot on unlabelled px, fine-tuned)", "50_eval_student_spsr"),
         ("student on KD labels (kd_paper + 1·khot, from scratch)", "50_eval_student_kd")]

def load(p, name="metrics.json"):
    p = Path(p) / name
    return json.loads(p.read_text()) if p.exists() else None

def fmt(x, nd=4):
    return "–" if x is None else (f"{x:.{nd}g}" if isinstance(x, float) else str(x))

def pct(x):
    return "–" if x is None else f"{100 * x:.1f} %"

def get(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d: return None
        d = d[k]
    return d

def has_gt(m):
    "Did this evaluation score against ground truth (the scene had gt/)?"
    t = get(m, "train_scene") or {}
    return bool(t.get("has_gt", "depth" in t))

def gt_free_table(rows):
    "The GT-free metrics of every stage; GT columns beside them when the scene has ground truth."
    gt = any(has_gt(m) for _, m in rows if m)
    heldout = any(get(m, "heldout_scene", "gt_free") for _, m in rows if m)
    ag = next((get(m, "train_scene", "gt_free", "agreement") for _, m in rows if get(m, "train_scene", "gt_free", "agreement")), None) or {}
    need = "/".join(map(str, ag.get("min_views", []))) or "N"
    head = ["stage", "held-out-view photometric error ↓", "pixels covered", f"cross-view agreement (≥ {need} views) ↑",
            f"mean consistent views (of {fmt(ag.get('mean_sources'), 3)}) ↑", "fused points"]
    if heldout: head += ["held-out scene: photometric ↓", "held-out scene: agreement ↑"]
    if gt: head += ["GT: depth MAE region", "GT: cloud overall"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    def row(name, g, m, hg=None):
        cells = [name, fmt(get(g, "photometric", "photo")), pct(get(g, "photometric", "covered")), pct(get(g, "agreement", "fraction")),
                 fmt(get(g, "agreement", "mean_views"), 3), fmt(get(m, "train_scene", "fusion", "num_points")) if m else "–"]
        if heldout: cells += [fmt(get(hg, "photometric", "photo")), pct(get(hg, "agreement", "fraction"))]
        if gt: cells += [fmt(get(m, "train_scene", "depth", "region", "abs_mean")), fmt(get(m, "train_scene", "cloud", "overall"))] if m else ["0", "–"]
        lines.append("| " + " | ".join(cells) + " |")
    for name, m in rows:
        if m: row(name, get(m, "train_scene", "gt_free"), m, get(m, "heldout_scene", "gt_free"))
    ref = next((get(m, "train_scene", "gt_free", "gt_depth") for _, m in rows if get(m, "train_scene", "gt_free", "gt_depth")), None)
    if ref:
        href = next((get(m, "heldout_scene", "gt_free", "gt_depth") for _, m in rows if get(m, "heldout_scene", "gt_free", "gt_depth")), None)
        row("*ground-truth depth (reference)*", ref, None, href)
    return lines, gt

def verdicts(rows):
    "One line per student: does it beat the teacher and the control (same extra steps, teacher's loss only) on depth MAE?"
    mae = lambda m, scene, part: get(m, scene, "depth", part, "abs_mean")
    base = {d: m for (_, m), (_, d) in zip(rows, EVALS)}
    teacher, control = base.get("50_eval_teacher"), base.get("50_eval_control")
    out = []
    for (name, m), (_, d) in zip(rows, EVALS):
        if not d.startswith("50_eval_student") or not has_gt(m) or not has_gt(teacher): continue
        cols = [("all", "train_scene", "all"), ("region", "train_scene", "region"), ("held-out region", "heldout_scene", "region")]
        def cmp(ref):
            got = [(lab, mae(m, sc, part), mae(ref, sc, part)) for lab, sc, part in cols]
            return ", ".join(f"{lab} {'✓' if a < b else '✗'} ({a / b - 1:+.1%})" for lab, a, b in got if a is not None and b is not None)
        line = f"- {name}: vs teacher {cmp(teacher)}"
        if has_gt(control): line += f"; vs control {cmp(control)}"
        out.append(line)
    return (["Student vs teacher (✓ = lower depth MAE; relative change):", ""] + out) if out else []

def main(run, seconds=None):
    run = Path(run)
    tp = load(run / "10_teacher", "params.json") or {}
    rows = [(name, load(run / d)) for name, d in EVALS]
    lines = ["# mvsnb demo report", "", f"Run folder: `{run}`" + (f"; wall time {seconds} s." if seconds else "")
             + (f" Scene: `{tp['data_root']}`" + (f" at {tp.get('height')}x{tp.get('width')}." if tp.get("height") else ".") if tp.get("data_root") else ""), ""]
    if any(m for _, m in rows):
        table, gt = gt_free_table(rows)
        lines += ["## Metrics that need no ground truth", "",
                  "*Held-out-view photometric error*: each view's depth warps the best source view that the network did not take "
                  "as input into the reference; mean |I_ref − warped| (RGB in [0, 1]) over the pixels it covers. *Cross-view "
                  "agreement*: fraction of pixels whose depth enough listed source views confirm (the evaluation-fusion thresholds, "
                  "1 px and 1 %, no confidence test), and the mean number that do."
                  + (" The GT columns and the ground-truth-depth row (the same metrics of the true depth: the floor and the ceiling "
                     "at this image size) show whether the GT-free numbers track the errors against ground truth." if gt else
                     " The scene has no ground truth, so these are the only scores."), "", *table, ""]
        if gt:
            lines += ["## Depth and point cloud against ground truth", "",
                      "Self-supervised training uses the training scene's images only; its ground truth is used for evaluation "
                      "only. *Region* = pixels whose surface lies in the observation mask (objects and ground, as DTU's masks); "
                      "*all* adds the textureless backdrop, which no pseudo label covers. The held-out scene (seed 1) is never trained on.", "",
                      "| stage | depth MAE all | depth MAE region | held-out MAE region | % within 1 % | fused points | accuracy | completeness | overall | F-score |",
                      "|---|---|---|---|---|---|---|---|---|---|"]
            for name, m in rows:
                if not has_gt(m): continue
                t = get(m, "train_scene") or {}
                lines.append(f"| {name} | {fmt(get(t, 'depth', 'all', 'abs_mean'))} | {fmt(get(t, 'depth', 'region', 'abs_mean'))} | "
                             f"{fmt(get(m, 'heldout_scene', 'depth', 'region', 'abs_mean'))} | "
                             f"{fmt(get(t, 'depth', 'all', 'within_1pct'), 3)} | {fmt(get(t, 'fusion', 'num_points'))} | "
                             f"{fmt(get(t, 'cloud', 'accuracy'))} | {fmt(get(t, 'cloud', 'completeness'))} | "
                             f"{fmt(get(t, 'cloud', 'overall'))} | {fmt(get(t, 'cloud', 'fscore'), 3)} |")
            lines += [""] + verdicts(rows) + [""]
    lab = load(run / "20_labels")
    if lab:
        lgt = lab.get("raw") is not None
        lines += ["## Pseudo labels", ""]
        if lgt: lines += ["| labels | kept / covered | label MAE | raw teacher MAE on the same pixels |", "|---|---|---|---|"]
        else: lines += ["| labels | kept by the check | labels cover |", "|---|---|---|"]
        for k in ("kd", "spsr"):
            m = lab.get(k)
            if not m: continue
            if lgt:
                lines.append(f"| {k} (checked: {fmt(m.get('kept_fraction'), 3)} kept) | {fmt(m.get('coverage'), 3)} | "
                             f"{fmt(get(m, 'labels', 'all', 'abs_mean'))} | {fmt(get(m, 'raw_on_kept', 'all', 'abs_mean'))} |")
            else: lines.append(f"| {k} | {pct(m.get('kept_fraction'))} | {pct(m.get('coverage'))} |")
        lines += [""] + ([f"Raw teacher MAE on all pixels: {fmt(get(lab, 'raw', 'all', 'abs_mean'))}.", ""] if lgt else
                         [f"Fused teacher cloud (`20_labels/fused.ply`): {fmt(lab.get('fused_points'))} points.", ""])
    tm = load(run / "10_teacher")
    if tm: lines += ["## Teacher training", "", "```json", json.dumps({k: v for k, v in tm.items() if not isinstance(v, (dict, list))}, indent=1), "```", ""]
    lines += ["Figures: `*/fig_*.png` in each stage folder; executed notebooks: `*/*.ipynb`.", ""]
    (run / "report.md").write_text("\n".join(lines)); print("\n".join(lines))

if __name__ == "__main__":
    args = sys.argv[1:]; sec = None
    if "--seconds" in args: i = args.index("--seconds"); sec = args[i + 1]; del args[i:i + 2]
    main(args[0], sec)

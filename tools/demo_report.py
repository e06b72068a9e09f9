"""Write RUN/report.md from the metrics.json files of a `make demo` run folder (see tools/demo.sh)."""
import json, sys
from pathlib import Path

def load(p):
    p = Path(p) / "metrics.json"
    return json.loads(p.read_text()) if p.exists() else None

def fmt(x, nd=4):
    return "–" if x is None else (f"{x:.{nd}g}" if isinstance(x, float) else str(x))

def get(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d: return None
        d = d[k]
    return d

def main(run, seconds=None):
    run = Path(run); lines = [f"# mvsnb demo report", "", f"Run folder: `{run}`" + (f"; wall time {seconds} s." if seconds else ""), ""]
    evals = [("teacher (unsupervised, khot)", "50_eval_teacher"), ("student on SPSR labels (pseudo_l1, fine-tuned)", "50_eval_student_spsr"),
             ("student on KD labels (kd_paper, from scratch)", "50_eval_student_kd")]
    rows = [(name, load(run / d)) for name, d in evals]
    if any(m for _, m in rows):
        lines += ["## Depth and point cloud against ground truth", "",
                  "Self-supervised training uses the training scene's images only; its ground truth is used for evaluation "
                  "only. *Region* = pixels whose surface lies in the observation mask (objects and ground, as DTU's masks); "
                  "*all* adds the textureless backdrop, which no pseudo label covers. The held-out scene (seed 1) is never trained on.", "",
                  "| stage | depth MAE all | depth MAE region | held-out MAE region | % within 1 % | fused points | accuracy | completeness | overall | F-score |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for name, m in rows:
            t = get(m, "train_scene") or {}
            lines.append(f"| {name} | {fmt(get(t, 'depth', 'all', 'abs_mean'))} | {fmt(get(t, 'depth', 'region', 'abs_mean'))} | "
                         f"{fmt(get(m, 'heldout_scene', 'depth', 'region', 'abs_mean'))} | "
                         f"{fmt(get(t, 'depth', 'all', 'within_1pct'), 3)} | {fmt(get(t, 'fusion', 'num_points'))} | "
                         f"{fmt(get(t, 'cloud', 'accuracy'))} | {fmt(get(t, 'cloud', 'completeness'))} | "
                         f"{fmt(get(t, 'cloud', 'overall'))} | {fmt(get(t, 'cloud', 'fscore'), 3)} |")
        lines.append("")
    lab = load(run / "20_labels")
    if lab:
        lines += ["## Pseudo labels", "", "| labels | kept / covered | label MAE | raw teacher MAE on the same pixels |", "|---|---|---|---|"]
        for k in ("kd", "spsr"):
            m = lab.get(k)
            if not m: continue
            lines.append(f"| {k} (checked: {fmt(m.get('kept_fraction'), 3)} kept) | {fmt(m.get('coverage'), 3)} | "
                         f"{fmt(get(m, 'labels', 'all', 'abs_mean'))} | {fmt(get(m, 'raw_on_kept', 'all', 'abs_mean'))} |")
        lines += ["", f"Raw teacher MAE on all pixels: {fmt(get(lab, 'raw', 'all', 'abs_mean'))}.", ""]
    tm = load(run / "10_teacher")
    if tm: lines += ["## Teacher training", "", "```json", json.dumps({k: v for k, v in tm.items() if not isinstance(v, (dict, list))}, indent=1), "```", ""]
    lines += ["Figures: `*/fig_*.png` in each stage folder; executed notebooks: `*/*.ipynb`.", ""]
    (run / "report.md").write_text("\n".join(lines)); print("\n".join(lines))

if __name__ == "__main__":
    args = sys.argv[1:]; sec = None
    if "--seconds" in args: i = args.index("--seconds"); sec = args[i + 1]; del args[i:i + 2]
    main(args[0], sec)

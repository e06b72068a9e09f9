"""Smoke test of the benchmark scripts in benchmarks/ (they are not timed tests): each runs with --smoke (smallest
size, one repeat) and writes a JSON whose rows, ratios and summary have the documented shape; the summary script
combines them. bench_crossview compiles its fused kernel (~5-20 s on a busy machine; inductor caches it on disk) and builds the native one (< 1 s). Keeps the scripts from rotting when the library changes under them."""
import importlib, json, sys
from pathlib import Path
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = ["probe", "warp", "train_step", "ply", "fusion", "spsr", "patchmatch", "memory", "crossview", "eval"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    "Run every script in this process (one torch import) with --smoke; {name: JSON dict}."
    pytest.importorskip("open3d")
    import torch
    out = tmp_path_factory.mktemp("bench")
    sys.path.insert(0, str(BENCH))
    threads = torch.get_num_threads()
    try:
        docs = {}
        for name in SCRIPTS:  # one thread: OpenMP threads spinning on a busy machine make tiny runs several times slower
            try:
                mod = importlib.import_module(f"bench_{name}")
                path = mod.main(["--smoke", "--device", "cpu", "--threads", "1", "--out", str(out / f"bench_{name}.json")])
                docs[name] = json.loads(Path(path).read_text())
            except Exception as e:  # one broken script fails its own tests, not the others'
                docs[name] = e
        docs["_dir"] = out
        return docs
    finally:
        sys.path.remove(str(BENCH)); torch.set_num_threads(threads)


@pytest.mark.parametrize("name", SCRIPTS)
def test_smoke_script(results, name):
    doc = results[name]
    if isinstance(doc, Exception): raise doc
    assert doc["benchmark"] == f"bench_{name}" and doc["args"]["smoke"]
    m = doc["machine"]
    assert m["cores"] >= 1 and m["cpu_model"] and m["torch_threads"] >= 1 and len(m["loadavg"]) == 3 and m["uptime"]
    assert doc["rows"], "no measured rows"
    for r in doc["rows"]:
        if r.get("median_s") is not None: assert r["median_s"] > 0 and (r.get("repeats") is None or r["repeats"] >= 1)
    if name != "probe":
        assert doc["hardware_bounds"]["bandwidth_gbps"] > 0 and doc["hardware_bounds"]["gflops"] > 0
        assert doc["summary"], "no summary rows"


def test_feature_ratios_and_checks(results):
    "The baselines ran beside mvsnb and agree with it where the script checks agreement."
    failed = [n for n in SCRIPTS if isinstance(results[n], Exception)]
    assert not failed, f"scripts failed: {failed}"
    ply = results["ply"]
    assert all(r["roundtrip_ok"] for r in ply["rows"]) and ply["summary"][0]["speedup"] > 1
    warp = results["warp"]
    assert {r["impl"] for r in warp["rows"]} == {"mvsnb", "mvsnb chunk 8", "baseline"}
    assert max(r["mismatch_frac_vs_other"] for r in warp["rows"] if "mismatch_frac_vs_other" in r) < 0.01
    assert all(r.get("speedup", 1) > 0 for r in results["train_step"]["rows"])
    pm = [r for r in results["patchmatch"]["rows"] if r["impl"] == "baseline"]
    assert pm and all(r["max_abs_diff_vs_mvsnb"] < 1e-3 for r in pm)
    fus = results["fusion"]["speedups"]
    assert fus and all(abs(s["points_mvsnb"] - s["points_baseline"]) <= 0.01 * s["points_baseline"] for s in fus)
    assert any(r.get("extrapolated") for r in results["memory"]["rows"])  # CPU: the 1200x1600 value is labelled
    assert "bounds" in results["probe"] and results["probe"]["bounds"]["cpu"]["bandwidth_gbps"] > 0
    assert results["probe"]["bounds"]["cpu"]["gather_geps"] > 0  # the C gather probe (a C compiler is part of the set-up)
    cv = results["crossview"]  # baseline, eager, torch.compile and native kernels in alternating rounds, the same decisions
    assert {r["impl"] for r in cv["rows"]} == {"baseline", "eager", "compiled", "native"}
    for impl in ("compiled", "native"):
        comp = next(r for r in cv["rows"] if r["impl"] == impl)
        assert comp["first_call_s"] > 0 and comp["same_decisions_vs_eager"] >= 0.999 and comp["same_decisions_vs_baseline"] >= 0.999
        assert comp["bw_frac"] > 0 and comp["speedup"] > 0 and comp["bound_s"] > 0 and comp["compiled"]
        assert 0 < comp["gather_frac"] and comp["gathers"] > 0
    # the summary quotes the kernel mvsnb runs by default on the CPU: the native one
    assert cv["summary"][0]["kernel"] == "crossview" and "(native)" in cv["summary"][0]["what"] and cv["speedup"] == comp["speedup"]
    ev = results["eval"]  # the exact thinning gives the baseline's metrics
    assert ev["baseline_same_metrics"] and {s["method"] for s in ev["summary"]} == {"greedy", "grid", "baseline"}


def test_smoke_summary(results):
    sys.path.insert(0, str(BENCH))
    try:
        summary = importlib.import_module("summary")
        out = results["_dir"] / "all.json"
        summary.main(["--dir", str(results["_dir"]), "--out", str(out), "--wall", "1"])
    finally: sys.path.remove(str(BENCH))
    doc = json.loads(out.read_text())
    assert set(doc["benchmarks"]) == {f"bench_{n}" for n in SCRIPTS}
    assert {r["kernel"] for r in doc["summary"]} >= {"warp", "train step", "ply", "fusion", "spsr", "patchmatch", "memory", "crossview", "eval"}

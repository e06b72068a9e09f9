"""mvsnb.sweep on the toy pipeline (nbs/pipelines/99_toy.ipynb): spec checks, expansion, failures, reruns,
interruption (a SIGKILLed sweep), GPU-slot pinning, results.csv and the summary figure."""
import csv, json, os, signal, subprocess, sys, time
from pathlib import Path
import pytest
import mvsnb.sweep as sw
from mvsnb.core import InputError, MvsnbError
from mvsnb.sweep import (load_spec, parse_spec, expand, run_sweep, collect_results, write_results_csv, summary_figure,
                         run_status, make_run_id)

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "nbs" / "pipelines" / "99_toy.ipynb"


def spec_file(tmp_path, text, name="spec.yaml"):
    p = tmp_path / name
    p.write_text(text.replace("TOY", str(TOY)))
    return p


def read_csv(path):
    with open(path, newline="") as f: return list(csv.DictReader(f))


@pytest.fixture
def executions(monkeypatch):
    "Names of the run folders executed in this process (sequential sweeps run in-process)."
    calls, real = [], sw.execute_run
    def counting(notebook, run_dir, params, info=None, env=None):
        calls.append(Path(run_dir).name)
        return real(notebook, run_dir, params, info, env)
    monkeypatch.setattr(sw, "execute_run", counting)
    return calls


def test_feature_expand_variants_grid_seeds(tmp_path):
    spec = load_spec(spec_file(tmp_path, "notebook: TOY\nout: o\nbase: {x: 9.0, sleep: 0.5}\n"
                                          "variants:\n  a: {}\n  b c: {fail: true}\ngrid:\n  x: [1.0, 2.5]\n  y: [1, 2, 3]\nseeds: [0, 7]\n"))
    runs = expand(spec)
    assert len(runs) == 2 * 2 * 3 * 2 and len({r.run_id for r in runs}) == len(runs)
    assert [r.run_id for r in runs[:3]] == ["a__x=1.0__y=1__seed=0", "a__x=1.0__y=1__seed=7", "a__x=1.0__y=2__seed=0"]
    last = runs[-1]
    assert last.run_id == "b-c__x=2.5__y=3__seed=7" and last.variant == "b c" and last.grid == {"x": 2.5, "y": 3} and last.seed == 7
    assert last.params == {"x": 2.5, "sleep": 0.5, "fail": True, "y": 3, "seed": 7}  # the grid overrides base
    assert last.dir == tmp_path / "o" / "runs" / last.run_id
    # ids are stable and bounded
    assert [r.run_id for r in expand(spec)] == [r.run_id for r in runs]
    long = make_run_id("v" * 100, {"x": 1.0}, 0)
    assert len(long) == sw.MAX_ID and long != make_run_id("v" * 100, {"x": 2.0}, 0)


BAD_SPECS = [  # (spec text, expected message fragment): each is one InputError naming file, line and key
    ("notebook: TOY\ngrdi: {x: [1.0]}\n", "spec.yaml:2 [grdi]: unknown key 'grdi' (did you mean 'grid'?); valid keys: ["),
    ("notebook: TOY\ngrid:\n  x: [1.0]\n  xx: [2]\n", "spec.yaml:4 [grid.xx]: unknown parameter 'xx'"),
    ("notebook: TOY\nvariants:\n  a: {sleeep: 1}\n", "spec.yaml:3 [variants.a.sleeep]: unknown parameter 'sleeep' (did you mean 'sleep'?); 99_toy.ipynb declares: ["),
    ("notebook: TOY\ngrid: {x: []}\n", "spec.yaml:2 [grid.x]: empty list of values"),
    ("notebook: TOY\ngrid: {}\n", "spec.yaml:2 [grid]: empty grid"),
    ("notebook: TOY\nvariants: {}\n", "spec.yaml:2 [variants]: empty variants"),
    ("notebook: TOY\nbase: {x: 1.0}\n", "nothing to sweep"),
    ("notebook: TOY\ngrid: {y: [1, 2.5]}\n", "spec.yaml:2 [grid.y]: expected int"),
    ("notebook: missing.ipynb\nseeds: [0]\n", "spec.yaml:1 [notebook]: notebook not found"),
    ("notebook: TOY\nseeds: [0]\nmetrics: [score]\nfigure: {y: score, hue: variantt}\n", "[figure.hue]: 'variantt' is not a sweep column"),
]


@pytest.mark.parametrize("text,msg", BAD_SPECS)
def test_exception_bad_spec(tmp_path, text, msg):
    with pytest.raises(InputError) as e: load_spec(spec_file(tmp_path, text))
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_exception_bad_spec_runs_nothing(tmp_path):
    p = spec_file(tmp_path, "notebook: TOY\nout: o\ngrid: {x: [1.0, 2.0]}\nvariants: {a: {}, b: {yy: 1}}\n")
    with pytest.raises(InputError, match=r"\[variants.b.yy\]: unknown parameter 'yy'"): run_sweep(p, progress=False)
    assert not (tmp_path / "o").exists()  # checked before any run folder was made
    with pytest.raises(InputError, match="jobs must be a positive integer"):
        run_sweep(spec_file(tmp_path, "notebook: TOY\nout: o\nseeds: [0]\n"), jobs=0, progress=False)


def test_feature_failures_reruns_results(tmp_path, executions):
    "A failing run is recorded and the others finish; reruns skip finished (and failed) runs; results.csv and figure."
    p = spec_file(tmp_path, "notebook: TOY\nout: o\nbase: {y: 3}\nvariants:\n  good: {}\n  bad: {fail: true}\n"
                            "grid: {x: [1.0, 2.0]}\nmetrics: [score, val.square]\nfigure: {y: score}\n")
    rows = run_sweep(p, progress=False)
    out = tmp_path / "o"
    assert executions == ["good__x=1.0", "good__x=2.0", "bad__x=1.0", "bad__x=2.0"]
    assert [r["status"] for r in rows] == ["ok", "ok", "failed", "failed"]
    assert [r["score"] for r in rows] == [3.0, 6.0, None, None] and rows[1]["val.square"] == 4.0
    err = json.loads((out / "runs" / "bad__x=2.0" / "error.json").read_text())
    assert err["type"] == "ValueError" and err["message"] == "toy failure requested (x=2.0, y=3)" and err["cell"] == 4
    assert Path(err["notebook"]).exists() and not (out / "runs" / "bad__x=2.0" / "done").exists()
    assert rows[2]["error"] == "ValueError: toy failure requested (x=1.0, y=3) (cell 4)"
    # results.csv: one row per run, fixed columns, metrics by name
    table = read_csv(out / "results.csv")
    assert list(table[0]) == ["run_id", "variant", "x", "seed", "status", "seconds", "score", "val.square", "error"]
    assert [(t["run_id"], t["status"], t["score"]) for t in table] == [
        ("good__x=1.0", "ok", "3.0"), ("good__x=2.0", "ok", "6.0"), ("bad__x=1.0", "failed", ""), ("bad__x=2.0", "failed", "")]
    assert all(float(t["seconds"]) > 0 for t in table) and table[0]["seed"] == ""
    png = (out / "summary.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert oct((out / "results.csv").stat().st_mode & 0o044) != "0o0"  # readable by others (not mkstemp's 0600)

    # rerun: nothing executes; results unchanged
    executions.clear()
    assert run_sweep(p, progress=False) == rows and executions == []
    # --retry-failed re-runs only the failed ones (still failing)
    rows2 = run_sweep(p, retry_failed=True, progress=False)
    assert executions == ["bad__x=1.0", "bad__x=2.0"] and [r["status"] for r in rows2] == [r["status"] for r in rows]

    # an interrupted run (no `done` marker, leftovers of the attempt) is restarted cleanly
    executions.clear()
    d = out / "runs" / "good__x=2.0"
    (d / "done").unlink(); (d / "leftover.tmp").write_text("partial")
    assert run_status(d) == "interrupted"
    rows3 = run_sweep(p, progress=False)
    assert executions == ["good__x=2.0"] and not (d / "leftover.tmp").exists() and rows3[1]["status"] == "ok"
    assert not [q for q in (out / "runs").iterdir() if q.name.startswith(".")]  # the old attempt is deleted

    # the spec changes under finished runs → one clear error, nothing runs
    executions.clear()
    p.write_text(p.read_text().replace("base: {y: 3}", "base: {y: 4}"))
    with pytest.raises(InputError, match=r"finished run\(s\) .* other parameters .* good__x=1.0: y: 3 → 4"): run_sweep(p, progress=False)
    assert executions == []
    # a failed run whose parameters changed is simply re-run (its error is no result to protect)
    p.write_text(p.read_text().replace("base: {y: 4}", "base: {y: 3}").replace("bad: {fail: true}", "bad: {fail: false}"))
    run_sweep(p, progress=False)
    assert executions == ["bad__x=1.0", "bad__x=2.0"]
    assert [t["status"] for t in read_csv(out / "results.csv")] == ["ok"] * 4


def test_feature_sweep_lock(tmp_path):
    p = spec_file(tmp_path, "notebook: TOY\nout: o\nseeds: [0]\n")
    with sw._sweep_lock(tmp_path / "o"):
        with pytest.raises(MvsnbError, match="another sweep is running"): run_sweep(p, progress=False)


def test_feature_killed_sweep_resumes(tmp_path, executions):
    "SIGKILL a sweep mid-run: the rerun skips the finished run, restarts the interrupted one, and the table is complete."
    p = spec_file(tmp_path, "notebook: TOY\nout: o\nbase: {sleep: 1.5}\ngrid: {x: [1.0, 2.0, 3.0]}\nmetrics: [score]\n")
    runs = tmp_path / "o" / "runs"
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from mvsnb.sweep import run_sweep; run_sweep(sys.argv[1], progress=False)", str(p)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not ((runs / "x=1.0" / "done").exists() and (runs / "x=2.0" / "run.json").exists()):
            assert proc.poll() is None and time.time() < deadline, "the sweep ended before it could be interrupted"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL); proc.wait()
    assert [run_status(runs / n) for n in ("x=1.0", "x=2.0", "x=3.0")] == ["ok", "interrupted", "pending"]
    first = (runs / "x=1.0" / "metrics.json").read_text()
    rows = run_sweep(p, progress=False)
    assert executions == ["x=2.0", "x=3.0"]  # the finished run is not executed again
    assert (runs / "x=1.0" / "metrics.json").read_text() == first
    table = read_csv(tmp_path / "o" / "results.csv")
    assert [t["run_id"] for t in table] == ["x=1.0", "x=2.0", "x=3.0"]  # complete, no duplicates
    assert [t["status"] for t in table] == ["ok"] * 3 and [float(t["score"]) for t in table] == [2.0, 4.0, 6.0]
    assert rows[1]["score"] == 4.0


def test_feature_parallel_workers_pinned_to_devices(tmp_path):
    "jobs=2 over two device slots: spawned workers, each run's kernel sees one CUDA_VISIBLE_DEVICES; `device` is set."
    p = spec_file(tmp_path, "notebook: TOY\nout: o\ngrid: {x: [1.0, 2.0, 3.0]}\nmetrics: [score, device, cuda_visible_devices]\n")
    rows = run_sweep(p, jobs=2, devices=["0", "1"], progress=False)
    assert [r["status"] for r in rows] == ["ok"] * 3 and [r["score"] for r in rows] == [2.0, 4.0, 6.0]
    assert {r["cuda_visible_devices"] for r in rows} == {"0", "1"} and {r["device"] for r in rows} == {"cuda"}
    pids = {json.loads((tmp_path / "o" / "runs" / r["run_id"] / "run.json").read_text())["pid"] for r in rows}
    assert os.getpid() not in pids  # the runs went to worker processes


def test_smoke_task_device_and_threads(tmp_path):
    "Which parameters and environment a run gets: device pinning, an explicit `device` kept, CPU thread split."
    spec = parse_spec({"notebook": str(TOY), "grid": {"x": [1.0]}, "variants": {"auto": {}, "cpu": {"device": "cpu"}}}, base_dir=tmp_path)
    declared = sw.check_params(spec)
    auto, cpu = expand(spec)
    t = sw._task(spec, auto, declared, "3", 2)
    assert t["env"] == {"CUDA_VISIBLE_DEVICES": "3"} and t["params"]["device"] == "cuda" and "device" not in auto.params
    assert sw._task(spec, cpu, declared, "3", 2)["params"]["device"] == "cpu"
    t = sw._task(spec, auto, declared, None, 2)
    assert "device" not in t["params"] and ("OMP_NUM_THREADS" in t["env"]) == ("OMP_NUM_THREADS" not in os.environ)
    assert sw._task(spec, auto, declared, None, 1)["env"] == {}


def test_smoke_results_without_sweep_record(tmp_path):
    "collect_results reads bare run folders; the figure needs a finished run; write_results_csv round-trips."
    runs = tmp_path / "runs"
    for name, status, score in (("b", "ok", 2.0), ("a", "ok", 1.0), ("c", "failed", None), ("d", "interrupted", None)):
        d = runs / name; d.mkdir(parents=True)
        (d / "run.json").write_text(json.dumps({"variant": name, "grid": {"lr": 0.1}, "seed": 0}))
        if status == "ok":
            (d / "metrics.json").write_text(json.dumps({"score": score, "val": {"mae": score / 10}, "hist": [1, 2]}))
            (d / "done").write_text(json.dumps({"seconds": 1.5}))
        if status == "failed": (d / "error.json").write_text(json.dumps({"type": "KeyError", "message": "'k'", "summary": "KeyError: 'k' (cell 2)"}))
    rows = collect_results(tmp_path)
    assert [(r["run_id"], r["status"]) for r in rows] == [("a", "ok"), ("b", "ok"), ("c", "failed"), ("d", "interrupted")]
    assert list(rows[0]) == ["run_id", "variant", "lr", "seed", "status", "seconds", "score", "val.mae", "error"]
    assert rows[0]["score"] == 1.0 and rows[1]["val.mae"] == 0.2 and rows[2]["error"] == "KeyError: 'k' (cell 2)"
    write_results_csv(rows, tmp_path / "r.csv")
    back = read_csv(tmp_path / "r.csv")
    assert [b["run_id"] for b in back] == ["a", "b", "c", "d"] and back[1]["score"] == "2.0" and back[3]["seconds"] == ""
    fig = summary_figure(rows, path=tmp_path / "s.png")
    assert fig is not None and fig.axes[0].get_xlabel() == "score" and (tmp_path / "s.png").stat().st_size > 1000
    assert summary_figure([r for r in rows if r["status"] != "ok"]) is None


def test_smoke_ready_made_specs():
    "Every spec in configs/sweeps/ names real notebook parameters (checked against the notebooks themselves)."
    specs = sorted((ROOT / "configs" / "sweeps").glob("*.yaml"))
    assert specs
    for path in specs:
        spec = load_spec(path)
        runs = expand(spec)
        assert runs and len({r.run_id for r in runs}) == len(runs), path
    # the DIV Table 3 row mapping (8 rows) is checked in tests/test_configs.py

"""Fault tests (issue 8): runs killed with SIGKILL and resumed through the public `mvsnb` command, a failing run
inside a sweep, and the manifests that keep stale checkpoints and pseudo-label folders from being used silently.

The kill tests kill the whole process tree the command started (the `mvsnb` process and the Jupyter kernel that
does the work), as the out-of-memory killer or a preempted job on a shared GPU would.
"""
from __future__ import annotations
import csv, dataclasses, json, os, re, signal, subprocess, sys, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
MVSNB = str(Path(sys.executable).with_name("mvsnb"))
TEACHER = ROOT / "nbs" / "pipelines" / "10_train_teacher.ipynb"
TOY = ROOT / "nbs" / "pipelines" / "99_toy.ipynb"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit(): continue
        try: ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError): continue
        kids.setdefault(ppid, []).append(int(p.name))
    return kids


def kill9_tree(proc: subprocess.Popen) -> list[int]:
    "SIGKILL `proc` and every process it started (only those), deepest first; return their pids."
    kids, tree, todo = _children(), [], [proc.pid]
    while todo:
        q = todo.pop(); tree.append(q); todo += kids.get(q, [])
    for q in reversed(tree):
        try: os.kill(q, signal.SIGKILL)
        except ProcessLookupError: pass
    proc.wait(timeout=30)
    return tree


def wait_for(cond, proc, what: str, timeout: float = 240):
    t0 = time.time()
    while not cond():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the command ended (rc {proc.returncode}) before {what}\n{out}\n{err}")
        assert time.time() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.05)


def log_rows(run: Path) -> list[dict]:
    p = run / "log.jsonl"
    if not p.exists(): return []
    out = []
    for line in p.read_text().splitlines():
        try: out.append(json.loads(line))
        except json.JSONDecodeError: pass  # a line being written
    return out


def read_csv(path):
    with open(path, newline="") as f: return list(csv.DictReader(f))


# ---------------------------------------------------------------- the three subprocess scenarios, run side by side
# Each scenario starts Jupyter kernels (seconds each), so the module fixture runs them concurrently and the tests
# below assert on what they observed.
STEPS, CKPT_EVERY = 15, 3  # the synthetic scene has 5 views → 5 samples per epoch: checkpoints at 3, 6, 9, 12 fall mid-epoch
TRAIN_ARGS = ["-p", "steps", str(STEPS), "-p", "train_overrides",
              json.dumps({"ckpt_every": CKPT_EVERY, "log_every": 1, "val_every": 0, "keep_checkpoints": 0})]


def _popen(*args):
    return subprocess.Popen([MVSNB, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            start_new_session=True)


def _scenario_training(root: Path) -> dict:
    "Teacher pipeline: an uninterrupted run beside one killed (-9) mid-epoch after its second checkpoint, then resumed."
    from mvsnb.train import read_checkpoint
    full, cut = root / "full", root / "cut"
    p_full, p_cut = _popen("run", TEACHER, "--run-dir", full, *TRAIN_ARGS), _popen("run", TEACHER, "--run-dir", cut, *TRAIN_ARGS)
    try:
        def past_a_checkpoint():
            steps = [r["step"] for r in log_rows(cut) if r["kind"] == "train"]
            return bool(steps) and steps[-1] >= 2 * CKPT_EVERY + 1 and (cut / "checkpoints" / "last.pt").exists()
        wait_for(past_a_checkpoint, p_cut, "the run passed its second checkpoint")
        killed = kill9_tree(p_cut)
    finally:
        if p_cut.poll() is None: kill9_tree(p_cut)
    obs = dict(full=full, cut=cut, rc_killed=p_cut.returncode, killed=killed,
               done=max(r["step"] for r in log_rows(cut) if r["kind"] == "train"),
               saved=read_checkpoint(cut / "checkpoints" / "last.pt")["step"])  # never half-written: it loads
    obs["resume"] = subprocess.run([MVSNB, "run", str(TEACHER), "--run-dir", str(cut), *TRAIN_ARGS, "-p", "resume", "True",
                                    "--overwrite"], capture_output=True, text=True, env=ENV, timeout=600)
    out, err = p_full.communicate(timeout=600)
    obs["full_rc"], obs["full_err"] = p_full.returncode, err
    return obs


def _spec(root: Path, text) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    p = root / "spec.yaml"
    p.write_text(text.replace("TOY", str(TOY)).replace("OUT", str(root / "sweep")))
    return p


def _scenario_sweep_kill(root: Path) -> dict:
    "`mvsnb sweep` killed (-9) while its second run sleeps, then rerun."
    spec = _spec(root, "notebook: TOY\nout: OUT\nbase: {sleep: 1.5}\ngrid: {x: [1.0, 2.0, 3.0]}\nmetrics: [score]\n")
    runs = root / "sweep" / "runs"
    p = _popen("sweep", spec)
    try:
        wait_for(lambda: (runs / "x=1.0" / "done").exists() and (runs / "x=2.0" / "run.json").exists(), p, "run 2 started")
        time.sleep(0.3)  # let run 2's kernel get going
        kill9_tree(p)
    finally:
        if p.poll() is None: kill9_tree(p)
    obs = dict(root=root, runs=runs, rc_killed=p.returncode, first=(runs / "x=1.0" / "metrics.json").read_text(),
               killed_pid=json.loads((runs / "x=2.0" / "run.json").read_text())["pid"],
               done2_before=(runs / "x=2.0" / "done").exists(), run3_before=(runs / "x=3.0").exists())
    obs["rerun"] = subprocess.run([MVSNB, "sweep", str(spec)], capture_output=True, text=True, env=ENV, timeout=600)
    return obs


def _scenario_sweep_fail(root: Path) -> dict:
    "`mvsnb sweep` whose middle run's notebook raises."
    spec = _spec(root, "notebook: TOY\nout: OUT\nvariants:\n  a: {x: 1.0}\n  broken: {fail: true}\n  c: {x: 3.0}\nmetrics: [score]\n")
    return dict(root=root, run=subprocess.run([MVSNB, "sweep", str(spec)], capture_output=True, text=True, env=ENV, timeout=600))


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    ex = ThreadPoolExecutor(max_workers=3)
    futs = {name: ex.submit(fn, root / name) for name, fn in
            (("training", _scenario_training), ("sweep_kill", _scenario_sweep_kill), ("sweep_fail", _scenario_sweep_fail))}
    yield futs
    ex.shutdown(wait=True)


def test_feature_kill9_training_resumes_to_the_same_weights(scenarios):
    "kill -9 `mvsnb run` of the teacher mid-epoch, rerun with resume: ≤ one checkpoint interval lost, same final weights."
    from mvsnb.train import read_checkpoint
    o = scenarios["training"].result()
    full, cut = o["full"], o["cut"]
    assert o["rc_killed"] == -signal.SIGKILL and len(o["killed"]) >= 2  # the command and its kernel
    assert o["done"] < STEPS, "the run finished before it was killed"
    assert o["saved"] % CKPT_EVERY == 0 and 0 <= o["done"] - o["saved"] <= CKPT_EVERY, (o["saved"], o["done"])  # ≤ 1 interval lost
    assert o["resume"].returncode == 0, o["resume"].stderr
    assert o["full_rc"] == 0, o["full_err"]
    a, b = read_checkpoint(full / "checkpoints" / "last.pt"), read_checkpoint(cut / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == STEPS and a["model"].keys() == b["model"].keys()
    for k in a["model"]: torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-5, atol=1e-6, msg=k)
    nosec = lambda rows: [{k: v for k, v in r.items() if k != "sec"} for r in rows]
    resumed = log_rows(cut)
    assert nosec(resumed) == nosec(log_rows(full))  # the lost steps were redone once: no duplicated rows
    assert [r["step"] for r in resumed if r["kind"] == "train"] == list(range(1, STEPS + 1))
    assert not list((cut / "checkpoints").glob(".*.tmp"))  # a checkpoint write cut by the kill is cleaned up
    assert b["config"]["ckpt_every"] == CKPT_EVERY and b["versions"]["torch"] == str(torch.__version__)
    assert b["inputs"]["train_data"] == {"type": "SceneDataset", "len": 5}  # the manifest of what went in


def test_feature_killed_sweep_rerun_skips_finished_runs(scenarios):
    "kill -9 `mvsnb sweep` mid-run and rerun it: the finished run is kept, the interrupted one restarts, results.csv is whole."
    o = scenarios["sweep_kill"].result()
    runs, r = o["runs"], o["rerun"]
    assert o["rc_killed"] == -signal.SIGKILL and not o["done2_before"] and not o["run3_before"]
    assert r.returncode == 0 and "3 runs: 3 ok;" in r.stdout, r.stdout + r.stderr
    assert (runs / "x=1.0" / "metrics.json").read_text() == o["first"]  # the finished run was not executed again
    assert json.loads((runs / "x=2.0" / "run.json").read_text())["pid"] != o["killed_pid"]  # restarted by the rerun
    table = read_csv(o["root"] / "sweep" / "results.csv")
    assert [t["run_id"] for t in table] == ["x=1.0", "x=2.0", "x=3.0"]  # complete, no duplicates
    assert [t["status"] for t in table] == ["ok"] * 3 and [float(t["score"]) for t in table] == [2.0, 4.0, 6.0]
    assert not [q for q in runs.iterdir() if q.name.startswith(".")]  # the killed attempt's folder was replaced, not kept


def test_feature_failing_run_recorded_others_finish(scenarios):
    "A run whose notebook raises is recorded as failed with its error; the runs after it still run; exit code 1."
    o = scenarios["sweep_fail"].result()
    r = o["run"]
    assert r.returncode == 1 and "3 runs: 2 ok, 1 failed (failed: broken)" in r.stdout, r.stdout + r.stderr
    table = read_csv(o["root"] / "sweep" / "results.csv")
    assert [(t["run_id"], t["status"]) for t in table] == [("a", "ok"), ("broken", "failed"), ("c", "ok")]
    assert re.fullmatch(r"ValueError: toy failure requested \(x=1\.0, y=2\) \(cell \d+\)", table[1]["error"]), table[1]["error"]
    assert [t["score"] for t in table] == ["2.0", "", "6.0"]
    err = json.loads((o["root"] / "sweep" / "runs" / "broken" / "error.json").read_text())
    assert err["type"] == "ValueError" and Path(err["notebook"]).exists()  # the executed notebook kept for inspection


# ---------------------------------------------------------------- manifests: stale or mismatched inputs are named
def test_feature_checkpoint_manifest_and_stale_run_folder(tmp_path):
    "Checkpoints carry config, versions and inputs; resuming a folder made with other settings or data is refused."
    from mvsnb.core import InputError
    from mvsnb.train import train, train_config, plane_pair_dataset, read_checkpoint
    cfg = train_config("tiny_cpu", model="toy", model_preset="", loss="toy_photo", steps=2, ckpt_every=2, log_every=1,
                       run_dir=str(tmp_path / "run"), progress=False)
    train(cfg, plane_pair_dataset(3))
    ck = read_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert ck["config"]["model"] == "toy" and {"mvsnb", "torch", "python"} <= set(ck["versions"])
    assert ck["inputs"]["train_data"]["len"] == 3
    resume = dataclasses.replace(cfg, resume=True, steps=4)  # more steps: allowed
    with pytest.raises(InputError, match=r"last\.pt \[resume\]: cannot resume: .*lr: 0\.001 in the checkpoint, 0\.01 now"):
        train(dataclasses.replace(resume, lr=0.01), plane_pair_dataset(3))
    with pytest.raises(InputError, match="train_data: 3 samples in the checkpoint, 4 now"):
        train(resume, plane_pair_dataset(4))
    # a checkpoint write killed before its rename leaves a hidden temporary; the next run removes it
    stray = tmp_path / "run" / "checkpoints" / ".last.pt.abc123.tmp"; stray.write_bytes(b"half")
    assert train(resume, plane_pair_dataset(3)).step == 4 and not stray.exists()


def test_feature_label_folder_manifest_detects_stale_scene(tmp_path):
    "Pseudo-label folders carry versions and the scene's hashes; labels made for other cameras or pairs are refused."
    from mvsnb.core import InputError
    from mvsnb.synthetic import make_scene, write_scene
    from mvsnb.io import write_pfm
    from mvsnb.crossview import run_check, CrossViewConfig
    from mvsnb.kd import run_kd_labels, PseudoLabelDataset, check_pseudo_labels
    from mvsnb.data import DTUTestDataset
    scene = make_scene(views=3, height=16, width=20, seed=3)
    write_scene(scene, tmp_path / "scene")
    for v in range(3): write_pfm(tmp_path / "out" / "depth_est" / f"{v:08d}.pfm", scene.depth[v, 0].numpy())
    run_check(tmp_path / "scene", tmp_path / "out", tmp_path / "checked", CrossViewConfig.preset("eval_fusion", min_views=1, tau_conf=0.0))
    man = run_kd_labels(tmp_path / "scene", tmp_path / "checked", tmp_path / "labels")
    assert man["format"] == "mvsnb-pseudo-labels" and {"mvsnb", "torch", "numpy"} <= set(man["versions"])
    assert sorted(man["scene"]) == ["cams/00000000_cam.txt", "cams/00000001_cam.txt", "cams/00000002_cam.txt", "pair.txt"]
    assert len(man["sources"]) == 3 * 3 + 1  # checked depth, sigma, mask per view + summary.json
    ds = PseudoLabelDataset(DTUTestDataset(tmp_path / "scene", num_views=2), tmp_path / "labels")
    assert ds[0]["pseudo_depth"].shape == (1, 16, 20)
    # the scene's view selection changes after the labels were made
    pair = tmp_path / "scene" / "pair.txt"; pair.write_text(pair.read_text().replace("\n1\n", "\n1 \n", 1))
    with pytest.raises(InputError, match=r"labels \[scene\]: stale pseudo labels: .*pair\.txt"):
        PseudoLabelDataset(DTUTestDataset(tmp_path / "scene", num_views=2), {"scene": tmp_path / "labels"})
    with pytest.raises(InputError, match="stale pseudo labels"): check_pseudo_labels(tmp_path / "labels", tmp_path / "scene")
    # a folder without a valid manifest is not a label folder
    (tmp_path / "labels" / "manifest.json").write_text('{"format": "something else"}')
    with pytest.raises(InputError, match=r"manifest\.json \[format\]: not an mvsnb pseudo-label manifest"):
        check_pseudo_labels(tmp_path / "labels")


def test_feature_label_folder_written_whole_or_not_at_all(tmp_path, monkeypatch):
    "A label write that dies part-way leaves no label folder and no temporary folder (and an old folder stays whole)."
    import mvsnb.io
    from mvsnb.core import atomic_path
    from mvsnb.spsr import write_pseudo_labels
    depth = torch.rand(3, 1, 8, 10) + 1; mask = torch.ones(3, 1, 8, 10, dtype=torch.bool)
    write_pseudo_labels(tmp_path / "labels", depth, mask, manifest={"method": "test", "round": 1})
    real, calls = mvsnb.io.write_pfm, [0]
    def dying(path, a):
        calls[0] += 1
        if calls[0] == 3:  # the third map does not fit on the disk
            with atomic_path(path): raise OSError(28, "No space left on device")
        return real(path, a)
    monkeypatch.setattr(mvsnb.io, "write_pfm", dying)
    with pytest.raises(OSError, match=r"No space left on device: '.*labels/depth/00000002\.pfm'"):
        write_pseudo_labels(tmp_path / "labels", depth * 2, mask, manifest={"method": "test", "round": 2}, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels"]  # no temporary folder left
    assert json.loads((tmp_path / "labels" / "manifest.json").read_text())["round"] == 1  # the old folder, whole


def test_feature_no_unpickling_of_user_files():
    "The library never unpickles data files: torch.load only with weights_only=True, np.load never with allow_pickle."
    bad = []
    for p in sorted((ROOT / "mvsnb").rglob("*.py")):
        text = p.read_text()
        for m in re.finditer(r"torch\.load\(([^()]|\([^()]*\))*\)", text):
            if "weights_only=True" not in m.group(0): bad.append(f"{p.name}: {m.group(0)}")
        bad += [f"{p.name}: allow_pickle=True" for _ in re.finditer(r"allow_pickle\s*=\s*True", text)]
        bad += [f"{p.name}: {m.group(0)}" for m in re.finditer(r"pickle\.loads?\(|cloudpickle|dill\.load", text)]
    assert not bad, bad


class _Touch:
    "Unpickling this creates a file: loading it would mean running code from a data file."
    def __init__(self, path): self.path = str(path)
    def __reduce__(self): return (Path.touch, (Path(self.path),))


def test_feature_pickled_code_in_data_files_is_refused(tmp_path):
    "A checkpoint or an observation mask carrying a code-running pickle is refused by name, and the code never runs."
    import numpy as np
    from mvsnb.core import InputError
    from mvsnb.train import read_checkpoint
    from mvsnb.io import read_npz
    torch.save({"model": {}, "versions": {}, "x": _Touch(tmp_path / "PWNED")}, tmp_path / "evil.pt")
    with pytest.raises(InputError, match=r"evil\.pt: cannot read checkpoint: .*refusing to unpickle"): read_checkpoint(tmp_path / "evil.pt")
    np.savez(tmp_path / "obs_mask.npz", bbox=np.zeros((2, 3)), mask=np.array([_Touch(tmp_path / "PWNED")], dtype=object))
    with pytest.raises(InputError, match=r"obs_mask\.npz \[mask\]: holds an object \(pickled\) array"): read_npz(tmp_path / "obs_mask.npz")
    assert not (tmp_path / "PWNED").exists()

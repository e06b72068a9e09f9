"""Render the explorer widgets in a real JupyterLab and screenshot them with headless Chromium.

Usage (from the repository root):  .venv/bin/python tests/screenshot_explorer.py [--out nbs/images/explorer.png]

What it does, all on 127.0.0.1 with fresh temporary config, settings, workspace and browser-profile folders:
1. copies `nbs/tutorials/explore_demo.ipynb` into a temporary folder (JupyterLab's autosave never touches the repo);
2. starts `jupyter lab` (token auth, `--expose-app-in-browser`, build check off, news fetching off);
3. opens the notebook in headless Chromium and drives the page over the Chrome DevTools Protocol
   (`websocket-client`): runs `notebook:run-all-cells` in JupyterLab itself, so the kernel, the comms and the
   widget manager are the real ones, then waits until every cell has run and the widget views exist;
4. presses the right-arrow key on the "min views" slider of the cross-view explorer and checks that the status
   line (kept fraction, label error) changes: a kernel round trip through a live widget;
5. saves a PNG of the page to `--out` and prints what the page held (counts of slider views and images).

Needs Debian's `chromium` (`apt-get install -y chromium`); without it the script prints SKIPPED and exits 0.
Not a pytest test: pytest never depends on a browser.
"""
from __future__ import annotations
import argparse, base64, json, os, shutil, signal, socket, subprocess, sys, tempfile, time, urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "nbs" / "tutorials" / "explore_demo.ipynb"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]

def _wait_http(url: str, timeout: float) -> bytes:
    t0, err = time.time(), None
    while time.time() - t0 < timeout:
        try:
            with urllib.request.urlopen(url, timeout=5) as r: return r.read()
        except Exception as e: err = e; time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer in {timeout:.0f} s ({err})")


class Page:
    "A minimal Chrome DevTools Protocol client for one page target."
    def __init__(self, ws_url: str):
        import websocket  # websocket-client, a jupyter dependency
        self.ws, self.n = websocket.create_connection(ws_url, timeout=60, suppress_origin=True), 0

    def call(self, method: str, **params):
        self.n += 1; self.ws.send(json.dumps({"id": self.n, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.n:
                if "error" in msg: raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def js(self, expr: str, await_promise: bool=False):
        r = self.call("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=await_promise)
        if "exceptionDetails" in r: raise RuntimeError(f"JS error in {expr[:80]}…: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait(self, expr: str, timeout: float, what: str):
        t0 = time.time()
        while time.time() - t0 < timeout:
            try:
                if self.js(expr): return
            except RuntimeError: pass
            time.sleep(0.5)
        raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")

    def key(self, key: str, code: str, keycode: int):
        for t in ("keyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", type=t, key=key, code=code, windowsVirtualKeyCode=keycode)


# JS snippets run in the page
_STATE = """(() => {
  const nb = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook');
  if (!nb) return null;
  const cells = [...nb.querySelectorAll('.jp-CodeCell')];
  const prompts = cells.map(c => (c.querySelector('.jp-InputPrompt') || {}).textContent || '');
  return {cells: cells.length, prompts,
          sliders: nb.querySelectorAll('.widget-slider').length,
          dropdowns: nb.querySelectorAll('.widget-dropdown').length,
          widget_imgs: nb.querySelectorAll('.widget-output img').length,
          all_imgs: nb.querySelectorAll('.jp-OutputArea-output img').length,
          status: [...nb.querySelectorAll('.widget-html-content')].map(e => e.textContent),
          errors: nb.querySelectorAll('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]').length};
})()"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "nbs" / "images" / "explorer.png"), help="PNG to write")
    ap.add_argument("--width", type=int, default=1280); ap.add_argument("--height", type=int, default=2150)
    ap.add_argument("--timeout", type=float, default=240, help="seconds for the whole notebook to run")
    ap.add_argument("--colors", type=int, default=256, help="palette size of the saved PNG (0: keep full colour)")
    a = ap.parse_args(argv)

    chrome = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chrome is None:
        print("SKIPPED: no chromium on PATH (Debian: apt-get install -y chromium); nothing was written")
        return 0
    jupyter = Path(sys.executable).parent / "jupyter"
    if not jupyter.exists(): print(f"SKIPPED: {jupyter} not found (run from the project venv)"); return 0

    tmp = Path(tempfile.mkdtemp(prefix="mvsnb_shot_"))
    work, cfg, data, settings, wsdir, profile = (tmp / d for d in ("work", "config", "data", "settings", "workspaces", "chrome"))
    for d in (work, cfg / "labconfig", data / "runtime", settings / "@jupyterlab" / "apputils-extension",
              settings / "@jupyterlab" / "notebook-extension", wsdir, profile): d.mkdir(parents=True)
    shutil.copy(NOTEBOOK, work / NOTEBOOK.name)
    (cfg / "labconfig" / "page_config.json").write_text(json.dumps({"buildCheck": False, "buildAvailable": False}))
    (settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    (settings / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings").write_text(
        json.dumps({"windowingMode": "none"}))  # render every cell, not only those in view
    token, port, dport = base64.b32encode(os.urandom(15)).decode().lower(), _free_port(), _free_port()
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(cfg), "JUPYTER_DATA_DIR": str(data),  # nothing written to ~/.jupyter, ~/.local
           "JUPYTER_RUNTIME_DIR": str(data / "runtime"), "JUPYTERLAB_SETTINGS_DIR": str(settings),
           "JUPYTERLAB_WORKSPACES_DIR": str(wsdir), "MPLBACKEND": "module://matplotlib_inline.backend_inline"}
    procs, page = [], None
    try:
        lab = subprocess.Popen([str(jupyter), "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
                                f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={work}", "--expose-app-in-browser",
                                *(["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else [])],
                               env=env, stdout=open(tmp / "lab.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(lab)
        _wait_http(f"http://127.0.0.1:{port}/api/status?token={token}", 90)
        url = f"http://127.0.0.1:{port}/lab/tree/{NOTEBOOK.name}?token={token}"
        chromium = subprocess.Popen([chrome, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                                     "--hide-scrollbars", f"--user-data-dir={profile}", f"--remote-debugging-port={dport}",
                                     "--remote-debugging-address=127.0.0.1", f"--window-size={a.width},{a.height}", url],
                                    stdout=open(tmp / "chromium.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(chromium)
        targets = json.loads(_wait_http(f"http://127.0.0.1:{dport}/json/list", 60))
        page = Page(next(t for t in targets if t["type"] == "page")["webSocketDebuggerUrl"])
        page.call("Emulation.setDeviceMetricsOverride", width=a.width, height=a.height, deviceScaleFactor=1, mobile=False)
        page.wait("!!(window.jupyterapp && window.jupyterapp.shell && document.querySelector('.jp-NotebookPanel .jp-Cell'))",
                  120, "JupyterLab to open the notebook")
        page.wait("(() => { const w = jupyterapp.shell.currentWidget;"
                  " return !!(w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel"
                  " && w.sessionContext.session.kernel.connectionStatus === 'connected'"
                  " && w.sessionContext.session.kernel.status === 'idle'); })()", 120, "the kernel to be idle")
        t0 = time.time()
        page.js("jupyterapp.shell.collapseLeft(); jupyterapp.shell.collapseRight();"
                " jupyterapp.commands.execute('notebook:run-all-cells')", await_promise=True)
        page.wait("(() => { const s = " + _STATE + "; return s && s.prompts.length > 0 &&"
                  " s.prompts.every(p => /\\[\\d+\\]/.test(p)) && s.sliders >= 8 && s.widget_imgs >= 2; })()",
                  a.timeout, "all cells to run and both widgets to render")
        time.sleep(1.5)  # let the last images decode and the layout settle
        before = page.js(_STATE)
        print(f"ran {before['cells']} code cells in {time.time() - t0:.1f} s; prompts {before['prompts']}")
        # live check: focus the cross-view explorer's "min views" slider handle and press → once
        handle = ("(() => { const ls = [...document.querySelectorAll('.widget-slider')].filter("
                  "s => (s.querySelector('.widget-label')||{}).textContent === 'min views');"
                  " const h = ls.length && ls[0].querySelector('.noUi-handle'); if (!h) return false; h.focus(); return true; })()")
        live = None
        if page.js(handle):
            old = before["status"]
            page.key("ArrowRight", "ArrowRight", 39)
            try:
                page.wait("(() => { const s = " + _STATE + "; return JSON.stringify(s.status) !== " + json.dumps(json.dumps(old)) + "; })()",
                          60, "the status line to change after a slider key press")
                time.sleep(1.5)
                live = True
            except TimeoutError: live = False
        after = page.js(_STATE)
        page.js("(() => { const nb = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-WindowedPanel-outer, "
                ".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook'); if (nb) nb.scrollTop = 0; })()")
        time.sleep(0.5)
        shot = page.call("Page.captureScreenshot", format="png")
        out = Path(a.out); out.parent.mkdir(parents=True, exist_ok=True)
        png = base64.b64decode(shot["data"])
        if a.colors:  # a 256-colour palette keeps the committed file small; the figures are flat colour maps anyway
            import io
            from PIL import Image
            buf = io.BytesIO(); Image.open(io.BytesIO(png)).convert("RGB").quantize(a.colors).save(buf, "PNG", optimize=True)
            png = buf.getvalue()
        out.write_bytes(png)
        print(f"slider views {after['sliders']}, dropdowns {after['dropdowns']}, images inside widget outputs "
              f"{after['widget_imgs']}, images in all outputs {after['all_imgs']}, stderr outputs {after['errors']}")
        print("status lines before:", before["status"])
        print("status lines after :", after["status"])
        print({True: "live widget: the key press on 'min views' re-ran the check in the kernel and changed the status line",
               False: "live widget check FAILED: the status line did not change after the key press",
               None: "live widget check not done: 'min views' slider handle not found"}[live])
        print(f"wrote {out} ({out.stat().st_size // 1024} KiB, {a.width}x{a.height})")
        return 0 if live else 1
    except Exception:
        if page is not None:
            try:
                print("page state:", page.js(_STATE))
                dbg = Path(a.out).with_suffix(".debug.png")
                dbg.write_bytes(base64.b64decode(page.call("Page.captureScreenshot", format="png")["data"]))
                print(f"page at the failure: {dbg}")
            except Exception as e: print(f"(no page state: {e})")
        for log in ("lab.log", "chromium.log"):
            if (tmp / log).exists(): print(f"--- last lines of {log}:\n" + "\n".join((tmp / log).read_text().splitlines()[-25:]))
        raise
    finally:
        for p in reversed(procs):  # only the processes this script started, by their own process group
            try: os.killpg(p.pid, signal.SIGTERM); p.wait(timeout=20)
            except Exception:
                try: os.killpg(p.pid, signal.SIGKILL)
                except Exception: pass
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

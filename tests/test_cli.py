"""The command line: info, calibration of saved logits (safe loading), demo; one-line errors (exit 2) for every
user error, a quiet exit on a closed stdout, strict JSON."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from vlmfast.cli import main
from vlmfast.metrics import calibration

HAS_CUDA = torch.cuda.is_available()


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("VLMFAST_BACKEND", "TRITON_INTERPRET")}
    env.update(extra)
    return env


def _vlmfast(*args, env=None, timeout=120):
    """The real entry point (python -m vlmfast), as a user runs it."""
    return subprocess.run([sys.executable, "-m", "vlmfast", *args], capture_output=True, text=True,
                          env=env or _env(), timeout=timeout)


def _assert_one_line_error(rc, err, prog="vlmfast calibration"):
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    return lines[0]


def _save_npz(path, **arrays):
    np.savez(path, **{k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in arrays.items()})
    return str(path)


@pytest.fixture
def good(tmp_path):
    g = torch.Generator().manual_seed(1)
    logits, labels = torch.randn(2, 60, 4, generator=g), torch.randint(0, 4, (60,), generator=g)
    return _save_npz(tmp_path / "good.npz", logits=logits, labels=labels), logits, labels


def test_info_lists_every_backend_with_reasons(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for name in ("triton", "cuda", "cpp", "torch"):
        assert f"  {name:<7} " in out
    assert "calibration_bins on cpu tensors ->" in out
    assert main(["info", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["backends"]["torch"]["available"] is True


def test_python_dash_m_info():
    out = subprocess.run([sys.executable, "-m", "vlmfast.info"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "backends (default order):" in out.stdout


@pytest.mark.parametrize("fmt", ["pt", "safetensors", "npz"])
def test_calibration_of_saved_logits(tmp_path, capsys, fmt):
    logits = torch.randn(3, 200, 5)
    labels = torch.randint(0, 5, (200,))
    path = tmp_path / f"run.{fmt}"
    if fmt == "pt":
        torch.save({"logits": logits, "labels": labels}, path)
    elif fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({"logits": logits, "labels": labels}, str(path))
    else:
        np.savez(path, logits=logits.numpy(), labels=labels.numpy())
    rc = main(["calibration", str(path), "--n-bins", "10", "--names", "a,b,c", "--json", str(tmp_path / "m.json"),
               "--plot", str(tmp_path / "m.png"), "--backend", "cpp"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| a |" in out and "| c |" in out
    d = json.loads((tmp_path / "m.json").read_text())
    want = calibration(logits, labels, 10, backend="cpp")
    assert np.allclose(d["ece"], want.ece.numpy()) and d["models"] == ["a", "b", "c"]
    assert (tmp_path / "m.png").stat().st_size > 10_000


def test_pickled_objects_are_refused(tmp_path, capsys):
    import fractions

    path = tmp_path / "evil.pt"
    torch.save({"logits": fractions.Fraction(1, 3)}, path)  # an arbitrary class: weights_only refuses it
    assert main(["calibration", str(path)]) == 2
    line = _assert_one_line_error(2, capsys.readouterr().err)
    assert "evil.pt" in line and ("refused" in line or "could not be read" in line)


def test_missing_labels_and_bad_values(tmp_path, capsys):
    path = tmp_path / "only.npy"
    np.save(path, np.random.randn(10, 3))
    assert main(["calibration", str(path)]) == 2
    assert "must hold 'logits' and 'labels'" in capsys.readouterr().err
    lab = tmp_path / "lab.npy"
    np.save(lab, np.full(10, 7))
    assert main(["calibration", str(path), "--labels", str(lab)]) == 2
    assert "labels: expected values in [0, 3)" in capsys.readouterr().err


def test_demo_runs_the_whole_fleet_job_offline(tmp_path, capsys, monkeypatch):
    """The main job's wiring on a shrunk plan (the demo's own methods, a few steps each) and 60-image splits: the
    runs, the three audits into the store, the report with the findings, and a re-run that recomputes nothing."""
    from tests._utils import fake_discovery
    from vlmfast.cli import demo as D
    from vlmfast.fleet import AuditStore

    fake_discovery(monkeypatch)  # a 3-step shortcut model may find nothing; RaVL needs a cluster to mitigate
    small = {"steps": 3, "batch_size": 16, "train_n": 60}
    plan = dict(D.DEMO_PLAN, defaults={"seed": [0, 1]}, runs=[
        {"method": "zs"},
        {"name": "ft", "method": "ft", "strength": 0.0, "seed": 0, **small},
        {"name": "flyp", "method": "flyp", "strength": [0.0, 0.95], **small},
        {"name": "carot", "method": "carot", "strength": 0.0, **small},
        {"name": "ravl", "method": "ravl", "discover_from": "flyp", "strength": 0.95, "discovery_n": 40,
         "discovery_ks": [4, 6], **small},
        {"name": "coop", "method": "coop", "dor": [False, True], "steps": 3, "shots": 1, "n_ctx": 2, "seed": 0,
         "train_n": 60}])
    monkeypatch.setattr(D, "DEMO_PLAN", plan)
    monkeypatch.setitem(D.DEMO_SETTINGS, "spurious", {"ks": [4, 6]})
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--n", "60"]) == 0
    text = capsys.readouterr().out
    n_runs = 1 + 1 + 4 + 2 + 2 + 2
    assert f"{n_runs} runs: {n_runs} done, 0 skipped, 0 failed" in text
    for claim in ("fine-tuning lowers PT and raises IR", "DOR lowers new-class ECE vs CoOp",
                  "CaRot lowers OOD ECE vs FLYP", "RaVL finds the planted feature and raises worst-group accuracy"):
        assert claim in text
    html = (out / "report" / "index.html").read_text(encoding="utf-8")
    assert 'id="findings"' in html and (out / "report" / "calibration.csv").is_file()
    demo = json.loads((out / "demo.json").read_text())
    assert [f["key"] for f in demo["findings"]] == ["rationality", "dor", "carot", "ravl"]
    assert all(f["verdict"] != "not measured" for f in demo["findings"]), demo["findings"]
    with AuditStore(out / "audit.sqlite") as st:
        units = {(a, r["split"]) for a in D.DEMO_AUDITS for r in st.results(a)}
        n_cal = len(st.results("calibration"))
    assert {("calibration", s) for s in D.DEMO_AUDITS["calibration"]} <= units
    assert ("rationality", "sklearn-digits") in units and ("spurious", "id") in units
    assert ("rationality", "noise-3") not in units  # rationality runs on its own splits only
    assert (out / "plan.yaml").read_text().count("method:") == len(plan["runs"])
    # a second run reuses every run and every result
    assert main(["demo", "--out", str(out), "--n", "60"]) == 0
    again = capsys.readouterr().out
    assert f"{n_runs} runs: 0 done, {n_runs} skipped" in again and "0 results computed" in again
    with AuditStore(out / "audit.sqlite") as st:
        assert len(st.results("calibration")) == n_cal


def test_progress_plain_and_rich():
    """Plain lines off a terminal (nothing else); with rich bars the same lines still reach the stream."""
    import io

    from vlmfast.cli._progress import Progress

    buf = io.StringIO()
    with Progress(stream=buf) as p:
        assert not p.bars
        bar = p.stage("runs", 2)
        bar.advance("a: done")
        bar.advance("b: done")
        p.line("summary")
    assert buf.getvalue() == "a: done\nb: done\nsummary\n"
    buf = io.StringIO()
    from vlmfast import _progress as lib

    with Progress(enabled=True, stream=buf) as p:
        assert p.bars
        bar = p.stage("runs", 2)
        bar.advance("a: done")
        inner = lib.bar(3, "encode_images", "batch")  # the library's batch bars become rich tasks
        assert len(p._rich.tasks) == 2
        inner.update(3)
        inner.close()
        assert len(p._rich.tasks) == 1
        bar.advance("b: done")
        bar.done()
    assert lib._FACTORY.get() is None  # tqdm again outside the block
    text = buf.getvalue()
    assert "a: done" in text and "b: done" in text and "runs" in text and "2/2" in text


# ---------------------------------------------------------------------------------------------------------
# Hardening (issue 8): one-line errors, exit 2; quiet broken pipes; strict JSON; keys; output folders
# ---------------------------------------------------------------------------------------------------------


def test_backend_refusals_are_one_line_exit_2(good, monkeypatch, capsys):
    """A forced backend that cannot run: one line (its own reason, a pointer to `vlmfast info`), exit 2; through
    the option, the environment variable and an input limit. The first case runs the real entry point."""
    path = good[0]
    if HAS_CUDA:  # the Triton kernel keeps its bins in registers: 2000 is over its limit on every machine
        out = _vlmfast("calibration", path, "--n-bins", "2000", "--backend", "triton")
        needle = "n_bins"
    else:
        out = _vlmfast("calibration", path, "--backend", "cuda")
        needle = "'cuda'"
    line = _assert_one_line_error(out.returncode, out.stderr)
    assert needle in line and "vlmfast info" in line and out.stdout == ""

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert main(["calibration", path, "--n-bins", "2000", "--backend", "triton"]) == 2
    assert "n_bins" in _assert_one_line_error(2, capsys.readouterr().err)
    if not HAS_CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        monkeypatch.setenv("VLMFAST_BACKEND", "triton")
        assert main(["calibration", path]) == 2
        line = _assert_one_line_error(2, capsys.readouterr().err)
        assert "'triton'" in line and "TRITON_INTERPRET" in line


def test_invalid_backend_names_are_one_line(good, monkeypatch, capsys):
    assert main(["calibration", good[0], "--backend", "bogus"]) == 2
    assert "backend: expected one of" in _assert_one_line_error(2, capsys.readouterr().err)
    monkeypatch.setenv("VLMFAST_BACKEND", "bogus")
    assert main(["calibration", good[0]]) == 2
    assert "VLMFAST_BACKEND" in _assert_one_line_error(2, capsys.readouterr().err)


def test_closed_stdout_exits_quietly(tmp_path):
    """`vlmfast calibration many.npz | head -1`: the reader stops after one line; no BrokenPipeError, status 0.
    The table (1,500 rows, ~150 kB) is larger than a pipe's buffer, so the writer does hit the closed pipe."""
    path = _save_npz(tmp_path / "many.npz", logits=np.random.randn(1500, 20, 3).astype(np.float32),
                     labels=np.random.randint(0, 3, 20))
    proc = subprocess.Popen([sys.executable, "-m", "vlmfast", "calibration", path,
                             "--json", str(tmp_path / "out" / "m.json")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    first = proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    rc = proc.wait(timeout=120)
    assert first.startswith(b"| model |")
    assert err == "" and rc == 0
    assert len(json.loads((tmp_path / "out" / "m.json").read_text())["ece"]) == 1500  # written before the table


def test_info_reports_the_forced_backend(monkeypatch, capsys):
    """`vlmfast info` agrees with the calls: an invalid VLMFAST_BACKEND is reported and exits 2; a forced backend
    that cannot run CPU tensors says so instead of naming the default."""
    monkeypatch.setenv("VLMFAST_BACKEND", "bogus")
    assert main(["info"]) == 2
    cap = capsys.readouterr()
    assert "forced backend: INVALID VLMFAST_BACKEND='bogus'" in cap.out
    assert "calibration_bins on cpu tensors -> CANNOT RUN" in cap.out
    assert "VLMFAST_BACKEND" in _assert_one_line_error(2, cap.err, "vlmfast info")
    assert main(["info", "--json"]) == 2
    d = json.loads(capsys.readouterr().out)
    assert d["forced_backend"]["error"] and d["ops"]["calibration_bins"]["cpu"]["backend"] is None

    monkeypatch.delenv("VLMFAST_BACKEND")
    assert main(["info", "--backend", "torch"]) == 0
    assert "calibration_bins on cpu tensors -> torch (forced)" in capsys.readouterr().out
    if not HAS_CUDA:
        monkeypatch.setenv("VLMFAST_BACKEND", "cuda")
        assert main(["info"]) == 0
        out = capsys.readouterr().out
        assert "forced backend: cuda (from VLMFAST_BACKEND)" in out
        assert "calibration_bins on cpu tensors -> CANNOT RUN: the forced backend 'cuda'" in out
        assert "calibration_bins on cpu tensors -> cpp" not in out
        with pytest.raises(vlmfast_BackendError()):
            calibration(torch.randn(1, 4, 3), torch.zeros(4, dtype=torch.long))  # the call agrees


def vlmfast_BackendError():
    from vlmfast import BackendError

    return BackendError


def _strict_loads(text):
    def refuse(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_json_is_strict_and_its_folder_is_created(good, capsys):
    """Empty bins are null, not NaN; --json creates a missing parent folder as --plot does."""
    path, logits, labels = good
    out = os.path.join(os.path.dirname(path), "new", "deeper", "m.json")
    assert main(["calibration", path, "--n-bins", "40", "--json", out, "--backend", "torch"]) == 0
    capsys.readouterr()
    d = _strict_loads(open(out).read())
    want = calibration(logits, labels, 40, backend="torch")
    empty = want.bin_count == 0
    assert bool(empty.any())  # 60 samples in 40 bins: some are empty
    acc = d["bin_accuracy"]
    for i in range(2):
        for b in range(40):
            if empty[i, b]:
                assert acc[i][b] is None
            else:
                assert acc[i][b] == pytest.approx(float(want.bin_accuracy[i, b]))
    assert d["ece"] == pytest.approx(want.ece.tolist())


def test_output_paths_that_cannot_be_written(good, tmp_path, capsys):
    path = good[0]
    assert main(["calibration", path, "--json", str(tmp_path)]) == 2  # a folder
    assert "--json" in _assert_one_line_error(2, capsys.readouterr().err)
    (tmp_path / "file").write_text("x")
    assert main(["calibration", path, "--json", str(tmp_path / "file" / "m.json")]) == 2  # parent is a file
    _assert_one_line_error(2, capsys.readouterr().err)
    assert main(["calibration", path, "--plot", ""]) == 2
    assert "--plot" in _assert_one_line_error(2, capsys.readouterr().err)


def test_keys_pick_tensors(tmp_path, capsys):
    """A file with several arrays: the error names the option; --logits-key/--labels-key pick them, in one file or
    with --labels in another."""
    x, y = torch.randn(3, 50, 4), torch.randint(0, 4, (50,))
    both = _save_npz(tmp_path / "xy.npz", x=x, y=y, z=torch.zeros(2))
    assert main(["calibration", both]) == 2
    assert "--logits-key/--labels-key" in _assert_one_line_error(2, capsys.readouterr().err)
    assert main(["calibration", both, "--labels", both]) == 2
    assert "choose one with --logits-key" in _assert_one_line_error(2, capsys.readouterr().err)
    js = tmp_path / "m.json"
    assert main(["calibration", both, "--logits-key", "x", "--labels-key", "y", "--json", str(js),
                 "--backend", "torch"]) == 0
    assert "| model 2 |" in capsys.readouterr().out
    assert json.loads(js.read_text())["ece"] == pytest.approx(calibration(x, y, backend="torch").ece.tolist())
    lab = _save_npz(tmp_path / "lab.npz", a=y, b=y + 100)
    assert main(["calibration", both, "--logits-key", "x", "--labels", lab]) == 2
    assert "choose one with --labels-key" in _assert_one_line_error(2, capsys.readouterr().err)
    assert main(["calibration", both, "--logits-key", "x", "--labels", lab, "--labels-key", "a"]) == 0
    capsys.readouterr()
    assert main(["calibration", both, "--logits-key", "nope", "--labels-key", "y"]) == 2
    line = _assert_one_line_error(2, capsys.readouterr().err)
    assert "'nope'" in line and "['x', 'y', 'z']" in line


def test_usage_errors_are_one_line(good, capsys):
    path = good[0]
    for argv, prog in [(["calibration", path, "--n-bins", "x"], "vlmfast calibration"),
                       (["calibration"], "vlmfast calibration"),
                       (["calibration", path, "--binning", "quantile"], "vlmfast calibration"),
                       (["nope"], "vlmfast"), ([], "vlmfast"),
                       (["calibration", path, "--names", "a"], "vlmfast calibration"),
                       (["calibration", path, "--n-bins", "0"], "vlmfast calibration"),
                       (["calibration", path + ".missing.npz"], "vlmfast calibration"),
                       (["calibration", path, "--labels", path, "--labels-key", "logits"], "vlmfast calibration"),
                       (["demo", "--n", "0"], "vlmfast demo")]:
        assert main(argv) == 2, argv
        _assert_one_line_error(2, capsys.readouterr().err, prog)
    assert main(["calibration", "--help"]) == 0
    assert "--labels-key" in capsys.readouterr().out

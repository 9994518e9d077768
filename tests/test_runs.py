"""Run directories under faults (issue 18, items 1, 5, 6): one owner at a time, a full disk, a bad --out."""
import errno
import os
import subprocess
import sys
import time

import pytest
import torch

import amma
import runs
import finetune as ft
from conftest import ROOT, write_features

SMALL = ["--D", "32", "--n-layers", "1", "--n-heads", "4", "--dec-layers", "1", "--M", "24", "--num-workers", "0",
         "--batch-size", "2", "--device", "cpu"]


def cli(script, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / script), *map(str, args)], env=env, cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_a_second_run_into_the_same_out_is_refused_while_the_first_runs(tmp_path):
    """Two runs started 2 s apart into one --out both 'finished'; now the second is refused at once."""
    root = write_features(tmp_path / "f", [12] * 40)
    out = tmp_path / "run"
    first = cli("amma.py", "--pretrain", "--features", root, *SMALL, "--epochs", "100000", "--out", out)   # still running when killed
    for _ in range(300):                                                      # until the first holds the lock
        if (out / ".lock").exists() and (out / ".lock").read_text():
            break
        time.sleep(0.1)
    second = cli("amma.py", "--pretrain", "--features", root, *SMALL, "--epochs", "1", "--out", out, "--overwrite")
    _, err = second.communicate(timeout=120)
    first.kill()
    first.wait()
    assert second.returncode != 0
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"error: {out} is in use by another run (pid {first.pid}") and "amma.py --pretrain" in line
    # killed with -9, the first left its lock text: the next run says so and takes over
    (out / "checkpoint.pt.4242.tmp").write_bytes(b"partial")
    third = cli("amma.py", "--pretrain", "--features", root, *SMALL, "--epochs", "1", "--out", tmp_path / "run", "--overwrite")
    _, err = third.communicate(timeout=300)
    assert third.returncode == 0, err
    assert "was left locked by a run that did not end cleanly" in err and "removed 1 temporary files" in err
    assert not list(out.glob("*.tmp")) and (out / ".lock").read_text() == ""


def test_finetune_run_directories_are_locked_too(tmp_path):
    out = tmp_path / "ft"
    with runs.RunLock(out):
        cfg = ft.FinetuneConfig(task="go-mf", from_scratch=True, features=str(tmp_path / "none"), out=str(out))
        with pytest.raises(SystemExit, match=r"is in use by another run \(pid \d+ on "):
            ft.finetune(cfg, quiet=True)


def test_disk_full_at_a_checkpoint_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    root = write_features(tmp_path / "f", [10] * 6)
    real_save = torch.save

    def full_disk(obj, path, *a, **k):
        if str(path).endswith(".tmp") and "checkpoint.pt" in str(path):
            with open(path, "wb") as f:
                f.write(b"half a checkpoint")
            raise RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing "
                               "file data/0: file write failed")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    mc = amma.AMMAConfig(d_seq=12, d_str=20, d_func=8, D=32, n_layers=1, n_heads=4, dec_layers=1, M=24)
    tc = amma.TrainConfig(features=str(root), out=str(tmp_path / "run"), batch_size=2, num_workers=0, epochs=1)
    with pytest.raises(SystemExit) as e:
        amma.pretrain(mc, tc, quiet=True)
    message = str(e.value)
    assert message.startswith(f"error: cannot write {tmp_path / 'run' / 'checkpoint.pt'}: ") and "GiB free there" in message
    assert "\n" not in message and not list((tmp_path / "run").glob("*.tmp"))
    def enospc(path, text):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(type(tmp_path), "write_text", enospc)
    with pytest.raises(SystemExit, match=r"cannot write .*results.json: No space left on device \(.* GiB free there\)"):
        runs.atomic_write_text(tmp_path / "results.json", "{}")
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("script", ["amma.py", "finetune.py"])
def test_an_out_that_cannot_be_a_folder_is_one_line(tmp_path, script):
    root = write_features(tmp_path / "f", [10] * 6)
    (tmp_path / "file").write_text("not a folder")
    args = ["--pretrain", "--features", root, *SMALL] if script == "amma.py" else \
        ["--task", "go-mf", "--from-scratch", "--features", root, "--device", "cpu"]
    for out, why in ((tmp_path / "file", "is a file, not a folder"), (tmp_path / "file" / "run", "which is a file")):
        run = cli(script, *args, "--out", out)
        _, err = run.communicate(timeout=120)
        assert run.returncode != 0 and "Traceback" not in err, err
        assert err.strip().splitlines()[-1].startswith(f"error: --out {out}: ") and why in err, err


def test_a_read_only_out_is_one_line(tmp_path, monkeypatch):
    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(SystemExit, match=r"^error: --out .*ro: cannot be written \(Read-only file system\)$"):
        with runs.RunLock(tmp_path / "ro"):
            pass


@pytest.mark.parametrize("torchrun", [False, True])
def test_run_as_script_exit_statuses(torchrun):
    """A script's exit status through runs.run_as_script, as a plain process and as a torchrun rank (which
    ends with os._exit after flushing): an int result is the status, anything else 0, SystemExit's message
    reaches stderr with status 1, and stdout written before the end is not lost."""
    env = {k: v for k, v in os.environ.items() if k != "RANK"}
    if torchrun:
        env["RANK"] = "0"
    cases = {"3": (3, ""), "[0.5, 0.4]": (0, ""), "None": (0, ""), "True": (0, ""),
             "(_ for _ in ()).throw(SystemExit('error: bad input'))": (1, "error: bad input"),
             "(_ for _ in ()).throw(SystemExit(4))": (4, "")}
    for body, (status, err) in cases.items():
        code = f"import runs; print('out', end=''); runs.run_as_script(lambda: {body})"
        run = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True)
        assert (run.returncode, run.stdout, run.stderr.strip()) == (status, "out", err), body

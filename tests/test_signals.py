"""kto-precompute on a scheduler's signal: exit 128 + the signal's number, no spill file,
no half-written shard, and a rerun that finishes the same cache."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import build_cache, read_cache
from test_precompute import synthetic

from shared.errors import Interrupted
from shared.signals import SignalGuard

TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def data(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("signals")
    path = synthetic(root, n=60)
    build_cache(tiny_dir, [path], root / "clean", shard_size=4)
    return {"data": path, "clean": root / "clean"}


def precompute_args(tiny_dir, data, out):
    return ["--model", str(tiny_dir), "--data", str(data["data"]), "--output", str(out),
            "--backend", "hf", "--shard-size", "4"]


def leftovers(out: Path, tmpdir: Path) -> list[str]:
    return [p.name for p in out.glob(".*tmp*")] + [p.name for p in tmpdir.iterdir()]


@pytest.mark.parametrize("point,n,signame", [
    ("precompute-shard", 2, "SIGTERM"),  # while shard 3 sits under its temporary name
    ("precompute-prepare", 0, "SIGINT"),  # while rows are spilled to $TMPDIR
])
def test_signal_removes_temporary_files_and_rerun_finishes(tiny_dir, data, tmp_path, point, n,
                                                           signame):
    out, tmpdir = tmp_path / "out", tmp_path / "tmp"
    tmpdir.mkdir()
    proc = subprocess.run([sys.executable, str(TESTS / "signal_driver.py"), point, str(n),
                           signame, *precompute_args(tiny_dir, data, out)],
                          capture_output=True, text=True, cwd=TESTS.parent, timeout=600,
                          env={**os.environ, "TMPDIR": str(tmpdir)})
    assert proc.returncode == 128 + getattr(signal, signame), proc.stderr[-2000:]
    assert f"Error: stopped by {signame}" in proc.stderr and "Traceback" not in proc.stderr
    assert leftovers(out, tmpdir) == [] and not (out / "manifest.json").exists()
    build_cache(tiny_dir, [data["data"]], out, shard_size=4)
    assert read_cache(out)[0] == read_cache(data["clean"])[0]  # the same shards, byte for byte


def test_external_sigterm_while_scoring(tiny_dir, data, tmp_path):
    """A real signal from another process once the first shards are written."""
    out, tmpdir = tmp_path / "out", tmp_path / "tmp"
    tmpdir.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "precompute.cli",
                             *precompute_args(tiny_dir, data, out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=TESTS.parent,
                            env={**os.environ, "TMPDIR": str(tmpdir)})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if len(list(out.glob("shard-*.parquet"))) >= 2:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, stderr[-2000:]
    assert leftovers(out, tmpdir) == []
    done = len(list(out.glob("shard-*.parquet")))
    assert 2 <= done < 15
    summary = build_cache(tiny_dir, [data["data"]], out, shard_size=4)
    assert summary["rows_scored_now"] == 60 - 4 * done
    assert read_cache(out)[0] == read_cache(data["clean"])[0]


def test_guard_defers_the_first_signal_and_raises_on_the_second():
    with SignalGuard() as guard:
        with guard.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            assert guard.pending == signal.SIGTERM
            with pytest.raises(Interrupted) as err:
                os.kill(os.getpid(), signal.SIGTERM)
        assert err.value.exit_code == 143
        with pytest.raises(Interrupted):
            os.kill(os.getpid(), signal.SIGUSR1)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored

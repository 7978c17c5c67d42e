"""Writers under a full disk, a second writer and killed predecessors (issue 15): one error line
naming the file, exit 1, no temporary left, the previous file intact; stale temporaries of dead
writers removed; damaged netx files refused by name."""

import errno
import os
import shutil
import socket
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

import tmkt.fileio
from tmkt.checkpoint import load_run, save_run
from tmkt.cli import app
from tmkt.errors import TmktError
from tmkt.export.graph import lower_run
from tmkt.export.netx import export_netx, read_netx
from tmkt.export.nir import export_nir
from tmkt.export.onnx import export_onnx
from tmkt.export.onnx_int8 import export_onnx_int8
from tmkt.fileio import LockedError, WriteError, atomic_path, exclusive_lock, remove_stale_temps
from tmkt.models import ModelConfig, build_model, randomize_batchnorm

TMKT = [sys.executable, "-m", "tmkt"]
HOST = f"{zlib.crc32(socket.gethostname().encode()) & 0xFFFF:04x}"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="small", num_classes=3, input_size=(16, 16), width=0.5))
    randomize_batchnorm(model, 0)
    data = {"name": "digits", "class_names": ["a", "b", "c"], "sensor_size": [16, 16, 2], "input_size": [16, 16],
            "timesteps": 3, "binning": {"by": "time", "binary": True, "shift_to_origin": False, "resize": "events"}}
    return save_run(tmp_path_factory.mktemp("write") / "run", model, {"data": data, "method": {"name": "dvs"}})


@pytest.fixture(scope="module")
def graph(run_dir):
    return lower_run(load_run(run_dir))


@pytest.fixture
def full_disk(monkeypatch):
    """Every write through tmkt.fileio fails with ENOSPC after its first 100 bytes landed."""
    real = tmkt.fileio.write_all

    def full(fd, data):
        real(fd, bytes(data)[:100])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(tmkt.fileio, "write_all", full)


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def assert_one_error(res, *words: str) -> str:
    assert res.exit_code == 1, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    lines = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


# ---------------------------------------------------------------- tmkt.fileio


def test_a_failed_write_names_the_target_keeps_the_old_file_and_leaves_no_temporary(tmp_path, full_disk):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(WriteError, match=f"^{target}: cannot write \\(No space left on device\\)$") as e:
        tmkt.fileio.atomic_write_bytes(target, b"new" * 1000)
    assert e.value.errno == errno.ENOSPC and isinstance(e.value, (OSError, TmktError))
    assert target.read_bytes() == b"old" and leftovers(tmp_path) == []


def test_a_writer_that_fills_the_disk_itself_gets_the_named_error(tmp_path):
    """As the frame caches do: np.save into the temporary, the disk fills mid-write."""
    target = tmp_path / "frames.npy"
    with pytest.raises(WriteError, match=f"{target}: cannot write"):
        with atomic_path(target, suffix=".npy") as tmp, open(tmp, "wb") as fh:
            np.save(fh, np.zeros(10))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert not target.exists() and leftovers(tmp_path) == []
    # an error about another file the block read keeps its own name and type
    with pytest.raises(FileNotFoundError):
        with atomic_path(target) as tmp:
            open(tmp_path / "nowhere.txt")


def test_stale_temporaries_of_dead_writers_go_live_ones_stay(tmp_path):
    target = tmp_path / "model.onnx"
    dead, live = dead_pid(), os.getpid()
    names = {
        "dead": f".model.onnx.tmp-{HOST}-{dead}.abc123.onnx",
        "live": f".model.onnx.tmp-{HOST}-{live}.def456.onnx",
        "other host": f".model.onnx.tmp-{'0000' if HOST != '0000' else '0001'}-{dead}.ghi789.onnx",
        "other file": f".other.onnx.tmp-{HOST}-{dead}.jkl012.onnx",
        "old style": ".model.onnx.mno345.onnx",
    }
    for name in names.values():
        (tmp_path / name).write_bytes(b"x" * 1000)
    tmkt.fileio.atomic_write_bytes(target, b"new")  # the next writer of the same target cleans up
    assert not (tmp_path / names["dead"]).exists()
    assert all((tmp_path / names[k]).exists() for k in ("live", "other host", "other file", "old style"))
    assert remove_stale_temps(target) == []


def test_a_killed_exporters_temporary_is_removed_by_the_next_export(tmp_path, graph):
    """A real kill -9 in the middle of an atomic write, then a normal export of the same file."""
    target = tmp_path / "m.onnx"
    script = (
        "import os, signal, sys\n"
        "from tmkt.fileio import atomic_path\n"
        f"with atomic_path({str(target)!r}, suffix='.onnx') as tmp:\n"
        "    tmp.write_bytes(b'x' * 1_000_000)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script])
    assert proc.returncode == -9
    assert len(leftovers(tmp_path)) == 1 and not target.exists()
    export_onnx(graph, target, verify=False)
    assert leftovers(tmp_path) == [] and onnx.load(str(target)).graph.node


# ---------------------------------------------------------------- exporters under a full disk


@pytest.mark.parametrize("target", ["onnx", "nir"])
def test_cli_export_onto_a_full_disk_is_one_line(run_dir, tmp_path, full_disk, target):
    out = tmp_path / f"m.{target}"
    res = CliRunner().invoke(app, ["export", str(run_dir), "--target", target, "--out", str(out)])
    assert_one_error(res, str(out), "No space left on device")
    assert not out.exists() and leftovers(tmp_path) == []


def test_lava_export_onto_a_full_disk_is_one_error(graph, tmp_path, full_disk):
    out = tmp_path / "m.net"
    with pytest.raises(WriteError, match=f"{out}: cannot write"):
        export_netx(graph, out, verify=True)
    assert not out.exists() and leftovers(tmp_path) == []


def test_profile_json_onto_a_full_disk_is_one_line(run_dir, tmp_path, full_disk):
    frames = tmp_path / "frames.npy"
    np.save(frames, (np.random.default_rng(0).random((2, 3, 2, 16, 16)) < 0.2).astype(np.float32))
    out = tmp_path / "p.json"
    res = CliRunner().invoke(app, ["profile", str(run_dir), "--frames", str(frames), "--json", str(out)])
    assert_one_error(res, str(out), "No space left on device")
    assert not out.exists() and leftovers(tmp_path) == []


def _unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _unshare_works(), reason="needs `unshare -rm` (user and mount namespaces) for a real tmpfs")
def test_every_export_onto_a_really_full_tmpfs(run_dir, tmp_path):
    """A 16 KiB tmpfs: h5py (lava, NIR) and ONNX hit a real ENOSPC; the process survives (no
    exit 139), says one line and leaves nothing. lava without --no-verify would rebuild the
    run's data; its write path is the same with or without the check."""
    mount = tmp_path / "full"
    mount.mkdir()
    lines = [f"mount -t tmpfs -o size=16k tmpfs {mount} || exit 90"]
    for target in ("onnx", "lava", "nir"):
        extra = "--no-verify" if target == "lava" else ""
        lines.append(f"OMP_NUM_THREADS=1 {' '.join(TMKT)} export {run_dir} --target {target} {extra} "
                     f"--out {mount}/m.{target} 2>{tmp_path}/{target}.err; echo $? > {tmp_path}/{target}.rc")
    lines.append(f"ls -A {mount} > {tmp_path}/files.txt")
    subprocess.run(["unshare", "-rm", "sh", "-c", "\n".join(lines)], check=True, timeout=600)
    for target in ("onnx", "lava", "nir"):
        err = (tmp_path / f"{target}.err").read_text()
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert (tmp_path / f"{target}.rc").read_text().strip() == "1", (target, err)
        assert len(errors) == 1 and f"{mount}/m.{target}: cannot write (No space left on device)" in errors[0], err
        assert "Traceback" not in err and "HDF5-DIAG" not in err, err
    assert (tmp_path / "files.txt").read_text().split() == []


# ---------------------------------------------------------------- one writer per output file


def test_a_second_writer_of_an_export_is_refused_with_the_holders_pid(graph, tmp_path):
    out = tmp_path / "m.onnx"
    with exclusive_lock(tmp_path / ".m.onnx.lock", str(out)):
        for export in (lambda: export_onnx(graph, out, verify=False), lambda: export_nir(graph, out, verify=False),
                       lambda: export_netx(graph, out, verify=False), lambda: export_onnx_int8(graph, out, verify=False)):
            with pytest.raises(LockedError, match=f"{out} is being written by another tmkt process \\(pid {os.getpid()}\\)"):
                export()
    assert not out.exists()
    export_onnx(graph, out, verify=False)  # released: the lock file is gone and the next export runs
    assert leftovers(tmp_path) == []


def test_two_exports_to_one_path_at_once(run_dir, tmp_path):
    """Real processes, twice: each export either writes a verified file or is refused in one line;
    the file that stays is a complete, verified model."""
    out = tmp_path / "m.onnx"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for _ in range(2):
        procs = [subprocess.Popen([*TMKT, "export", str(run_dir), "--out", str(out)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, env=env, text=True) for _ in range(2)]
        results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
        assert any(rc == 0 for rc, _, _ in results), results
        for rc, stdout, stderr in results:
            assert "Traceback" not in stderr, stderr
            if rc:
                errors = [line for line in stderr.splitlines() if line.startswith("error:")]
                assert rc == 1 and len(errors) == 1 and "is being written by another tmkt process" in errors[0]
            else:
                assert "verified" in stdout.lower() or "onnxruntime" in stdout, stdout
        onnx.checker.check_model(str(out), full_check=True)
        assert leftovers(tmp_path) == []


# ---------------------------------------------------------------- damaged netx files


def test_bit_flipped_netx_files_are_refused_by_name_or_read_as_written(graph, tmp_path):
    path = export_netx(graph, tmp_path / "m.net", verify=True).path
    reference = read_netx(path)
    data = path.read_bytes()
    rng = np.random.default_rng(0)
    refused = []
    identical = 0
    for i in range(60):
        b = bytearray(data)
        for j in rng.choice(len(b), size=int(rng.choice([1, 3, 20])), replace=False):
            b[j] ^= 1 << int(rng.integers(8))
        bad = tmp_path / f"bad{i}.net"
        bad.write_bytes(bytes(b))
        try:
            net = read_netx(bad)
        except TmktError as e:
            assert str(e).startswith(str(bad)), e
            refused.append(bad)
            continue
        # what still loads is the network that was written (a flip in unused bytes of the file)
        assert net.meta == reference.meta and all(
            np.array_equal(a.weight, b.weight) and np.array_equal(a.bias, b.bias) and a.neuron == b.neuron
            for a, b in zip(net.layers, reference.layers)
        )
        identical += 1
    assert len(refused) > 30, (len(refused), identical)
    assert_one_error(CliRunner().invoke(app, ["eval", str(refused[0])]), str(refused[0]))

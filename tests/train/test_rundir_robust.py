"""Run directories under damage, kills, full disks and a second writer (issue 15): each case is
one error line naming the file and the field (exit 1), or a correct result; nothing is filled in."""

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load as load_bytes
from safetensors.torch import save_file
from typer.testing import CliRunner

from tmkt.checkpoint import CheckpointError, load_run, save_weights, tensor_digest
from tmkt.cli import app
from tmkt.fileio import exclusive_lock

TMKT = [sys.executable, "-m", "tmkt"]


def copy_run(tiny_run, tmp_path: Path, name: str = "run") -> Path:
    dst = tmp_path / name
    shutil.copytree(tiny_run[0], dst)
    return dst


def edit_config(run: Path, edit) -> None:
    cfg = json.loads((run / "config.json").read_text())
    edit(cfg)
    (run / "config.json").write_text(json.dumps(cfg))


def edit_resume(run: Path, tensors=None, state=None, fix_digest: bool = True) -> None:
    """Rewrite resume.safetensors with changed tensors and/or JSON state; `fix_digest` keeps the
    file's digest and name list consistent with the change (a careful forger), else the old ones stay."""
    path = run / "resume.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    old = load_file(str(path))
    tensors = old if tensors is None else tensors(dict(old))
    doc = json.loads(meta["state"])
    if state is not None:
        state(doc)
    if fix_digest:
        doc["tensor_names"] = sorted(tensors)
        meta["tmkt_sha256"] = tensor_digest(tensors)
    text = json.dumps(doc)
    if fix_digest:
        meta["state_sha256"] = hashlib.sha256(text.encode()).hexdigest()
    save_file(tensors, str(path), metadata={**meta, "state": text})


def load_file(path) -> dict:
    """The tensors of a safetensors file, copied (safetensors' own load_file maps the file, and
    these tests rewrite files in place)."""
    return load_bytes(Path(path).read_bytes())


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_one_error(res, *words: str) -> str:
    """Exit 1 through the CLI's own error path (no exception escaped), exactly one `error:` line,
    holding every word."""
    assert res.exit_code == 1, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    lines = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, res.output
    assert "Traceback" not in res.output
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def same_tensors(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


# ---------------------------------------------------------------- config.json fields


@pytest.mark.parametrize(
    "edit, field, command",
    [
        (lambda c: c["data"].update(timesteps=10**9), "data.timesteps", "eval"),
        (lambda c: c["data"].update(timesteps=10**9), "data.timesteps", "export"),
        (lambda c: c["data"].update(timesteps=10**9), "data.timesteps", "profile"),
        (lambda c: c["data"].update(timesteps=2000), "data.timesteps", "eval"),
        (lambda c: c["data"].update(timesteps=1000, input_size=[128, 128]), "data.timesteps", "eval"),  # 128 MiB a sample
        (lambda c: c["data"].update(binning="x"), "data.binning", "profile"),
        (lambda c: c["data"]["binning"].update(by="x"), "data.binning.by", "profile"),
        (lambda c: c.update(metrics="n/a"), "metrics", "eval"),
        (lambda c: c["data"].update(input_size="abc"), "data.input_size", "export"),
        (lambda c: c["model"].update(input_size="abc"), "model.input_size", "export"),
        (lambda c: c["model"].update(width=1e9), "model.width", "eval"),
        (lambda c: c["model"].update(num_classes=10**9), "model.num_classes", "eval"),
        (lambda c: c["model"]["neuron"].update(tau="x"), "model.neuron.tau", "eval"),
        (lambda c: c["files"]["model.safetensors"].update(sha256="zz"), "files.model.safetensors.sha256", "eval"),
        (lambda c: c.update(versions=[]), "versions", "export"),
    ],
)
def test_config_field_is_named_in_one_line(tiny_run, tmp_path, edit, field, command):
    run = copy_run(tiny_run, tmp_path)
    edit_config(run, edit)
    args = {"eval": ["eval", run, "--cache-dir", tiny_run[1]], "export": ["export", run, "--no-verify"],
            "profile": ["profile", run, "--samples", "2"]}[command]
    assert_one_error(invoke(*args), str(run / "config.json"), f"'{field}'")
    with pytest.raises(CheckpointError, match=f"'{field}'"):
        load_run(run)


# ---------------------------------------------------------------- weights files


def test_weights_of_the_wrong_dtype_nan_inf_or_flipped_bytes_are_refused(tiny_run, tmp_path):
    for name, change, words in [
        ("int64", lambda s: s.update({"event_head.weight": s["event_head.weight"].to(torch.int64)}), ["torch.int64"]),
        ("nan", lambda s: s["event_head.weight"].view(-1).__setitem__(0, float("nan")), ["NaN"]),
        ("inf", lambda s: s["trunk.0.weight"].view(-1).__setitem__(3, float("inf")), ["NaN or infinite"]),
    ]:
        run = copy_run(tiny_run, tmp_path, name)
        state = load_file(str(run / "model.safetensors"))
        change(state)
        save_file(state, str(run / "model.safetensors"))
        assert_one_error(invoke("eval", run, "--cache-dir", tiny_run[1]), str(run / "model.safetensors"), *words)
    run = copy_run(tiny_run, tmp_path, "flipped")
    data = bytearray((run / "model.safetensors").read_bytes())
    rng = torch.Generator().manual_seed(0)
    header = 8 + int.from_bytes(data[:8], "little")
    for i in (torch.randperm(len(data) - header, generator=rng)[:50] + header).tolist():  # 50 bytes of tensor data
        data[i] ^= 0x5A
    (run / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors: .*(sha256|NaN)"):
        load_run(run)


def test_a_single_flipped_bit_is_caught_by_the_recorded_sha256(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path)
    data = bytearray((run / "model.safetensors").read_bytes())
    data[-7] ^= 0x01  # the last bits of the last tensor: still a finite float32
    (run / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="differs from .* recorded in config.json"):
        load_run(run)
    edit_config(run, lambda c: c.pop("files"))  # no record: the digest inside the file still catches it
    with pytest.raises(CheckpointError, match="digest stored in the file"):
        load_run(run)


def test_runs_written_before_checksums_still_load_with_the_other_checks(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path)
    reference = load_run(run).model.state_dict()
    edit_config(run, lambda c: c.pop("files"))
    state = load_file(str(run / "model.safetensors"))
    save_file(state, str(run / "model.safetensors"), metadata={"format": "tmkt-run/1"})  # no digest either
    loaded = load_run(run).model.state_dict()
    assert same_tensors(loaded, reference)
    state["trunk.0.weight"].view(-1)[0] = float("nan")
    save_file(state, str(run / "model.safetensors"), metadata={"format": "tmkt-run/1"})
    with pytest.raises(CheckpointError, match="'trunk.0.weight' holds NaN"):
        load_run(run)
    state.pop("trunk.0.weight")
    save_file(state, str(run / "model.safetensors"), metadata={"format": "tmkt-run/1"})
    with pytest.raises(CheckpointError, match=r"missing \['trunk.0.weight'\]"):
        load_run(run)


# ---------------------------------------------------------------- resume


def test_resume_state_fields_are_named(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path)
    edit_resume(run, state=lambda s: s.update(epoch="x"))
    assert_one_error(invoke("train", "--resume", run), str(run / "resume.safetensors"), "'state.epoch'")
    run = copy_run(tiny_run, tmp_path, "b")
    edit_resume(run, state=lambda s: s.update(global_step=s["global_step"] + 1))
    assert_one_error(invoke("train", "--resume", run), "'state.global_step'")
    run = copy_run(tiny_run, tmp_path, "c")
    edit_resume(run, state=lambda s: s["best"].update(epoch=7))
    assert_one_error(invoke("train", "--resume", run), "'state.best'")


def test_an_edited_resume_state_is_refused_by_its_digest(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path)
    edit_resume(run, state=lambda s: s["optimizer"]["param_groups"][0].update(betas=[0.5, 0.5]), fix_digest=False)
    assert_one_error(invoke("train", "--resume", run), str(run / "resume.safetensors"), "state_sha256")


def test_truncated_resume_file_is_refused(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path)
    size = (run / "resume.safetensors").stat().st_size
    os.truncate(run / "resume.safetensors", size // 2)
    assert_one_error(invoke("train", "--resume", run), str(run / "resume.safetensors"), "truncated")


def test_a_tensor_missing_from_the_resume_state_is_refused_never_filled_in(tiny_run, tmp_path):
    first_optim = lambda t: next(k for k in sorted(t) if k.startswith("optim.") and k.endswith("exp_avg"))  # noqa: E731
    cases = [
        (lambda t: {k: v for k, v in t.items() if k != first_optim(t)}, False, "digest stored in the file"),
        (lambda t: {k: v for k, v in t.items() if k != first_optim(t)}, True, "optimizer state of parameter"),
        (lambda t: {k: v for k, v in t.items() if k != "model.event_head.bias"}, True, "missing ['model.event_head.bias']"),
        (lambda t: {k: v for k, v in t.items() if not k.startswith("best.")}, True, "best weights (epoch"),
        (lambda t: {k: v for k, v in t.items() if k != "rng.numpy"}, True, "'rng.numpy'"),
        (lambda t: {**t, "method.eta": t["method.eta"].double()}, True, "'method.eta'"),
    ]
    for i, (change, fix, words) in enumerate(cases):
        run = copy_run(tiny_run, tmp_path, f"case{i}")
        edit_resume(run, tensors=change, fix_digest=fix)
        assert_one_error(invoke("train", "--resume", run), "resume.safetensors", words)


def test_deleted_best_weights_come_back_from_the_resume_state_not_the_last(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path)
    # make the stored best weights differ from the last ones, as after a run whose best epoch is not its last
    edit_resume(run, tensors=lambda t: {**t, **{k: v * 0.5 if v.is_floating_point() else v
                                               for k, v in t.items() if k.startswith("best.")}})
    best = {k[5:]: v for k, v in load_file(str(run / "resume.safetensors")).items() if k.startswith("best.")}
    last = load_file(str(run / "last.safetensors"))
    assert not same_tensors(best, last)
    (run / "model.safetensors").unlink()
    res = invoke("train", "--resume", run)
    assert res.exit_code == 0, res.output
    assert same_tensors(load_file(str(run / "model.safetensors")), best)
    assert same_tensors(load_file(str(run / "last.safetensors")), last)
    loaded = {k: v for k, v in load_run(run).model.state_dict().items() if k in best}
    assert same_tensors(loaded, best)


def test_truncated_best_weights_are_restored_on_resume_with_a_note(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path)
    reference = load_file(str(run / "model.safetensors"))
    accuracy = json.loads((run / "config.json").read_text())["metrics"]["test_accuracy"]
    os.truncate(run / "model.safetensors", 5000)
    res = invoke("train", "--resume", run, "--cache-dir", tiny_run[1])
    assert res.exit_code == 0, res.output
    assert "restored the best weights" in res.output
    assert same_tensors(load_file(str(run / "model.safetensors")), reference)
    assert json.loads((run / "config.json").read_text())["metrics"]["test_accuracy"] == accuracy
    load_run(run)


def test_legacy_resume_state_without_best_weights_refuses_when_they_are_gone(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path)

    def legacy(doc):
        doc.pop("tensor_names")

    edit_resume(run, tensors=lambda t: {k: v for k, v in t.items() if not k.startswith("best.")}, state=legacy,
                fix_digest=False)
    # written like a file from before the digest: no digest, no name list
    path = run / "resume.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k not in ("tmkt_sha256", "state_sha256")}
    save_file(load_file(str(path)), str(path), metadata=meta)
    (run / "model.safetensors").unlink()
    assert_one_error(invoke("train", "--resume", run), str(run / "model.safetensors"), "cannot resume")


def test_a_kill_between_the_weights_and_config_json_is_refused_on_load_and_repaired_by_resume(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path)
    last = load_file(str(run / "last.safetensors"))
    save_weights(run / "model.safetensors", {k: v * 0.5 if v.is_floating_point() else v for k, v in last.items()})
    assert_one_error(invoke("eval", run, "--cache-dir", tiny_run[1]), "recorded in config.json", "--resume")
    res = invoke("train", "--resume", run, "--cache-dir", tiny_run[1])
    assert res.exit_code == 0, res.output
    load_run(run)
    load_run(run, weights_name="last.safetensors")


def test_config_json_of_another_run_is_refused_on_resume(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path)
    edit_config(run, lambda c: (c["model"].update(width=2.0), c.pop("files")))
    assert_one_error(invoke("train", "--resume", run), "describe different runs", "model.width")


# ---------------------------------------------------------------- one writer per run directory


def test_a_second_writer_of_a_run_dir_is_refused_with_the_holders_pid(tiny_run, tiny_run_flags, tmp_path):
    run = copy_run(tiny_run, tmp_path)
    before = sorted(p.name for p in run.iterdir())
    with exclusive_lock(run / ".tmkt.lock", "test"):
        line = assert_one_error(invoke("train", "--resume", run), str(run), f"pid {os.getpid()}")
        assert "being written" in line
        res = invoke("train", *tiny_run_flags, "--cache-dir", tiny_run[1], "--out", run, "--overwrite")
        assert_one_error(res, f"pid {os.getpid()}")
    assert sorted(p.name for p in run.iterdir()) == before  # nothing written, the lock file is gone


def test_two_trainings_into_one_folder_at_once(tiny_run, tiny_run_flags, tmp_path):
    """Real processes: the second `tmkt train --out same` is refused while the first runs; the
    first finishes (here: is stopped with SIGTERM and saves) with metrics.jsonl of its own."""
    out = tmp_path / "same"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [*TMKT, "train", *tiny_run_flags, "--cache-dir", str(tiny_run[1]), "--out", str(out)]
    args[args.index("--epochs") + 1] = "50"
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / ".tmkt.lock").exists():
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.05)
        second = subprocess.run(args, capture_output=True, env=env, text=True, timeout=300)
        assert second.returncode == 1, second.stderr
        errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and f"pid {first.pid}" in errors[0] and "Traceback" not in second.stderr
        while not (out / "metrics.jsonl").exists():  # let the first finish an epoch, then stop it
            assert first.poll() is None and time.monotonic() < deadline + 120
            time.sleep(0.1)
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=300)
    assert first.returncode == 128 + signal.SIGTERM
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, len(epochs) + 1))
    assert not (out / ".tmkt.lock").exists()


# ---------------------------------------------------------------- full disk


def test_full_disk_while_training_is_one_line_and_leaves_no_temporary(tiny_run, tiny_run_flags, tmp_path, monkeypatch):
    import tmkt.fileio

    real = tmkt.fileio.write_all

    def full(fd, data):
        real(fd, bytes(data)[:100])  # part of it lands, as on a real disk
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(tmkt.fileio, "write_all", full)
    out = tmp_path / "run"
    res = invoke("train", *tiny_run_flags, "--cache-dir", tiny_run[1], "--out", out)
    assert_one_error(res, str(out / "model.safetensors"), "No space left on device")
    assert not [p for p in out.iterdir() if ".tmp" in p.name or p.suffix == ".lock" or p.name.startswith(".")]


def _unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _unshare_works(), reason="needs `unshare -rm` (user and mount namespaces) for a real tmpfs")
def test_train_onto_a_really_full_tmpfs(tiny_run, tiny_run_flags, tmp_path):
    mount = tmp_path / "full"
    mount.mkdir()
    script = (
        f"mount -t tmpfs -o size=64k tmpfs {mount} || exit 90\n"
        f"OMP_NUM_THREADS=1 {' '.join(TMKT)} train {' '.join(tiny_run_flags)} --epochs 1 --cache-dir {tiny_run[1]} "
        f"--out {mount}/run 2>{tmp_path}/err.txt; echo $? > {tmp_path}/rc.txt\n"
        f"find {mount} -type f > {tmp_path}/files.txt\n"
    )
    subprocess.run(["unshare", "-rm", "sh", "-c", script], check=True, timeout=600)
    assert (tmp_path / "rc.txt").read_text().strip() == "1"
    err = (tmp_path / "err.txt").read_text()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "No space left on device" in errors[0] and "Traceback" not in err, err
    assert str(mount / "run") in errors[0]
    assert not [f for f in (tmp_path / "files.txt").read_text().split() if ".tmp" in f]


# ---------------------------------------------------------------- CPU threads


def test_threads_flag_is_recorded_applied_for_the_run_and_restored(tiny_run, tmp_path, monkeypatch):
    from tmkt.train.config import ConfigError, config_from_dict
    from tmkt.train.setup import cpu_threads, default_cpu_threads, usable_cpus

    run = copy_run(tiny_run, tmp_path)
    before = torch.get_num_threads()
    res = invoke("train", "--resume", run, "--threads", "3")  # resume may change the thread count
    assert res.exit_code == 0, res.output
    assert json.loads((run / "config.json").read_text())["train"]["threads"] == 3
    assert torch.get_num_threads() == before
    with cpu_threads(2):
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == before
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_cpu_threads() == usable_cpus() >= 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's setting wins
    assert default_cpu_threads() == 3
    with pytest.raises(ConfigError, match="threads"):
        config_from_dict({"threads": 0})
    assert "--threads" in invoke("train", "--help").output


def test_overwrite_starts_a_fresh_metrics_file(tiny_run, tiny_run_flags, tmp_path):
    run = copy_run(tiny_run, tmp_path)
    res = invoke("train", *tiny_run_flags, "--epochs", "1", "--cache-dir", tiny_run[1], "--out", run, "--overwrite")
    assert res.exit_code == 0, res.output
    epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1]

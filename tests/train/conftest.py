import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny tensor ops: on the 2 shared cores, extra threads
    only spin-wait and make such ops 10x slower under load."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TINY_RUN_FLAGS = [
    "--dataset", "digits", "-T", "3", "--input-size", "16", "--event-fraction", "0.3", "-o", "image_size=16",
    "-o", "time_resolution_us=10000", "--epochs", "2", "--batch-size", "8", "--device", "cpu",
]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A finished 2-epoch `tmkt train` run on a tiny digits set (16x16, T=3), trained once per
    session: (run directory, frame cache). Copy it before changing anything in it."""
    from typer.testing import CliRunner

    from tmkt.cli import app

    root = tmp_path_factory.mktemp("tiny-run")
    cache = root / "cache"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = CliRunner().invoke(app, ["train", *TINY_RUN_FLAGS, "--cache-dir", str(cache), "--out", str(root / "run")])
    finally:
        torch.set_num_threads(before)
    assert res.exit_code == 0, res.output
    return root / "run", cache


@pytest.fixture(scope="session")
def tiny_run_flags():
    """The `tmkt train` flags of `tiny_run` (without --cache-dir and --out)."""
    return list(TINY_RUN_FLAGS)

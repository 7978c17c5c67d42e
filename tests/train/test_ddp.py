"""Two-process data-parallel training on CPU (gloo), launched by torchrun as users would."""

import json
import math
import os
import subprocess
import sys
import textwrap

import torch
from safetensors.torch import load_file

from tmkt.checkpoint import load_run
from tmkt.data.registry import build_data
from tmkt.train.resume import load_resume_state

OPTIONS = {"image_size": 16, "time_resolution_us": 10000}

# Each rank trains, then dumps its own network and method parameters for comparison.
RANK_SCRIPT = textwrap.dedent(
    """
    import os, sys
    from rich.console import Console
    from safetensors.torch import save_file
    from tmkt.checkpoint import model_state
    from tmkt.train.config import config_from_dict
    from tmkt.train.trainer import train

    out, cache, method = sys.argv[1], sys.argv[2], sys.argv[3]
    cfg = config_from_dict(dict(
        dataset="digits", timesteps=3, input_size=[16, 16], event_fraction=0.3,
        data_options={"image_size": 16, "time_resolution_us": 10000}, cache_dir=cache, epochs=1,
        batch_size=16, device="cpu", out=out + "/run", method=method,
    ))
    rank = int(os.environ["RANK"])
    res = train(cfg, console=Console(quiet=rank != 0))
    state = {"model." + k: v for k, v in model_state(res.model).items()}
    state.update({"method." + k: v.detach() for k, v in res.method.state_dict().items()})
    save_file(state, f"{out}/rank{rank}.safetensors")
    """
)


def _torchrun(tmp_path, cache, method):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)]
    proc = subprocess.run([*cmd, str(tmp_path), cache, method], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_two_gloo_ranks_end_with_identical_weights(tmp_path, tmp_path_factory):
    cache = str(tmp_path_factory.getbasetemp() / "digits-cache")
    _torchrun(tmp_path, cache, "tmkt")
    r0 = load_file(str(tmp_path / "rank0.safetensors"))
    r1 = load_file(str(tmp_path / "rank1.safetensors"))
    assert r0.keys() == r1.keys() and "method.eta" in r0
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k  # parameters, BN statistics and the method's eta
    assert not torch.equal(r0["method.eta"], torch.ones_like(r0["method.eta"]))  # eta did train

    # Rank 0 alone wrote the run; its checkpoint is what both ranks hold.
    run = load_run(tmp_path / "run")
    for k, v in run.model.state_dict().items():
        assert torch.equal(v, r0["model." + k]), k
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["train"]["world_size"] == 2
    # Each rank sees half the samples, 8 per step: every sample once per epoch in all.
    n = len(build_data("digits", timesteps=3, input_size=(16, 16), event_fraction=0.3, cache_dir=cache, options=OPTIONS).train)
    _, state = load_resume_state(tmp_path / "run")
    assert state["global_step"] == math.ceil(math.ceil(n / 2) / 8) and state["world_size"] == 2
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1

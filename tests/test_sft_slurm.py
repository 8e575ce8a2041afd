"""`megallama sft --slurm NODES`: writes OUTPUT/launch.sbatch for the resolved plan and starts nothing."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml
from helpers import SFT_CONFIG, cli

from megallama.convert import convert
from megallama.sft.data import make_learnable_dataset


@pytest.fixture(scope="module")
def inputs(hf_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm")
    meg = convert(hf_dir, root / "meg", src_format="hf", dst_format="megatron").output
    return meg, make_learnable_dataset(root / "train.jsonl", n=16, seed=0), root


def run(inputs, name: str, *args: str):
    meg, train, root = inputs
    out = root / name
    result = cli("sft", "--config", str(SFT_CONFIG), f"load={meg}", f"data.train={train}",
                 f"output={out}", "parallel.dp=null", "train.micro_batch_size=1",
                 "train.global_batch_size=16", *args)
    return result, out


def test_writes_the_sbatch_script_and_runs_nothing(inputs):
    result, out = run(inputs, "two-nodes", "--slurm", "2", "--gpus-per-node", "4")
    assert result.exit_code == 0, result.output
    script = out / "launch.sbatch"
    assert result.stdout.strip().splitlines()[-1] == str(script)
    text = script.read_text()
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=4",
                 "# megallama sft: world 8 = TP 1 x PP 1 x DP 8 (2 nodes x 4 GPUs)"):
        assert any(have.startswith(line) for have in text.splitlines()), line
    srun = next(line for line in text.splitlines() if line.startswith("srun "))
    assert ("-m torch.distributed.run --nnodes=2 --nproc-per-node=4 --rdzv-backend=c10d "
            "--rdzv-endpoint=$MASTER_ADDR:$MASTER_PORT --rdzv-id=$SLURM_JOB_ID -m megallama.sft.train --config "
            f"{out / 'config.yaml'}") in srun
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["parallel"]["dp"] == 8 and cfg["output"] == str(out)  # what the ranks will read
    assert not list(out.glob("iter_*")) and not (out / "metrics.jsonl").exists()  # nothing ran
    if shutil.which("bash"):
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0  # valid shell


@pytest.mark.parametrize(("args", "message"), [
    (["--slurm", "0"], "--slurm NODES and --gpus-per-node must be >= 1"),
    (["--slurm", "2", "--gpus-per-node", "3", "parallel.dp=2"], "world size 6 (2 node(s) x 3 processes) is not "
                                                                "TP x PP x DP = 1x1x2 = 2"),
])
def test_refusals_exit_2_and_write_nothing(inputs, args, message):
    result, out = run(inputs, "refused", *args)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert not out.exists()

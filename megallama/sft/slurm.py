"""`megallama sft --slurm NODES`: the sbatch script that runs the resolved SFT plan on a Slurm cluster.

One Slurm task per node; each runs torchrun with one process per GPU, and the nodes meet through torchrun's c10d
rendezvous on the first node of the allocation. Only writes the script: nothing is submitted.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

SBATCH = "launch.sbatch"
RDZV_PORT = 29500


def torchrun_extra(nodes: int, gpus_per_node: int) -> list[str]:
    """What `resolve_plan` reads to lay TP x PP x DP over the allocation (it never sees these GPUs itself)."""
    return [f"--nnodes={nodes}", f"--nproc-per-node={gpus_per_node}"]


def sbatch_script(plan, *, config: Path, output: Path, job_name: str = "megallama-sft",
                  python: str | None = None) -> str:
    """The script's text: #SBATCH header, rendezvous address, and `srun ... torchrun ... megallama.sft.train`."""
    python = python or sys.executable
    torchrun = [python, "-m", "torch.distributed.run", f"--nnodes={plan.nnodes}",
                f"--nproc-per-node={plan.nproc_per_node}", "--rdzv-backend=c10d",
                "--rdzv-endpoint=$MASTER_ADDR:$MASTER_PORT", "--rdzv-id=$SLURM_JOB_ID",
                "-m", "megallama.sft.train", "--config", str(config)]
    # the $VARIABLES must reach bash unquoted; every path is quoted
    command = " ".join(a if a.startswith("--rdzv-") else shlex.quote(a) for a in torchrun)
    return "\n".join([
        "#!/bin/bash",
        f"#SBATCH --job-name={job_name}",
        f"#SBATCH --nodes={plan.nnodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={plan.nproc_per_node}",
        f"#SBATCH --output={output}/slurm-%j.out",
        "#SBATCH --exclusive",
        "",
        f"# megallama sft: world {plan.world_size} = TP {plan.tp} x PP {plan.pp} x DP {plan.dp} "
        f"({plan.nnodes} nodes x {plan.nproc_per_node} GPUs), {plan.steps} steps, global batch "
        f"{plan.global_batch_size}",
        f"# submit with: sbatch {output}/{SBATCH}",
        "set -euo pipefail",
        'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f"MASTER_PORT={RDZV_PORT}",
        "export MASTER_ADDR MASTER_PORT OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1",
        f"srun --kill-on-bad-exit=1 --ntasks-per-node=1 {command}",
        "",
    ])


def write_sbatch(plan, *, config: Path, output: Path) -> Path:
    path = Path(output) / SBATCH
    path.write_text(sbatch_script(plan, config=config, output=Path(output)))
    path.chmod(0o755)
    return path

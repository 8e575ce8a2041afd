"""Where SFT metrics go besides metrics.jsonl: TensorBoard event files and Weights & Biases runs.

Configured by the `logging` section of the SFT config:
    logging: {tensorboard: true, wandb_project: my-project, wandb_run_name: null}
TensorBoard writes OUTPUT/tensorboard/ (torch's SummaryWriter; needs the `tensorboard` package, a dependency);
W&B needs `wandb` (the optional extra `megallama[wandb]`) and honours WANDB_MODE, WANDB_API_KEY, WANDB_DIR.
Scalar names follow TensorBoard's "group/name" habit: train/loss, train/lr, train/grad_norm, train/tokens_per_s,
train/loss_scale (fp16), eval/loss. Only rank 0 logs.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_run_id.txt"  # a resumed run continues the same W&B run
TRAIN_SCALARS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
                 "tokens_per_s": "train/tokens_per_s", "loss_scale": "train/loss_scale"}


def logging_problems(cfg: dict) -> list[str]:
    """Config problems of the `logging` section, found before any process starts."""
    problems = []
    if cfg["logging"]["tensorboard"] and importlib.util.find_spec("tensorboard") is None:
        problems.append("logging.tensorboard is true but the tensorboard package is not installed: "
                        "pip install tensorboard")
    if cfg["logging"]["wandb_project"] and importlib.util.find_spec("wandb") is None:
        problems.append("logging.wandb_project is set but wandb is not installed: pip install 'megallama[wandb]' "
                        "(or pip install wandb), or unset logging.wandb_project")
    return problems


class TensorBoardBackend:
    def __init__(self, output: Path, *, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: readers drop the events from this step on that an earlier (killed) run logged after the
        # checkpoint this run resumes from, so the curves never double back
        self.writer = SummaryWriter(log_dir=str(Path(output) / TENSORBOARD_DIR),
                                    purge_step=start_step + 1 if start_step else None)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbBackend:
    def __init__(self, output: Path, *, project: str, name: str | None, config: dict, start_step: int):
        import wandb

        id_file = Path(output) / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if start_step and id_file.is_file() else None
        self.run = wandb.init(project=project, name=name, id=run_id, resume="allow" if run_id else None,
                              dir=str(output), config=config)
        id_file.write_text(self.run.id)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


def open_backends(output: Path, cfg: dict | None, *, start_step: int) -> list:
    """The backends the config's `logging` section asks for (none without a config)."""
    section = (cfg or {}).get("logging") or {}
    backends: list = []
    if section.get("tensorboard"):
        backends.append(TensorBoardBackend(output, start_step=start_step))
    if section.get("wandb_project"):
        backends.append(WandbBackend(output, project=section["wandb_project"], name=section.get("wandb_run_name"),
                                     config=cfg, start_step=start_step))
    return backends


def train_scalars(record: dict) -> dict[str, float]:
    """The metrics.jsonl record of a train step as named scalars (absent or null values skipped)."""
    return {name: float(record[key]) for key, name in TRAIN_SCALARS.items() if record.get(key) is not None}

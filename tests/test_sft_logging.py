"""SFT metrics in TensorBoard (read back with TensorBoard's own event reader) and W&B (offline mode), beside
metrics.jsonl and loss.png. One sft launch (1 rank, 4 steps)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from helpers import SFT_CONFIG, cli

from megallama.convert import convert
from megallama.sft import config as sft_config
from megallama.sft.data import make_learnable_dataset
from megallama.sft.report import Reporter, read_metrics


def scalars(folder: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} from the event files, with TensorBoard's EventAccumulator."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def record(step: int, loss: float) -> dict:
    return {"step": step, "loss": loss, "lr": 1e-3 * step, "tokens_per_s": 100.0 + step, "grad_norm": 0.5,
            "loss_tokens": 10, "step_time_s": 0.1, "trained_tokens_per_s": 50.0 + step, "pad_fraction": 0.5}


def test_reporter_writes_scalars_and_a_resume_drops_the_steps_after_its_checkpoint(tmp_path):
    cfg = sft_config.load_config(None, ["logging.tensorboard=true"])
    with Reporter(tmp_path, steps=4, start_step=0, enabled=True, cfg=cfg) as rep:
        for step in (1, 2, 3):
            rep.train(record(step, 5.0 - step), log=True)
        rep.eval(3, 1.25, 40)
    with Reporter(tmp_path, steps=4, start_step=2, enabled=True, cfg=cfg) as rep:  # resumed from step 2
        for step in (3, 4):
            rep.train(record(step, 10.0 + step), log=True)
    got = scalars(tmp_path / "tensorboard")
    assert got["train/loss"] == pytest.approx({1: 4.0, 2: 3.0, 3: 13.0, 4: 14.0})
    assert got["train/lr"] == pytest.approx({1: 1e-3, 2: 2e-3, 3: 3e-3, 4: 4e-3})
    assert got["train/grad_norm"][4] == pytest.approx(0.5) and got["train/tokens_per_s"][2] == pytest.approx(102.0)
    assert not got.get("eval/loss")  # logged at step 3 by the first run, after the checkpoint the second resumed


def test_no_logging_section_writes_no_event_files(tmp_path):
    with Reporter(tmp_path, steps=1, start_step=0, enabled=True, cfg=sft_config.load_config(None)) as rep:
        rep.train(record(1, 1.0), log=True)
    assert not (tmp_path / "tensorboard").exists() and read_metrics(tmp_path)[0]["loss"] == 1.0


def test_wandb_requested_but_missing_is_refused_before_launch(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    cfg = sft_config.load_config(None, ["logging.wandb_project=p", "load=.", "data.train=.", "output=o"])
    with pytest.raises(Exception, match=r"logging.wandb_project is set but wandb is not installed: pip install "
                                        r"'megallama\[wandb\]'"):
        sft_config.validate(cfg)


def wandb_history(run_file: Path) -> dict[int, dict]:
    """{step: {key: value}} of an offline run's .wandb file, decoded with wandb's own protobuf schema. The file is a
    LevelDB-style log (wandb's datastore): a 7-byte header, then records framed as crc32 (4), length (2), type (1)
    in 32 KiB blocks; a record split across blocks comes as FIRST, MIDDLE..., LAST chunks."""
    import json
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    block, pos, pending, rows = 32768, 7, b"", {}
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: one whole Record
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                rows[row["_step"]] = row
    return rows


@pytest.mark.slow
def test_sft_run_logs_to_tensorboard_and_wandb(hf_dir, tmp_path, monkeypatch):
    meg = convert(hf_dir, tmp_path / "meg", src_format="hf", dst_format="megatron").output
    train = make_learnable_dataset(tmp_path / "train.jsonl", n=32, seed=0)
    out = tmp_path / "run"
    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": tmp_path / "wandb-dir",
                        "WANDB_CACHE_DIR": tmp_path / "wandb-cache", "WANDB_CONFIG_DIR": tmp_path / "wandb-config",
                        "WANDB_DATA_DIR": tmp_path / "wandb-data"}.items():
        monkeypatch.setenv(name, str(value))  # nothing reaches the network or the home folder
    result = cli("sft", "--config", SFT_CONFIG, f"load={meg}", f"data.train={train}", f"data.eval={train}",
                 f"output={out}", "train.steps=4", "train.eval_interval=2", "train.eval_steps=1",
                 "train.save_interval=4", "logging.tensorboard=true", "logging.wandb_project=megallama-test")
    assert result.exit_code == 0, result.output
    metrics = read_metrics(out)
    train_records = [m for m in metrics if "loss" in m]
    logged = {"train/loss": {m["step"]: m["loss"] for m in train_records},
              "train/lr": {m["step"]: m["lr"] for m in train_records},
              "train/grad_norm": {m["step"]: m["grad_norm"] for m in train_records},
              "train/tokens_per_s": {m["step"]: m["tokens_per_s"] for m in train_records},
              "eval/loss": {m["step"]: m["eval_loss"] for m in metrics if "eval_loss" in m}}
    assert sorted(logged["train/loss"]) == [1, 2, 3, 4] and sorted(logged["eval/loss"]) == [2, 4]
    assert (out / "loss.png").is_file()

    tensorboard = scalars(out / "tensorboard")
    for tag, values in logged.items():
        assert tensorboard[tag] == pytest.approx(values), tag

    run_id = (out / "wandb_run_id.txt").read_text()
    (run_folder,) = (out / "wandb").glob(f"offline-run-*-{run_id}")  # one offline run, under the output
    history = wandb_history(run_folder / f"run-{run_id}.wandb")
    for tag, values in logged.items():
        assert {step: row[tag] for step, row in history.items() if tag in row} == pytest.approx(values), tag

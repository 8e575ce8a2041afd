"""`megallama sft`: check everything, print the plan, then run the recipe on TP x PP x DP ranks via torchrun.
Docs: docs/sft.md."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import typer
from rich.table import Table

from megallama.cli.common import err, handle_errors, out
from megallama.errors import InputError, MegallamaError

OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*=")
REPARTITION = ("megallama convert megatron2pth --input-dir {load} --output-dir PTH && "
               "megallama convert pth2megatron --input-dir PTH --output-dir NEW --tp {tp} --pp {pp}")


def split_args(args: list[str]) -> tuple[list[str], list[str]]:
    """`key=value` overrides, then torchrun's arguments (everything from the first option-like token on).

    Click drops the `--` separator; before it, an unknown option is already a usage error, so the first token
    starting with `-` can only come from after `--`.
    """
    overrides: list[str] = []
    for i, arg in enumerate(args):
        if arg.startswith("-"):
            return overrides, list(args[i:])
        if not OVERRIDE.match(arg):
            raise InputError(f"unexpected argument {arg!r}: overrides look like section.key=value, and torchrun "
                             "arguments go after --")
        overrides.append(arg)
    return overrides, []


def check_checkpoint(cfg: dict, manifest: dict | None, root: Path, *, read_ranks: bool = True,
                     foreign: bool = False) -> None:
    """The checkpoint must exist, carry megallama's manifest, be complete, and (torch format) be split for the
    requested TP x PP; torch_dist loads at any TP x PP, and so does a `foreign` checkpoint (another tool's, read
    and re-split by the converters' reader, which has checked every rank file already)."""
    from megallama.formats.megatron.torch_format import iteration_dir
    from megallama.sft.checkpoint import checkpoint_format, rank_path, read_tracker, torch_grid
    from megallama.sft.dist_checkpoint import missing_files
    from megallama.spec import ModelSpec, check_parallel

    if manifest is None or "spec" not in manifest or "padded_vocab_size" not in manifest:
        raise InputError(f"{root} has no megallama.json with the model spec: convert the checkpoint with "
                         "`megallama convert pth2megatron` (or point load at an sft output)")
    spec = ModelSpec.from_dict(manifest["spec"])
    p = cfg["parallel"]
    check_parallel(spec, tp=p["tp"], pp=p["pp"], ep=p.get("ep", 1))
    iteration = read_tracker(root)
    it_dir = iteration_dir(root, iteration)
    if not it_dir.is_dir():
        raise InputError(f"checkpoint {root} is incomplete: {it_dir} (named by its tracker) is missing")
    if checkpoint_format(it_dir) == "torch_dist":
        missing = missing_files(it_dir)
        if missing:
            raise InputError(f"torch_dist checkpoint {it_dir} is incomplete: {missing[0]} is missing")
        from megallama.formats.megatron.torch_dist import DistCheckpoint
        from megallama.formats.megatron.torch_format import load_rank_file

        # the converters' check, before anything is written or launched: .metadata read with the restricted
        # unpickler (megatron-core's ranks would pickle.load it), every .distcp it lists present and whole
        DistCheckpoint(it_dir)
        load_rank_file(it_dir / "common.pt")  # its globals checked here, in one line, not in every rank
    elif not foreign:
        have = torch_grid(it_dir)
        if have != (p["tp"], p["pp"]):
            raise InputError(f"checkpoint {root} is split for TP={have[0]} PP={have[1]} but the run asks for "
                             f"TP={p['tp']} PP={p['pp']}: re-split it with `"
                             + REPARTITION.format(load=root, tp=p["tp"], pp=p["pp"]) + "` and set load to NEW "
                             "(torch_dist checkpoints, sft's default, load at any TP x PP)")
        missing = [str(path) for t in range(p["tp"]) for q in range(p["pp"])
                   if not (path := rank_path(root, iteration, tp_rank=t, pp_rank=q, pp=p["pp"])).is_file()]
        if missing:
            raise InputError(f"checkpoint {root} is incomplete: {missing[0]} is missing"
                             + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        from megallama.formats.megatron.torch_format import load_rank_file

        for t in range(p["tp"] if read_ranks else 0):  # mmap, safe unpickler: a refusal here, not in the ranks
            for q in range(p["pp"]):
                load_rank_file(rank_path(root, iteration, tp_rank=t, pp_rank=q, pp=p["pp"]))
    if cfg["data"]["seq_length"] > spec.max_position_embeddings:
        raise InputError(f"data.seq_length {cfg['data']['seq_length']} exceeds the model's max_position_embeddings "
                         f"{spec.max_position_embeddings}")


def worker_error(output: Path, returncode: int) -> MegallamaError:
    """The first rank's own error (keeping exit 2 for bad input), else a generic failure."""
    import json

    for path in sorted(output.glob("error-rank*.json")):
        report = json.loads(path.read_text())
        error = InputError(report["message"]) if report.get("exit_code") == 2 else MegallamaError(report["message"])
        return error
    return MegallamaError(f"sft workers failed (exit code {returncode}); see the log above")


def start_folder(cfg: dict) -> Path:
    """The checkpoint the run reads: `output` when resuming, else `load`; refuses to overwrite a finished run."""
    from megallama.sft.checkpoint import has_checkpoint

    load, output = Path(cfg["load"]).resolve(), Path(cfg["output"]).resolve()
    if load == output:
        cfg["resume"] = True  # load pointing at this very sft output: continue it
    if cfg["resume"]:
        if not has_checkpoint(output):
            raise InputError(f"--resume: output folder {output} holds no checkpoint yet; start without --resume")
        return output
    if has_checkpoint(output):
        raise InputError(f"output folder {output} already holds checkpoints of a run: pass --resume to continue "
                         "it, or choose another output folder")
    return load


def plan_table(cfg: dict, plan, splits: dict, start, command: list[str]) -> Table:
    t, d = cfg["train"], cfg["data"]
    table = Table(title="megallama sft plan", show_header=False, title_justify="left")
    rows = [
        ("world size", f"{plan.world_size} = TP {plan.tp} x PP {plan.pp} x DP {plan.dp} "
                       f"({plan.nnodes} node(s) x {plan.nproc_per_node} processes)"),
        ("batch", f"global {plan.global_batch_size} = micro {plan.micro_batch_size} x DP {plan.dp} x "
                  f"accumulation {plan.accumulation}"),
        ("accumulation steps", str(plan.accumulation)),
        ("layers per stage", f"{plan.layers_per_stage} ({plan.num_layers} layers / PP {plan.pp})"),
        ("padded vocab", str(plan.padded_vocab_size)),
        ("steps", f"{plan.steps}" + (f" ({t['epochs']:g} epochs)" if t["epochs"] is not None else "")),
        ("start", _start_row(start)),
        ("checkpoints", f"{cfg['checkpoint']['format']} every {t['save_interval']} steps"),
        ("schedule", f"lr {t['lr']:g} -> {t['min_lr']:g} {t['decay_style']}, warmup {t['warmup_steps']}, "
                     f"clip {t['clip_grad']:g}, wd {t['weight_decay']:g}, betas {t['adam_beta1']}/{t['adam_beta2']}"),
        ("precision", f"{t['precision']}, recompute {t['recompute']}, distributed optimizer "
                      f"{cfg['parallel']['distributed_optimizer']}"),
        ("attention", t["attention"]),
        ("packing", _packing_row(cfg, plan, splits["train"])),
        ("train data", _data_row(d["train"], splits["train"], d)),
        ("eval data", _data_row(d["eval"], splits["eval"], d) if splits["eval"] is not None else "none"),
        ("output", str(cfg["output"])),
        ("command", shlex.join(command)),
    ]
    for key, value in rows + [("note", n) for n in plan.notes]:
        table.add_row(key, value)
    return table


PACKING_PREVIEW_STEPS = 100  # enough batches for a stable figure, quick for a 128-sample global batch


def _packing_row(cfg: dict, plan, train_set) -> str:
    """How full the token slots are over the first steps, unpacked and packed (data.pack)."""
    import itertools

    from megallama.sft.data import global_batches
    from megallama.sft.packing import packing_efficiency, sample_lengths

    steps = min(plan.steps, PACKING_PREVIEW_STEPS)
    batches = list(itertools.islice(global_batches(len(train_set), global_batch_size=plan.global_batch_size,
                                                   seed=cfg["train"]["seed"]), steps))
    e = packing_efficiency(sample_lengths(train_set.labels), batches, seq_length=cfg["data"]["seq_length"],
                           micro_batch_size=plan.micro_batch_size, dp_size=plan.dp)
    if cfg["data"]["pack"]:
        return (f"on: {e['samples_per_row']:.1f} samples per row, {e['packed_fill']:.0%} of token slots hold "
                f"tokens (unpacked {e['unpacked_fill']:.0%}) over the first {steps} steps")
    return (f"off: {e['unpacked_fill']:.0%} of token slots hold tokens over the first {steps} steps "
            f"(data.pack=true would fill {e['packed_fill']:.0%})")


def _start_row(start) -> str:
    where = f"from {start.root} ({start.fmt})"
    if start.resumes:
        return f"resume at step {start.step} {where}"
    if start.continues:
        return f"resume at step {start.step} {where}, weights only: fresh optimizer state, RNG reseeded"
    return f"step 0 {where}"


def _data_row(path: str, ds, d: dict) -> str:
    s = ds.stats
    return (f"{path} ({d['format']}, seq {d['seq_length']}): {s.samples} samples, {s.loss_tokens} loss tokens, "
            f"{s.truncated} truncated, {s.dropped_empty} dropped")


def pack_pretraining(cfg: dict) -> list[str]:
    """Continued pretraining (text, or prefixes without loss masks) packs its document pieces into rows."""
    from megallama.data.sources import is_pretraining

    d = cfg["data"]
    if d["pack"] or not is_pretraining(d["train"], d["format"]):
        return []
    if cfg["train"]["attention"] == "local":
        return ["continued pretraining without packing: train.attention=local cannot pack (use sdpa)"]
    d["pack"] = True
    return ["continued pretraining: data.pack turned on (document pieces share rows, attention stays inside each)"]


def register(app: typer.Typer) -> None:
    @app.command("sft", no_args_is_help=True)
    @handle_errors
    def sft(
        config: Path = typer.Option(None, "--config", "-c", help="SFT recipe YAML (see configs/sft/)."),
        tp: int = typer.Option(None, "--tp", "--tensor-size", "--tensor_size", help="Tensor-parallel size."),
        pp: int = typer.Option(None, "--pp", "--pipeline-size", "--pipeline_size", help="Pipeline-parallel size."),
        dp: int = typer.Option(None, "--dp", help="Data-parallel size (default: world size / (TP x PP))."),
        resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint in the output."),
        resume_weights_only: bool = typer.Option(
            False, "--resume-weights-only",
            help="Resume from the output's weights and step only, with a fresh optimizer state and RNG "
                 "(Megatron-LM's --no-load-optim --no-load-rng); for optimizer state that cannot be re-sharded."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved plan, check it, start nothing."),
        slurm: int = typer.Option(None, "--slurm", metavar="NODES",
                                  help="Write OUTPUT/launch.sbatch for this many Slurm nodes; start nothing."),
        gpus_per_node: int = typer.Option(8, "--gpus-per-node", help="GPUs per Slurm node (with --slurm)."),
        args: list[str] = typer.Argument(None, metavar="[KEY=VALUE ...] [-- TORCHRUN ARGS]",
                                         help="Config overrides such as train.lr=1e-5; torchrun arguments after --."),
    ) -> None:
        """Supervised fine-tuning of a Megatron checkpoint on megatron-core (TP x PP x DP via torchrun).

        The model comes from the checkpoint's megallama.json; the YAML holds data, batch, schedule and output.
        Writes config.yaml, metrics.jsonl, loss.png and Megatron checkpoints to the output folder.

        \b
        Examples:
          megallama sft --config configs/sft/tiny-cpu.yaml load=runs/tiny-tp1 data.train=train.jsonl
          megallama sft --config configs/sft/llama2-7b-reference.yaml --dry-run
          megallama sft --config run.yaml --resume -- --nnodes 2 --node-rank 0
          megallama sft --config run.yaml --slurm 4 --gpus-per-node 8   (then: sbatch OUTPUT/launch.sbatch)
          megallama sft --config runs/x/config.yaml --resume --tp 2 --pp 1

        Docs: docs/sft.md
        """
        from megallama.engine.launch import run_torchrun, torchrun_command
        from megallama.formats.base import read_manifest
        from megallama.hub import resolve_model_config
        from megallama.sft import config as sft_config
        from megallama.sft.checkpoint import check_resume, find_start
        from megallama.sft.train import DATA_CACHE, save_splits, tokenize_splits
        from megallama.spec import ModelSpec
        from megallama.staging import check_writable_folder

        overrides, extra = split_args(list(args or []))
        if slurm is not None:
            from megallama.sft.slurm import torchrun_extra

            if slurm < 1 or gpus_per_node < 1 or extra:
                raise InputError("--slurm NODES and --gpus-per-node must be >= 1, and torchrun arguments after -- "
                                 "do not combine with --slurm (the script sets them)")
            extra = torchrun_extra(slurm, gpus_per_node)
        cfg = sft_config.load_config(config, overrides)
        for key, value in (("tp", tp), ("pp", pp), ("dp", dp)):
            if value is not None:
                cfg["parallel"][key] = value
        if resume or resume_weights_only:  # the command line decides (a resumed run's config.yaml holds both keys)
            cfg["resume"], cfg["resume_weights_only"] = True, resume_weights_only
        warnings = sft_config.validate(cfg)
        check_writable_folder(Path(cfg["output"]))  # before tokenizing, and long before training
        root = start_folder(cfg)
        if cfg["load_model_config"] is not None:  # a Hub id becomes its snapshot's config files
            cfg["load_model_config"] = str(resolve_model_config(cfg["load_model_config"], "load_model_config"))
        manifest = read_manifest(root)
        foreign = not cfg["resume"] and not (manifest or {}).get("spec")
        if foreign:  # another tool's torch-format checkpoint: spec from its args or load_model_config
            from megallama.sft.checkpoint import foreign_manifest

            manifest = foreign_manifest(root, cfg["load_model_config"], tp=cfg["parallel"]["tp"])
        check_checkpoint(cfg, manifest, root, read_ranks=not dry_run, foreign=foreign)  # a dry run reads no weights
        start = find_start(Path(cfg["load"]), Path(cfg["output"]), resume=cfg["resume"],
                           weights_only=cfg["resume_weights_only"])
        check_resume(start, tp=cfg["parallel"]["tp"], pp=cfg["parallel"]["pp"],
                     distributed_optimizer=cfg["parallel"]["distributed_optimizer"],
                     precision=cfg["train"]["precision"])
        peft_record = None
        if cfg["peft"]["method"] != "none":  # LoRA / DoRA: the base checkpoint, its fingerprint, the record
            import dataclasses

            from megallama.peft.training import prepare_run

            base, peft_record = prepare_run(cfg)
            check_checkpoint(cfg, read_manifest(base), base)
            if not cfg["resume"]:
                start = dataclasses.replace(start, continues=False, resumes=False)
        spec = ModelSpec.from_dict(manifest["spec"])
        splits = tokenize_splits(cfg, vocab_size=spec.vocab_size)  # bad data exits 2 before any process starts
        pack_note = pack_pretraining(cfg)
        plan = sft_config.resolve_plan(cfg, num_layers=spec.num_layers, padded_vocab_size=manifest["padded_vocab_size"],
                                       num_samples=len(splits["train"]), extra=extra,
                                       devices=None if slurm else sft_config.local_devices())
        plan.notes += pack_note
        if start.step >= plan.steps:
            raise InputError(f"nothing to do: the checkpoint in {start.root} is at step {start.step} and the run "
                             f"has {plan.steps} steps; raise train.steps to train further")
        final = sft_config.resolved(cfg, plan)
        output = Path(final["output"])
        target = ["-m", "megallama.sft.train", "--config", str(output / "config.yaml")]
        command = torchrun_command(target, nproc=plan.nproc_per_node, extra=extra)
        for warning in warnings:
            err.print(f"[yellow]warning:[/] {warning}", highlight=False)
        table = plan_table(final, plan, splits, start, command)
        from megallama.peft.training import plan_rows

        for key, value in plan_rows(final, spec, dp=plan.dp):
            table.add_row(key, value)
        out.print(table)
        if dry_run:
            out.print("dry run: plan is valid, nothing started")
            return
        output.mkdir(parents=True, exist_ok=True)
        sft_config.dump_config(final, output / "config.yaml")
        save_splits(final, splits, output / DATA_CACHE)
        if peft_record is not None and not final["resume"]:
            from megallama.peft.store import write_record

            write_record(output, peft_record)
        if slurm is not None:
            from megallama.sft.slurm import write_sbatch

            path = write_sbatch(plan, config=output / "config.yaml", output=output)
            err.print(f"wrote the Slurm script; submit it with: sbatch {path}", highlight=False)
            print(path)
            return
        for stale in output.glob("error-rank*.json"):
            stale.unlink()
        result = run_torchrun(target, nproc=plan.nproc_per_node, extra=extra)
        if result.returncode != 0:
            raise worker_error(output, result.returncode)
        out.print(f"sft finished: {output} (config.yaml, metrics.jsonl, loss.png, checkpoints)")

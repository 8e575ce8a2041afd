"""`megallama convert ...`: HF <-> Meta pth <-> Megatron. Docs: docs/convert.md."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from megallama.cli.common import ModelConfig, byte_progress, err, handle_errors, print_write_report
from megallama.errors import InputError

app = typer.Typer(help="Convert between HF, Meta pth and Megatron (torch_dist, torch). Docs: docs/convert.md",
                  no_args_is_help=True, rich_markup_mode=None)

DTYPE_HELP = "Output dtype: fp32, bf16 or fp16 (default: keep the source dtype)."
REVISION_HELP = "Branch, tag or commit when --input-dir is a Hub id (owner/name)."
TP_HELP = "Tensor-parallel size (torch_dist: only pads the vocab and fills the launch flags; torch: split)."
PP_HELP = "Pipeline-parallel size (torch_dist: only fills the launch flags; torch: split)."
CKPT_FORMAT_HELP = ("Megatron --ckpt-format to write: torch_dist (default, as Megatron-LM; loads at any TP x PP) or "
                    "torch (per-rank mp_rank_* files for exactly --tp x --pp).")
DIVISIBLE_HELP = "Pad the vocab to a multiple of this x TP (Megatron's default 128)."
LAYOUT_HELP = ("Force the input's Megatron layout: mcore-local, mcore-te, legacy, llama-fork or alibaba "
               "(default: detected from the keys).")
IMPL_HELP = ("Megatron-LM's --transformer-impl the torch-format keys are for: local or transformer_engine "
             "(torch_dist stores the same keys for both).")

# Options shared by several commands, declared once (Typer reads the Annotated metadata).
Dtype = Annotated[str | None, typer.Option("--dtype", help=DTYPE_HELP)]
Force = Annotated[bool, typer.Option("--force", help="Replace a non-empty output folder.")]
Revision = Annotated[str | None, typer.Option("--revision", help=REVISION_HELP)]
Tp = Annotated[int | None, typer.Option("--tp", "--tensor-size", "--tensor_size", help=TP_HELP)]
Pp = Annotated[int | None, typer.Option("--pp", "--pipeline-size", "--pipeline_size", help=PP_HELP)]
EP_HELP = ("Expert-parallel size, mixture-of-experts models only (Llama 4; torch_dist: only fills the launch flags "
           "and the split verify/generate use; torch: mp_rank_*_EEE files).")
Ep = Annotated[int | None, typer.Option("--ep", "--expert-parallel-size", help=EP_HELP)]
CkptFormat = Annotated[str, typer.Option("--ckpt-format", "--ckpt_format", help=CKPT_FORMAT_HELP)]
DivisibleBy = Annotated[int, typer.Option("--make-vocab-size-divisible-by", "--make_vocab_size_divisible_by",
                                          help=DIVISIBLE_HELP)]
TransformerImpl = Annotated[str, typer.Option("--transformer-impl", "--transformer_impl", help=IMPL_HELP)]
Layout = Annotated[str | None, typer.Option("--layout", help=LAYOUT_HELP)]
NoChecksums = Annotated[bool, typer.Option("--no-checksums", help="Skip the sources' sha256 in megallama.json "
                                           "(one read pass of the input less).")]
BASE_HELP = ("LoRA/DoRA run only: the base model (HF, Meta or Megatron folder, or Hub id) to merge the adapters into "
             "(default: the base recorded in the run's peft.json; its fingerprint must match).")
ADAPTER_HELP = ("HF PEFT LoRA/DoRA adapter folder (adapter_config.json + adapter_model.safetensors) to merge into the "
                "weights written, as peft's merge_and_unload() does. Docs: docs/peft-io.md")
Base = Annotated[str | None, typer.Option("--base", help=BASE_HELP)]
Adapter = Annotated[Path | None, typer.Option("--adapter", help=ADAPTER_HELP)]


def _base_path(base: str | None) -> Path | None:
    """--base as a folder (a Hub id becomes its snapshot)."""
    if base is None:
        return None
    from megallama.hub import resolve_model_path
    return resolve_model_path(Path(base), None)


def _resolve_model_size(input_dir: Path, model_size: str | None) -> Path:
    """The reference scripts' `--input_dir X --model_size 7B` reads X/7B/."""
    if model_size:
        return input_dir / model_size
    return input_dir


def _run(src: Path, dst: Path, *, src_format: str, dst_format: str, title: str, revision: str | None = None,
         model_size: str | None = None, **kwargs) -> None:
    from megallama.hub import resolve_model_config, resolve_model_path

    src = _resolve_model_size(resolve_model_path(src, revision), model_size)  # a Hub id becomes its snapshot
    if kwargs.get("model_config") is not None:
        kwargs["model_config"] = resolve_model_config(kwargs["model_config"])
    if kwargs.get("checksums", True):
        from megallama.formats.checksums import start_early

        start_early(src, src_format)  # reads the input while torch imports (first byte within ~0.4 s)
    from megallama.convert import convert

    with byte_progress(title) as on_tensor:
        report = convert(src, dst, src_format=src_format, dst_format=dst_format, on_tensor=on_tensor,
                         on_start=on_tensor.set_total, **kwargs)
    print_write_report(title, report)
    return report


@app.command("hf2pth")
@handle_errors
def hf2pth(
    input_dir: Path = typer.Option(..., "--input-dir", "--input_dir", "--base_model", "--base-model",
                                   help="HF folder: config.json + *.safetensors or pytorch_model*.bin."),
    output_dir: Path = typer.Option(..., "--output-dir", "--output_dir", help="Meta pth folder to write."),
    shards: int = typer.Option(1, "--shards", help="Number of consolidated.NN.pth model-parallel shards."),
    dtype: Dtype = None,
    output_type: str = typer.Option("pth", "--output-type", "--output_type", hidden=True),
    force: Force = False,
    revision: Revision = None,
    no_checksums: NoChecksums = False,
) -> None:
    """HuggingFace LLaMA -> Meta consolidated.NN.pth + params.json.

    \b
    Examples:
      megallama convert hf2pth --input-dir llama-2-7b-hf --output-dir llama-2-7b
      megallama convert hf2pth --input-dir meta-llama/Llama-2-7b-hf --output-dir llama-2-7b   (HF Hub id)
    """
    if output_type != "pth":
        raise InputError(f"--output_type {output_type!r} is not supported: only 'pth'")
    _run(input_dir, output_dir, src_format="hf", dst_format="meta", title="hf2pth", shards=shards, dtype=dtype,
         force=force, revision=revision, checksums=not no_checksums)


@app.command("pth2hf")
@handle_errors
def pth2hf(
    input_dir: Path = typer.Option(..., "--input-dir", "--input_dir", help="Meta pth folder."),
    output_dir: Path = typer.Option(..., "--output-dir", "--output_dir", help="HF folder to write."),
    model_size: str = typer.Option(None, "--model-size", "--model_size", help="Read INPUT_DIR/MODEL_SIZE/."),
    dtype: Dtype = None,
    force: Force = False,
    revision: Revision = None,
    no_checksums: NoChecksums = False,
) -> None:
    """Meta consolidated.NN.pth -> HuggingFace safetensors + config.json.

    Example: megallama convert pth2hf --input-dir llama-2-7b --output-dir llama-2-7b-hf
    """
    _run(input_dir, output_dir, model_size=model_size, src_format="meta", dst_format="hf",
         title="pth2hf", dtype=dtype, force=force, revision=revision, checksums=not no_checksums)


def _to_megatron(src: Path, dst: Path, *, src_format: str, title: str, **kwargs) -> None:
    """Write a Megatron checkpoint and print the Megatron-LM launch flags that load it."""
    _run(src, dst, src_format=src_format, dst_format="megatron", title=title, **kwargs)
    launch_flags = dst / "megatron_args.txt"
    if launch_flags.exists():
        err.print("Megatron-LM launch flags (also in megatron_args.txt):")
        print(launch_flags.read_text().strip())


@app.command("pth2megatron")
@handle_errors
def pth2megatron(
    input_dir: Path = typer.Option(..., "--input-dir", "--input_dir", help="Meta pth folder."),
    output_dir: Path = typer.Option(..., "--output-dir", "--output_dir", help="Megatron folder to write."),
    tp: Tp = None,
    pp: Pp = None,
    ckpt_format: CkptFormat = "torch_dist",
    model_size: str = typer.Option(None, "--model-size", "--model_size", help="Read INPUT_DIR/MODEL_SIZE/."),
    dtype: Dtype = None,
    divisible_by: DivisibleBy = 128,
    transformer_impl: TransformerImpl = "local",
    force: Force = False,
    revision: Revision = None,
    no_checksums: NoChecksums = False,
    adapter: Adapter = None,
) -> None:
    """Meta pth -> Megatron checkpoint (megatron-core GPTModel): torch_dist by default, or torch format split for
    TP x PP.

    \b
    Examples:
      megallama convert pth2megatron --input-dir llama-2-7b --output-dir llama-2-7b-mcore --tp 2 --pp 2
      megallama convert pth2megatron --input-dir llama-2-7b --output-dir merged-mcore --adapter my-peft-adapter
    """
    _to_megatron(input_dir, output_dir, model_size=model_size, src_format="meta", title="pth2megatron",
                 tp=tp, pp=pp, ckpt_format=ckpt_format, dtype=dtype, divisible_by=divisible_by, force=force,
                 transformer_impl=transformer_impl, revision=revision, checksums=not no_checksums, adapter=adapter)


@app.command("hf2megatron")
@handle_errors
def hf2megatron(
    input_dir: Path = typer.Option(..., "--input-dir", "--input_dir", "--base_model", "--base-model",
                                   help="HF folder: config.json + *.safetensors or pytorch_model*.bin."),
    output_dir: Path = typer.Option(..., "--output-dir", "--output_dir", help="Megatron folder to write."),
    tp: Tp = None,
    pp: Pp = None,
    ep: Ep = None,
    ckpt_format: CkptFormat = "torch_dist",
    dtype: Dtype = None,
    divisible_by: DivisibleBy = 128,
    transformer_impl: TransformerImpl = "local",
    force: Force = False,
    revision: Revision = None,
    no_checksums: NoChecksums = False,
    adapter: Adapter = None,
) -> None:
    """HuggingFace LLaMA -> Megatron checkpoint (torch_dist by default), without a pth step in between.

    \b
    Examples:
      megallama convert hf2megatron --input-dir llama-2-7b-hf --output-dir llama-2-7b-mcore
      megallama convert hf2megatron --input-dir llama-2-7b-hf --output-dir merged-mcore --adapter my-peft-adapter
    """
    _to_megatron(input_dir, output_dir, src_format="hf", title="hf2megatron", tp=tp, pp=pp, ep=ep,
                 ckpt_format=ckpt_format, dtype=dtype, divisible_by=divisible_by, force=force,
                 transformer_impl=transformer_impl, revision=revision, checksums=not no_checksums, adapter=adapter)


@app.command("megatron2megatron")
@handle_errors
def megatron2megatron(
    input_dir: Path = typer.Option(..., "--input-dir", "--input_dir",
                                   help="Megatron folder (torch_dist or torch format, any TP x PP)."),
    output_dir: Path = typer.Option(..., "--output-dir", "--output_dir", help="Megatron folder to write."),
    tp: Tp = None,
    pp: Pp = None,
    ep: Ep = None,
    ckpt_format: CkptFormat = "torch_dist",
    dtype: Dtype = None,
    divisible_by: DivisibleBy = 128,
    transformer_impl: TransformerImpl = "local",
    layout: Layout = None,
    model_config: ModelConfig = None,
    force: Force = False,
    revision: Revision = None,
    no_checksums: NoChecksums = False,
    base: Base = None,
) -> None:
    """Megatron -> Megatron: re-shard to another TP x PP and/or change the ckpt format (weights only). A LoRA/DoRA
    run is written merged into its base.

    Example: megallama convert megatron2megatron --input-dir runs/sft --output-dir sft-tp4 --ckpt-format torch --tp 4
    """
    _to_megatron(input_dir, output_dir, src_format="megatron", title="megatron2megatron", tp=tp, pp=pp, ep=ep,
                 ckpt_format=ckpt_format, dtype=dtype, divisible_by=divisible_by, force=force,
                 transformer_impl=transformer_impl, layout=layout, model_config=model_config, revision=revision,
                 checksums=not no_checksums, base=_base_path(base))


@app.command("megatron2pth")
@handle_errors
def megatron2pth(
    input_dir: Path = typer.Option(..., "--input-dir", "--input_dir",
                                   help="Megatron folder (torch_dist or torch format, any TP x PP)."),
    output_dir: Path = typer.Option(..., "--output-dir", "--output_dir", help="Meta pth folder to write."),
    shards: int = typer.Option(1, "--shards", help="Number of consolidated.NN.pth model-parallel shards."),
    dtype: Dtype = None,
    layout: Layout = None,
    model_config: ModelConfig = None,
    force: Force = False,
    revision: Revision = None,
    no_checksums: NoChecksums = False,
    base: Base = None,
) -> None:
    """Megatron checkpoint (any TP x PP) -> Meta pth: merge TP, join PP, drop padding, undo fusion. A LoRA/DoRA
    run is written merged into its base.

    Example: megallama convert megatron2pth --input-dir runs/sft --output-dir llama-2-7b-sft
    """
    _run(input_dir, output_dir, src_format="megatron", dst_format="meta", title="megatron2pth", shards=shards,
         dtype=dtype, force=force, layout=layout, model_config=model_config, revision=revision,
         checksums=not no_checksums, base=_base_path(base))


@app.command("megatron2hf")
@handle_errors
def megatron2hf(
    input_dir: Path = typer.Option(..., "--input-dir", "--input_dir",
                                   help="Megatron folder (torch_dist or torch format, any TP x PP)."),
    output_dir: Path = typer.Option(..., "--output-dir", "--output_dir", help="HF folder to write."),
    dtype: Dtype = None,
    layout: Layout = None,
    model_config: ModelConfig = None,
    force: Force = False,
    revision: Revision = None,
    no_checksums: NoChecksums = False,
    base: Base = None,
    peft: bool = typer.Option(False, "--peft", help="LoRA/DoRA run only: write an HF PEFT adapter folder "
                              "(adapter_config.json + adapter_model.safetensors) instead of merged weights."),
) -> None:
    """Megatron checkpoint (torch_dist or torch, any TP x PP) -> HuggingFace safetensors + config.json. A LoRA/DoRA
    run is written merged into its base, or with --peft as an HF PEFT adapter folder.

    \b
    Examples:
      megallama convert megatron2hf --input-dir runs/sft --output-dir llama-2-7b-sft-hf
      megallama convert megatron2hf --input-dir runs/lora --output-dir lora-adapter --peft   (docs/peft-io.md)
    """
    if peft:
        from megallama.peft.hf_adapter import export_run
        report = export_run(input_dir, output_dir, base=_base_path(base), base_name=base, dtype=dtype, force=force)
        print_write_report("megatron2hf --peft", report)
        return
    _run(input_dir, output_dir, src_format="megatron", dst_format="hf", title="megatron2hf", dtype=dtype,
         force=force, layout=layout, model_config=model_config, revision=revision,
         checksums=not no_checksums, base=_base_path(base))

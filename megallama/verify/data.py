"""What verify layer-diff feeds both sides: validated inputs (`prepare` -> `Job`), the token batch, and the
reference model's captures.

Captured points (same names as `verify_worker.py` on the Megatron side), each [batch, seq, features]:
"embedding", "layers.{i}.attention" (o_proj / wo output, before the residual add), "layers.{i}.mlp" (down_proj /
w2 output), "layers.{i}" (the layer's output hidden states), "final_norm", "logits".
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megallama.engine.model import TORCH_DTYPES
from megallama.errors import InputError
from megallama.spec import ModelSpec, check_parallel

SHAPE_FIELDS = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "ffn_hidden_size", "vocab_size",
                "head_dim", "qkv_bias", "o_bias", "mlp_bias", "qk_norm")
NUMERIC_FIELDS = ("norm_eps", "rope_theta", "rope_scaling", "tie_embeddings", "sliding_window",
                  "sliding_window_layers")
MAX_CPU_RANKS = 64  # gloo on one host: beyond this a launch is thrashing, not verifying

# Fixed English text for when --data is absent: ordinary prose, so the loss means something on a real model.
SAMPLE_TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
    "movable metal type, oil-based ink and a wooden screw press into a system that could produce books quickly "
    "and cheaply. Before that time, most books in Europe were copied by hand, a slow process that kept them "
    "rare and expensive. Within fifty years, presses had spread to more than two hundred cities, and millions "
    "of copies of sermons, grammars, calendars and scientific treatises were in circulation. Scholars could "
    "compare the same text in distant libraries, errors could be corrected in the next edition, and ideas "
    "travelled faster than ever before. Historians still debate how much the press caused the changes that "
    "followed, but few doubt that it made them possible. "
)
RANDOM_SEED = 0
Encoder = Callable[[str], list[int]]


# ---------------------------------------------------------------- reference format
def reference_format(path: Path) -> str:
    """'hf' for a folder with config.json, 'meta' for params.json (directly or in its single sub-folder)."""
    from megallama.formats.base import require_folder

    path = require_folder(path, "reference folder")
    if (path / "config.json").is_file():
        return "hf"
    if (path / "params.json").is_file() or any((d / "params.json").is_file() for d in path.iterdir() if d.is_dir()):
        return "meta"
    raise InputError(f"{path} is neither an HF folder (config.json) nor a Meta pth folder (params.json)")


# ---------------------------------------------------------------- validated inputs
@dataclass
class Job:
    """One reference/Megatron pair, validated and ready to run."""

    reference: Path
    reference_format: str  # "hf" | "meta"
    megatron: Path
    spec: ModelSpec  # as the Megatron checkpoint records it (this is what the workers build)
    tp: int
    pp: int
    padded_vocab_size: int
    rotary_interleaved: bool  # of the model the workers build (False when they convert through canonical tensors)
    rank_files: list[str]  # index pp_rank * tp + tp_rank; for torch_dist the iteration folder, for every rank
    tokens: torch.Tensor  # [b, s]
    token_source: str
    notes: list[str] = field(default_factory=list)
    layout: str = "mcore-local"  # other layouts are converted to local-spec rank dicts by the workers
    ep: int = 1  # expert parallelism (MoE): tp * pp * ep processes, the experts split over ep data-parallel ranks
    engine_overrides: dict = field(default_factory=dict)  # build_gpt_model keywords (tests' negative controls)
    adapters: str | None = None  # a LoRA/DoRA run: the Megatron side applies its adapters to `megatron` (its base)
    reference_adapter: str | None = None  # an HF PEFT adapter folder peft applies to the HF reference
    model_config: str | None = None  # --model-config: the architecture the checkpoint's args lack (the forks)


def prepare(reference: Path, megatron: Path, *, data: Path | None = None, seq_len: int = 64,
            batch: int = 2, model_config: Path | None = None) -> Job:
    """Validate both folders and build the token batch; every problem here is an InputError (exit 2)."""
    from megallama.formats.base import read_manifest, require_folder
    from megallama.formats.megatron.local import LOCAL
    from megallama.formats.megatron.torch_format import load_rank_file, open_megatron

    reference, megatron = Path(reference), Path(megatron)
    if seq_len < 2 or batch < 1:
        raise InputError(f"--seq-len must be >= 2 and --batch >= 1 (got {seq_len}, {batch})")
    fmt = reference_format(reference)
    ref_spec = _reference_spec(reference, fmt)
    require_folder(megatron, "Megatron folder")
    from megallama.formats.megatron.torch_dist import find_iteration_dir, open_torch_dist

    dist_dir = find_iteration_dir(megatron)
    with (open_torch_dist if dist_dir else open_megatron)(megatron, model_config=model_config) as meg:
        spec, tp, pp, files, notes = meg.spec, meg.tp, meg.pp, [str(f) for f in meg.source_files], list(meg.notes)
        tp, pp = getattr(meg, "saved_tp", tp), getattr(meg, "saved_pp", pp)  # torch_dist: the split it was saved for
        layout, padded, interleaved = meg.layout.name, meg.padded_vocab_size, meg.rotary_interleaved
    manifest = read_manifest(megatron) or read_manifest(megatron.parent) or {}
    padded = manifest.get("padded_vocab_size") or padded
    if dist_dir is not None:
        # torch_dist loads at any TP x PP: run it at the one it was saved for (megallama.json or args);
        # every rank reads its own slices of the iteration folder with megatron-core's dist_checkpointing
        from megallama.formats.megatron.torch_dist import DistCheckpoint
        from megallama.spec import padded_vocab_size

        rows = DistCheckpoint(dist_dir).tensors["embedding.word_embeddings.weight"].size[0]
        padded = rows if rows % tp == 0 else padded_vocab_size(spec.vocab_size, tp)
        files = [str(dist_dir)] * (tp * pp)
    if not padded:
        padded = load_rank_file(Path(files[0]))["model"]["embedding.word_embeddings.weight"].shape[0] * tp
    if "vocab_size" not in manifest and spec.vocab_size == padded and ref_spec.vocab_size <= padded:
        # A Megatron-LM checkpoint without megallama.json may not know its true vocab (only the padded rows):
        # the reference's is the one to compare on.
        spec = spec.replace(vocab_size=ref_spec.vocab_size)
        notes = [n for n in notes if not n.startswith("true vocab unknown")]
        notes.append(f"checkpoint does not record its true vocab: comparing the reference's {spec.vocab_size} "
                     f"of {padded} logit columns")
    check_same_shapes(ref_spec, spec)
    ep = int(manifest.get("ep") or 1)
    check_launchable(spec, tp=tp, pp=pp, ep=ep)
    if seq_len > spec.max_position_embeddings:
        raise InputError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings "
                         f"{spec.max_position_embeddings}: pass --seq-len {spec.max_position_embeddings} or less")
    notes += spec_differences(ref_spec, spec)
    tokens, source = sample_tokens([megatron, reference], vocab_size=spec.vocab_size, data=data,
                                   seq_len=seq_len, batch=batch)
    if layout != LOCAL.name:
        notes.append(f"{layout} layout: the Megatron side loads it converted to the megatron-core local spec")
        interleaved = False  # the canonical tensors are in HF order
    return Job(reference, fmt, megatron, spec, tp, pp, int(padded), interleaved, files, tokens, source, notes,
               layout, ep, model_config=None if model_config is None else str(Path(model_config).resolve()))


def _reference_spec(path: Path, fmt: str) -> ModelSpec:
    """Open the reference lazily: its spec, and every tensor present with the shape its config implies."""
    from megallama.formats.base import check_complete

    if fmt == "hf":
        from megallama.formats.hf import open_hf as opener
    else:
        from megallama.formats.meta import open_meta as opener
    with opener(path) as reader:
        check_complete(reader)
        return reader.spec


def check_same_shapes(ref: ModelSpec, meg: ModelSpec) -> None:
    """The two sides must describe the same architecture; numeric settings (eps, theta) are left to the numbers."""
    wrong = [f"{k} {getattr(ref, k)} vs {getattr(meg, k)}" for k in SHAPE_FIELDS if getattr(ref, k) != getattr(meg, k)]
    if wrong:
        raise InputError(f"reference and Megatron checkpoint are different models: {'; '.join(wrong)} "
                         "(reference vs Megatron)")


def spec_differences(ref: ModelSpec, meg: ModelSpec) -> list[str]:
    """Settings that differ without changing shapes (formats.md P11-P13): reported as hints, judged by numbers."""
    return [f"{k} differs: reference {getattr(ref, k)}, Megatron {getattr(meg, k)}"
            for k in NUMERIC_FIELDS if getattr(ref, k) != getattr(meg, k)]


def check_launchable(spec: ModelSpec, *, tp: int, pp: int, ep: int = 1) -> None:
    """Refuse a TP x PP (x EP) world this host cannot run (one process per rank, one GPU per process on GPU)."""
    check_parallel(spec, tp=tp, pp=pp, ep=ep)
    world = tp * pp * ep
    if torch.cuda.is_available():
        gpus = torch.cuda.device_count()
        if world > gpus:
            raise InputError(f"checkpoint is split TP={tp} x PP={pp} = {world} ranks but this host has {gpus} GPUs: "
                             "verify runs on one node; reshard the checkpoint (megatron2pth, pth2megatron) to fit")
    elif world > MAX_CPU_RANKS:
        raise InputError(f"checkpoint is split into {world} ranks; on CPU verify runs at most {MAX_CPU_RANKS}")


# ---------------------------------------------------------------- tokens
def load_encoder(folders: list[Path]) -> tuple[Encoder, str] | None:
    """The first tokenizer found: SentencePiece tokenizer.model (BOS prepended), else tokenizer.json."""
    from megallama.formats.hf import load_sentencepiece

    for folder in folders:
        candidates = [folder / "tokenizer.model", folder.parent / "tokenizer.model"]
        for path in candidates:
            sp = load_sentencepiece(path) if path.is_file() else None
            if sp is not None:
                bos = [sp.bos_id()] if sp.bos_id() >= 0 else []
                return (lambda text, sp=sp, bos=bos: bos + sp.encode(text)), str(path)
        if (folder / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
            return (lambda text, tok=tok: tok.encode(text).ids), str(folder / "tokenizer.json")
    return None


def sample_tokens(folders: list[Path], *, vocab_size: int, data: Path | None, seq_len: int,
                  batch: int) -> tuple[torch.Tensor, str]:
    """A [batch, seq_len] token batch: --data (or the built-in sample) tokenized with the checkpoint's tokenizer,
    repeated when short; without any tokenizer, fixed ids from a seeded generator."""
    need = batch * seq_len
    found = load_encoder([Path(f) for f in folders])
    if found is None:
        if data is not None:
            raise InputError("--data needs a tokenizer, but neither folder has tokenizer.model or tokenizer.json")
        gen = torch.Generator().manual_seed(RANDOM_SEED)
        return torch.randint(0, vocab_size, (batch, seq_len), generator=gen), "random ids (no tokenizer found)"
    encode, tokenizer = found
    if data is None:
        text, source = SAMPLE_TEXT, f"built-in sample, {tokenizer}"
    else:
        text, source = read_text(Path(data), chars=max(need * 16, 1 << 16)), f"{data}, {tokenizer}"
    ids = encode(text)
    if not ids:
        raise InputError(f"{data} holds no text to tokenize")
    if max(ids) >= vocab_size:
        raise InputError(f"tokenizer {tokenizer} produced id {max(ids)} but the model's vocab is {vocab_size}: "
                         "the tokenizer does not belong to this checkpoint")
    ids = (ids * math.ceil(need / len(ids)))[:need]
    return torch.tensor(ids, dtype=torch.long).view(batch, seq_len), source


def read_text(path: Path, *, chars: int) -> str:
    """The first `chars` characters of a text file: a large corpus is not read whole."""
    if not path.is_file():
        raise InputError(f"--data file {path} does not exist")
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read(chars)
    if not text.strip():
        raise InputError(f"--data file {path} is empty")
    return text


# ---------------------------------------------------------------- reference models
def reference_device() -> torch.device:
    # The workers have exited by now, so the reference may use the first GPU whole.
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def _keep(captures: dict, name: str, tokens_shape: tuple | None = None):
    def hook(module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        if tokens_shape is not None:
            out = out.reshape(*tokens_shape, -1)  # [b * s, h] -> [b, s, h]
        captures[name] = out.detach().to("cpu")

    return hook


def hf_captures(path: Path, tokens: torch.Tensor, *, dtype: str,
                adapter: Path | None = None) -> dict[str, torch.Tensor]:
    """transformers' class of the model's family (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM,
    Qwen3ForCausalLM, Llama4ForCausalLM) with forward hooks on every compared module; with `adapter`, HF peft's
    LoRA/DoRA layers from that adapter folder injected (unmerged)."""
    import transformers
    from transformers.utils import logging as hf_logging

    from megallama.formats.hf import read_json
    from megallama.llama4 import hf_reference_class

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # the CLI owns the terminal
    try:
        model_class, text_only = hf_reference_class(path) or (None, None)  # Llama 4: its own class
        if model_class is None:
            spec = ModelSpec.from_hf_config(read_json(Path(path) / "config.json", "expected an HF folder"))
            model_class = getattr(transformers, spec.architecture)
        model = model_class.from_pretrained(path, dtype=TORCH_DTYPES[dtype], attn_implementation="eager")
        model = text_only(model) if text_only else model
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).base_model.model  # the LlamaForCausalLM, adapted
    model = model.to(reference_device()).eval()
    captures: dict[str, torch.Tensor] = {}
    inner = model.model
    hooks = [inner.embed_tokens.register_forward_hook(_keep(captures, "embedding")),
             inner.norm.register_forward_hook(_keep(captures, "final_norm"))]
    for i, layer in enumerate(inner.layers):
        mlp = getattr(layer, "mlp", None) or layer.feed_forward  # Llama 4: feed_forward (MoE returns [b*s, h])
        hooks += [layer.self_attn.register_forward_hook(_keep(captures, f"layers.{i}.attention")),
                  mlp.register_forward_hook(_keep(captures, f"layers.{i}.mlp", tokens.shape)),
                  layer.register_forward_hook(_keep(captures, f"layers.{i}"))]
    with torch.no_grad():
        out = model(input_ids=tokens.to(reference_device()), use_cache=False)
    captures["logits"] = out.logits.detach().to("cpu")
    for h in hooks:
        h.remove()
    return captures


def meta_captures(path: Path, tokens: torch.Tensor, *, dtype: str) -> dict[str, torch.Tensor]:
    """The project's Meta-style reference (interleaved complex rotary, as Meta's model.py)."""
    from megallama.verify.reference import MetaReference

    model = MetaReference.from_meta_dir(path, dtype=dtype).to(reference_device())
    captures: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        model(tokens.to(reference_device()), capture=captures)
    captures["final_norm"] = captures.pop("norm")
    return {k: v.detach().to("cpu") for k, v in captures.items()}

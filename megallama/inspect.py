"""`inspect`: what a checkpoint folder is (format, ckpt format, layout, TP x PP, iteration, dtype, model, vocab,
tokenizer, optimizer state), found from its files without reading tensor data (readers open lazily)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from megallama.errors import InputError
from megallama.spec import ModelSpec, padded_vocab_size

DIST_FILES = (".metadata", "common.pt", "metadata.json")  # a torch_dist iteration folder (formats.md addendum)
NOT_TOKENIZER = {"generation_config.json"}  # copied with the tokenizer files, but it is not one
DISTRIB_OPTIM_FILE = "distrib_optim.pt"  # the distributed optimizer's state beside a rank's model file


@dataclass
class Inspection:
    """Everything `megallama inspect` reports; None where the format does not have it."""

    path: str
    format: str  # hf | meta | megatron
    ckpt_format: str | None = None  # megatron: torch | torch_dist
    layout: str | None = None  # megatron: mcore-local | mcore-te | legacy | llama-fork | alibaba | mcore (torch_dist)
    tp: int | None = None
    pp: int | None = None
    shards: int | None = None  # meta: consolidated.NN.pth files
    iteration: int | str | None = None  # "release" or a number
    dtype: str | None = None
    spec: dict = field(default_factory=dict)
    num_parameters: int | None = None
    vocab_size: int | None = None  # true vocab
    padded_vocab_size: int | None = None
    tokenizer: list[str] = field(default_factory=list)  # tokenizer files in the folder
    tokenizer_type: str | None = None  # as Megatron-LM's --tokenizer-type would name it
    optimizer_state: bool = False
    notes: list[str] = field(default_factory=list)
    ep: int | None = None  # megatron, mixture of experts: the expert-parallel split it was saved for
    experts: str | None = None  # Llama 4: "16 routed (top-1, FFN 8192) + shared (FFN 8192)"
    moe_layers: str | None = None  # one letter per layer: E = experts, D = dense MLP
    rope_layers: str | None = None  # one letter per layer: R = rotary (chunked attention), N = NoPE
    peft: dict | None = None  # a LoRA/DoRA run: method, rank, alpha, dropout, targets, base, adapter_parameters
    unknown: list[str] = field(default_factory=list)  # spec fields the files do not give (args-less forks): None

    def to_json(self) -> dict:
        return asdict(self)


def inspect_checkpoint(path: Path, *, layout: str | None = None, model_config: Path | None = None) -> Inspection:
    """Place `path` as an HF, Meta or Megatron (torch / torch_dist) checkpoint; InputError if it is none.
    `layout` forces a Megatron torch-format layout instead of detecting it; `model_config` (--model-config) gives
    the architecture a Megatron checkpoint's args lack. Without it such a checkpoint is described from its
    tensor shapes, the rest listed in `unknown`."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{path} is not a folder")
    # Megatron first: the forks' folders also hold the config.json / params.json their args lack
    dist = _torch_dist_dir(path)
    if dist is not None:
        return _with_peft(_torch_dist(path, dist, model_config), dist)
    if (path / "latest_checkpointed_iteration.txt").is_file() or any(d.name.startswith("mp_rank_")
                                                                      for d in _subdirs(path)):
        return _megatron(path, layout, model_config)
    if (path / "config.json").is_file():
        return _hf(path)
    if (path / "params.json").is_file() or any((d / "params.json").is_file() for d in _subdirs(path)):
        return _meta(path)
    found = ", ".join(sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())[:12]) or "nothing"
    raise InputError(f"{path} is no checkpoint megallama knows (HF config.json, Meta params.json, Megatron "
                     f"latest_checkpointed_iteration.txt + mp_rank_*/ or torch_dist .metadata); found: {found}")


def _subdirs(path: Path) -> list[Path]:
    return [d for d in path.iterdir() if d.is_dir()]


def _base(path: Path, fmt: str, spec: ModelSpec, tokenizer_files) -> Inspection:
    from megallama.formats.megatron.torch_format import detect_tokenizer

    files = [Path(f) for f in tokenizer_files if Path(f).name not in NOT_TOKENIZER]
    report = Inspection(path=str(path), format=fmt, dtype=spec.dtype, spec=spec.to_dict(),
                        num_parameters=spec.num_parameters(), vocab_size=spec.vocab_size,
                        tokenizer=[f.name for f in files], tokenizer_type=detect_tokenizer(files, path)[0])
    if spec.is_moe:
        from megallama.llama4 import moe_pattern, rope_pattern

        report.experts = (f"{spec.num_experts} routed (top-{spec.moe_top_k}, FFN {spec.moe_ffn_hidden_size})"
                          + (f" + shared (FFN {spec.shared_expert_ffn_hidden_size})"
                             if spec.shared_expert_ffn_hidden_size else ""))
        report.moe_layers, report.rope_layers = moe_pattern(spec), rope_pattern(spec)
    return report


def _hf(path: Path) -> Inspection:
    from megallama.formats.hf import open_hf

    with open_hf(path) as r:
        report = _base(path, "hf", r.spec, r.tokenizer_files)
        report.notes = list(getattr(r, "notes", []))  # Llama 4 multimodal: the vision tower is not converted
        return report


def _meta(path: Path) -> Inspection:
    from megallama.formats.meta import open_meta

    with open_meta(path) as r:
        report = _base(path, "meta", r.spec, r.tokenizer_files)
        report.shards = len(r.source_files)
    return report


def _megatron(path: Path, layout: str | None, model_config: Path | None = None) -> Inspection:
    from megallama.errors import ArchitectureUnknown
    from megallama.formats.megatron.torch_format import open_megatron

    try:
        reader = open_megatron(path, layout=layout, model_config=model_config)
    except ArchitectureUnknown:
        return _megatron_from_shapes(path, layout)
    with reader as r:
        report = _base(path, "megatron", r.spec, r.tokenizer_files)
        report.ckpt_format, report.layout, report.tp, report.pp = "torch", r.layout.name, r.tp, r.pp
        report.ep = r.ep if r.spec.is_moe else None
        report.padded_vocab_size, report.notes = r.padded_vocab_size, list(r.notes)
        first = r.source_files[0]
    return _saved_state(report, first)


def _saved_state(report: Inspection, first: Path) -> Inspection:
    """The iteration and whether optimizer state was saved, from the first rank's file."""
    from megallama.formats.megatron.torch_format import load_rank_file

    it_dir = first.parent.parent
    report.iteration = "release" if it_dir.name == "release" else int(it_dir.name.removeprefix("iter_"))
    ckpt = load_rank_file(first)
    optimizer = ckpt.get("optimizer") if isinstance(ckpt, dict) else None
    # a real optimizer state dict has per-parameter "state"; alibaba's converter stores a dummy without it
    report.optimizer_state = (isinstance(optimizer, dict) and bool(optimizer.get("state") or
                                                                    optimizer.get("optimizer"))
                              or (first.parent / DISTRIB_OPTIM_FILE).is_file()
                              or any(it_dir.glob("mp_rank_*/optim.pt")))
    return report


# What an args-less checkpoint's tensors cannot say; `inspect` shows them as unknown (args may still give some).
SHAPE_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_heads", "num_kv_heads", "vocab_size",
                "norm_eps", "rope_theta", "max_position_embeddings", "tie_embeddings")


def _megatron_from_shapes(path: Path, layout: str | None) -> Inspection:
    """A torch-format checkpoint whose args lack the architecture (the fork's `args: None`, alibaba's partial
    args), described from its tensor shapes and whatever its args and tokenizer give; the rest is unknown."""
    from megallama.formats.base import TOKENIZER_FILES
    from megallama.formats.megatron.args import tokenizer_vocab
    from megallama.formats.megatron.rules import Kind
    from megallama.formats.megatron.torch_format import detect_tokenizer, read_ranks

    ranks = read_ranks(path, layout=layout)
    a = vars(ranks.args) if ranks.args is not None and hasattr(ranks.args, "__dict__") else {}
    rules, tp = ranks.layout.layer_rules, ranks.tp
    qkv = next(r for r in rules if r.kind in (Kind.QKV, Kind.QKV_BLOCKS) and r.target.endswith(".weight"))
    fc1 = next(r for r in rules if r.kind is Kind.GATE_UP and r.target.endswith(".weight"))
    first = ranks.stages[0]
    hidden = int(ranks.embedding.shape[1])
    heads, groups = a.get("num_attention_heads"), None
    if heads:  # fused q, k, v rows = (heads + 2 groups) x head_dim (alibaba's args do not say GQA)
        head_dim = a.get("kv_channels") or hidden // heads
        groups = (int(first[qkv.target.format(j=0)].shape[0]) * tp // head_dim - heads) // 2
    output, last = ranks.layout.output.target, ranks.stages[-1]
    # no output layer: tied; at PP > 1 a tied model's last stage holds a copy of the embedding
    tied = output not in last or (ranks.pp > 1 and _same(last[output], ranks.embedding))
    facts = {
        "num_layers": sum(_count_layers(stage, qkv.target) for stage in ranks.stages),
        "hidden_size": hidden,
        "ffn_hidden_size": int(first[fc1.target.format(j=0)].shape[0]) * tp // 2,
        "num_heads": heads, "num_kv_heads": groups,
        "vocab_size": a.get("orig_vocab_size") or a.get("vocab_size") or tokenizer_vocab(ranks.root),
        "norm_eps": a.get("norm_epsilon", a.get("layernorm_epsilon")), "rope_theta": a.get("rotary_base"),
        "max_position_embeddings": a.get("max_position_embeddings"), "tie_embeddings": tied,
    }
    files = [ranks.root / n for n in TOKENIZER_FILES
             if (ranks.root / n).is_file() and n not in NOT_TOKENIZER]
    unknown = [k for k in SHAPE_FIELDS if facts[k] is None] + ["num_parameters"]
    report = Inspection(path=str(path), format="megatron", ckpt_format="torch", layout=ranks.layout.name,
                        tp=tp, pp=ranks.pp, dtype=ranks.dtype, spec=facts, vocab_size=facts["vocab_size"],
                        padded_vocab_size=ranks.padded_vocab_size, tokenizer=[f.name for f in files],
                        tokenizer_type=detect_tokenizer(files, path)[0], unknown=unknown)
    report.notes = [f"the checkpoint's args do not give {', '.join(unknown)}: shown as unknown; pass the model's "
                    "config.json (HF) or params.json (Meta) as --model-config PATH to know them"]
    return _saved_state(report, ranks.files[0, 0, 0])


def _count_layers(stage: dict, qkv_target: str) -> int:
    """Layers of one pipeline stage: stage-local indices 0, 1, ... that have a fused QKV weight."""
    n = 0
    while qkv_target.format(j=n) in stage:
        n += 1
    return n


def _same(a, b) -> bool:
    import torch

    return a.shape == b.shape and bool(torch.equal(a, b))


def _torch_dist_dir(path: Path) -> Path | None:
    """The torch_dist iteration folder under `path` (tracker-named), or `path` itself when it is one."""
    if any((path / f).is_file() for f in DIST_FILES) or any(path.glob("*.distcp")):
        return path
    tracker = path / "latest_checkpointed_iteration.txt"
    if tracker.is_file():
        text = tracker.read_text(encoding="utf-8", errors="replace").strip()  # a binary file: not torch_dist
        it_dir = path / ("release" if text == "release" else f"iter_{int(text):07d}"
                         if text.isascii() and text.isdigit() else text)
        if it_dir.is_dir() and ((it_dir / ".metadata").is_file() or any(it_dir.glob("*.distcp"))):
            return it_dir
    return None


def _torch_dist(path: Path, it_dir: Path, model_config: Path | None = None) -> Inspection:
    """torch_dist: the architecture from common.pt's args, tensor dtype and sizes from the DCP `.metadata`."""
    from megallama.formats.megatron.args import spec_from_args
    from megallama.formats.megatron.torch_format import load_rank_file

    if not (it_dir / "common.pt").is_file():
        raise InputError(f"{it_dir} looks like torch_dist (.metadata / *.distcp) but has no common.pt")
    common = load_rank_file(it_dir / "common.pt")
    args = common.get("args") if isinstance(common, dict) else None
    tensors = _dcp_tensors(it_dir)
    embed = tensors.get("embedding.word_embeddings.weight")
    padded = embed[0][0] if embed else getattr(args, "padded_vocab_size", None)
    dtype = embed[1] if embed else "float32"
    notes: list[str] = []
    from megallama.formats.base import read_manifest

    manifest = read_manifest(path) or {}
    if manifest.get("format") == "megatron" and manifest.get("spec"):  # megallama's: the exact spec (Llama 4 too)
        spec = ModelSpec.from_dict({**manifest["spec"], "dtype": dtype})
    elif model_config is not None:
        from megallama.formats.megatron.args import spec_from_config_file

        spec = spec_from_config_file(path, dtype, model_config)
        notes.append(f"architecture from --model-config {model_config}")
    else:
        spec = spec_from_args(args, padded_vocab_size=padded or 0, dtype=dtype, notes=notes)
    from megallama.formats.base import TOKENIZER_FILES

    report = _base(path, "megatron", spec, [path / n for n in TOKENIZER_FILES if (path / n).is_file()])
    report.ckpt_format, report.layout = "torch_dist", "mcore"
    report.tp = getattr(args, "tensor_model_parallel_size", None)
    report.pp = getattr(args, "pipeline_model_parallel_size", None)
    report.ep = getattr(args, "expert_model_parallel_size", None) if spec.is_moe else None
    report.iteration = "release" if it_dir.name == "release" else common.get("iteration")
    report.padded_vocab_size = padded or padded_vocab_size(spec.vocab_size, report.tp or 1)
    report.optimizer_state = any(k.startswith("optimizer.") for k in tensors)
    report.notes = notes + ["torch_dist holds global tensors: any TP x PP can load it; tp/pp are the saving run's"]
    return report


def _dcp_tensors(it_dir: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """{key: (global shape, dtype)} from a PyTorch Distributed Checkpoint's `.metadata` (no tensor data read)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from megallama.formats.safe_pickle import read_dcp_metadata
    from megallama.spec import normalize_dtype

    metadata = read_dcp_metadata(it_dir / ".metadata")  # restricted unpickler: nothing in it runs
    return {k: (tuple(m.size), normalize_dtype(str(m.properties.dtype)))
            for k, m in metadata.state_dict_metadata.items() if isinstance(m, TensorStorageMetadata)}


def _with_peft(report: Inspection, it_dir: Path) -> Inspection:
    """A LoRA/DoRA run (peft.json): its record, and the adapters' parameter count from the DCP metadata."""
    from megallama.peft.store import is_peft_run, read_record, run_root

    if not is_peft_run(it_dir):
        return report
    record = read_record(it_dir if (it_dir / "peft.json").is_file() else run_root(it_dir))
    sizes = [shape for key, (shape, _) in _dcp_tensors(it_dir).items()
             if key.startswith("decoder.layers.") and ".adapter." in key]
    count = 0
    for shape in sizes:
        n = 1
        for d in shape:
            n *= d
        count += n
    report.peft = {**record.to_json(), "adapter_parameters": count}
    report.notes.append(f"{record.method} run: the checkpoint holds only adapters (rank {record.rank}, "
                        f"{count:,} parameters) and their optimizer state; the base is {record.base_path}")
    return report

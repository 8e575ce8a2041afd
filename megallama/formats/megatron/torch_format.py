"""Megatron torch-format checkpoints: writer (megatron-core local or TE spec) and reader (every layout).

Layout (formats.md 3.1, 3.2, 4.1-4.4): `latest_checkpointed_iteration.txt` ("release" or an iteration),
`release/` or `iter_NNNNNNN/`, one `mp_rank_TT` (PP=1) or `mp_rank_TT_PPP` folder per rank holding
`model_optim_rng.pt` = {args, checkpoint_version 3.0, iteration, model}. Which canonical tensors make which key,
and how each is split, is the layout's rule table (`local.py`, `te.py`, `legacy.py`, `llama_fork.py`,
`alibaba.py`; `detect.py` picks one from the keys); this module only does files and metadata.

Both directions stream: the writer lays out the rank files of a stage first and fills them in from one read of
each tensor (`streaming.py`); the reader maps the rank files of one layer at a time and drops them before the
next. Memory stays near one whole tensor plus its rank pieces, whatever the model size.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import pickle
import re
import types
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PosixPath

import numpy as np
import torch

from megallama.errors import ArchitectureUnknown, InputError
from megallama.formats.base import (
    MANIFEST,
    TOKENIZER_FILES,
    TORCH_DTYPES,
    ContextReader,
    OnTensor,
    Reader,
    WriteReport,
    cast,
    copy_tokenizer,
    read_manifest,
    write_manifest,
)
from megallama.formats.megatron.args import (
    TRANSFORMER_IMPLS,
    args_describe_model,
    launch_flags,
    megatron_args,
    spec_from_args,
    spec_from_config_file,
    tokenizer_vocab,
)
from megallama.formats.megatron.detect import WRITABLE, detect_layout, layout_named
from megallama.formats.megatron.local import LOCAL
from megallama.formats.megatron.moe import moe_args
from megallama.formats.megatron.row_trace import canonical_raw, rank_raw
from megallama.formats.megatron.rules import Kind, Layout, Rule, from_ranks, rank_shape, stage_rules, to_rank
from megallama.formats.rawcopy import RawChain, RawRange, raw_tensor, read_column_blocks
from megallama.formats.streaming import StreamedFiles
from megallama.names import canonical_names, expected_shapes
from megallama.spec import LLAMA3_ROPE_DEFAULTS, ModelSpec, check_parallel, normalize_dtype, padded_vocab_size
from megallama.transforms import meta_to_hf_rotary

TRACKER = "latest_checkpointed_iteration.txt"
MODEL_FILE = "model_optim_rng.pt"
FORK_MODEL_FILE = "model_rng.pt"  # 2023-era forks with --use-distributed-optimizer (optimizer in mp_rank_*_DDD/)
ARGS_FILE = "megatron_args.txt"
CHECKPOINT_VERSION = 3.0  # < 2.0 makes Megatron silently re-order linear_qkv rows (formats.md P4)
# `_extra_state` (FP8 metadata, never unpickled) and rotary inverse frequencies some forks save as buffers
# (formats.md P14): derived from the config, nothing to convert.
IGNORED_SUFFIXES = ("_extra_state", "rotary_emb.inv_freq")
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")  # TT[_PPP if PP > 1][_EEE if EP > 1]
# `args`, plus what the RNG state of an sft / Megatron-LM checkpoint holds (numpy's MT19937 state array), plus
# BytesIO (older Transformer Engine `_extra_state`, never unpickled further); everything else in these files is
# tensors, numbers, strings and torch.dtype.
_NP_CORE = np._core if hasattr(np, "_core") else np.core  # numpy 2 renamed numpy.core
_SAFE_GLOBALS = [argparse.Namespace, types.SimpleNamespace, PosixPath, _NP_CORE.multiarray._reconstruct, np.ndarray,
                 np.dtype, type(np.dtype(np.uint32)), io.BytesIO]


# ---------------------------------------------------------------- paths
def iteration_dir(root: Path, iteration: int | None) -> Path:
    """`release/` for None, else `iter_NNNNNNN/`."""
    return Path(root) / ("release" if iteration is None else f"iter_{iteration:07d}")


def checkpoint_dir(root: Path, iteration: int | None, tp_rank: int, pp_rank: int, pp: int, ep_rank: int = 0,
                   ep: int = 1) -> Path:
    """The folder of one rank: `mp_rank_TT` when PP=1, else `mp_rank_TT_PPP`, plus `_EEE` with expert parallelism
    (Megatron-LM's get_checkpoint_name appends the expert rank when EP > 1)."""
    name = f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
    return iteration_dir(root, iteration) / (name + (f"_{ep_rank:03d}" if ep > 1 else ""))


def write_tracker(root: Path, iteration: int | None) -> None:
    """Written last: Megatron (and our reader) treat a folder without it as no checkpoint at all."""
    (Path(root) / TRACKER).write_text("release" if iteration is None else str(iteration))


def detect_tokenizer(files: list[Path], final_dir: Path) -> tuple[str | None, str | None]:
    """(Megatron --tokenizer-type, --tokenizer-model) for the tokenizer files copied into the output."""
    by_name = {f.name: f for f in files}
    model = by_name.get("tokenizer.model")
    # Llama 3's Meta tokenizer.model is tiktoken text ("<base64> <rank>" lines), not a SentencePiece protobuf.
    tiktoken = model is not None and re.match(rb"^[A-Za-z0-9+/=]+ \d+\r?\n", model.read_bytes()[:256]) is not None
    if model is not None and not tiktoken:
        return "Llama2Tokenizer", str(final_dir / "tokenizer.model")
    if "tokenizer.json" in by_name:
        return "HuggingFaceTokenizer", str(final_dir)
    if model is not None:
        return "TikTokenizer", str(final_dir / "tokenizer.model")
    return None, None


NULL_TOKENIZER = "NullTokenizer"  # Megatron-LM's tokenizer of ids only: vocab_size ids, then one eod id


def args_tokenizer(files: list[Path], final_dir: Path, *, vocab_size: int, padded: int, tp: int,
                   divisible_by: int) -> tuple[str | None, str | None]:
    """The (tokenizer_type, tokenizer_model) a written checkpoint's args record.

    The tokenizer files copied into the output when there are any. Without them Megatron-LM's tools/checkpoint
    refuses `tokenizer_type = None`, so the args record NullTokenizer with the true vocab, which is what such a
    checkpoint has: ids 0..V-1 and no text. NullTokenizer adds an eod id (V), so Megatron-LM pads V + 1; only
    where that gives the same padded rows is the record true. Otherwise nothing is recorded (a write note says
    why, `tokenizer_note`)."""
    kind, model = detect_tokenizer(files, final_dir)
    if kind is None and padded_vocab_size(vocab_size + 1, tp, divisible_by) == padded:
        return NULL_TOKENIZER, None
    return kind, model


def tokenizer_note(tokenizer_type: str | None, *, vocab_size: int, padded: int, tp: int,
                   divisible_by: int) -> str | None:
    """The write note for a checkpoint written without tokenizer files."""
    if tokenizer_type == NULL_TOKENIZER:
        return (f"no tokenizer in the input: the args record --tokenizer-type {NULL_TOKENIZER} --vocab-size "
                f"{vocab_size} (ids only; Megatron-LM's tools/checkpoint needs a type); train with the real one")
    if tokenizer_type is None:
        null = padded_vocab_size(vocab_size + 1, tp, divisible_by)
        return (f"no tokenizer in the input, and no tokenizer type recorded: {NULL_TOKENIZER} (vocab {vocab_size} "
                f"+ eod) would pad to {null} rows, not {padded}, so Megatron-LM's tools/checkpoint will refuse "
                "this checkpoint; put the model's tokenizer files in the input folder")
    return None


# ---------------------------------------------------------------- writer
def rank_tensors(source: Reader | Callable[[str], torch.Tensor], spec: ModelSpec, *, tp_rank: int, tp: int,
                 pp_rank: int, pp: int, padded_vocab_size: int, dtype: str | None = None,
                 layout: Layout = LOCAL, ep_rank: int = 0, ep: int = 1) -> Iterator[tuple[str, torch.Tensor | None]]:
    """One rank's `(key, tensor)` pairs, keyed and ordered exactly like megatron-core's `GPTModel.state_dict()`.

    `source` is a Reader or any `name -> canonical tensor` function. Each tensor is fresh and rank-sized (never a
    view of a whole tensor, which torch.save would store in full); `_extra_state` entries are what a fresh model
    of `layout` saves (`Layout.extra_state_value`).
    """
    get = source.get if hasattr(source, "get") else source
    for rule, _ in stage_rules(layout, spec, pp_rank=pp_rank, pp=pp, ep_rank=ep_rank, ep=ep):
        if rule.sources:
            tensors = [get(name) for name in rule.sources]
            piece = to_rank(rule.kind, tensors, spec, tp_rank=tp_rank, tp=tp, padded_vocab_size=padded_vocab_size)
            del tensors
            yield rule.target, cast(piece, dtype)
        if rule.extra_state:
            yield rule.extra_state_key, layout.extra_state_value(rule.extra_state_key)


def rank_state_dict(source: Reader | Callable[[str], torch.Tensor], spec: ModelSpec, *, tp_rank: int, tp: int,
                    pp_rank: int, pp: int, padded_vocab_size: int, dtype: str | None = None,
                    layout: Layout = LOCAL, ep_rank: int = 0, ep: int = 1) -> dict:
    """The `model` dict of one rank, in memory (for `sft`, verify and tests; the writer streams instead)."""
    return dict(rank_tensors(source, spec, tp_rank=tp_rank, tp=tp, pp_rank=pp_rank, pp=pp,
                             padded_vocab_size=padded_vocab_size, dtype=dtype, layout=layout, ep_rank=ep_rank, ep=ep))


def rank_placeholders(spec: ModelSpec, *, tp: int, pp_rank: int, pp: int, padded_vocab_size: int,
                      layout: Layout = LOCAL, ep_rank: int = 0, ep: int = 1) -> dict:
    """One rank's keys with untouched `torch.empty` tensors of their final shape and dtype (never resident)."""
    shapes, dtype = expected_shapes(spec), TORCH_DTYPES[spec.dtype]
    out: dict = {}
    for rule, _ in stage_rules(layout, spec, pp_rank=pp_rank, pp=pp, ep_rank=ep_rank, ep=ep):
        if rule.sources:
            shape = rank_shape(rule.kind, spec, shapes[rule.sources[0]], tp=tp, padded_vocab_size=padded_vocab_size)
            out[rule.target] = torch.empty(shape, dtype=dtype)
        if rule.extra_state:
            out[rule.extra_state_key] = layout.extra_state_value(rule.extra_state_key)
    return out


def checkpoint_dict(model: dict, args: argparse.Namespace, iteration: int | None) -> dict:
    """The top-level dict of `model_optim_rng.pt` (formats.md 3.2); no optimizer or RNG state."""
    return {"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration or 0, "model": model}


def save_rank_file(path: Path, source: Reader | Callable[[str], torch.Tensor], spec: ModelSpec,
                   args: argparse.Namespace, *, tp_rank: int, tp: int, pp_rank: int, pp: int, padded_vocab_size: int,
                   iteration: int | None = None, on_tensor: OnTensor | None = None, layout: Layout = LOCAL) -> None:
    """Write one rank's `model_optim_rng.pt` without ever holding the whole rank in memory (`streaming.py`)."""
    save_stage_files({tp_rank: path}, source, spec, args, tp=tp, pp_rank=pp_rank, pp=pp,
                     padded_vocab_size=padded_vocab_size, iteration=iteration, on_tensor=on_tensor, layout=layout)


def save_stage_files(paths: dict[int, Path], source: Reader | Callable[[str], torch.Tensor], spec: ModelSpec,
                     args: argparse.Namespace, *, tp: int, pp_rank: int, pp: int, padded_vocab_size: int,
                     iteration: int | None = None, on_tensor: OnTensor | None = None,
                     layout: Layout = LOCAL, ep_rank: int = 0, ep: int = 1) -> None:
    """Write the rank files `paths` ({tp_rank: path}) of one pipeline stage (and expert rank) side by side.

    Each canonical tensor is read once and split for every rank in `paths`; the pieces are written by
    `StreamedFiles`' threads while the next tensor is read, so memory holds about one tensor and its pieces.
    """
    with StreamedFiles(on_tensor=on_tensor) as files:
        skeletons = {t: checkpoint_dict(rank_placeholders(spec, tp=tp, pp_rank=pp_rank, pp=pp,
                                                          padded_vocab_size=padded_vocab_size, layout=layout,
                                                          ep_rank=ep_rank, ep=ep),
                                        args, iteration) for t in paths}
        targets = {t: files.add(paths[t], skeletons.pop(t), flat=lambda ckpt: ckpt["model"]) for t in paths}
        for rule, _ in stage_rules(layout, spec, pp_rank=pp_rank, pp=pp, ep_rank=ep_rank, ep=ep):
            if rule.sources:
                for tp_rank, piece in rank_pieces(source, rule, spec, ranks=list(targets), tp=tp,
                                                  padded_vocab_size=padded_vocab_size):
                    if isinstance(piece, (RawRange, RawChain)):
                        files.put_raw(targets[tp_rank], rule.target, piece)
                    else:
                        files.put(targets[tp_rank], rule.target, piece)
                    del piece
            extra = layout.extra_state_value(rule.extra_state_key) if rule.extra_state else None
            if torch.is_tensor(extra):  # TE's (empty) uint8 extra state is a tensor slot like any other
                for target in targets.values():
                    files.put(target, rule.extra_state_key, extra)


def rank_pieces(source: Reader | Callable[[str], torch.Tensor], rule: Rule, spec: ModelSpec, *, ranks: list[int],
                tp: int, padded_vocab_size: int) -> Iterator[tuple[int, torch.Tensor | RawRange | RawChain]]:
    """(tp_rank, piece) of a bound rule with sources, for each of `ranks`. When the sources' bytes lie as they are
    in their files (rawcopy.py), a piece is where its bytes lie (fused QKV and gate/up rows, vocab rows, norms:
    `row_trace.py`) or, for a dim-1 split, the rank's columns read straight into a tensor of their own; else it
    is made from the canonical tensors (`to_rank`), read once for all ranks."""
    get = source.get if hasattr(source, "get") else source
    raws = source_raws(source, rule.sources, spec.dtype)
    if raws and rule.kind is Kind.ROW and isinstance(raws[0], RawRange) and len(raws[0].shape) == 2:
        blocks = read_column_blocks(raws[0], tp)
        for tp_rank in ranks:
            yield tp_rank, blocks[tp_rank]
        return
    tensors = None
    for tp_rank in ranks:
        raw = raws and rank_raw(rule.kind, raws, spec, tp_rank=tp_rank, tp=tp, padded_vocab_size=padded_vocab_size)
        if raw:
            yield tp_rank, raw
            continue
        tensors = tensors or [get(name) for name in rule.sources]
        piece = to_rank(rule.kind, tensors, spec, tp_rank=tp_rank, tp=tp, padded_vocab_size=padded_vocab_size)
        yield tp_rank, cast(piece, spec.dtype)


def source_raws(source, names: tuple[str, ...], dtype: str) -> list[RawRange] | None:
    """Where each of `names` lies in `source`'s files as `dtype` bytes (rawcopy.py); None unless all do."""
    raws = [raw_tensor(source, name, dtype) for name in names]
    return None if any(r is None for r in raws) else raws


def write_megatron(reader: Reader, out_dir: Path, *, tp: int, pp: int, dtype: str | None = None,
                   divisible_by: int = 128, on_tensor: OnTensor | None = None, iteration: int | None = None,
                   args_overrides: dict | None = None, final_dir: Path | None = None,
                   transformer_impl: str = "local", ep: int = 1) -> WriteReport:
    """Write `reader`'s model as a megatron-core torch checkpoint split for TP x PP into the empty `out_dir`.

    `transformer_impl` is Megatron-LM's `--transformer-impl` the checkpoint is for: "local" (local spec keys) or
    "transformer_engine" (TE spec keys). `final_dir` is where `out_dir` will be renamed to (for the absolute
    paths in megatron_args.txt).

    Example:
        >>> with open_meta(Path("llama-2-7b")) as r:
        ...     write_megatron(r, Path("out"), tp=2, pp=2)
    """
    if transformer_impl not in TRANSFORMER_IMPLS:
        raise InputError(f"--transformer-impl {transformer_impl!r}: expected one of {', '.join(TRANSFORMER_IMPLS)}")
    layout = WRITABLE[transformer_impl]
    check_parallel(reader.spec, tp=tp, pp=pp, ep=ep)
    out_dir = Path(out_dir)
    final_dir = Path(final_dir or _staged_target(out_dir)).resolve()
    spec = reader.spec.replace(dtype=normalize_dtype(dtype) or reader.spec.dtype)
    padded = padded_vocab_size(spec.vocab_size, tp, divisible_by)
    report = WriteReport(output=out_dir)
    tokenizer_type, tokenizer_model = args_tokenizer(reader.tokenizer_files, final_dir, vocab_size=spec.vocab_size,
                                                     padded=padded, tp=tp, divisible_by=divisible_by)
    args = megatron_args(spec, tp=tp, pp=pp, padded_vocab_size=padded, divisible_by=divisible_by,
                         iteration=iteration or 0, tokenizer_type=tokenizer_type, tokenizer_model=tokenizer_model,
                         transformer_impl=transformer_impl,
                         **{"no_save_optim": True, "no_save_rng": True, **moe_args(spec, ep=ep),
                            **(args_overrides or {})})
    for pp_rank in range(pp):
        for ep_rank in range(ep):  # each expert rank's files hold the shared tensors and its own experts
            paths = {t: checkpoint_dir(out_dir, iteration, t, pp_rank, pp, ep_rank, ep) / MODEL_FILE
                     for t in range(tp)}
            save_stage_files(paths, reader, spec, args, tp=tp, pp_rank=pp_rank, pp=pp, padded_vocab_size=padded,
                             iteration=iteration, on_tensor=on_tensor, layout=layout, ep_rank=ep_rank, ep=ep)
            report.files += [str(p.relative_to(out_dir)) for p in paths.values()]
    report.files += copy_tokenizer(reader.tokenizer_files, out_dir)
    write_manifest(out_dir, spec=spec, fmt="megatron", sources=reader.source_files, tp=tp, pp=pp, ep=ep,
                   vocab_size=spec.vocab_size, padded_vocab_size=padded, divisible_by=divisible_by,
                   rotary_interleaved=False, transformer_impl=transformer_impl, layout=layout.name,
                   iteration="release" if iteration is None else iteration)
    (out_dir / ARGS_FILE).write_text("\n".join(launch_flags(args, load_dir=final_dir)) + "\n")
    report.files += [MANIFEST, ARGS_FILE, TRACKER]
    report.notes += _notes(spec, padded, tokenizer_type, tp=tp, divisible_by=divisible_by)
    write_tracker(out_dir, iteration)
    return report


def _staged_target(out_dir: Path) -> Path:
    # convert() stages into `.NAME.tmp-PID` beside the target (base.staged_output) and renames it on success.
    m = re.fullmatch(r"\.(.+)\.tmp-\d+", out_dir.name)
    return out_dir.parent / m.group(1) if m else out_dir


def _notes(spec: ModelSpec, padded: int, tokenizer_type: str | None, *, tp: int, divisible_by: int) -> list[str]:
    notes = [f"vocab {spec.vocab_size} padded to {padded} with zero rows"] if padded != spec.vocab_size else []
    if spec.rope_scaling:
        fixed = {k: spec.rope_scaling.get(k) for k in LLAMA3_ROPE_DEFAULTS
                 if k != "factor" and spec.rope_scaling.get(k) != LLAMA3_ROPE_DEFAULTS[k]}
        if fixed:
            notes.append(f"rope scaling {fixed} differs from megatron-core's hard-coded llama3 values")
    note = tokenizer_note(tokenizer_type, vocab_size=spec.vocab_size, padded=padded, tp=tp, divisible_by=divisible_by)
    return notes + ([note] if note else [])


# ---------------------------------------------------------------- reader
class MegatronReader(ContextReader):
    """A canonical Reader over a TP x PP grid of rank `model` dicts (files, or dicts already in memory).

    `load_state(tp_rank, pp_rank)` returns one rank's flat `model` dict keyed as `layout`'s table. Tensors of one
    layer are merged from all TP ranks of its stage; the loaded dicts are dropped when the next layer is
    requested (mmap'd files then unmap).
    """

    def __init__(self, spec: ModelSpec, *, tp: int, pp: int, load_state: Callable[[int, int], dict],
                 rotary_interleaved: bool | None = None, layout: Layout = LOCAL, ep: int = 1):
        self.spec, self.tp, self.pp, self.layout, self.ep = spec, tp, pp, layout, ep
        self.tokenizer_files: list[Path] = []
        self.source_files: list[Path] = []
        self.notes: list[str] = []
        self.padded_vocab_size: int | None = None
        self.rotary_interleaved = layout.rotary_interleaved if rotary_interleaved is None else rotary_interleaved
        self._load_state = load_state
        self._index: dict[str, tuple[Rule, int, int | None, int]] = {}
        for pp_rank in range(pp):
            for ep_rank in range(ep):  # EP > 1: an expert is read from its own rank's files, the rest from rank 0's
                for rule, layer in stage_rules(layout, spec, pp_rank=pp_rank, pp=pp, ep_rank=ep_rank, ep=ep):
                    for name in rule.sources:  # tied, PP>1: the embedding comes from stage 0, not the output copy
                        self._index.setdefault(name, (rule, pp_rank, layer, ep_rank))
        self._loaded: dict[int, dict] = {}
        self._loaded_key: tuple | None = None
        self._pending: dict[str, torch.Tensor] = {}  # siblings of the last merged rule (k, v after q)
        # where a rule's TP=1 tensor lies in the files, by native key (torch_dist sets it; rawcopy.py)
        self.raw_part: Callable[[str], RawRange | RawChain | None] | None = None

    def names(self) -> list[str]:
        return canonical_names(self.spec)

    def get(self, name: str) -> torch.Tensor:
        if name in self._pending:
            return self._pending.pop(name)
        if name not in self._index:
            raise KeyError(name)
        rule, pp_rank, layer, ep_rank = self._index[name]
        parts = [self._state(t, pp_rank, layer, ep_rank)[rule.target] for t in range(self.tp)]
        tensors = dict(zip(rule.sources, from_ranks(rule.kind, parts, self.spec, vocab_size=self.spec.vocab_size),
                           strict=True))
        del parts
        if self.rotary_interleaved and rule.kind in (Kind.QKV, Kind.QKV_BLOCKS):  # Meta's pair order on disk
            q, k, _ = rule.sources
            tensors[q] = meta_to_hf_rotary(tensors[q], self.spec.num_heads)
            tensors[k] = meta_to_hf_rotary(tensors[k], self.spec.num_kv_heads)
        self._pending = {k: v for k, v in tensors.items() if k != name}
        return tensors[name]

    def raw(self, name: str) -> RawRange | RawChain | None:
        """Where canonical `name`'s bytes lie as they are in the checkpoint's files (a TP=1 torch_dist tensor, or
        row blocks of one: q, k, v of a fused QKV), for a file-to-file copy (rawcopy.py); else None."""
        if self.raw_part is None or self.tp != 1 or name not in self._index:
            return None
        rule = self._index[name][0]
        if self.rotary_interleaved and rule.kind in (Kind.QKV, Kind.QKV_BLOCKS):
            return None
        part = self.raw_part(rule.target)
        if part is None:
            return None
        return canonical_raw(rule.kind, [part], self.spec, which=rule.sources.index(name),
                             vocab_size=self.spec.vocab_size)

    def _state(self, tp_rank: int, pp_rank: int, layer: int | None, ep_rank: int = 0) -> dict:
        key = (pp_rank, layer)
        if key != self._loaded_key:
            self._loaded, self._loaded_key = {}, key
        if (tp_rank, ep_rank) not in self._loaded:
            self._loaded[tp_rank, ep_rank] = (self._load_state(tp_rank, pp_rank) if ep_rank == 0
                                              else self._load_state(tp_rank, pp_rank, ep_rank))
        return self._loaded[tp_rank, ep_rank]

    def close(self) -> None:
        self._loaded, self._pending = {}, {}


def canonical_from_ranks(states: list[list[dict]], spec: ModelSpec, layout: Layout = LOCAL) -> dict[str, torch.Tensor]:
    """Inverse of `rank_state_dict` for in-memory dicts: `states[pp_rank][tp_rank]` -> canonical tensors."""
    reader = MegatronReader(spec, tp=len(states[0]), pp=len(states), layout=layout,
                            load_state=lambda t, p: layout.rename(flatten(states[p][t])))
    return {name: reader.get(name) for name in reader.names()}


@contextlib.contextmanager
def only_safe_globals(allowed: list) -> Iterator[None]:
    """Exactly `allowed` during the block, and afterwards exactly what was registered before. torch's own
    `safe_globals` context adds to what is registered (megatron-core's `register_safe_globals` at import) and on
    exit removes its list, megatron-core's classes included, which broke a later torch_dist load in the process."""
    before = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    torch.serialization.add_safe_globals(allowed)
    try:
        yield
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(before)


def load_rank_file(path: Path) -> dict:
    """torch.load a rank file lazily (mmap) and safely (weights_only), one clear line if it is unreadable."""
    allowed = list(_SAFE_GLOBALS)
    try:
        for _ in range(_MAX_FOREIGN):
            try:
                with only_safe_globals(allowed):
                    return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except pickle.UnpicklingError as e:
                foreign = _megatron_global(e)
                if foreign is None or any(name == foreign for _, name in allowed[len(_SAFE_GLOBALS):]):
                    raise
                allowed.append((megatron_stand_in(foreign), foreign))
        raise pickle.UnpicklingError(f"more than {_MAX_FOREIGN} Megatron-LM classes in its args")
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        refused = _REFUSED_GLOBAL.search(str(e))
        if refused:
            raise InputError(f"{path} is not a readable torch checkpoint: it would unpickle {refused.group(1)}, "
                             "which is not allowed (loading it could run code)") from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"{path} is not a readable torch checkpoint: {first}") from None


# Checkpoints saved by Megatron-LM hold megatron-core enums and config dataclasses in `args` (ModelType,
# AttnBackend, ...; megatron/core/safe_globals.py lists today's). Importing megatron-core to allow-list them costs
# seconds and prints warnings, and conversion never reads those fields: each `megatron.*` class the unpickler
# names is allowed as an inert stand-in that only records what it was built from. Nothing else is allowed.
_MAX_FOREIGN = 32
_UNSUPPORTED_GLOBAL = re.compile(r"GLOBAL (megatron\.[\w.]+) was not an allowed global")
_REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+) (?:was not an allowed global|whose module)")


class MegatronStandIn:
    """A value of a Megatron-LM class from a checkpoint's `args`, kept as data: `args` (enums) or `state`."""

    qualname = "megatron"

    def __new__(cls, *args):
        obj = object.__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __init__(self, *args):
        self.args = args

    def __setstate__(self, state) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"{self.qualname}{self.args}" if self.state is None else f"{self.qualname}({self.state!r})"


def megatron_stand_in(qualname: str) -> type:
    """A MegatronStandIn subclass named for one megatron class (e.g. `megatron.core.enums.ModelType`)."""
    return type(qualname.rsplit(".", 1)[-1], (MegatronStandIn,), {"qualname": qualname})


def _megatron_global(e: pickle.UnpicklingError) -> str | None:
    m = _UNSUPPORTED_GLOBAL.search(str(e))
    return m.group(1) if m else None


def flatten(model: dict, prefix: str = "") -> dict:
    """A nested `model` dict (legacy: model['language_model']['encoder'][...]) as one dict of dotted keys."""
    out: dict = {}
    for key, value in model.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# ---------------------------------------------------------------- opening a folder
def open_megatron(path: Path, *, layout: str | None = None, model_config: Path | None = None) -> MegatronReader:
    """Open a Megatron torch-format checkpoint of any known layout as a canonical Reader.

    `path` is the checkpoint root (with latest_checkpointed_iteration.txt) or one iteration folder. The layout
    is detected from the keys unless `layout` names one (`detect.LAYOUTS`). Keys and shapes of every rank are
    checked up front; optimizer and RNG state in the files are ignored.
    """
    ranks = read_ranks(path, layout=layout)
    root, all_files, tp, pp, ep, args, chosen = (ranks.root, ranks.files, ranks.tp, ranks.pp, ranks.ep, ranks.args,
                                                 ranks.layout)
    padded, dtype = ranks.padded_vocab_size, ranks.dtype
    del ranks
    spec, notes = _spec(root, args, padded=padded, dtype=dtype, model_config=model_config)
    if padded < spec.vocab_size:
        raise InputError(f"embedding has {padded} rows but the vocab is {spec.vocab_size}")
    check_parallel(spec, tp=tp, pp=pp, ep=ep)
    _validate(all_files, spec, tp=tp, pp=pp, padded=padded, layout=chosen, ep=ep)
    manifest = _manifest(root)
    interleaved = bool(manifest.get("rotary_interleaved", getattr(args, "rotary_interleaved", False))
                       or chosen.rotary_interleaved)
    reader = MegatronReader(spec, tp=tp, pp=pp, rotary_interleaved=interleaved, layout=chosen, ep=ep,
                            load_state=lambda t, p, e=0: chosen.rename(flatten(_model(load_rank_file(
                                all_files[t, p, e]), all_files[t, p, e]))))
    reader.tokenizer_files = [root / n for n in TOKENIZER_FILES if (root / n).is_file()]
    reader.source_files = [all_files[t, p, e] for p in range(pp) for e in range(ep) for t in range(tp)]
    reader.notes = notes
    reader.padded_vocab_size = padded
    return reader


@dataclass
class SavedRanks:
    """What a torch-format checkpoint's files say before its architecture is known (`read_ranks`)."""

    root: Path
    files: dict[tuple[int, int, int], Path]  # (tp_rank, pp_rank, ep_rank): model file
    tp: int
    pp: int
    ep: int
    args: object  # the saved args (a Namespace, partial for alibaba, None for the fork)
    layout: Layout
    stages: list[dict]  # per PP stage, TP rank 0's flat `model` dict in the spellings of `layout`'s table

    @property
    def embedding(self) -> torch.Tensor:
        return self.stages[0][self.layout.embedding.target]

    @property
    def padded_vocab_size(self) -> int:
        return self.embedding.shape[0] * self.tp

    @property
    def dtype(self) -> str:
        return normalize_dtype(str(self.embedding.dtype))


def read_ranks(path: Path, *, layout: str | None = None) -> SavedRanks:
    """Find the rank files of every TP x PP (x EP) rank, read the args, and detect the layout (or check the one
    `layout` names); InputError when the folder is not a complete torch-format checkpoint of a known layout."""
    root = Path(path)
    if not root.is_dir():
        raise InputError(f"input folder {root} does not exist")
    it_dir = _iteration_dir(root)
    root = it_dir.parent  # the checkpoint root, also when `path` named an iteration folder
    all_files, tp, pp, ep = _rank_files(it_dir, ep=int(_manifest(root).get("ep") or 1))
    files = {(t, p): f for (t, p, e), f in all_files.items() if e == 0}
    first = load_rank_file(files[0, 0])
    args = first.get("args") if isinstance(first, dict) else None
    del first
    _check_saved_grid(it_dir, files, args, tp=tp, pp=pp)
    stage_keys = [flatten(_model(load_rank_file(files[0, p]), files[0, p])) for p in range(pp)]
    chosen = layout_named(layout) if layout else detect_layout(k for keys in stage_keys for k in keys)
    stages = [chosen.rename(keys) for keys in stage_keys]
    if not torch.is_tensor(stages[0].get(chosen.embedding.target)):
        raise InputError(f"{files[0, 0]} has no {chosen.embedding.target}: not a {chosen.name} checkpoint")
    return SavedRanks(root, all_files, tp, pp, ep, args, chosen, stages)


def _manifest(root: Path) -> dict:
    manifest = read_manifest(root) or {}
    return manifest if manifest.get("format") == "megatron" else {}


def _spec(root: Path, args, *, padded: int, dtype: str, model_config: Path | None = None
          ) -> tuple[ModelSpec, list[str]]:
    """The architecture: megallama.json, else `model_config` (--model-config), else the saved args, else a
    config.json / params.json beside the checkpoint (the forks save no or partial args)."""
    notes: list[str] = []
    manifest = _manifest(root)
    if manifest.get("spec"):
        spec = ModelSpec.from_dict({**manifest["spec"], "dtype": dtype})
        return spec.replace(vocab_size=manifest.get("vocab_size", spec.vocab_size)), notes
    if model_config is not None:
        return spec_from_config_file(root, dtype, model_config), [f"architecture from --model-config {model_config}"]
    if args_describe_model(args):
        return spec_from_args(args, padded_vocab_size=padded, dtype=dtype, notes=notes,
                              fallback_vocab=tokenizer_vocab(root)), notes
    spec = spec_from_config_file(root, dtype)
    if spec is None:
        raise ArchitectureUnknown(f"{root}: the checkpoint's args do not give the architecture (norm eps, sizes): "
                                  "put the model's config.json (HF) or params.json (Meta) as --model-config PATH "
                                  "(sft: load_model_config=PATH)")
    return spec, notes


def _iteration_dir(root: Path) -> Path:
    tracker = root / TRACKER
    if not tracker.is_file():
        if any(_RANK_DIR.match(p.name) for p in root.iterdir()):
            return root  # pointed at release/ or iter_NNNNNNN/ itself
        raise InputError(f"{root} has no {TRACKER}: not a Megatron torch-format checkpoint folder")
    text = tracker.read_text(encoding="utf-8", errors="replace").strip()  # a binary file: refused below
    if text == "release":
        it_dir = iteration_dir(root, None)
    elif text.isascii() and text.isdigit():
        it_dir = iteration_dir(root, int(text))
    else:
        raise InputError(f"{tracker} holds {text[:40]!r}: expected 'release' or an iteration number")
    if not it_dir.is_dir():
        raise InputError(f"{tracker} points at {it_dir.name}/, which does not exist")
    return it_dir


def model_file(rank_dir: Path) -> Path:
    """`model_optim_rng.pt`, or the forks' `model_rng.pt` (distributed optimizer on)."""
    fork = rank_dir / FORK_MODEL_FILE
    return fork if fork.is_file() and not (rank_dir / MODEL_FILE).is_file() else rank_dir / MODEL_FILE


def _rank_files(it_dir: Path, *, ep: int = 1) -> tuple[dict[tuple[int, int, int], Path], int, int, int]:
    """{(tp_rank, pp_rank, ep_rank): model file}, TP, PP, EP; every rank of the grid must be present.

    With expert parallelism the expert rank is the last `_EEE` (`mp_rank_TT_EEE` at PP=1 reads like a PP rank,
    so `ep` from megallama.json decides; two groups, `mp_rank_TT_PPP_EEE`, always mean EP)."""
    found = {}
    for p in it_dir.iterdir():
        m = _RANK_DIR.match(p.name)
        if not m or not p.is_dir():
            continue
        if (p / "optim.pt").is_file() and not model_file(p).is_file():
            continue  # a fork's per-DP optimizer shard folder (mp_rank_TT[_PPP]_DDD), no model in it
        groups = [g for g in m.groups()[1:] if g is not None]
        if len(groups) == 2:
            ep = max(ep, 2)
        pp_rank, ep_rank = (int(groups[0]) if groups else 0), 0
        if ep > 1 and groups:
            pp_rank, ep_rank = (int(groups[0]), int(groups[1])) if len(groups) == 2 else (0, int(groups[0]))
        found[int(m.group(1)), pp_rank, ep_rank] = (model_file(p), len(groups) == (1 if ep > 1 else 0))
    if not found:
        raise InputError(f"{it_dir} has no mp_rank_* folders")
    if len({plain for _, plain in found.values()}) > 1:
        raise InputError(f"{it_dir} mixes mp_rank_TT and mp_rank_TT_PPP folders")
    tp, pp = max(t for t, _, _ in found) + 1, max(p for _, p, _ in found) + 1
    ep = max(e for _, _, e in found) + 1
    missing = [checkpoint_dir(it_dir.parent, 0, t, p, pp, e, ep).name for p in range(pp) for e in range(ep)
               for t in range(tp) if (t, p, e) not in found or not found[t, p, e][0].is_file()]
    if missing:
        raise InputError(f"{it_dir} is missing {MODEL_FILE} for {', '.join(missing[:4])} (TP={tp}, PP={pp}"
                         f"{f', EP={ep}' if ep > 1 else ''} grid)")
    return {k: f for k, (f, _) in found.items()}, tp, pp, ep


def _check_saved_grid(it_dir: Path, files: dict, args, *, tp: int, pp: int) -> None:
    """The rank files found cover the TP x PP grid the args were saved at: a deleted last rank would otherwise
    shrink the grid and surface later as a shape mismatch. Names the missing rank folders."""
    saved_tp = getattr(args, "tensor_model_parallel_size", None)
    saved_pp = getattr(args, "pipeline_model_parallel_size", None) or 1
    if not isinstance(saved_tp, int) or not isinstance(saved_pp, int) or (saved_tp <= tp and saved_pp <= pp):
        return
    missing = [checkpoint_dir(it_dir.parent, 0, t, p, saved_pp).name for p in range(saved_pp)
               for t in range(saved_tp) if (t, p) not in files]
    raise InputError(f"{it_dir} is missing {MODEL_FILE} for {', '.join(missing[:4])}"
                     + (f" (and {len(missing) - 4} more)" if len(missing) > 4 else "")
                     + f": its args say TP={saved_tp}, PP={saved_pp}")


def _model(ckpt: dict, path: Path) -> dict:
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        if isinstance(ckpt, dict) and "model0" in ckpt:
            raise InputError(f"{path} holds virtual-pipeline chunks (model0, model1, ...): not supported")
        raise InputError(f"{path} has no 'model' state dict")
    return ckpt["model"]


def _validate(files: dict, spec: ModelSpec, *, tp: int, pp: int, padded: int, layout: Layout, ep: int = 1) -> None:
    """Every rank holds exactly the keys and shapes its stage needs; collect all problems, raise once.
    Keys no rule places are refused (named), except those with nothing to convert (`IGNORED_SUFFIXES`)."""
    shapes = expected_shapes(spec)
    problems: list[str] = []
    for (_, pp_rank, ep_rank), path in sorted(files.items(), key=lambda kv: kv[0][::-1]):
        model = layout.rename(flatten(_model(load_rank_file(path), path)))
        want = {}
        for rule, _ in stage_rules(layout, spec, pp_rank=pp_rank, pp=pp, ep_rank=ep_rank, ep=ep):
            if rule.sources:
                want[rule.target] = rank_shape(rule.kind, spec, shapes.get(rule.sources[0], ()), tp=tp,
                                               padded_vocab_size=padded)
        where = path.parent.name
        for key, shape in want.items():
            t = model.get(key)
            if not torch.is_tensor(t):
                problems.append(f"{where}: missing {key}")
            elif tuple(t.shape) != shape:
                problems.append(f"{where}: {key} has shape {tuple(t.shape)}, expected {shape}")
        unplaced = [k for k in model if k not in want and not k.endswith(IGNORED_SUFFIXES)]
        problems += [f"{where}: cannot place {k}" for k in unplaced]
    if problems:
        raise InputError(f"checkpoint does not match the {layout.name} layout and its config ({len(problems)} "
                         "problems): " + "; ".join(problems[:5]) + (" ..." if len(problems) > 5 else ""))

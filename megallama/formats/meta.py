"""Meta's official pth folders: params.json + consolidated.NN.pth model-parallel shards + tokenizer.model.

On disk: Meta names, interleaved-pair rotary rows, fairscale MP splits (formats.md 1.3, 1.4, 2.2).
In memory: canonical (HF) names and rotary order. Example:

    with open_meta(Path("llama-2-13b")) as src:     # two shards, merged per tensor on demand
        w = src.get("model.layers.0.mlp.down_proj.weight")
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from megallama.errors import InputError
from megallama.formats.base import (
    TOKENIZER_FILES,
    TORCH_DTYPES,
    ContextReader,
    OnTensor,
    WriteReport,
    cast,
    check_float_dtypes,
    check_shape,
    copy_tokenizer,
    read_manifest,
    write_manifest,
)
from megallama.formats.hf import MappedFile, check_shapes, load_sentencepiece, owned, read_json, release_if_due
from megallama.formats.rawcopy import RawRange, raw_tensor
from megallama.formats.streaming import save_streamed
from megallama.names import EMBED, FINAL_NORM, LM_HEAD, canonical_names, expected_shapes
from megallama.spec import ModelSpec
from megallama.transforms import Split, hf_to_meta_rotary, meta_to_hf_rotary, shard_cols, shard_rows, unshard

IGNORED = "rope.freqs"  # recomputed by every model; some releases store it, even under a layer name (P14)
_SHARD_RE = re.compile(r"consolidated\.(\d+)\.pth")


@dataclass(frozen=True)
class Rule:
    """One Meta tensor: its name, its canonical name, how MP shards split it, whose heads its rotary rows follow."""

    meta: str
    hf: str
    split: Split | None  # None: the embedding, split on dim 1 (LLaMA-1/2) or dim 0 (Llama 3) (formats.md 1.4)
    rotary: str | None = None  # "q" (num_heads) or "k" (num_kv_heads): Meta rows are interleaved pairs


EMBED_RULE = Rule("tok_embeddings.weight", EMBED, None)
LAYER_RULES = (  # canonical order, as names.LAYER_TEMPLATES
    Rule("layers.{i}.attention_norm.weight", "model.layers.{i}.input_layernorm.weight", Split.REPLICATED),
    Rule("layers.{i}.attention.wq.weight", "model.layers.{i}.self_attn.q_proj.weight", Split.COLUMN, "q"),
    Rule("layers.{i}.attention.wk.weight", "model.layers.{i}.self_attn.k_proj.weight", Split.COLUMN, "k"),
    Rule("layers.{i}.attention.wv.weight", "model.layers.{i}.self_attn.v_proj.weight", Split.COLUMN),
    Rule("layers.{i}.attention.wo.weight", "model.layers.{i}.self_attn.o_proj.weight", Split.ROW),
    Rule("layers.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight", Split.REPLICATED),
    Rule("layers.{i}.feed_forward.w1.weight", "model.layers.{i}.mlp.gate_proj.weight", Split.COLUMN),
    Rule("layers.{i}.feed_forward.w3.weight", "model.layers.{i}.mlp.up_proj.weight", Split.COLUMN),
    Rule("layers.{i}.feed_forward.w2.weight", "model.layers.{i}.mlp.down_proj.weight", Split.ROW),
)
FINAL_RULES = (
    Rule("norm.weight", FINAL_NORM, Split.REPLICATED),
    Rule("output.weight", LM_HEAD, Split.COLUMN),
)
META_RULES = (EMBED_RULE, *LAYER_RULES, *FINAL_RULES)


def expand_rules(spec: ModelSpec, embed_split: Split) -> list[Rule]:
    """Every concrete Meta tensor of `spec` in model order, with the embedding's split resolved."""
    def at(rule: Rule, i: int = 0) -> Rule:
        return replace(rule, meta=rule.meta.format(i=i), hf=rule.hf.format(i=i), split=rule.split or embed_split)

    layers = [at(r, i) for i in range(spec.num_layers) for r in LAYER_RULES]
    return [at(EMBED_RULE), *layers, *(at(r) for r in FINAL_RULES)]


def rotary_heads(rule: Rule, spec: ModelSpec) -> int:
    return {"q": spec.num_heads, "k": spec.num_kv_heads}.get(rule.rotary, 0)


def embedding_split(spec: ModelSpec) -> Split:
    """Llama 3 shards the embedding by vocab rows (VocabParallelEmbedding), LLaMA-1/2 by hidden columns.

    Llama 3.x is recognised by its 128k vocab, its llama3 rope scaling or its exact theta 500000; Code Llama
    (theta 1e6, 32016 tokens) runs on the LLaMA-2 code and keeps the dim-1 split.
    """
    llama3 = spec.vocab_size >= 128000 or spec.rope_scaling is not None or spec.rope_theta == 500000.0
    return Split.COLUMN if llama3 else Split.ROW


def meta_tensor(reader, rule: Rule, *, rank: int = 0, shards: int = 1, dtype: str | None = None) -> torch.Tensor:
    """Rank `rank`'s part of one Meta tensor, in Meta rotary order, from any canonical reader.

    Rotary rows are permuted per head, so a head-aligned part is permuted with its own head count
    (formats.md 2.2); readers with `get_part` read only that part.
    """
    spec = reader.spec
    name = EMBED if rule.hf == LM_HEAD and spec.tie_embeddings else rule.hf  # Meta always stores output
    if shards == 1 or rule.split is Split.REPLICATED:
        t = owned(reader.get(name))
    else:
        t = _read_part(reader, name, 0 if rule.split is Split.COLUMN else 1, rank, shards)
    t = cast(t, dtype)
    heads = rotary_heads(rule, spec) // shards
    return hf_to_meta_rotary(t, heads) if heads else t


def meta_raw(reader, rule: Rule, *, rank: int = 0, shards: int = 1, dtype: str) -> RawRange | None:
    """Where rank's part of one Meta tensor already lies, byte for byte, in `reader`'s files (no rotary permute,
    same dtype, a whole tensor or a row block); None: build it with `meta_tensor`."""
    if rotary_heads(rule, reader.spec):
        return None
    name = EMBED if rule.hf == LM_HEAD and reader.spec.tie_embeddings else rule.hf
    raw = raw_tensor(reader, name, dtype)
    if raw is None or shards == 1 or rule.split is Split.REPLICATED:
        return raw
    return raw.rows(rank, shards) if rule.split is Split.COLUMN else None


def _read_part(reader, name: str, dim: int, rank: int, shards: int) -> torch.Tensor:
    if hasattr(reader, "get_part"):
        return reader.get_part(name, dim, rank, shards)
    t = reader.get(name)
    return shard_rows(t, rank, shards) if dim == 0 else shard_cols(t, rank, shards)


def iter_meta_tensors(reader, *, dtype: str | None = None) -> Iterator[tuple[Rule, torch.Tensor]]:
    """Whole (unsharded) Meta-named tensors of any canonical reader, one at a time: what Meta's model loads."""
    for rule in expand_rules(reader.spec, embedding_split(reader.spec)):
        yield rule, meta_tensor(reader, rule, dtype=dtype)


# ---------------------------------------------------------------- reader
def open_meta(path: Path) -> MetaReader:
    """Open a Meta pth folder (or a folder whose single sub-folder holds params.json) lazily, through mmap."""
    folder = find_params_folder(Path(path))
    params = read_json(folder / "params.json", "expected a Meta checkpoint folder")
    return MetaReader(folder, params, find_shards(folder))


def find_params_folder(path: Path) -> Path:
    if (path / "params.json").is_file():
        return path
    subs = sorted(d for d in path.iterdir() if d.is_dir() and (d / "params.json").is_file())
    if len(subs) == 1:  # the reference scripts' `--input_dir X --model_size 7B` layout
        return subs[0]
    if subs:
        raise InputError(f"{path} holds several models ({', '.join(d.name for d in subs)}): pass one of them")
    raise InputError(f"no params.json in {path}: expected a Meta checkpoint folder (params.json + consolidated.NN.pth)")


def find_shards(folder: Path) -> list[Path]:
    numbered = {int(m.group(1)): f for f in folder.glob("*.pth") if (m := _SHARD_RE.fullmatch(f.name))}
    if numbered:
        if sorted(numbered) != list(range(len(numbered))):
            found = ", ".join(numbered[i].name for i in sorted(numbered))
            raise InputError(f"shards in {folder} are not numbered 00..{len(numbered) - 1:02d} (found {found}): "
                             "is one missing?")
        return [numbered[i] for i in range(len(numbered))]
    files = sorted(folder.glob("*.pth"))  # Meta's own loader takes every *.pth, sorted
    if not files:
        raise InputError(f"no consolidated.NN.pth in {folder}")
    return files


def find_tokenizer_files(folder: Path) -> list[Path]:
    files = [folder / n for n in TOKENIZER_FILES if (folder / n).is_file()]
    parent_sp = folder.parent / "tokenizer.model"  # LLaMA-1/2 downloads share one tokenizer beside the sizes
    if not (folder / "tokenizer.model").is_file() and parent_sp.is_file():
        files.insert(0, parent_sp)
    return files


class MetaReader(ContextReader):
    """Canonical tensors from Meta MP shards: concatenated per formats.md 1.4, q/k rows permuted to HF order."""

    def __init__(self, folder: Path, params: dict, shard_files: list[Path]):
        self.folder = folder
        self.source_files = shard_files
        self.tokenizer_files = find_tokenizer_files(folder)
        self._shards: list[MappedFile] = []
        try:
            for f in shard_files:
                self._shards.append(MappedFile(f))
            self._check_same_keys()
            manifest = read_manifest(folder) or {}
            extra = manifest.get("meta_extra") if manifest.get("format") == "meta" else None
            self.spec = ModelSpec.from_meta_params(params, vocab_size=self._vocab_hint(params),
                                                   dtype=self._dtype(), extra=extra)
            self.embed_split = self._detect_embed_split()
            rules = expand_rules(self.spec, self.embed_split)
            self._rules = {r.hf: r for r in rules if r.meta in self._shards[0].shapes}
            known = {r.meta for r in rules}
            self._unknown = sorted(k for k in self._keys(0) if k not in known)
            check_shapes(self.spec, {n: self._merged_shape(r) for n, r in self._rules.items()}, str(folder))
            self._drop_tied_output()
        except BaseException:
            self.close()
            raise

    def _keys(self, i: int) -> set[str]:
        return {k for k in self._shards[i].shapes if IGNORED not in k}

    def _check_same_keys(self) -> None:
        for i in range(1, len(self._shards)):
            diff = sorted(self._keys(0) ^ self._keys(i))
            if diff:
                raise InputError(f"shards disagree: {self.source_files[i].name} and {self.source_files[0].name} "
                                 f"hold different tensors ({', '.join(diff[:3])})")

    def _dtype(self) -> str:
        for shard, path in zip(self._shards, self.source_files, strict=True):
            check_float_dtypes({k: v for k, v in shard.dtypes.items() if IGNORED not in k}, str(path))
        dtypes = self._shards[0].dtypes
        return dtypes.get(EMBED_RULE.meta) or next(iter(dtypes.values()), "float32")

    def _vocab_hint(self, params: dict) -> int | None:
        """Meta writes vocab_size -1 for LLaMA-1/2: the tokenizer decides; failing that, the output rows."""
        if (params.get("model", params).get("vocab_size") or -1) > 0:
            return None
        sp_file = next((f for f in self.tokenizer_files if f.name == "tokenizer.model"), None)
        sp = load_sentencepiece(sp_file) if sp_file else None
        if sp is not None:
            return sp.get_piece_size()
        if all("output.weight" in s.shapes for s in self._shards):
            return sum(s.shapes["output.weight"][0] for s in self._shards)
        return None

    def _detect_embed_split(self) -> Split:
        # A dim-1 (LLaMA-1/2) shard is [V, h/m]; a dim-0 (Llama 3) shard is [V/m, h]. With m = 1 either reads the same.
        emb = self._shards[0].shapes.get(EMBED_RULE.meta)
        if len(self._shards) > 1 and emb is not None and len(emb) == 2 and emb[1] != self.spec.hidden_size:
            return Split.ROW
        return Split.COLUMN

    def _merged_shape(self, rule: Rule) -> tuple[int, ...]:
        shapes = [s.shapes[rule.meta] for s in self._shards]
        if rule.split is Split.REPLICATED or len(shapes) == 1:
            merged = shapes[0] if len(set(shapes)) == 1 else None
        else:
            dim = 0 if rule.split is Split.COLUMN else 1
            rest = {s[:dim] + s[dim + 1:] for s in shapes}
            ok = len(rest) == 1 and all(len(s) > dim for s in shapes)
            merged = shapes[0][:dim] + (sum(s[dim] for s in shapes),) + shapes[0][dim + 1:] if ok else None
        if merged is None:
            raise InputError(f"shards disagree on the shape of {rule.meta}: {', '.join(map(str, shapes))}")
        return merged

    def _merge(self, rule: Rule) -> torch.Tensor:
        parts = [s.get(rule.meta) for s in self._shards]  # copies, so the mappings can be released
        release_if_due(self._shards)
        if rule.split is Split.REPLICATED:
            for i, p in enumerate(parts[1:], start=1):
                if not torch.equal(p, parts[0]):
                    raise InputError(f"shards disagree: {rule.meta} differs between {self.source_files[0].name} "
                                     f"and {self.source_files[i].name} (replicated tensors must be identical)")
        if len(parts) == 1 or rule.split is Split.REPLICATED:
            return parts[0]
        return unshard(parts, rule.split)

    def _drop_tied_output(self) -> None:
        # Meta files always carry output.weight; our manifest says when it is only a copy of the embedding.
        if not self.spec.tie_embeddings or LM_HEAD not in self._rules:
            return
        if not torch.equal(self._merge(self._rules[LM_HEAD]), self._merge(self._rules[EMBED])):
            raise InputError(f"{self.folder / 'megallama.json'} records tied embeddings but output.weight differs "
                             "from tok_embeddings.weight")
        del self._rules[LM_HEAD]

    def names(self) -> list[str]:
        return [n for n in canonical_names(self.spec) if n in self._rules] + self._unknown

    def get(self, name: str) -> torch.Tensor:
        rule = self._rules[name]
        t = self._merge(rule)
        check_shape(name, t, self.spec)
        heads = rotary_heads(rule, self.spec)
        return meta_to_hf_rotary(t, heads) if heads else t

    def raw(self, name: str) -> RawRange | None:
        """Where canonical `name` lies in the single shard when no permute changes it (rawcopy.py)."""
        rule = self._rules[name]
        if len(self._shards) != 1 or rotary_heads(rule, self.spec):
            return None
        return self._shards[0].raw(rule.meta)

    def close(self) -> None:
        for s in self._shards:
            s.close()



# ---------------------------------------------------------------- writer
def write_meta(reader, out_dir: Path, *, shards: int = 1, dtype: str | None = None,
               on_tensor: OnTensor | None = None) -> WriteReport:
    """Write params.json + consolidated.NN.pth split as Meta's releases are, one shard file at a time."""
    out_dir = Path(out_dir)
    spec = reader.spec.replace(dtype=dtype or reader.spec.dtype)
    check_meta_expressible(spec)
    embed_split = embedding_split(spec)
    check_shards(spec, shards, embed_split)
    (out_dir / "params.json").write_text(json.dumps(spec.to_meta_params(), indent=2) + "\n")
    report = WriteReport(output=out_dir, files=["params.json"])
    for rank in range(shards):
        fname = f"consolidated.{rank:02d}.pth"
        _save_shard(reader, out_dir / fname, rank=rank, shards=shards, dtype=spec.dtype, embed_split=embed_split,
                    on_tensor=on_tensor)
        report.files.append(fname)
    report.files += copy_tokenizer(_meta_tokenizer(reader.tokenizer_files), out_dir)
    split_name = "dim 0 (Llama 3 style)" if embed_split is Split.COLUMN else "dim 1 (LLaMA-1/2 style)"
    write_manifest(out_dir, spec=spec, fmt="meta", sources=reader.source_files, meta_extra=spec.meta_extra(),
                   shards=shards, embedding_split=split_name)
    report.files.append("megallama.json")
    if shards > 1:
        report.notes.append(f"{shards} shards; embedding split on {split_name}")
    if spec.tie_embeddings:
        report.notes.append("tied embeddings: output.weight = embedding")
    return report


def check_meta_expressible(spec: ModelSpec) -> None:
    """Meta's pth format (params.json + Meta's model.py) is LLaMA only: refuse the families' extras by name."""
    if spec.is_plain_llama():
        return
    extras = [name for name, on in (("head_dim != hidden/heads", spec.explicit_head_dim),
                                    ("q/k/v biases", spec.qkv_bias), ("o_proj bias", spec.o_bias),
                                    ("mlp biases", spec.mlp_bias), (f"q/k norm {spec.qk_norm}", spec.qk_norm),
                                    ("sliding window", spec.sliding_window is not None)) if on]
    what = spec.architecture + (f" with {', '.join(extras)}" if extras else "")
    raise InputError(f"{what}: Meta's pth format holds LLaMA only (no Meta release of this family exists); "
                     "convert to HF or Megatron instead")


def check_shards(spec: ModelSpec, shards: int, embed_split: Split) -> None:
    """Refuse shard counts that fairscale's layers could not load (uneven or head-splitting parts, P20)."""
    if shards < 1:
        raise InputError(f"--shards must be at least 1 (got {shards})")
    sizes = [("attention heads", spec.num_heads), ("KV heads", spec.num_kv_heads),
             ("FFN size", spec.ffn_hidden_size), ("vocab size", spec.vocab_size)]
    if embed_split is Split.ROW:
        sizes.append(("hidden size", spec.hidden_size))
    bad = [f"{what} {n}" for what, n in sizes if n % shards]
    if bad:
        raise InputError(f"--shards {shards} does not divide the model's {', '.join(bad)}: "
                         "choose a shard count that divides them all")


def _save_shard(reader, path: Path, *, rank: int, shards: int, dtype: str, embed_split: Split,
                on_tensor: OnTensor | None) -> None:
    """Write shard `rank` tensor by tensor (streaming.save_streamed): memory holds one tensor, not the shard."""
    rules = expand_rules(reader.spec, embed_split)
    shapes = expected_shapes(reader.spec)
    skeleton = {}
    for rule in rules:
        shape = list(shapes[EMBED if rule.hf == LM_HEAD and reader.spec.tie_embeddings else rule.hf])
        if shards > 1 and rule.split is not Split.REPLICATED:
            shape[0 if rule.split is Split.COLUMN else 1] //= shards
        skeleton[rule.meta] = torch.empty(shape, dtype=TORCH_DTYPES[dtype])  # never touched: not resident
    parts = ((r.meta, meta_raw(reader, r, rank=rank, shards=shards, dtype=dtype)
              or meta_tensor(reader, r, rank=rank, shards=shards, dtype=dtype)) for r in rules)
    save_streamed(path, skeleton, parts, on_tensor=on_tensor)


def _meta_tokenizer(files: list[Path]) -> list[Path]:
    """Meta folders carry tokenizer.model; without one, keep the HF tokenizer files so nothing is lost."""
    return [f for f in files if f.name == "tokenizer.model"] or files

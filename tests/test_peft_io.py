"""HF PEFT adapters out of and into megallama, judged by HF `peft` itself (docs/peft-io.md).

The reference for a fused Megatron adapter is computed without the code under test: the adapter is merged into
the FUSED Megatron weights (`W_fused + s B A`, DoRA rescaled per fused row), and the already-tested Megatron
reader turns that checkpoint back into HF tensors. peft's logits on the exported folder must equal it; a wrong
B split (GQA grouping, rotary order), A/B swapped, or a dropped DoRA magnitude must not.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import peft  # the judge (a dev dependency, pyproject [dev])
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM
from typer.testing import CliRunner

from megallama.cli import app
from megallama.formats.hf import open_hf
from megallama.formats.megatron.rules import Kind
from megallama.formats.megatron.torch_dist import _tensor_item, save_dcp
from megallama.formats.megatron.torch_format import canonical_from_ranks, rank_state_dict
from megallama.peft import mapping
from megallama.peft.hf_adapter import read_peft_adapter, write_peft_adapter
from megallama.peft.store import PeftRecord, base_fingerprint, write_record

runner = CliRunner()
RANK, ALPHA = 4, 8.0
TOL = dict(rtol=0, atol=1e-5)
TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


# ---------------------------------------------------------------- helpers
def spec_of(hf_dir):
    with open_hf(hf_dir) as r:
        return r.spec


def fused_weights(hf_dir) -> dict[str, torch.Tensor]:
    """The TP1 Megatron state (fused linear_qkv / linear_fc1) of the base, as megallama's writers build it."""
    with open_hf(hf_dir) as r:
        return rank_state_dict(r, r.spec, tp_rank=0, tp=1, pp_rank=0, pp=1, padded_vocab_size=r.spec.vocab_size)


def random_adapters(hf_dir, *, dora: bool, seed: int = 0, rank: int = RANK) -> dict[str, torch.Tensor]:
    """A full-view fused adapter state with non-zero A, B (and a magnitude that is not ||W + sBA||)."""
    g = torch.Generator().manual_seed(seed)
    state, spec = fused_weights(hf_dir), spec_of(hf_dir)
    out = {}
    for layer in range(spec.num_layers):
        for target in mapping.TARGETS.values():
            w = state[f"decoder.layers.{layer}.{target.module}.weight"]
            key = f"decoder.layers.{layer}.{target.module}.adapter."
            out[key + "linear_in.weight"] = torch.randn(rank, w.shape[1], generator=g) / w.shape[1] ** 0.5
            out[key + "linear_out.weight"] = torch.randn(w.shape[0], rank, generator=g) * 0.1
            if dora:
                out[key + "magnitude"] = w.norm(dim=1) * (1 + 0.3 * torch.rand(w.shape[0], generator=g))
    return out


def reference_state(hf_dir, adapters: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """HF tensors of the base with `adapters` merged into the FUSED weights (no per-projection split anywhere)."""
    state, spec = fused_weights(hf_dir), spec_of(hf_dir)
    for key in [k for k in adapters if k.endswith(".adapter.linear_in.weight")]:
        prefix = key.removesuffix(".adapter.linear_in.weight")
        w = state[prefix + ".weight"]
        merged = w + (adapters[prefix + ".adapter.linear_out.weight"] @ adapters[key]) * scale
        if prefix + ".adapter.magnitude" in adapters:
            merged = (adapters[prefix + ".adapter.magnitude"] / merged.norm(dim=1)).view(-1, 1) * merged
        state[prefix + ".weight"] = merged
    return canonical_from_ranks([[state]], spec)


def tokens(hf_dir) -> torch.Tensor:
    return torch.randint(0, spec_of(hf_dir).vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))


def base_model(hf_dir):
    return LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()


@torch.no_grad()
def logits_of_state(hf_dir, state) -> torch.Tensor:
    model = base_model(hf_dir)
    model.load_state_dict(state, strict=True)
    return model(tokens(hf_dir)).logits


@torch.no_grad()
def peft_logits(hf_dir, folder) -> torch.Tensor | None:
    """peft's logits on `folder` over the base, or None when peft refuses to load it."""
    try:
        model = peft.PeftModel.from_pretrained(base_model(hf_dir), str(folder)).eval()
    except (RuntimeError, ValueError, KeyError):
        return None
    return model(tokens(hf_dir)).logits


def peft_matches(hf_dir, folder, reference: torch.Tensor) -> bool:
    got = peft_logits(hf_dir, folder)
    return got is not None and bool(torch.allclose(got, reference, **TOL))


def make_lora_run(run, hf_dir, adapters, *, method: str, rank: int = RANK, alpha: float = ALPHA):
    """A LoRA/DoRA run folder as sft writes it: peft.json, megallama.json, torch_dist iteration of adapters only
    (stacked over layers, as megatron-core's sharded state dict stores them)."""
    spec = spec_of(hf_dir)
    items = []
    for rest in sorted({k.split(".", 3)[3] for k in adapters}):
        t = torch.stack([adapters[f"decoder.layers.{i}.{rest}"] for i in range(spec.num_layers)])
        items.append(_tensor_item(f"decoder.layers.{rest}", (0,) * t.dim(), tuple(t.shape), tuple(t.shape),
                                  torch.float32, lambda t=t: t))
    save_dcp(run / "iter_0000001", items)
    (run / "latest_checkpointed_iteration.txt").write_text("1")
    write_record(run, PeftRecord(method=method, rank=rank, alpha=alpha, dropout=0.0, targets=TARGETS,
                                 base_path=str(hf_dir), base_fingerprint=base_fingerprint(hf_dir)))
    (run / "megallama.json").write_text(json.dumps({"format": "megatron", "spec": spec.to_dict()}))
    return run


def cli(*args) -> object:
    return runner.invoke(app, ["convert", *map(str, args)])


# ---------------------------------------------------------------- the mapping, as a transform pair
def test_split_b_like_the_weight_and_block_diagonal_fuse_are_exact(hf_dir):
    """Each projection's delta is exactly the rows of the fused delta the weight split gives that projection; the
    block-diagonal fuse of three per-projection adapters gives back their deltas."""
    spec, adapters = spec_of(hf_dir), random_adapters(hf_dir, dora=False)
    projs = mapping.fused_to_projections(adapters, spec, scale=2.0)
    for target in mapping.TARGETS.values():
        prefix = f"decoder.layers.1.{target.module}.adapter."
        fused_delta = adapters[prefix + "linear_out.weight"] @ adapters[prefix + "linear_in.weight"]
        want = mapping.split_rows(target.kind, fused_delta, spec)
        for projection, delta in zip(target.projections, want, strict=True):
            pa = projs[f"model.layers.1.{projection}"]
            torch.testing.assert_close(pa.b @ pa.a, delta, rtol=0, atol=0)
    fused, scale = mapping.projections_to_fused(projs, spec, rank=3 * RANK)
    assert scale == 2.0
    for module, pa in projs.items():
        layer, projection = int(module.split(".")[2]), module.split(".", 3)[3]
        target = mapping.PROJECTION_TARGET[projection.rsplit(".", 1)[1]]
        prefix = f"decoder.layers.{layer}.{target.module}.adapter."
        fused_delta = fused[prefix + "linear_out.weight"] @ fused[prefix + "linear_in.weight"]
        parts = mapping.split_rows(target.kind, fused_delta, spec)
        torch.testing.assert_close(parts[target.projections.index(projection)], pa.b @ pa.a)


# ---------------------------------------------------------------- export: peft is the judge
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_exported_adapter_loads_in_peft_with_the_megatron_logits(hf_dir, tmp_path, method):
    adapters = random_adapters(hf_dir, dora=method == "dora")
    reference = logits_of_state(hf_dir, reference_state(hf_dir, adapters, ALPHA / RANK))
    assert not torch.allclose(reference, logits_of_state(hf_dir, reference_state(hf_dir, {}, 1.0)), **TOL)
    run = make_lora_run(tmp_path / "run", hf_dir, adapters, method=method)
    result = cli("megatron2hf", "--input-dir", run, "--output-dir", tmp_path / "adapter", "--peft")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["use_dora"]) == \
        ("LORA", RANK, ALPHA, method == "dora")
    assert config["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    got = peft_logits(hf_dir, tmp_path / "adapter")
    torch.testing.assert_close(got, reference, **TOL)
    # without --peft the same run is written merged: the merged HF folder gives the same logits
    result = cli("megatron2hf", "--input-dir", run, "--output-dir", tmp_path / "merged")
    assert result.exit_code == 0, result.output
    merged = LlamaForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens(hf_dir)).logits, reference, **TOL)


def _rewrite(folder, change) -> None:
    path = folder / "adapter_model.safetensors"
    weights = load_file(path)
    change(weights)
    save_file(weights, path, metadata={"format": "pt"})


def test_negative_controls_wrong_b_split_or_swapped_ab_fail_the_peft_check(hf_dir, tmp_path):
    """The peft check catches each mapping bug it is meant to: GQA grouping, rotary order, A/B swapped."""
    spec, adapters = spec_of(hf_dir), random_adapters(hf_dir, dora=False)
    reference = logits_of_state(hf_dir, reference_state(hf_dir, adapters, ALPHA / RANK))
    kw = dict(method="lora", rank=RANK, alpha=ALPHA)
    (good := tmp_path / "good").mkdir()
    write_peft_adapter(adapters, spec, good, **kw)
    assert peft_matches(hf_dir, good, reference)

    (rotary := tmp_path / "rotary").mkdir()  # B rows permuted as if the fused rows were in Meta's pair order
    write_peft_adapter(adapters, spec, rotary, rotary_interleaved=True, **kw)
    assert not peft_matches(hf_dir, rotary, reference)

    def blocks_split(weights):  # [q; k; v] blocks instead of KV groups [q.., k, v] per group
        for layer in range(spec.num_layers):
            b = adapters[f"decoder.layers.{layer}.self_attention.linear_qkv.adapter.linear_out.weight"]
            q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
            for name, part in zip(("q_proj", "k_proj", "v_proj"), torch.split(b, [q, kv, kv]), strict=True):
                weights[f"base_model.model.model.layers.{layer}.self_attn.{name}.lora_B.weight"] = part.contiguous()

    shutil.copytree(good, grouping := tmp_path / "grouping")
    _rewrite(grouping, blocks_split)
    assert not peft_matches(hf_dir, grouping, reference)

    def swap(weights):
        for key in [k for k in weights if k.endswith("lora_A.weight")]:
            b_key = key.replace("lora_A", "lora_B")
            weights[key], weights[b_key] = weights[b_key].T.contiguous(), weights[key].T.contiguous()

    shutil.copytree(good, swapped := tmp_path / "swapped")
    _rewrite(swapped, swap)
    assert not peft_matches(hf_dir, swapped, reference)


def test_dora_exports_the_trained_magnitude_and_dropping_it_fails(hf_dir, tmp_path):
    spec, adapters = spec_of(hf_dir), random_adapters(hf_dir, dora=True, seed=3)
    reference = logits_of_state(hf_dir, reference_state(hf_dir, adapters, ALPHA / RANK))
    (folder := tmp_path / "dora").mkdir()
    write_peft_adapter(adapters, spec, folder, method="dora", rank=RANK, alpha=ALPHA)
    weights = load_file(folder / "adapter_model.safetensors")
    q_rows = mapping.split_rows(Kind.QKV, adapters["decoder.layers.0.self_attention.linear_qkv.adapter.magnitude"],
                                spec)[0]
    exported = weights["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"]
    assert torch.equal(exported, q_rows)
    w_q = base_model(hf_dir).model.layers[0].self_attn.q_proj.weight
    assert not torch.allclose(exported, w_q.norm(dim=1), atol=1e-3)  # the trained one, not ||W||
    assert peft_matches(hf_dir, folder, reference)

    shutil.copytree(folder, dropped := tmp_path / "dropped")  # Megatron-Bridge's bug: use_dora, no magnitude
    _rewrite(dropped, lambda w: [w.pop(k) for k in [k for k in w if "magnitude" in k]])
    assert not peft_matches(hf_dir, dropped, reference)


# ---------------------------------------------------------------- import: merge_and_unload is the judge
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_peft_adapter(hf_dir, folder, *, dora: bool, patterns: bool = False, seed: int = 0,
                      targets: list[str] = ALL_PROJECTIONS):
    """An adapter trained 'elsewhere': made by peft, with random non-zero B (and magnitude)."""
    torch.manual_seed(seed)
    extra = dict(rank_pattern={"k_proj": 2}, alpha_pattern={"down_proj": 3.0}, use_rslora=True) if patterns else {}
    cfg = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, use_dora=dora, task_type="CAUSAL_LM", target_modules=targets,
                          **extra)
    model = peft.get_peft_model(base_model(hf_dir), cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.3)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.rand_like(p))
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("variant", ["lora", "dora", "patterns"])
def test_hf2megatron_adapter_then_megatron2hf_equals_merge_and_unload(hf_dir, tmp_path, variant):
    """hf2megatron (pth2megatron for plain LoRA) --adapter, then megatron2hf: peft's merge_and_unload() bit for bit."""
    model = make_peft_adapter(hf_dir, tmp_path / "adapter", dora=variant == "dora", patterns=variant == "patterns")
    want = model.merge_and_unload().state_dict()
    if variant == "lora":  # the Meta pth route: pth2megatron --adapter
        assert cli("hf2pth", "--input-dir", hf_dir, "--output-dir", tmp_path / "pth").exit_code == 0
        result = cli("pth2megatron", "--input-dir", tmp_path / "pth", "--output-dir", tmp_path / "meg", "--adapter",
                     tmp_path / "adapter")
    else:
        result = cli("hf2megatron", "--input-dir", hf_dir, "--output-dir", tmp_path / "meg", "--adapter",
                     tmp_path / "adapter")
    assert result.exit_code == 0, result.output
    assert cli("megatron2hf", "--input-dir", tmp_path / "meg", "--output-dir", tmp_path / "hf").exit_code == 0
    got = load_file(tmp_path / "hf" / "model.safetensors")
    assert set(got) == set(want)
    for name, tensor in got.items():  # fp32: bit-exact, the same arithmetic in the same order as peft's
        assert torch.equal(tensor, want[name]), name


@pytest.mark.parametrize("variant", ["lora", "dora", "partial"])
def test_read_peft_adapter_fuses_into_one_adapter_with_the_same_logits(hf_dir, tmp_path, variant):
    """peft.init_from: q/k/v -> one rank-3r linear_qkv adapter with block-diagonal B (gate/up: 2r), padded to one
    rank; merged into the fused weights it gives peft's own logits. `partial`: q/v and gate only, k/up get zero
    blocks, o/down no adapter (and rank/alpha patterns, rsLoRA)."""
    dora, partial = variant == "dora", variant == "partial"
    model = make_peft_adapter(hf_dir, tmp_path / "adapter", dora=dora, seed=5, patterns=partial,
                              targets=["q_proj", "v_proj", "gate_proj"] if partial else ALL_PROJECTIONS)
    with torch.no_grad():
        want = model(tokens(hf_dir)).logits
    adapter_set = read_peft_adapter(tmp_path / "adapter", spec_of(hf_dir))
    record = adapter_set.record
    targets = ("linear_qkv", "linear_fc1") if partial else TARGETS
    assert (record.rank, record.method, record.targets) == ((2 if partial else 3) * RANK, "dora" if dora else "lora",
                                                            targets)
    got = logits_of_state(hf_dir, reference_state(hf_dir, adapter_set.tensors, record.alpha / record.rank))
    torch.testing.assert_close(got, want, **TOL)


# ---------------------------------------------------------------- refusals: exit 2, one line, nothing written
def _adapter_with(tmp_path, hf_dir, name, change_config=None, change_weights=None):
    folder = tmp_path / name
    make_peft_adapter(hf_dir, folder, dora=False)
    if change_config:
        cfg = json.loads((folder / "adapter_config.json").read_text())
        change_config(cfg)
        (folder / "adapter_config.json").write_text(json.dumps(cfg))
    if change_weights:
        _rewrite(folder, change_weights)
    return folder


def test_bad_adapters_and_runs_exit_2_with_one_line_and_write_nothing(hf_dirs, tmp_path):
    hf_dir = hf_dirs["llama2"]
    embed = _adapter_with(tmp_path, hf_dir, "embed", lambda c: c.update(target_modules=["q_proj", "embed_tokens"]))
    to_save = _adapter_with(tmp_path, hf_dir, "save", lambda c: c.update(modules_to_save=["lm_head"]))
    unknown = _adapter_with(tmp_path, hf_dir, "unknown", lambda c: c.update(target_modules=["q_proj", "qkv_proj"]))
    ia3 = _adapter_with(tmp_path, hf_dir, "ia3", lambda c: c.update(peft_type="IA3"))
    head = _adapter_with(tmp_path, hf_dir, "head", change_weights=lambda w: w.update({
        "base_model.model.lm_head.lora_A.weight": torch.zeros(RANK, 64)}))
    no_mag = _adapter_with(tmp_path, hf_dir, "no_mag", lambda c: c.update(use_dora=True))
    other = tmp_path / "other"  # an MHA model's adapter: k/v shapes do not fit the GQA base
    make_peft_adapter(hf_dirs["llama1"], other, dora=False)
    meg = tmp_path / "meg"
    assert cli("hf2megatron", "--input-dir", hf_dir, "--output-dir", meg).exit_code == 0
    run = make_lora_run(tmp_path / "run", hf_dir, random_adapters(hf_dir, dora=False), method="lora")
    cases = {
        "not an HF PEFT adapter": ["hf2megatron", "--input-dir", hf_dir, "--adapter", hf_dir],
        "embed_tokens": ["hf2megatron", "--input-dir", hf_dir, "--adapter", embed],
        "modules_to_save": ["hf2megatron", "--input-dir", hf_dir, "--adapter", to_save],
        "unknown target module": ["hf2megatron", "--input-dir", hf_dir, "--adapter", unknown],
        "does not fit the base": ["hf2megatron", "--input-dir", hf_dir, "--adapter", other],
        "only LORA": ["hf2megatron", "--input-dir", hf_dir, "--adapter", ia3],
        "adapts lm_head": ["hf2megatron", "--input-dir", hf_dir, "--adapter", head],
        "has no lora_magnitude_vector": ["hf2megatron", "--input-dir", hf_dir, "--adapter", no_mag],
        "not a LoRA/DoRA run": ["megatron2hf", "--input-dir", meg, "--peft"],
        "is not the base": ["megatron2hf", "--input-dir", run, "--base", hf_dirs["tied"]],
        "--base is for a LoRA/DoRA run": ["megatron2pth", "--input-dir", meg, "--base", hf_dir],
    }
    for i, (message, args) in enumerate(cases.items()):
        out = tmp_path / f"out{i}"
        result = cli(*args, "--output-dir", out)
        assert result.exit_code == 2, (message, result.output)
        assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output
        assert not out.exists()


# ---------------------------------------------------------------- end to end: a real LoRA run at TP2 x PP2
@pytest.mark.slow
def test_dora_run_at_tp2_pp2_exports_an_adapter_peft_agrees_with(tmp_path):
    """sft trains DoRA at TP2 x PP2 (4 gloo ranks); `--peft` gives a folder whose peft logits equal the merged
    export's and megallama's Megatron forward of the run (verify layer-diff, 4 ranks); megatron2megatron's merged
    checkpoint reads back to the same tensors as megatron2hf's."""
    from megallama.convert import convert
    from megallama.sft.data import learnable_lines, make_learnable_dataset
    from megallama.tiny import make_hf_checkpoint, train_tokenizer

    hf = make_hf_checkpoint(tmp_path / "hf", "llama2")
    train_tokenizer(hf, vocab_size=320, extra_lines=learnable_lines())  # short prompts -> short sequences
    convert(hf, tmp_path / "base", src_format="hf", dst_format="megatron", tp=2, pp=2)
    train = make_learnable_dataset(tmp_path / "train.jsonl", n=64, seed=0)
    config = Path(__file__).parents[1] / "configs" / "sft" / "tiny-cpu.yaml"
    run = tmp_path / "run"
    result = runner.invoke(app, ["sft", "--config", str(config), f"load={tmp_path / 'base'}", f"data.train={train}",
                                 f"output={run}", "train.steps=3", "train.warmup_steps=1", "train.save_interval=3",
                                 "train.eval_interval=100", "peft.method=dora", f"peft.rank={RANK}",
                                 f"peft.alpha={ALPHA}", "parallel.tp=2", "parallel.pp=2"])
    assert result.exit_code == 0, result.output

    assert cli("megatron2hf", "--input-dir", run, "--output-dir", tmp_path / "adapter", "--peft").exit_code == 0
    assert cli("megatron2hf", "--input-dir", run, "--output-dir", tmp_path / "merged").exit_code == 0
    merged = LlamaForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        reference = merged(tokens(hf)).logits
        base = base_model(hf)(tokens(hf)).logits
    assert not torch.allclose(reference, base, **TOL)  # the run trained something
    torch.testing.assert_close(peft_logits(hf, tmp_path / "adapter"), reference, **TOL)
    # megallama's Megatron forward (base + adapters unmerged, TP2 x PP2) against peft on the exported adapter
    result = runner.invoke(app, ["verify", "layer-diff", "--megatron", str(run), "--reference", str(hf), "--json",
                                 str(tmp_path / "verify.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "verify.json").read_text())
    assert (report["tp"], report["pp"], report["verdict"]) == (2, 2, "PASS")
    assert report["max_abs_logits_diff"] <= 1e-5, report["max_abs_logits_diff"]

    result = cli("megatron2megatron", "--input-dir", run, "--output-dir", tmp_path / "meg", "--ckpt-format", "torch",
                 "--tp", "2")
    assert result.exit_code == 0, result.output
    assert cli("megatron2hf", "--input-dir", tmp_path / "meg", "--output-dir", tmp_path / "meg-hf").exit_code == 0
    a, b = load_file(tmp_path / "meg-hf" / "model.safetensors"), load_file(tmp_path / "merged" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

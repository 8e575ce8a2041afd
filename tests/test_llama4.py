"""Llama 4 (text): spec, conversion round trips (TP x PP x EP, torch / torch_dist), the multimodal text part,
refusals, inspect; and (slow) verify / generate against transformers' Llama4ForCausalLM.

The tiny model (megallama.tiny.LLAMA4_TEXT) has experts on layers 1 and 3, dense MLPs on 0 and 2, NoPE on layer 2,
an explicit head_dim, Scout's rope scaling, and attention_chunk_size 16 / floor_scale 8: shorter than the test
sequences (40 tokens), so chunked attention and temperature tuning change the reference's logits (asserted).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from megallama.cli import app
from megallama.convert import convert
from megallama.formats.hf import open_hf
from megallama.spec import ModelSpec
from megallama.tiny import LLAMA4_TEXT, make_llama4_checkpoint

runner = CliRunner()
SEQ = 40  # > attention_chunk_size 16 and > floor_scale 8


@pytest.fixture(scope="module")
def l4_dir(tmp_path_factory):
    return make_llama4_checkpoint(tmp_path_factory.mktemp("llama4") / "hf")


@pytest.fixture(scope="module")
def l4_mm_dir(tmp_path_factory):
    return make_llama4_checkpoint(tmp_path_factory.mktemp("llama4mm") / "hf", multimodal=True, seed=1)


def _tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _hf_logits(folder, tokens, **config_changes):
    from transformers import Llama4ForCausalLM

    model = Llama4ForCausalLM.from_pretrained(folder, dtype=torch.float32, **config_changes).eval()
    with torch.no_grad():
        return model(tokens, use_cache=False).logits


# ---------------------------------------------------------------- spec
def test_spec_reads_llama4_config_and_writes_it_back(l4_dir):
    cfg = json.loads((l4_dir / "config.json").read_text())
    spec = ModelSpec.from_hf_config(cfg)
    assert (spec.num_experts, spec.moe_layers, spec.nope_layers) == (4, (1, 3), (2,))
    assert (spec.head_dim, spec.qk_norm, spec.attention_chunk_size, spec.floor_scale) == (24, "l2", 16, 8)
    assert (spec.ffn_hidden_size, spec.moe_ffn_hidden_size) == (96, 32)
    assert spec.rope_scaling["high_freq_factor"] == 1.0 and spec.rope_scaling["factor"] == 16.0
    assert ModelSpec.from_hf_config(spec.to_hf_config()) == spec
    assert ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_chunking_and_temperature_change_the_reference(l4_dir):
    """The judges below only mean something if the tiny model's sequences reach both mechanisms."""
    tokens = torch.randint(0, LLAMA4_TEXT["vocab_size"], (1, SEQ), generator=torch.Generator().manual_seed(0))
    base = _hf_logits(l4_dir, tokens)
    assert not torch.allclose(base, _hf_logits(l4_dir, tokens, attention_chunk_size=4096), atol=1e-4)
    assert not torch.allclose(base, _hf_logits(l4_dir, tokens, attn_temperature_tuning=False), atol=1e-4)


# ---------------------------------------------------------------- conversion
def test_hf_round_trip_is_bit_exact(l4_dir, tmp_path):
    convert(l4_dir, tmp_path / "back", src_format="hf", dst_format="hf")
    a, b = _tensors(l4_dir), _tensors(tmp_path / "back")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with open_hf(tmp_path / "back") as r:
        assert r.spec.architecture == "Llama4ForCausalLM"


@pytest.mark.parametrize("fmt,tp,pp,ep", [("torch_dist", 1, 1, 1), ("torch_dist", 2, 2, 2), ("torch", 2, 2, 2),
                                          ("torch", 1, 1, 4)])
def test_megatron_round_trip_is_bit_exact(l4_dir, tmp_path, fmt, tp, pp, ep):
    meg = tmp_path / "meg"
    convert(l4_dir, meg, src_format="hf", dst_format="megatron", tp=tp, pp=pp, ep=ep, ckpt_format=fmt)
    if fmt == "torch":  # Megatron-LM's naming: mp_rank_TT[_PPP][_EEE]
        names = sorted(p.name for p in (meg / "release").iterdir())
        last = f"mp_rank_{tp - 1:02d}" + (f"_{pp - 1:03d}" if pp > 1 else "") + f"_{ep - 1:03d}"
        assert len(names) == tp * pp * ep and names[-1] == last
    flags = (meg / "megatron_args.txt").read_text()
    assert "--num-experts 4" in flags and f"--expert-model-parallel-size {ep}" in flags
    convert(meg, tmp_path / "back", src_format="megatron", dst_format="hf")
    a, b = _tensors(l4_dir), _tensors(tmp_path / "back")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_torch_format_expert_ranks_hold_their_own_experts(l4_dir, tmp_path):
    """EP=2: rank e holds global experts 2e, 2e+1 as local 0, 1; the rest is replicated."""
    from megallama.formats.megatron.torch_format import load_rank_file

    meg = tmp_path / "meg"
    convert(l4_dir, meg, src_format="hf", dst_format="megatron", ep=2, ckpt_format="torch")
    fused = _tensors(l4_dir)["model.layers.1.feed_forward.experts.down_proj"]  # [E, F, h]
    for e in range(2):
        model = load_rank_file(meg / "release" / f"mp_rank_00_{e:03d}" / "model_optim_rng.pt")["model"]
        for local in range(2):
            key = f"decoder.layers.1.mlp.experts.local_experts.{local}.linear_fc2.weight"
            assert torch.equal(model[key], fused[2 * e + local].t())
        assert "decoder.layers.1.mlp.experts.local_experts.2.linear_fc2.weight" not in model


def test_multimodal_checkpoint_converts_its_text_part(l4_mm_dir, tmp_path):
    meg = tmp_path / "meg"
    report = convert(l4_mm_dir, meg, src_format="hf", dst_format="megatron")
    assert any("vision tower dropped" in n for n in report.notes)
    convert(meg, tmp_path / "back", src_format="megatron", dst_format="hf")
    src, back = _tensors(l4_mm_dir), _tensors(tmp_path / "back")
    assert set(back) == {k.removeprefix("language_model.") for k in src if k.startswith("language_model.")}
    assert all(torch.equal(src["language_model." + k], v) for k, v in back.items())
    assert json.loads((tmp_path / "back" / "config.json").read_text())["architectures"] == ["Llama4ForCausalLM"]


def test_inspect_shows_experts_and_layer_patterns(l4_dir, tmp_path):
    meg = tmp_path / "meg"
    convert(l4_dir, meg, src_format="hf", dst_format="megatron", ep=2)
    for folder in (l4_dir, meg):
        result = runner.invoke(app, ["inspect", str(folder), "--json"])
        assert result.exit_code == 0, result.output
        data = json.loads(result.stdout)
        assert data["experts"] == "4 routed (top-1, FFN 32) + shared (FFN 32)"
        assert (data["moe_layers"], data["rope_layers"]) == ("DEDE", "RRNR")
    assert data["ep"] == 2


def _vision_only(tmp_path):
    folder = tmp_path / "vision"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["Llama4VisionModel"],
                                                    "model_type": "llama4_vision_model"}))
    return folder


@pytest.mark.parametrize("case", ["ep_not_dividing", "ep_on_dense", "vision_only"])
def test_bad_input_exits_2_and_leaves_nothing(case, l4_dir, hf_dir, tmp_path):
    src, extra, expect = {
        "ep_not_dividing": (l4_dir, ["--ep", "3"], "EP=3 does not divide the 4 experts"),
        "ep_on_dense": (hf_dir, ["--ep", "2"], "expert parallelism needs a mixture-of-experts model"),
        "vision_only": (_vision_only(tmp_path), [], "vision-only Llama 4 checkpoint has no language model"),
    }[case]
    out = tmp_path / "out"
    result = runner.invoke(app, ["convert", "hf2megatron", "--input-dir", str(src), "--output-dir", str(out),
                                 *extra])
    assert result.exit_code == 2, result.output
    assert expect in " ".join(result.output.split())
    assert not out.exists() and not list(tmp_path.glob(".out*"))


# ---------------------------------------------------------------- running the model (torchrun, slow)
@pytest.mark.slow
def test_verify_passes_at_tp_pp_ep_and_negative_controls_fail(l4_dir, l4_mm_dir, tmp_path):
    """fp32 logits within the verify tolerance (1e-5 relative) of transformers at TP1, TP2, PP2, EP2 (torch_dist
    and torch format) and for the multimodal checkpoint's text part; a router applied to the expert output, or
    the q/k norm on NoPE layers, FAIL at the first MoE / NoPE layer."""
    from megallama.verify.layer_diff import layer_diff_many

    cases = [("torch_dist", 1, 1, 1, l4_dir, None), ("torch_dist", 2, 1, 1, l4_dir, None),
             ("torch_dist", 1, 2, 1, l4_dir, None), ("torch_dist", 1, 1, 2, l4_dir, None),
             ("torch", 1, 1, 2, l4_dir, None), ("torch_dist", 1, 1, 1, l4_mm_dir, None),
             ("torch_dist", 1, 1, 1, l4_dir, {"moe_apply_probs_on_input": False}),
             ("torch_dist", 1, 1, 1, l4_dir, {"llama4_faults": {"qk_norm_on_nope": True}})]
    pairs, overrides = [], []
    for n, (fmt, tp, pp, ep, src, fault) in enumerate(cases):
        meg = tmp_path / f"meg{n}"
        convert(src, meg, src_format="hf", dst_format="megatron", tp=tp, pp=pp, ep=ep, ckpt_format=fmt)
        pairs.append((src, meg))
        overrides.append(fault)
    reports = layer_diff_many(pairs, seq_len=SEQ, batch=2, engine_overrides=overrides)
    for case, r in zip(cases[:6], reports[:6], strict=True):
        assert r.passed, (case, r.first_failing_point, r.max_abs_logits_diff)
        assert (r.tp, r.pp) == case[1:3]
        assert r.max_abs_logits_diff < 1e-4
    router, qk_norm = reports[6:]
    assert not router.passed and router.first_diverging_layer == 1 and router.first_failing_point == "layers.1.mlp"
    assert not qk_norm.passed and qk_norm.first_diverging_layer == 2
    assert qk_norm.first_failing_point == "layers.2.attention"


@pytest.mark.slow
def test_greedy_generate_equals_transformers_at_tp_pp_ep(l4_dir, tmp_path):
    from transformers import Llama4ForCausalLM

    from megallama.generate.driver import Prompt, Settings, generate

    meg = tmp_path / "meg"
    convert(l4_dir, meg, src_format="hf", dst_format="megatron")
    prompt = "The quick brown fox jumps over the lazy dog and keeps running through the field"
    done = generate(meg, [Prompt(prompt)], Settings(max_new_tokens=12, tp=2, pp=1, ep=2))[0]
    assert len(done.prompt_ids) + 12 > LLAMA4_TEXT["attention_chunk_size"]  # decoding crosses a chunk boundary
    model = Llama4ForCausalLM.from_pretrained(l4_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([done.prompt_ids]), max_new_tokens=12, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    expected = out[0, len(done.prompt_ids):].tolist()
    n = len(done.completion_ids)
    assert done.completion_ids == expected[:n]  # token for token
    assert n == 12 or (done.stop == "eos" and expected[n] == 2)  # generate stops at EOS, transformers was told not to


@pytest.mark.slow
def test_sft_ep2_equals_ep1_per_step(tmp_path):
    """Loss and pre-clip grad_norm per step are the same with the experts split over two ranks (alltoall
    dispatcher, which needs the CPU bridge's split sizes) as with every expert on every rank (allgather
    dispatcher); DP2 in both runs."""
    from megallama.sft.data import learnable_lines, make_learnable_dataset
    from megallama.sft.report import read_metrics
    from megallama.tiny import train_tokenizer

    hf = make_llama4_checkpoint(tmp_path / "hf", tokenizer=False)
    train_tokenizer(hf, vocab_size=LLAMA4_TEXT["vocab_size"], extra_lines=learnable_lines())
    convert(hf, tmp_path / "meg", src_format="hf", dst_format="megatron")
    train = make_learnable_dataset(tmp_path / "train.jsonl", n=64, seed=0)
    config = Path(__file__).parents[1] / "configs" / "sft" / "tiny-cpu.yaml"
    runs = {}
    for ep, dispatcher in ((1, "allgather"), (2, "alltoall")):
        out = tmp_path / f"ep{ep}-{dispatcher}"
        result = runner.invoke(app, [
            "sft", "--config", str(config), f"load={tmp_path / 'meg'}", f"data.train={train}", "data.eval=null",
            f"output={out}", "train.steps=3", "train.micro_batch_size=2", "train.global_batch_size=4",
            "train.save_interval=3", "train.eval_interval=100", "parallel.tp=1", "parallel.pp=1", "parallel.dp=2",
            f"parallel.ep={ep}", f"parallel.moe_dispatcher={dispatcher}", "train.precision=fp32",
            "data.seq_length=48"])
        assert result.exit_code == 0, result.output
        runs[ep, dispatcher] = [(m["loss"], m["grad_norm"]) for m in read_metrics(out) if "loss" in m]
    base = runs[1, "allgather"]
    assert len(base) == 3
    for (loss, norm), (loss1, norm1) in zip(runs[2, "alltoall"], base, strict=True):
        assert loss == pytest.approx(loss1, rel=1e-5) and norm == pytest.approx(norm1, rel=1e-5)

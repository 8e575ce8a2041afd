"""verify layer-diff: comparison maths, the verdict, PASS on correct conversions at every TP x PP, FAIL located
on planted conversion bugs (formats.md section 6), and the CLI contract (exit codes 0 / 1 / 2, --json).

Launches are the expensive part (~5-15 s each on 2 cores): every fp32 pair runs through one session fixture,
in which pairs with the same TP x PP share one torchrun launch (`layer_diff_many`).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import TOLERANCES, assert_one_line_error, cli

from megallama import transforms as T
from megallama.convert import convert
from megallama.errors import InputError
from megallama.formats.megatron.torch_format import MODEL_FILE, checkpoint_dir
from megallama.tiny import make_hf_checkpoint
from megallama.verify.data import reference_format, sample_tokens
from megallama.verify.layer_diff import (
    TOLERANCES as LIMITS,
)
from megallama.verify.layer_diff import (
    PointDiff,
    compare_point,
    layer_diff_many,
    locate,
    next_token_loss,
    topk_agreement,
)

GRIDS = [(1, 1), (2, 1), (1, 2), (2, 2)]
CONTRACT_KEYS = {"verdict", "dtype", "tp", "pp", "max_abs_logits_diff", "top1_agreement", "first_diverging_layer",
                 "layers", "loss"}


# ---------------------------------------------------------------- comparison maths (no launches)
def point(name: str, ok: bool) -> PointDiff:
    return PointDiff(name, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, ok)


def test_identical_tensors_pass_with_zero_diff():
    x = torch.randn(2, 8, 16)
    p = compare_point("layers.0", x, x.clone(), LIMITS["float32"], depth=1)
    assert p.ok and p.max_abs == 0 and p.rel_err == 0 and p.cosine == pytest.approx(1.0)


def test_tolerance_is_relative_to_the_reference_scale():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 16, generator=gen) * 1000  # large activations: rounding noise scales with them
    noisy = x * (1 + 1e-6 * torch.randn(x.shape, generator=gen))
    assert compare_point("p", x, noisy, LIMITS["float32"], depth=0).ok
    assert not compare_point("p", x / 1000, noisy / 1000 + 1e-3, LIMITS["float32"], depth=0).ok


def test_one_bad_element_fails_even_when_the_average_is_fine():
    x = torch.randn(2, 64, 64)
    y = x.clone()
    y[1, 7, 3] += 0.5
    p = compare_point("embedding", x, y, LIMITS["bfloat16"], depth=0)
    assert not p.ok and p.mean_abs < 1e-4


def test_nan_never_passes():
    x = torch.randn(4, 4)
    y = x.clone()
    y[1, 1] = float("nan")
    assert not compare_point("logits", x, y, LIMITS["bfloat16"], depth=4).ok
    assert not compare_point("logits", x, y, LIMITS["bfloat16"], depth=4, chunk=3).ok  # NaN in a middle chunk


def test_chunked_statistics_equal_whole_tensor_statistics():
    x, y = torch.randn(3, 7, 11), torch.randn(3, 7, 11)
    whole = compare_point("p", x, y, LIMITS["float32"], depth=2)
    chunked = compare_point("p", x, y, LIMITS["float32"], depth=2, chunk=10)
    assert whole.max_abs == chunked.max_abs and whole.scale == chunked.scale
    for field in ("mean_abs", "rel_err", "cosine"):
        assert getattr(chunked, field) == pytest.approx(getattr(whole, field), rel=1e-12)
    assert whole.cosine == pytest.approx(float(torch.nn.functional.cosine_similarity(
        x.flatten().double(), y.flatten().double(), dim=0)), rel=1e-12)


def test_low_precision_limits_are_looser_and_grow_with_depth():
    fp32, bf16, fp16 = (LIMITS[d] for d in ("float32", "bfloat16", "float16"))
    assert fp32.l2_rel < fp16.l2_rel < bf16.l2_rel
    assert bf16.limits(1.0, 8)[1] > bf16.limits(1.0, 1)[1]


@pytest.mark.parametrize(("failing", "expected"), [
    ("embedding", (-1, "embedding", "embedding")),
    ("layers.2.attention", (2, "attention", "layers.2.attention")),
    ("layers.2.mlp", (2, "mlp", "layers.2.mlp")),
    ("layers.2", (2, "layer_output", "layers.2")),
    ("final_norm", (None, "final_norm", "final_norm")),
    ("logits", (None, "logits", "logits")),
])
def test_locate_names_the_first_point_out_of_tolerance(failing, expected):
    names = ["embedding", "layers.2.attention", "layers.2.mlp", "layers.2", "final_norm", "logits"]
    start = names.index(failing)
    assert locate([point(n, i < start) for i, n in enumerate(names)]) == expected
    assert locate([point(n, True) for n in names]) == (None, None, None)


def test_topk_agreement_and_loss():
    ref = torch.randn(2, 5, 40)
    assert topk_agreement(ref, ref, 1) == 1.0 and topk_agreement(ref, ref, 5) == 1.0
    assert topk_agreement(ref, -ref, 1) == 0.0
    tokens = torch.randint(0, 40, (2, 5))
    want = torch.nn.functional.cross_entropy(ref[:, :-1].reshape(-1, 40), tokens[:, 1:].reshape(-1))
    assert next_token_loss(ref, tokens) == pytest.approx(float(want), rel=1e-6)


# ---------------------------------------------------------------- inputs (no launches)
def test_sample_tokens_from_the_checkpoint_tokenizer(hf_dir, tmp_path):
    tokens, source = sample_tokens([hf_dir], vocab_size=320, data=None, seq_len=16, batch=3)
    assert tokens.shape == (3, 16) and int(tokens.max()) < 320 and tokens[0, 0] == 1  # BOS first
    assert "built-in sample" in source
    text = tmp_path / "data.txt"
    text.write_text("A short file is repeated until the batch is full.")
    from_file, _ = sample_tokens([hf_dir], vocab_size=320, data=text, seq_len=64, batch=2)
    assert from_file.shape == (2, 64) and not torch.equal(from_file[:, :16], tokens[:2])


def test_sample_tokens_without_tokenizer_is_seeded(tmp_path):
    a, source = sample_tokens([tmp_path], vocab_size=50, data=None, seq_len=8, batch=2)
    b, _ = sample_tokens([tmp_path], vocab_size=50, data=None, seq_len=8, batch=2)
    assert torch.equal(a, b) and int(a.max()) < 50 and "random" in source


@pytest.mark.parametrize(("case", "message"), [
    ("no_tokenizer", "--data needs a tokenizer"),
    ("empty", "is empty"),
    ("missing", "does not exist"),
    ("small_vocab", "does not belong to this checkpoint"),
])
def test_sample_tokens_refusals(hf_dir, tmp_path, case, message):
    data = tmp_path / "data.txt"
    data.write_text("" if case == "empty" else "some text")
    folder = tmp_path if case == "no_tokenizer" else hf_dir
    with pytest.raises(InputError, match=message):
        sample_tokens([folder], vocab_size=10 if case == "small_vocab" else 320,
                      data=tmp_path / "nope.txt" if case == "missing" else data, seq_len=8, batch=1)


def test_reference_format_detection(hf_dir, meta_dir, tmp_path):
    assert reference_format(hf_dir) == "hf"
    assert reference_format(meta_dir) == "meta"
    nested = tmp_path / "nested"
    shutil.copytree(meta_dir, nested / "7B")  # the reference scripts' --input_dir X --model_size 7B layout
    assert reference_format(nested) == "meta"
    with pytest.raises(InputError, match="neither an HF folder"):
        reference_format(_empty(tmp_path))


def _empty(tmp_path: Path) -> Path:
    (tmp_path / "empty").mkdir(exist_ok=True)
    return tmp_path / "empty"


# ---------------------------------------------------------------- checkpoints
@pytest.fixture(scope="session")
def verify_root(tmp_path_factory):
    return tmp_path_factory.mktemp("verify")


@pytest.fixture(scope="session")
def meg_dirs(hf_dirs, verify_root):
    """{(preset, tp, pp): Megatron folder converted from the HF fixture} (GQA and Llama 3 at every grid, tied 1x2)."""
    wanted = [(p, tp, pp) for p in ("llama2", "llama3") for tp, pp in GRIDS] + [("tied", 1, 2)]
    return {key: convert(hf_dirs[key[0]], verify_root / "meg-{}-tp{}-pp{}".format(*key), src_format="hf",
                         dst_format="megatron", tp=key[1], pp=key[2], ckpt_format="torch").output
            for key in wanted}


@pytest.fixture(scope="session")
def meta_dir(hf_dirs, verify_root):
    return convert(hf_dirs["llama2"], verify_root / "meta-llama2", src_format="hf", dst_format="meta").output


def rank_file(folder: Path, tp_rank: int, pp_rank: int, pp: int) -> Path:
    return checkpoint_dir(folder, None, tp_rank, pp_rank, pp) / MODEL_FILE


def broken_copy(src: Path, dst: Path, mutate: Callable[[dict, dict], None]) -> Path:
    """Copy a correct checkpoint and let `mutate(models, manifest)` edit it; models[(tp_rank, pp_rank)]."""
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "megallama.json").read_text())
    tp, pp = manifest["tp"], manifest["pp"]
    files = {(t, p): rank_file(dst, t, p, pp) for t in range(tp) for p in range(pp)}
    ckpts = {k: torch.load(f, weights_only=False) for k, f in files.items()}
    mutate({k: c["model"] for k, c in ckpts.items()}, manifest)
    for k, f in files.items():
        torch.save(ckpts[k], f)
    (dst / "megallama.json").write_text(json.dumps(manifest))
    return dst


# ---------------------------------------------------------------- planted bugs: each one a converter has shipped
def _each_qkv(models: dict, manifest: dict, fn) -> None:
    nh, ng = manifest["spec"]["num_heads"] // manifest["tp"], manifest["spec"]["num_kv_heads"] // manifest["tp"]
    for m in models.values():
        for key in [k for k in m if k.endswith("linear_qkv.weight")]:
            q, k, v = T.split_qkv(m[key], num_heads=nh, num_kv_heads=ng)
            m[key] = fn(q, k, v, nh, ng)


def rotary_left_in_meta_order(models, manifest):  # P1: forgot to permute q/k for a rotate-half model
    _each_qkv(models, manifest, lambda q, k, v, nh, ng: T.fuse_qkv(
        T.hf_to_meta_rotary(q, nh), T.hf_to_meta_rotary(k, ng), v, num_heads=nh, num_kv_heads=ng))


def k_permuted_with_num_heads(models, manifest):  # P2: K permuted with nh instead of ng (GQA)
    _each_qkv(models, manifest, lambda q, k, v, nh, ng: T.fuse_qkv(
        q, T.meta_to_hf_rotary(T.hf_to_meta_rotary(k, ng), nh), v, num_heads=nh, num_kv_heads=ng))


def alibaba_qkv_layout(models, manifest):  # P3: per-rank [Q; K; V] instead of grouped by query group
    _each_qkv(models, manifest, lambda q, k, v, nh, ng: torch.cat([q, k, v]))


def up_gate_swapped(models, manifest):  # P5: [up; gate] halves in linear_fc1
    for m in models.values():
        for key in [k for k in m if k.endswith("linear_fc1.weight")]:
            gate, up = T.split_gate_up(m[key])
            m[key] = torch.cat([up, gate])


def fc1_chunked_naively(models, manifest):  # P5: the full [w1; w3] cut into TP chunks (NVIDIA/Megatron-LM#360)
    ranks = [models[t, 0] for t in range(manifest["tp"])]
    for key in [k for k in ranks[0] if k.endswith("linear_fc1.weight")]:
        gates, ups = zip(*(T.split_gate_up(m[key]) for m in ranks), strict=True)
        full = torch.cat([*gates, *ups])  # [w1; w3]
        for m, part in zip(ranks, torch.chunk(full, len(ranks)), strict=True):
            m[key] = part.clone()


def rope_theta_default(models, manifest):  # P11: Megatron's default --rotary-base 10000 for a Llama 3 model
    manifest["spec"]["rope_theta"] = 10000.0


def norm_eps_1e6(models, manifest):  # P13: LLaMA-1's 1e-6 (MinfanZhao's default) for a Llama 2 model
    manifest["spec"]["norm_eps"] = 1e-6


def _swap(a: dict, b: dict, prefix_a: str, prefix_b: str, parts: tuple[str, ...] = ("",)) -> None:
    for key in [k for k in a if k.startswith(prefix_a) and any(p in k for p in parts)]:
        other = prefix_b + key[len(prefix_a):]
        a[key], b[other] = b[other], a[key]


def layers_swapped_across_stages(models, manifest):  # PP=2: global layer 1 (stage 0) <-> global 2 (stage 1)
    _swap(models[0, 0], models[0, 1], "decoder.layers.1.", "decoder.layers.0.")


def layer_in_wrong_index(models, manifest):  # stage 1 of 2x2 loads its two layers in reverse order
    for t in range(manifest["tp"]):
        _swap(models[t, 1], models[t, 1], "decoder.layers.0.", "decoder.layers.1.")


def mlp_from_the_next_layer(models, manifest):  # 1x2: layer 2 and 3 exchange only their MLP weights
    _swap(models[0, 1], models[0, 1], "decoder.layers.0.", "decoder.layers.1.", ("mlp", "pre_mlp_layernorm"))


def final_norm_not_loaded(models, manifest):  # a key missed and left at its init value (strict=False loaders)
    for (_, p), m in models.items():
        if p == manifest["pp"] - 1:
            m["decoder.final_layernorm.weight"] = torch.ones_like(m["decoder.final_layernorm.weight"])


def corrupted_embedding_row(token: int):
    def mutate(models, manifest):  # the row of a token the batch uses, in whichever TP rank holds it
        per = manifest["padded_vocab_size"] // manifest["tp"]
        rows = models[token // per, 0]["embedding.word_embeddings.weight"]
        rows[token % per] = torch.randn(rows.shape[1], generator=torch.Generator().manual_seed(1)) * rows.std()
    return mutate


def frequent_token(folder: Path) -> int:
    tokens, _ = sample_tokens([folder], vocab_size=320, data=None, seq_len=64, batch=2)
    return int(torch.bincount(tokens.flatten()).argmax())


# label: (base checkpoint, mutation, expected first_diverging_layer, expected diverged_in)
BUGS = {
    "P1-rotary-meta-order": (("llama2", 1, 1), rotary_left_in_meta_order, 0, "attention"),
    "P2-k-permuted-with-num-heads": (("llama2", 1, 1), k_permuted_with_num_heads, 0, "attention"),
    "P3-alibaba-qkv-layout": (("llama2", 1, 1), alibaba_qkv_layout, 0, "attention"),
    "P5-up-gate-swapped": (("llama2", 1, 1), up_gate_swapped, 0, "mlp"),
    "P5-fc1-chunked-naively-tp2": (("llama2", 2, 1), fc1_chunked_naively, 0, "mlp"),
    "P11-rope-theta-10000": (("llama3", 1, 1), rope_theta_default, 0, "attention"),
    "P13-norm-eps-1e-6": (("llama2", 1, 1), norm_eps_1e6, 0, "attention"),
    "layers-swapped-across-pp-stages": (("llama2", 1, 2), layers_swapped_across_stages, 1, "attention"),
    "layer-in-wrong-index-stage1": (("llama2", 2, 2), layer_in_wrong_index, 2, "attention"),
    "mlp-from-next-layer": (("llama2", 1, 2), mlp_from_the_next_layer, 2, "mlp"),
    "final-norm-not-loaded": (("llama2", 2, 1), final_norm_not_loaded, None, "final_norm"),
    "corrupted-embedding-row": (("llama2", 2, 2), "embedding", -1, "embedding"),
}


@pytest.fixture(scope="session")
def broken(meg_dirs, verify_root):
    out = {}
    for label, (base, mutate, _, _) in BUGS.items():
        if mutate == "embedding":
            mutate = corrupted_embedding_row(frequent_token(meg_dirs[base]))
        out[label] = broken_copy(meg_dirs[base], verify_root / f"bug-{label}", mutate)
    return out


@pytest.fixture(scope="session")
def megatron_lm_style(meg_dirs, verify_root):
    """A checkpoint as other tools write it: no megallama.json, and args without the true vocab size (and no
    tokenizer.model beside it, which the reader would otherwise count the true vocab from)."""
    folder = broken_copy(meg_dirs["llama2", 2, 1], verify_root / "no-manifest", lambda models, manifest: None)
    (folder / "megallama.json").unlink()
    (folder / "tokenizer.model").unlink()
    for f in folder.glob("release/*/" + MODEL_FILE):
        ckpt = torch.load(f, weights_only=False)
        del ckpt["args"].vocab_size
        torch.save(ckpt, f)
    return folder


@pytest.fixture(scope="session")
def deep(verify_root):
    """A 16-layer tiny model: tolerances grow with depth, and a small bug must still stand out at that depth."""
    from megallama.tiny import PRESETS

    hf = make_hf_checkpoint(verify_root / "hf-deep16", PRESETS["llama2"].replace(num_layers=16))
    meg = convert(hf, verify_root / "meg-deep16", src_format="hf", dst_format="megatron", ckpt_format="torch").output
    return {"hf": hf, "meg": meg, "eps-bug": broken_copy(meg, verify_root / "bug-deep16-eps", norm_eps_1e6)}


@pytest.fixture(scope="session")
def fp32_reports(hf_dirs, meg_dirs, meta_dir, broken, megatron_lm_style, deep):
    """Every fp32 verification of this file, in one call: four torchrun launches (one per TP x PP)."""
    pairs = {f"pass-{p}-tp{t}-pp{q}": (hf_dirs[p], d) for (p, t, q), d in meg_dirs.items()}
    pairs["pass-meta-reference"] = (meta_dir, meg_dirs["llama2", 1, 1])
    pairs["pass-no-manifest"] = (hf_dirs["llama2"], megatron_lm_style)
    pairs["pass-deep16"] = (deep["hf"], deep["meg"])
    pairs["P13-norm-eps-deep16"] = (deep["hf"], deep["eps-bug"])
    pairs |= {label: (hf_dirs[BUGS[label][0][0]], d) for label, d in broken.items()}
    reports = dict(zip(pairs, layer_diff_many(list(pairs.values()), dtype="fp32"), strict=True))
    for label, report in reports.items():  # the measured values, for docs/testing.md (pytest -s)
        if report.verdict == "PASS":
            print(f"{label}: headroom {headroom(report):.1f}x, logits {report.max_abs_logits_diff:.1e}, "
                  f"loss {abs(report.loss_megatron - report.loss_reference):.1e}")
    return reports


# ---------------------------------------------------------------- PASS on correct conversions
HEADROOM = TOLERANCES["verify_headroom"]


def headroom(report) -> float:
    """How far below its fp32 limits a report sits: the smallest limit / measured ratio over every point (max abs
    and relative error) and the LM loss."""
    loss = abs(report.loss_megatron - report.loss_reference) / LIMITS["float32"].loss
    worst = max([loss] + [max(p.max_abs / p.limit, p.rel_err / p.rel_limit) for p in report.points])
    return 1 / worst if worst > 0 else float("inf")


@pytest.mark.slow
@pytest.mark.parametrize(("tp", "pp"), GRIDS)
@pytest.mark.parametrize("preset", ["llama2", "llama3"])
def test_correct_conversion_passes(fp32_reports, preset, tp, pp):
    report = fp32_reports[f"pass-{preset}-tp{tp}-pp{pp}"]
    assert report.verdict == "PASS", report.first_failing_point
    assert (report.tp, report.pp) == (tp, pp)
    assert report.max_abs_logits_diff <= 1e-5
    assert report.top1_agreement == 1.0 and report.first_diverging_layer is None
    # the headroom docs/verify.md claims: correct conversions sit >= 8x below every fp32 limit, the loss included
    # (planted bugs sit far above)
    assert headroom(report) >= HEADROOM, headroom(report)
    data = report.to_json()
    assert CONTRACT_KEYS <= set(data) and data["loss"]["reference"] == report.loss_reference
    assert [p["name"] for p in data["layers"]][:4] == ["embedding", "layers.0.attention", "layers.0.mlp", "layers.0"]


@pytest.mark.slow
@pytest.mark.parametrize("label", ["pass-meta-reference", "pass-tied-tp1-pp2", "pass-no-manifest"])
def test_meta_reference_tied_embeddings_and_foreign_checkpoints_pass(fp32_reports, label):
    report = fp32_reports[label]
    assert report.verdict == "PASS" and report.max_abs_logits_diff <= 1e-5
    assert headroom(report) >= HEADROOM, headroom(report)
    if label == "pass-no-manifest":  # the padded vocab (512) is cut to the reference's 320 columns
        assert any("320 of 512 logit columns" in n for n in report.notes)


# ---------------------------------------------------------------- FAIL, located, on planted bugs
@pytest.mark.slow
@pytest.mark.parametrize("label", list(BUGS))
def test_planted_bug_fails_at_the_right_place(fp32_reports, label):
    _, _, layer, where = BUGS[label]
    report = fp32_reports[label]
    assert report.verdict == "FAIL"
    assert (report.first_diverging_layer, report.diverged_in) == (layer, where)
    failing = next(p for p in report.points if p.name == report.first_failing_point)
    assert failing.max_abs > 10 * failing.limit or failing.rel_err > 10 * failing.rel_limit  # far above, not noise
    first = report.points.index(failing)
    assert all(p.ok for p in report.points[:first])


@pytest.mark.slow
def test_spec_mismatch_is_named_in_the_notes(fp32_reports):
    assert any("rope_theta differs" in n for n in fp32_reports["P11-rope-theta-10000"].notes)


@pytest.mark.slow
def test_small_bug_is_still_caught_16_layers_deep(fp32_reports):
    """The depth-scaled limits must not swallow a small bug: the eps bug on a 16-layer model, in fp32."""
    good, bad = fp32_reports["pass-deep16"], fp32_reports["P13-norm-eps-deep16"]
    assert good.verdict == "PASS" and len(good.points) == 1 + 3 * 16 + 2
    assert headroom(good) >= HEADROOM, headroom(good)
    assert (bad.verdict, bad.first_diverging_layer, bad.diverged_in) == ("FAIL", 0, "attention")
    deepest = [p for p in bad.points if p.name in ("layers.15", "logits")]
    assert all(not p.ok for p in deepest)  # and it stays visible to the last layer and the logits


# ---------------------------------------------------------------- bf16 / fp16
@pytest.mark.slow
def test_fp16_passes_correct_and_fails_broken(hf_dirs, meg_dirs, broken):
    good, bad = layer_diff_many([(hf_dirs["llama2"], meg_dirs["llama2", 1, 1]),
                                 (hf_dirs["llama2"], broken["P5-up-gate-swapped"])], dtype="fp16")
    assert good.verdict == "PASS" and good.dtype == "float16"
    assert max(p.rel_err / p.rel_limit for p in good.points) < 0.6
    assert (bad.verdict, bad.first_diverging_layer, bad.diverged_in) == ("FAIL", 0, "mlp")


@pytest.mark.slow
def test_bf16_passes_correct_and_fails_broken(hf_dirs, meg_dirs, broken):
    good, bad = layer_diff_many([(hf_dirs["llama3"], meg_dirs["llama3", 1, 1]),
                                 (hf_dirs["llama2"], broken["P1-rotary-meta-order"])], dtype="bf16")
    assert good.verdict == "PASS" and good.dtype == "bfloat16"
    assert max(p.rel_err / p.rel_limit for p in good.points) < 0.6
    assert (bad.verdict, bad.first_diverging_layer, bad.diverged_in) == ("FAIL", 0, "attention")


# ---------------------------------------------------------------- CLI
def run_layer_diff(*args):
    return cli("verify", "layer-diff", *args)


@pytest.mark.slow
def test_cli_pass_writes_the_json_contract(hf_dirs, meg_dirs, tmp_path):
    data = tmp_path / "data.txt"
    data.write_text("Verification data: the same tokens go through both models, one layer at a time.\n" * 4)
    result = run_layer_diff("--reference", hf_dirs["llama2"], "--megatron", meg_dirs["llama2", 1, 1], "--data", data,
                 "--seq-len", 32, "--batch", 3, "--json", tmp_path / "out.json")
    assert result.exit_code == 0, result.output
    assert "PASS" in result.stdout and "layers.3.mlp" in result.stdout
    report = json.loads((tmp_path / "out.json").read_text())
    assert CONTRACT_KEYS <= set(report)
    assert report["verdict"] == "PASS" and report["first_diverging_layer"] is None
    assert report["tokens"]["batch"] == 3 and report["tokens"]["seq_len"] == 32
    assert len(report["layers"]) == 1 + 3 * 4 + 2 and report["max_abs_logits_diff"] <= 1e-5


@pytest.mark.slow
def test_cli_fail_exits_1_and_locates(hf_dirs, broken, tmp_path):
    result = run_layer_diff("--reference", hf_dirs["llama2"], "--megatron", broken["P5-up-gate-swapped"],
                 "--json", tmp_path / "out.json")
    assert result.exit_code == 1, result.output
    assert "FAIL: first divergence at layer 0, mlp" in result.stdout
    report = json.loads((tmp_path / "out.json").read_text())
    assert (report["verdict"], report["first_diverging_layer"], report["diverged_in"]) == ("FAIL", 0, "mlp")


@pytest.mark.slow
def test_cli_worker_error_is_one_line_exit_2(hf_dirs, meg_dirs, verify_root):
    def extra_key(models, manifest):  # passes the reader's checks, fails the worker's strict load
        models[0, 0]["decoder.layers.0.self_attention.core_attention._extra_state"] = torch.zeros(1)

    bad = broken_copy(meg_dirs["llama2", 1, 1], verify_root / "bad-extra-key", extra_key)
    result = run_layer_diff("--reference", hf_dirs["llama2"], "--megatron", bad)
    assert result.exit_code == 2, result.output
    assert "does not fit the model" in result.stderr and "Traceback" not in result.output


@pytest.fixture(scope="session")
def hf_vocab_256(verify_root):
    from megallama.tiny import PRESETS

    return make_hf_checkpoint(verify_root / "hf-vocab256", PRESETS["llama2"].replace(vocab_size=256), tokenizer=False)


def _bad_input_cases(hf_dirs, meg_dirs, hf_vocab_256, tmp_path):
    llama2, meg = hf_dirs["llama2"], meg_dirs["llama2", 1, 1]
    return {
        "missing-reference": (["--reference", tmp_path / "nope", "--megatron", meg], "does not exist"),
        "missing-megatron": (["--reference", llama2, "--megatron", tmp_path / "nope"], "does not exist"),
        "not-a-model": (["--reference", _empty(tmp_path), "--megatron", meg], "neither an HF folder"),
        "vocab-mismatch": (["--reference", hf_vocab_256, "--megatron", meg], "vocab_size 256 vs 320"),
        "shape-mismatch": (["--reference", hf_dirs["llama1"], "--megatron", meg], "num_kv_heads 4 vs 2"),
        "bad-dtype": (["--reference", llama2, "--megatron", meg, "--dtype", "fp8"], "unsupported dtype"),
        "missing-data": (["--reference", llama2, "--megatron", meg, "--data", tmp_path / "x.txt"], "does not exist"),
        "seq-len": (["--reference", llama2, "--megatron", meg, "--seq-len", 1], "--seq-len must be >= 2"),
    }


@pytest.mark.parametrize("case", ["missing-reference", "missing-megatron", "not-a-model", "vocab-mismatch",
                                  "shape-mismatch", "bad-dtype", "missing-data", "seq-len"])
def test_cli_bad_input_exits_2_with_one_line(hf_dirs, meg_dirs, hf_vocab_256, tmp_path, case):
    args, message = _bad_input_cases(hf_dirs, meg_dirs, hf_vocab_256, tmp_path)[case]
    result = run_layer_diff(*args, "--json", tmp_path / "out.json")
    assert_one_line_error(result, message, absent=tmp_path / "out.json")


def test_cli_refuses_a_world_it_cannot_launch(hf_dirs, meg_dirs, monkeypatch):
    monkeypatch.setattr("megallama.verify.data.MAX_CPU_RANKS", 2)
    result = run_layer_diff("--reference", hf_dirs["llama2"], "--megatron", meg_dirs["llama2", 2, 2])
    assert result.exit_code == 2 and "4 ranks" in result.stderr

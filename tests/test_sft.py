"""`megallama sft` end to end on CPU (gloo, tiny LLaMA-2 GQA model, seq 96, 6 steps).

Invariance, not stored numbers: the loss and the pre-clip grad_norm per step of TP2 x PP2, DP2 and a different
accumulation split equal the TP1 x PP1 run's (the step-1 grad_norm equals transformers' per-token gradient norm,
and wrong normalisations are shown to fail that tolerance); a resumed run equals the uninterrupted one; the step-1
loss and the final eval loss equal what transformers computes on the same batch with the same weights (before
training, and after the round trip sft checkpoint -> megatron2pth -> pth2hf). Six torchrun launches (1, 4, 2, 1, 1,
1 ranks) for those; the advertised options (recompute, the distributed optimizer's state across layouts,
--resume-weights-only, bf16 / fp16 and the LR schedule) add five more (2, 1, 2, 1, 1 ranks), one run per variant,
each read by several tests.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from helpers import ROOT, SFT_CONFIG, TOLERANCES, WORKERS, assert_one_line_error, cli

from megallama.convert import convert
from megallama.sft.data import global_batches, learnable_lines, load_dataset, load_tokenizer, make_learnable_dataset
from megallama.sft.report import read_metrics
from megallama.tiny import make_hf_checkpoint, train_tokenizer

SEQ, MICRO, GLOBAL, STEPS, SEED = 96, 4, 8, 6, 1234
LAYOUT = TOLERANCES["sft_layout_rel"]  # any layout vs TP1 x PP1, per step: loss, grad norm, eval loss
HF_REL = TOLERANCES["sft_vs_transformers_rel"]  # step 1 (unchanged weights) vs transformers


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A tiny HF model whose tokenizer knows the task's words, its TP1xPP1 and TP2xPP2 Megatron folders, data."""
    root = tmp_path_factory.mktemp("sft")
    hf = make_hf_checkpoint(root / "hf", "llama2")
    train_tokenizer(hf, vocab_size=320, extra_lines=learnable_lines())  # short prompts -> short sequences
    convert(hf, root / "pth", src_format="hf", dst_format="meta")
    paths = {"root": root, "hf": hf, "train": make_learnable_dataset(root / "train.jsonl", n=256, seed=0),
             "eval": make_learnable_dataset(root / "eval.jsonl", n=32, seed=1)}
    for tp, pp in ((1, 1), (2, 2)):
        paths[f"meg{tp}{pp}"] = root / f"meg{tp}{pp}"
        convert(root / "pth", paths[f"meg{tp}{pp}"], src_format="meta", dst_format="megatron", tp=tp, pp=pp,
                ckpt_format="torch")  # what sft loads today
    return paths


def sft(tiny: dict, name: str, *args: str, load: str = "meg11", steps: int = STEPS, micro: int = MICRO):
    """Run `megallama sft` on the tiny recipe; returns (CliRunner result, output folder)."""
    output = tiny["root"] / name
    result = cli("sft", "--config", str(SFT_CONFIG), f"load={tiny[load]}", f"data.train={tiny['train']}",
                 f"data.eval={tiny['eval']}", f"output={output}", f"train.steps={steps}",
                 f"train.micro_batch_size={micro}", f"train.global_batch_size={GLOBAL}",
                 "train.save_interval=3", "train.eval_interval=3", *args)
    return result, output


def losses(output: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(output) if "loss" in r}


def grad_norms(output: Path) -> dict[int, float]:
    """Pre-clip global gradient norm per step: unlike the logged loss (a ratio of sums every split agrees on), it
    depends on how the gradients were normalised, so a wrong per-micro-batch or per-rank scaling shows here."""
    return {r["step"]: r["grad_norm"] for r in read_metrics(output) if "loss" in r}


def eval_losses(output: Path) -> dict[int, float]:
    return {r["step"]: r["eval_loss"] for r in read_metrics(output) if "eval_loss" in r}


def assert_same_losses(a: dict[int, float], b: dict[int, float], rel: float) -> None:
    assert a.keys() == b.keys(), (a, b)
    for step in a:
        assert abs(a[step] - b[step]) <= rel * abs(b[step]), (step, a[step], b[step])


@pytest.fixture(scope="module")
def base(tiny) -> Path:
    """TP1 x PP1 x DP1, micro 4 x accumulation 2: the reference run."""
    result, output = sft(tiny, "tp1pp1", "checkpoint.format=torch")  # megatron2pth / verify read it below
    assert result.exit_code == 0, result.output
    return output


def hf_loss(hf_dir: Path, tiny: dict, split: str, indices: list[int], *, train_on_prompt: bool = False):
    """(mean token loss, trained tokens) of transformers' LlamaForCausalLM on rows `indices` of the dataset."""
    from transformers import LlamaForCausalLM

    ds = load_dataset(tiny[split], fmt="alpaca", tokenizer=load_tokenizer(tiny["hf"]), seq_length=SEQ,
                      train_on_prompt=train_on_prompt, vocab_size=320)
    tokens, labels = ds.batch(indices)
    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(tokens).logits.float()  # [b, s, V]; labels are already shifted
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
    count = int((labels != -100).sum())
    return float(loss) / count, count


# ---------------------------------------------------------------- training
@pytest.mark.slow
def test_loss_falls_and_outputs(base):
    curve = losses(base)
    assert sorted(curve) == list(range(1, STEPS + 1))
    assert curve[STEPS] < curve[1] - 0.5, curve
    evals = eval_losses(base)
    assert sorted(evals) == [3, 6] and evals[6] < evals[3], evals
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "megallama.json", "tokenizer.model",
                 "iter_0000003/mp_rank_00/model_optim_rng.pt", "iter_0000006/mp_rank_00/model_optim_rng.pt"):
        assert (base / name).is_file(), name
    assert (base / "latest_checkpointed_iteration.txt").read_text().strip() == "6"
    record = read_metrics(base)[0]
    assert {"step", "loss", "lr", "tokens_per_s", "grad_norm", "loss_tokens"} <= record.keys()
    state = torch.load(base / "iter_0000003/mp_rank_00/model_optim_rng.pt", weights_only=False)
    assert {"args", "checkpoint_version", "iteration", "model", "optimizer", "opt_param_scheduler",
            "rng_state"} <= state.keys() and state["iteration"] == 3


@pytest.mark.slow
def test_step_one_loss_is_the_masked_token_loss(base, tiny):
    """Step 1 runs the unchanged weights: its loss is transformers' loss over the answer tokens of that batch."""
    indices = next(global_batches(256, global_batch_size=GLOBAL, seed=SEED))
    expected, count = hf_loss(tiny["hf"], tiny, "train", indices)
    first = read_metrics(base)[0]
    assert first["loss_tokens"] == count
    assert abs(first["loss"] - expected) <= HF_REL * expected, (first["loss"], expected)


def hf_sample_grads(tiny: dict, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
    """Per sample of `indices`: (gradient of its summed token loss over all parameters, flattened; its trained
    tokens), from transformers' LlamaForCausalLM at the starting weights."""
    from transformers import LlamaForCausalLM

    ds = load_dataset(tiny["train"], fmt="alpaca", tokenizer=load_tokenizer(tiny["hf"]), seq_length=SEQ,
                      vocab_size=320)
    model = LlamaForCausalLM.from_pretrained(tiny["hf"], dtype=torch.float32)  # no dropout in LLaMA
    out = []
    for i in indices:
        tokens, labels = ds.batch([i])
        model.zero_grad()
        logits = model(tokens).logits.float()  # labels are already shifted
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum").backward()
        grad = torch.cat([p.grad.double().flatten() for p in model.parameters() if p.grad is not None])
        out.append((grad, int((labels != -100).sum())))
    return out


@pytest.mark.slow
def test_step_one_grad_norm_is_the_per_token_gradient_and_catches_a_wrong_normalisation(base, tiny):
    """Step 1's logged grad_norm (megatron-core's norm before clipping) is the norm of transformers' gradient of
    the token-loss sum divided by the trained tokens of the whole global batch: the quantity the grad_norm parity
    checks compare across TP / PP / DP / accumulation.

    Negative controls, which the same relative tolerance (HF_REL) must reject (else those checks could not fail):
    each micro-batch's mean token loss summed over the base run's two micro-batches of 4 (a gradient twice too
    large), and each sample's mean token loss averaged over the batch (Megatron's per-micro-batch normalisation at
    micro-batch 1; the samples hold 7 to 15 trained tokens, so it weights tokens unequally). Both give a loss of
    the same scale; only the gradient tells them apart. (The two micro-batches of 4 happen to hold 41 trained
    tokens each, which is why the subtle control splits per sample.)"""
    indices = next(global_batches(256, global_batch_size=GLOBAL, seed=SEED))
    samples = hf_sample_grads(tiny, indices)
    total = sum(n for _, n in samples)
    per_token = float(sum(g for g, _ in samples).norm()) / total
    micro = [(sum(g for g, _ in samples[k: k + MICRO]), sum(n for _, n in samples[k: k + MICRO]))
             for k in range(0, GLOBAL, MICRO)]
    per_micro_summed = float(sum(g / n for g, n in micro).norm())
    per_sample_mean = float(sum(g / n for g, n in samples).norm()) / len(samples)
    logged = read_metrics(base)[0]["grad_norm"]
    assert logged > 1.0  # above clip_grad = 1: the logged norm is the one before clipping
    assert abs(logged - per_token) <= HF_REL * per_token, (logged, per_token)
    assert len({n for _, n in samples}) > 1
    for wrong in (per_micro_summed, per_sample_mean):
        assert abs(logged - wrong) > HF_REL * logged, (logged, wrong)


@pytest.mark.slow
def test_train_on_prompt_counts_prompt_tokens(base, tiny):
    result, output = sft(tiny, "on-prompt", "data.train_on_prompt=true", "train.warmup_steps=1", steps=2)
    assert result.exit_code == 0, result.output
    indices = next(global_batches(256, global_batch_size=GLOBAL, seed=SEED))
    expected, count = hf_loss(tiny["hf"], tiny, "train", indices, train_on_prompt=True)
    first = read_metrics(output)[0]
    assert first["loss_tokens"] == count > 3 * read_metrics(base)[0]["loss_tokens"]
    assert abs(first["loss"] - expected) <= HF_REL * expected


@pytest.mark.slow
def test_tp2_pp2_matches_tp1_pp1(base, tiny):
    """TP2 x PP2 saves torch_dist (the default), as Megatron-LM writes it; resumed at TP1 x PP1 from its step-3
    checkpoint (weights and Adam state re-sharded by megatron-core), it continues the uninterrupted curve."""
    result, output = sft(tiny, "tp2pp2", "--tp", "2", "--pp", "2", load="meg22")
    assert result.exit_code == 0, result.output
    assert_same_losses(losses(output), losses(base), LAYOUT)
    assert_same_losses(grad_norms(output), grad_norms(base), LAYOUT)
    assert_same_losses(eval_losses(output), eval_losses(base), LAYOUT)
    it = output / "iter_0000006"
    assert {p.name for p in it.iterdir()} == {".metadata", "common.pt", "metadata.json"} | \
        {f"__{r}_{k}.distcp" for r in range(4) for k in range(2)}
    common = torch.load(it / "common.pt", weights_only=False)
    assert common["checkpoint_version"] == 3.0 and common["iteration"] == 6
    assert common["args"].ckpt_format == "torch_dist" and common["opt_param_scheduler"]["num_steps"] == 6
    assert json.loads((it / "metadata.json").read_text())["sharded_backend"] == "torch_dist"
    resumed = resume_after_kill(output, "tp2pp2-at-tp1pp1", "--tp", "1", "--pp", "1")
    assert_same_losses({s: losses(resumed)[s] for s in (4, 5, 6)}, {s: losses(base)[s] for s in (4, 5, 6)}, LAYOUT)


@pytest.mark.slow
def test_sequence_parallel_tp2_pp2_matches_tp1_pp1(base, tiny):
    """Sequence parallelism (activations split over TP along the sequence, megallama's SP RMSNorm) changes where
    the work happens, not the maths; the checkpoint keeps the keys pth2megatron writes."""
    result, output = sft(tiny, "tp2pp2sp", "--tp", "2", "--pp", "2", "parallel.sequence_parallel=true",
                         "checkpoint.format=torch", load="meg22")
    assert result.exit_code == 0, result.output
    assert_same_losses(losses(output), losses(base), LAYOUT)
    assert_same_losses(grad_norms(output), grad_norms(base), LAYOUT)
    assert_same_losses(eval_losses(output), eval_losses(base), LAYOUT)
    for shard in ("mp_rank_00_000", "mp_rank_01_001"):
        saved = torch.load(output / "iter_0000006" / shard / "model_optim_rng.pt", weights_only=False)["model"]
        start = torch.load(next(tiny["meg22"].glob(f"*/{shard}/model_optim_rng.pt")), weights_only=False)["model"]
        assert sorted(k for k in saved if not k.endswith("_extra_state")) == \
            sorted(k for k in start if not k.endswith("_extra_state"))


@pytest.mark.slow
def test_packed_tp2_pp2_matches_unpacked(base, tiny):
    """data.pack: the same samples per step share rows (thd micro-batches through TP x PP with sequence parallel);
    attention stays within each sample and rotary positions restart, so the loss of every step and every eval
    equals the unpacked TP1 x PP1 run's, on fewer token slots. Rows of 176 hold two or three samples (46 to 81
    tokens, none truncated at the base run's 96, so both runs train on exactly the same tokens); the 8 samples
    of a step fill at most 4 rows, one micro-batch of up to 4 rows."""
    result, output = sft(tiny, "packed-tp2pp2", "--tp", "2", "--pp", "2", "data.pack=true", "data.seq_length=176",
                         "parallel.sequence_parallel=true", load="meg22")
    assert result.exit_code == 0, result.output
    assert_same_losses(losses(output), losses(base), LAYOUT)
    assert_same_losses(eval_losses(output), eval_losses(base), LAYOUT)
    assert_same_losses(grad_norms(output), grad_norms(base), LAYOUT)
    packed, unpacked = ([r for r in read_metrics(run) if "loss" in r] for run in (output, base))
    for p, u in zip(packed, unpacked, strict=True):
        assert p["loss_tokens"] == u["loss_tokens"]
        assert 0 <= p["pad_fraction"] < u["pad_fraction"] < 1, (p, u)
        assert p["trained_tokens_per_s"] == pytest.approx(p["loss_tokens"] / p["step_time_s"])


@pytest.mark.slow
def test_dp2_matches_and_learns(base, tiny):
    """micro 4 x DP 2 x accumulation 1, with megatron-core's distributed optimizer (sharded Adam state)."""
    result, output = sft(tiny, "dp2", "--dp", "2", "parallel.distributed_optimizer=true", "checkpoint.format=torch")
    assert result.exit_code == 0, result.output
    assert (output / "iter_0000006/mp_rank_00/distrib_optim.pt").is_file()
    assert_same_losses(losses(output), losses(base), LAYOUT)
    assert_same_losses(grad_norms(output), grad_norms(base), LAYOUT)
    assert losses(output)[STEPS] < losses(output)[1] - 0.5
    assert_resumed(resume_after_kill(output, "dp2-killed"), output)  # Adam shards come back from distrib_optim.pt


@pytest.mark.slow
def test_accumulation_split_does_not_change_the_loss(base, tiny):
    result, output = sft(tiny, "micro8", micro=8)  # micro 8 x accumulation 1 vs micro 4 x accumulation 2
    assert result.exit_code == 0, result.output
    assert_same_losses(losses(output), losses(base), LAYOUT)
    assert_same_losses(grad_norms(output), grad_norms(base), LAYOUT)


def resume_after_kill(run: Path, name: str, *args: str) -> Path:
    """Emulate a run killed after its step-3 checkpoint (the metrics of steps 4-6 it never saved stay behind),
    then continue it with --resume."""
    killed = run.parent / name
    shutil.copytree(run, killed)
    shutil.rmtree(killed / "iter_0000006")
    (killed / "latest_checkpointed_iteration.txt").write_text("3")
    result = cli("sft", "--config", str(killed / "config.yaml"), f"output={killed}", "--resume",
                 *args)
    assert result.exit_code == 0, result.output
    return killed


def assert_resumed(killed: Path, run: Path) -> None:
    resumed = losses(killed)
    assert sorted(resumed) == list(range(1, STEPS + 1))  # steps 4-6 were replaced, not appended
    assert_same_losses({s: resumed[s] for s in (4, 5, 6)}, {s: losses(run)[s] for s in (4, 5, 6)}, LAYOUT)
    assert_same_losses(eval_losses(killed), eval_losses(run), LAYOUT)


@pytest.mark.slow
def test_an_argsless_dialect_checkpoint_loads_with_load_model_config(base, tiny):
    """alibaba/Megatron-LLaMA's args lack norm eps and rope theta, and the HF config.json is not in the checkpoint:
    refused without `load_model_config`; with it, the ranks read the dialect through the converters' reader, and
    step 1 (unchanged weights) has the loss of the converted checkpoint's run. One 1-rank launch."""
    from dialect_fixtures import build

    ckpt = build("alibaba", tiny["hf"], tiny["root"] / "alibaba", tp=1, pp=1)
    (ckpt / "config.json").unlink()
    runs = {**tiny, "alibaba": ckpt}
    refused, _ = sft(runs, "alibaba-refused", "--dry-run", load="alibaba")
    assert refused.exit_code == 2 and "load_model_config" in refused.output, refused.output
    result, output = sft(runs, "alibaba-sft", f"load_model_config={tiny['hf'] / 'config.json'}", "train.warmup_steps=0",
                         "checkpoint.format=torch", load="alibaba", steps=1)
    assert result.exit_code == 0, result.output
    assert_same_losses(losses(output), {1: losses(base)[1]}, LAYOUT)
    assert json.loads((output / "megallama.json").read_text())["spec"]["norm_eps"] == json.loads(
        (tiny["hf"] / "config.json").read_text())["rms_norm_eps"]


@pytest.mark.slow
def test_resume_continues_as_if_never_interrupted(base):
    assert_resumed(resume_after_kill(base, "killed"), base)


@pytest.mark.slow
def test_round_trip_to_hf_reproduces_the_eval_loss(base, tiny):
    """sft checkpoint -> megatron2pth -> pth2hf: transformers gets the final eval loss of the run."""
    pth, hf = tiny["root"] / "rt-pth", tiny["root"] / "rt-hf"
    for cmd in (["megatron2pth", "--input-dir", str(base), "--output-dir", str(pth)],
                ["pth2hf", "--input-dir", str(pth), "--output-dir", str(hf)]):
        result = cli("convert", *cmd)
        assert result.exit_code == 0, result.output
    expected, _ = hf_loss(hf, tiny, "eval", list(range(2 * GLOBAL)))  # eval_steps 2 x global 8, in order
    assert abs(eval_losses(base)[STEPS] - expected) <= HF_REL * expected
    report = tiny["root"] / "verify.json"
    result = cli("verify", "layer-diff", "--reference", str(hf), "--megatron", str(base),
                 "--json", str(report))
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())["verdict"] == "PASS"


# ---------------------------------------------------------------- plan and refusals (no processes started)
def test_dry_run_prints_the_plan_and_starts_nothing(tiny):
    output = tiny["root"] / "dry"
    result = cli("sft", "--config", str(SFT_CONFIG), f"load={tiny['meg22']}",
                 f"data.train={tiny['train']}", f"output={output}", "--tp", "2", "--pp", "2",
                 "train.micro_batch_size=2", "--dry-run")
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    for expected in ("4 = TP 2 x PP 2 x DP 1", "accumulation 4", "2 (4 layers / PP 2)", "padded vocab",
                     "512", "torch.distributed.run", "megallama.sft.train", "--nproc-per-node=4"):
        assert expected in text, expected
    rows = " ".join(result.stdout.replace("│", " ").split())  # a wrapped cell continues after an empty key cell
    off = re.search(r"packing off: (\d+)% of token slots hold tokens over the first 20 steps "
                    r"\(data\.pack=true would fill (\d+)%\)", rows)
    assert "attention sdpa" in rows and off and 0 < int(off[1]) <= int(off[2]) <= 100, rows
    assert not output.exists()
    packed = cli("sft", "--config", str(SFT_CONFIG), f"load={tiny['meg22']}", "data.pack=true",
                 f"data.train={tiny['train']}", f"output={output}", "--tp", "2", "--pp", "2",
                 "data.seq_length=256", "--dry-run")
    assert packed.exit_code == 0, packed.output
    rows = " ".join(packed.stdout.replace("│", " ").split())
    found = re.search(r"packing on: (\d\.\d) samples per row, (\d+)% of token slots hold tokens \(unpacked (\d+)%\)",
                      rows)
    assert found and float(found[1]) >= 2 and int(found[2]) > 2 * int(found[3]), rows  # rows of 256, samples 46-81


def test_train_equal_to_eval_warns(tiny):
    result = cli("sft", "--config", str(SFT_CONFIG), f"load={tiny['meg11']}",
                 f"data.train={tiny['train']}", f"data.eval={tiny['train']}",
                 f"output={tiny['root'] / 'same'}", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "the same file" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--dp", "1", "--", "--nproc-per-node", "2"], "is not TP x PP x DP"),
    (["train.global_batch_size=6"], "not divisible by micro_batch_size x DP"),
    (["--tp", "2"], "pth2megatron --input-dir PTH --output-dir NEW --tp 2 --pp 1"),
    (["--tp", "3"], "does not divide the 4 attention heads"),
    (["--pp", "3"], "does not divide the 4 layers"),
    (["data.train=/nonexistent/train.jsonl"], "does not exist"),
    (["data.seq_len=64"], "did you mean data.seq_length"),
    (["train.lr=fast"], "expected float"),
    (["train.precision=fp8"], "expected one of fp32, bf16, fp16"),
    (["parallel.sequence_parallel=true", "--tp", "2", "data.seq_length=95"], "95 is not divisible by TP 2"),
    (["--resume"], "holds no checkpoint"),
    (["data.pack=true", "train.attention=local"], "data.pack needs train.attention sdpa or te"),
    (["train.attention=flash"], "expected one of sdpa, local, te"),
])
def test_refusals_exit_2(tiny, args, message):
    output = tiny["root"] / "refused"
    result = cli("sft", "--config", str(SFT_CONFIG), f"load={tiny['meg11']}",
                 f"data.train={tiny['train']}", f"output={output}", *args)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()), result.output
    assert not output.exists()


def test_token_ids_outside_the_vocabulary_exit_2(tiny):
    bad = tiny["root"] / "bad.jsonl"
    bad.write_text(json.dumps({"input_ids": [1, 5, 999, 2], "labels": [1, 5, 999, 2]}) + "\n")
    result = cli("sft", "--config", str(SFT_CONFIG), f"load={tiny['meg11']}", f"data.train={bad}",
                 "data.format=pretokenized", f"output={tiny['root'] / 'bad'}")
    assert result.exit_code == 2, result.output
    assert "outside the model's vocabulary" in " ".join(result.output.split())


@pytest.mark.slow
def test_finished_output_is_not_overwritten(base, tiny):
    result = cli("sft", "--config", str(SFT_CONFIG), f"load={tiny['meg11']}",
                 f"data.train={tiny['train']}", f"output={base}")
    assert result.exit_code == 2 and "--resume" in result.output


def test_config_overrides_are_coerced_and_epochs_become_steps():
    from megallama.sft.config import load_config, resolve_plan

    cfg = load_config(SFT_CONFIG, ["train.lr=2e-5", "train.steps=1e3", "data.train_on_prompt=yes", "parallel.dp=null",
                               "train.recompute=none", "train.epochs=2", "train.global_batch_size=16"])
    assert cfg["train"]["lr"] == 2e-5 and cfg["train"]["steps"] == 1000 and cfg["data"]["train_on_prompt"] is True
    assert cfg["parallel"]["dp"] is None and cfg["train"]["recompute"] == "none"
    plan = resolve_plan(cfg, num_layers=4, padded_vocab_size=384, num_samples=100, extra=["--nproc-per-node", "2"])
    assert (plan.dp, plan.accumulation, plan.steps) == (2, 2, 13)  # ceil(2 epochs x 100 / 16)


def test_reference_recipe_mirrors_llama_sft_sh(tmp_path):
    """The 7B recipe's dry run against a 7B checkpoint manifest (no weights are read before launch)."""
    from megallama.sft.config import load_config
    from megallama.spec import ModelSpec

    cfg = load_config(SFT_CONFIG.parent / "llama2-7b-reference.yaml")
    t = cfg["train"]
    assert (cfg["parallel"]["tp"], cfg["parallel"]["pp"], cfg["data"]["seq_length"]) == (4, 2, 2048)
    assert (t["micro_batch_size"], t["global_batch_size"], t["lr"], t["min_lr"]) == (2, 128, 2e-5, 2e-6)
    assert (t["warmup_steps"], t["steps"], t["decay_style"], t["clip_grad"], t["weight_decay"]) == \
        (400, 8000, "cosine", 1.0, 0.0)
    assert (t["adam_beta1"], t["adam_beta2"], t["eval_interval"], t["eval_steps"], t["save_interval"]) == \
        (0.9, 0.95, 1000, 20, 2000)
    ckpt = tmp_path / "llama-2-7b-tp4-pp2"
    ckpt.mkdir()
    spec = ModelSpec(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32, ffn_hidden_size=11008,
                     vocab_size=32000, dtype="float16")
    (ckpt / "megallama.json").write_text(json.dumps({"spec": spec.to_dict(), "tp": 4, "pp": 2, "vocab_size": 32000,
                                                    "padded_vocab_size": 32256}))
    (ckpt / "latest_checkpointed_iteration.txt").write_text("release")
    for tp in range(4):
        for pp in range(2):  # the dry run checks that every rank file is there, without reading it
            (ckpt / f"release/mp_rank_{tp:02d}_{pp:03d}").mkdir(parents=True)
            (ckpt / f"release/mp_rank_{tp:02d}_{pp:03d}/model_optim_rng.pt").touch()
    rows = [{"input_ids": list(range(1, 600)), "labels": [-100] * 300 + list(range(301, 600))}] * 4
    for name in ("train", "test"):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = cli("sft", "--config", str(SFT_CONFIG.parent / "llama2-7b-reference.yaml"), f"load={ckpt}",
                 f"data.train={tmp_path / 'train.jsonl'}", f"data.eval={tmp_path / 'test.jsonl'}",
                 f"output={tmp_path / 'out'}", "--dry-run")
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    for expected in ("8 = TP 4 x PP 2 x DP 1", "micro 2 x DP 1 x accumulation 64", "16 (32 layers / PP 2)",
                     "32256", "--nproc-per-node=8", "fp16"):
        assert expected in text, expected


def test_bad_input_found_inside_a_rank_still_exits_2(tiny):
    """A truncated rank file is only opened by the workers; torchrun says 1, the CLI keeps the worker's 2."""
    broken = tiny["root"] / "meg11-truncated"
    shutil.copytree(tiny["meg11"], broken)
    tiny = {**tiny, "meg11-truncated": broken}
    rank_file = next(broken.rglob("model_optim_rng.pt"))
    rank_file.write_bytes(rank_file.read_bytes()[:1000])
    result, _ = sft(tiny, "truncated-run", load="meg11-truncated", steps=1)
    assert result.exit_code == 2, result.output
    assert "error" in result.output


def test_half_written_iteration_folders_are_removed(tmp_path):
    """A save killed midway leaves an iteration folder newer than the tracker; the next save removes only that."""
    from megallama.sft.checkpoint import remove_uncommitted

    for step in (3, 6, 9):
        (tmp_path / f"iter_{step:07d}").mkdir()
        (tmp_path / f"iter_{step:07d}" / "__0_0.distcp").write_bytes(b"x")
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("6")
    assert remove_uncommitted(tmp_path) == [tmp_path / "iter_0000009"]
    assert sorted(p.name for p in tmp_path.glob("iter_*")) == ["iter_0000003", "iter_0000006"]


@pytest.mark.slow
@pytest.mark.parametrize("fmt, when", [("torch_dist", "mid-file"), ("torch", "before-commit")])
def test_sigkill_during_a_save_loses_nothing(tiny, fmt, when):
    """Rank 0 of a TP2 x PP2 run is SIGKILLed while saving step 6: torch_dist part-way through writing one of its
    .distcp files (tests/workers/fault_hook, MEGALLAMA_TEST_FAULT=kill:6), torch after every rank wrote its data
    files and before the commit (MEGALLAMA_TEST_KILL_IN_SAVE). The tracker still names step 3; --resume continues
    from it bit-exactly (the killed run logged steps 4-6 before dying) and its save replaces the half-written
    folder."""
    with pytest.MonkeyPatch.context() as env:
        if when == "mid-file":
            env.setenv("PYTHONPATH", os.pathsep.join([str(WORKERS / "fault_hook"), str(ROOT),
                                                      os.environ.get("PYTHONPATH", "")]))
            env.setenv("MEGALLAMA_TEST_FAULT", "kill:6")
        else:
            env.setenv("MEGALLAMA_TEST_KILL_IN_SAVE", "6")
        result, output = sft(tiny, f"sigkill-{fmt}", "--tp", "2", "--pp", "2", f"checkpoint.format={fmt}",
                             load="meg22")
    assert result.exit_code != 0
    assert (output / "latest_checkpointed_iteration.txt").read_text() == "3"
    assert (output / "iter_0000006").is_dir()  # half-written
    before = losses(output)
    result = cli("sft", "--config", str(output / "config.yaml"), f"output={output}", "--resume")
    assert result.exit_code == 0, result.output
    after = losses(output)
    assert [after[s] for s in (4, 5, 6)] == [before[s] for s in (4, 5, 6)]
    assert (output / "latest_checkpointed_iteration.txt").read_text() == "6"


# ---------------------------------------------------------------- optimizer state across layouts, weights-only resume
def killed_copy(run: Path, name: str, step: int) -> Path:
    """A copy of `run` as if killed after its step-`step` checkpoint: later iterations gone, the tracker on `step`
    (the metrics of the later steps stay behind, as a killed run leaves them)."""
    killed = run.parent / name
    shutil.copytree(run, killed)
    for later in killed.glob("iter_*"):
        if int(later.name[len("iter_"):]) > step:
            shutil.rmtree(later)
    (killed / "latest_checkpointed_iteration.txt").write_text(str(step))
    return killed


def sharding(it_dir: Path) -> str:
    """How the distributed optimizer stored its state in a torch_dist iteration (common.pt's content metadata)."""
    from megallama.sft.dist_checkpoint import read_common

    return read_common(it_dir)["content_metadata"]["distrib_optim_sharding_type"]


@pytest.fixture(scope="module")
def dopt(tiny) -> Path:
    """TP2 x PP1 from a torch_dist load, megatron-core's distributed optimizer saved as Megatron-LM does by default
    (dp_reshardable: DP may change, TP x PP may not), selective recompute."""
    load = tiny["root"] / "megdist"
    convert(tiny["root"] / "pth", load, src_format="meta", dst_format="megatron")  # torch_dist: any TP x PP
    result, output = sft({**tiny, "megdist": load}, "dopt-tp2", "--tp", "2", "parallel.distributed_optimizer=true",
                         "train.recompute=selective", load="megdist")
    assert result.exit_code == 0, result.output
    return output


@pytest.mark.slow
def test_selective_recompute_and_distributed_optimizer_match_tp1(base, dopt):
    """train.recompute=selective (megatron-core re-runs the core attention in the backward pass) and the
    distributed optimizer change where memory goes, not the numbers."""
    assert_same_losses(losses(dopt), losses(base), LAYOUT)
    assert_same_losses(grad_norms(dopt), grad_norms(base), LAYOUT)
    assert_same_losses(eval_losses(dopt), eval_losses(base), LAYOUT)
    assert sharding(dopt / "iter_0000003") == "dp_reshardable"


@pytest.mark.slow
def test_optimizer_state_that_cannot_follow_a_layout_change_exits_2(dopt, monkeypatch):
    """--resume at TP1 of a dp_reshardable checkpoint saved at TP2: one line, exit 2, before any launch, and the
    run folder is left exactly as it was (its config.yaml not rewritten)."""
    import megallama.engine.launch as launch

    killed = killed_copy(dopt, "dopt-resumed-at-tp1", 3)
    before = {p: p.read_bytes() for p in killed.rglob("*") if p.is_file()}
    monkeypatch.setattr(launch, "run_torchrun", lambda *a, **k: pytest.fail("torchrun started"))
    result = cli("sft", "--config", killed / "config.yaml", f"output={killed}", "--resume", "--tp", "1")
    line = assert_one_line_error(result, f"cannot resume the optimizer state of {killed / 'iter_0000003'}")
    for part in ("saved it as dp_reshardable at TP=2 PP=1", "checkpoint.optim_fully_reshardable=true",
                 "--resume-weights-only"):
        assert part in line, line
    assert {p: p.read_bytes() for p in killed.rglob("*") if p.is_file()} == before


@pytest.fixture(scope="module")
def weights_only(dopt) -> Path:
    """The same step-3 checkpoint continued at TP1 with --resume-weights-only (what the refusal above suggests),
    no recompute, saving every step with checkpoint.optim_fully_reshardable."""
    run = killed_copy(dopt, "dopt-weights-only-tp1", 3)
    result = cli("sft", "--config", run / "config.yaml", f"output={run}", "--resume-weights-only", "--tp", "1",
                 "train.recompute=none", "checkpoint.optim_fully_reshardable=true", "train.save_interval=1")
    assert result.exit_code == 0, result.output
    rows = " ".join(result.stdout.replace("│", " ").split())
    assert "resume at step 3" in rows and "weights only: fresh optimizer state" in rows, rows
    return run


@pytest.mark.slow
def test_resume_weights_only_keeps_weights_data_and_schedule_with_a_fresh_optimizer(base, dopt, weights_only):
    """Step 4 runs the step-3 weights on step 4's batch at step 4's LR: its loss and gradient are the
    uninterrupted run's. Adam starts afresh (Megatron-LM's --no-load-optim), so step 5 differs from the
    uninterrupted step 5 far beyond the layout tolerance."""
    got = losses(weights_only)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert_same_losses({4: got[4]}, {4: losses(base)[4]}, LAYOUT)
    assert_same_losses({4: grad_norms(weights_only)[4]}, {4: grad_norms(base)[4]}, LAYOUT)
    lrs = {r["step"]: r["lr"] for r in read_metrics(weights_only) if "loss" in r}
    assert all(lrs[s] == pytest.approx(lr, rel=1e-12) for s, lr in learning_rates(base).items() if s > 3), lrs
    assert abs(got[5] - losses(dopt)[5]) > 100 * LAYOUT * losses(dopt)[5], (got[5], losses(dopt)[5])


@pytest.mark.slow
def test_fully_reshardable_optimizer_state_resumes_at_another_layout(weights_only):
    """checkpoint.optim_fully_reshardable: the TP1 distributed optimizer's step-4 state, resumed at TP2 with full
    recompute, continues the TP1 run (step 6 depends on the Adam moments restored at step 4)."""
    assert {sharding(it) for it in weights_only.glob("iter_*") if int(it.name[5:]) > 3} == {"fully_reshardable"}
    resumed = killed_copy(weights_only, "fully-reshardable-at-tp2", 4)
    result = cli("sft", "--config", resumed / "config.yaml", f"output={resumed}", "--resume", "--tp", "2",
                 "train.recompute=full")
    assert result.exit_code == 0, result.output
    for metric in (losses, grad_norms):
        assert_same_losses({s: metric(resumed)[s] for s in (5, 6)}, {s: metric(weights_only)[s] for s in (5, 6)},
                           LAYOUT)


# ---------------------------------------------------------------- bf16 / fp16, loss scale, LR schedule
def learning_rates(output: Path) -> dict[int, float]:
    return {r["step"]: r["lr"] for r in read_metrics(output) if "loss" in r}


def documented_lr(step: int, t: dict) -> float:
    """docs/sft.md's schedule: linear warmup from 0 over warmup_steps, then decay_style from lr to min_lr at the
    last step."""
    if step <= t["warmup_steps"]:
        return t["lr"] * step / t["warmup_steps"]
    ratio = (step - t["warmup_steps"]) / (t["steps"] - t["warmup_steps"])
    coeff = {"cosine": 0.5 * (1 + math.cos(math.pi * ratio)), "linear": 1 - ratio, "constant": 1.0}[t["decay_style"]]
    return t["min_lr"] + coeff * (t["lr"] - t["min_lr"])


# precision -> (overrides, the relative gap of the step-1 loss to the fp32 run's it is checked at). Step 1 runs the
# unchanged weights: measured 7.9e-4 (bf16), 2.6e-5 (fp16); checked about 10x above. fp16 starts its dynamic loss
# scale at 2^16: at the default 2^32 every one of the 6 steps overflows and is skipped (measured), nothing trains.
LOW_PRECISION = {
    "bf16": (["train.warmup_steps=2", "train.decay_style=cosine"], 8e-3),
    "fp16": (["train.warmup_steps=1", "train.decay_style=linear", "train.initial_loss_scale=65536",
              "logging.tensorboard=true"], 3e-4),
}


@pytest.fixture(scope="module", params=sorted(LOW_PRECISION))
def low_precision(request, tiny) -> tuple[str, Path]:
    precision = request.param
    result, output = sft(tiny, precision, f"train.precision={precision}", "checkpoint.format=torch",
                         *LOW_PRECISION[precision][0])
    assert result.exit_code == 0, result.output
    return precision, output


@pytest.mark.slow
def test_low_precision_trains_the_same_model_in_its_dtype(base, low_precision):
    precision, output = low_precision
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    first, tolerance = losses(output)[1], LOW_PRECISION[precision][1]
    assert abs(first - losses(base)[1]) <= tolerance * losses(base)[1], (first, losses(base)[1])
    assert losses(output)[STEPS] < first - 0.5, losses(output)
    state = torch.load(output / "iter_0000006/mp_rank_00/model_optim_rng.pt", weights_only=False)
    weights = {k: v for k, v in state["model"].items() if not k.endswith("_extra_state")}
    assert {v.dtype for v in weights.values()} == {dtype}
    manifest = json.loads((output / "megallama.json").read_text())
    assert manifest["spec"]["dtype"] == str(dtype).removeprefix("torch.")
    assert f"--{precision}" in (output / "megatron_args.txt").read_text().splitlines()


@pytest.mark.slow
def test_fp16_records_the_loss_scale_and_bf16_does_not(low_precision):
    """fp16 (dynamic loss scaling): every step's record carries loss_scale and skipped, and TensorBoard's
    train/loss_scale holds the same values; bf16 needs no loss scale and records none."""
    precision, output = low_precision
    records = [r for r in read_metrics(output) if "loss" in r]
    if precision == "bf16":
        assert not any("loss_scale" in r or "skipped" in r for r in records)
        return
    scales = {r["step"]: r["loss_scale"] for r in records}
    assert all(isinstance(r["skipped"], bool) for r in records) and not all(r["skipped"] for r in records)
    assert all(s > 0 for s in scales.values())
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(output / "tensorboard")).Reload()
    assert {e.step: e.value for e in events.Scalars("train/loss_scale")} == pytest.approx(scales)


@pytest.mark.slow
def test_lr_schedule_is_warmup_then_decay_as_documented(base, low_precision):
    """metrics.jsonl's lr per step equals docs/sft.md's formula: cosine after 2 warmup steps (fp32, bf16), linear
    after 1 (fp16); the last step is at min_lr."""
    for run in (base, low_precision[1]):
        t = yaml.safe_load((run / "config.yaml").read_text())["train"]
        got = learning_rates(run)
        assert got == pytest.approx({s: documented_lr(s, t) for s in range(1, STEPS + 1)}, rel=1e-9), (t, got)
        assert got[STEPS] == pytest.approx(t["min_lr"]) and max(got.values()) == pytest.approx(t["lr"])

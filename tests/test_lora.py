"""LoRA / DoRA training in `megallama sft` (issue #17, training side), end to end on CPU (gloo, tiny LLaMA-2 GQA).

Invariance, not stored numbers: a LoRA run at TP2 x PP2 (sequence parallel) and at DP2 (accumulation split
differently, packing, distributed optimizer, full recompute) gives the TP1 x PP1 run's loss and pre-clip grad_norm per
step; a run resumed from the TP2 x PP2 run's step-2 adapter checkpoint at TP1 x PP1 gives the uninterrupted
steps. A DoRA run (TP2) is judged against HF peft: `generate` equals transformers + peft greedy, token for
token, and `verify layer-diff` passes against HF + the exported adapter; its magnitude is trained (no longer
||W||). Negative controls: a base with other weights is refused (resume, generate); the base's files are
untouched and the checkpoints hold no base tensor; bad peft values exit 2 with one line before any work.
Six torchrun launches for training (1, 4, 2, 1, 2, 1 ranks), one for generate, one for verify; peft.init_from
of the exported reference adapters gives back its deltas.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from megallama.cli import app
from megallama.convert import convert
from megallama.sft.report import read_metrics

CONFIG = Path(__file__).parents[1] / "configs" / "sft" / "tiny-cpu.yaml"
STEPS, RANK, ALPHA = 4, 4, 8
runner = CliRunner()
pytestmark = pytest.mark.slow


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, Path]:
    """A tiny HF model with a tokenizer that knows the task's words, its torch_dist Megatron base (saved for TP2,
    so it loads at any TP x PP and tools default to TP2), another base with other weights, and data."""
    from megallama.sft.data import learnable_lines, make_learnable_dataset
    from megallama.tiny import make_hf_checkpoint, train_tokenizer

    root = tmp_path_factory.mktemp("lora")
    paths = {"root": root}
    for name, seed in (("hf", 0), ("hf_other", 7)):
        paths[name] = make_hf_checkpoint(root / name, "llama2", seed=seed)
        train_tokenizer(paths[name], vocab_size=320, extra_lines=learnable_lines())
    paths["base"] = convert(paths["hf"], root / "base", src_format="hf", dst_format="megatron", tp=2, pp=1).output
    paths["other"] = convert(paths["hf_other"], root / "other", src_format="hf", dst_format="megatron", tp=2,
                             pp=1).output
    paths["train"] = make_learnable_dataset(root / "train.jsonl", n=256, seed=0)
    paths["base_hash"] = folder_hash(paths["base"])
    return paths


def folder_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for f in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        digest.update(f.relative_to(folder).as_posix().encode() + f.read_bytes())
    return digest.hexdigest()


def sft(env: dict, name: str, *args: str, method: str = "lora", load: str = "base"):
    output = env["root"] / name
    result = runner.invoke(app, ["sft", "--config", str(CONFIG), f"load={env[load]}", f"data.train={env['train']}",
                                 f"output={output}", f"train.steps={STEPS}", "train.save_interval=2",
                                 f"peft.method={method}", f"peft.rank={RANK}", f"peft.alpha={ALPHA}", *args])
    return result, output


def metric(output: Path, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(output) if "loss" in r}


def assert_same(a: dict[int, float], b: dict[int, float], rel: float = 1e-5) -> None:
    assert a.keys() == b.keys(), (a, b)
    for step in a:
        assert abs(a[step] - b[step]) <= rel * abs(b[step]), (step, a[step], b[step])


@pytest.fixture(scope="module")
def ref(env) -> Path:
    """LoRA at TP1 x PP1 x DP1, micro 4 x accumulation 2: the reference run."""
    result, output = sft(env, "tp1pp1")
    assert result.exit_code == 0, result.output
    return output


@pytest.fixture(scope="module")
def tp2pp2(env) -> Path:
    result, output = sft(env, "tp2pp2", "parallel.tp=2", "parallel.pp=2", "parallel.sequence_parallel=true")
    assert result.exit_code == 0, result.output
    return output


@pytest.fixture(scope="module")
def dora(env) -> Path:
    result, output = sft(env, "dora-tp2", "parallel.tp=2", method="dora")
    assert result.exit_code == 0, result.output
    return output


# ---------------------------------------------------------------- training
def test_lora_trains_adapters_only(ref, env):
    from megallama.formats.megatron.torch_dist import DistCheckpoint
    from megallama.peft.store import read_adapters, read_record

    loss = metric(ref, "loss")
    assert sorted(loss) == list(range(1, STEPS + 1)) and all(g > 0 for g in metric(ref, "grad_norm").values())
    record = read_record(ref)
    assert (record.method, record.rank, record.alpha, record.base_path) == ("lora", RANK, ALPHA, str(env["base"]))
    assert json.loads((ref / "iter_0000004" / "peft.json").read_text()) == record.to_json()
    keys = set(DistCheckpoint(ref / "iter_0000004").tensors)
    model_keys = {k for k in keys if not k.startswith("optimizer.")}
    assert model_keys and all(".adapter." in k for k in model_keys), model_keys  # no base tensor saved
    assert any(k.startswith("optimizer.state.exp_avg.") and ".adapter." in k for k in keys)
    adapters = read_adapters(ref)
    b = adapters.tensors["decoder.layers.0.self_attention.linear_qkv.adapter.linear_out.weight"]
    a = adapters.tensors["decoder.layers.0.mlp.linear_fc2.adapter.linear_in.weight"]
    assert b.shape[1] == RANK and b.abs().sum() > 0  # B starts at zero and was trained
    assert a.shape == (RANK, 176)
    assert folder_hash(env["base"]) == env["base_hash"]  # the base's files are bit-identical after the run


def test_tp2_pp2_sequence_parallel_equals_tp1(ref, tp2pp2):
    assert_same(metric(tp2pp2, "loss"), metric(ref, "loss"))
    assert_same(metric(tp2pp2, "grad_norm"), metric(ref, "grad_norm"))


def test_dp2_accumulation_packing_distributed_optimizer_recompute_equals_tp1(ref, env):
    """DP2 x micro 2 x accumulation 2, packed rows, the distributed optimizer, and full recompute (which, with a
    frozen embedding, would silently stop the adapters' gradients: Megatron-Bridge #1750)."""
    result, output = sft(env, "dp2", "parallel.dp=2", "train.micro_batch_size=2", "data.pack=true",
                         "parallel.distributed_optimizer=true", "train.recompute=full", "--", "--nproc-per-node=2")
    assert result.exit_code == 0, result.output
    assert_same(metric(output, "loss"), metric(ref, "loss"))
    assert_same(metric(output, "grad_norm"), metric(ref, "grad_norm"))


def test_resume_at_another_layout_is_exact(ref, tp2pp2, env):
    """The TP2 x PP2 run's step-2 adapters and Adam state, resumed at TP1 x PP1, give the uninterrupted steps."""
    run = env["root"] / "resumed"
    shutil.copytree(tp2pp2, run)
    shutil.rmtree(run / "iter_0000004")
    (run / "latest_checkpointed_iteration.txt").write_text("2")
    result = runner.invoke(app, ["sft", "--config", str(tp2pp2 / "config.yaml"), "--resume", "--tp", "1", "--pp", "1",
                                 f"output={run}", "parallel.sequence_parallel=false"])
    assert result.exit_code == 0, result.output
    assert "resume at step 2" in " ".join(result.output.split())  # the plan's start row
    got = metric(run, "loss")
    assert sorted(got) == [1, 2, 3, 4]
    assert_same({s: got[s] for s in (3, 4)}, {s: metric(ref, "loss")[s] for s in (3, 4)})
    grad = metric(run, "grad_norm")
    assert_same({s: grad[s] for s in (3, 4)}, {s: metric(ref, "grad_norm")[s] for s in (3, 4)})


# ---------------------------------------------------------------- DoRA, judged by HF peft
def test_dora_trains_its_magnitude(dora, ref, env):
    from megallama.formats.hf import open_hf
    from megallama.peft.store import read_adapters

    # B = 0 at the start: DoRA's first step runs the base exactly, like LoRA's
    assert abs(metric(dora, "loss")[1] - metric(ref, "loss")[1]) <= 1e-6 * metric(ref, "loss")[1]
    adapters = read_adapters(dora)
    assert adapters.record.method == "dora"
    with open_hf(env["hf"]) as reader:
        o_proj = reader.get("model.layers.1.self_attn.o_proj.weight")
    magnitude = adapters.tensors["decoder.layers.1.self_attention.linear_proj.adapter.magnitude"]
    start = o_proj.norm(dim=1)  # what it was initialised to: ||W||_row
    assert magnitude.shape == start.shape
    assert torch.allclose(magnitude, start, rtol=0.05)  # the right quantity...
    assert (magnitude - start).abs().max() > 1e-4  # ...and trained


def peft_greedy(hf_dir: Path, adapter: Path, ids: list[int], eos_id: int, new_tokens: int) -> list[int]:
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32), str(adapter))
    with torch.no_grad():
        out = model.eval().generate(input_ids=torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False,
                                    eos_token_id=eos_id, pad_token_id=eos_id)
    return out[0, len(ids):].tolist()


def test_generate_on_a_dora_run_equals_transformers_plus_peft(dora, env, tmp_path):
    from megallama.generate.driver import Prompt, Settings, generate
    from megallama.peft.hf_adapter import export_run
    from megallama.sft.tokenizer import load_tokenizer

    export_run(dora, tmp_path / "adapter")
    # TP2, the split the base was saved for; the adapters applied unmerged
    done = generate(dora, [Prompt("Name the colour of the sky")], Settings(max_new_tokens=8))
    tok = load_tokenizer(env["hf"])
    for c in done:
        want = peft_greedy(env["hf"], tmp_path / "adapter", c.prompt_ids, tok.eos_id, len(c.completion_ids))
        assert c.completion_ids + ([tok.eos_id] if c.stop == "eos" else []) == want


def test_verify_layer_diff_on_a_dora_run_passes_against_peft(dora, env):
    from megallama.verify.layer_diff import layer_diff

    report = layer_diff(env["hf"], dora, seq_len=16, batch=1)
    assert report.passed, report.to_json()
    assert any("dora run" in n for n in report.notes)


# ---------------------------------------------------------------- refusals
def test_wrong_base_is_refused(ref, env, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    result = runner.invoke(app, ["sft", "--config", str(ref / "config.yaml"), "--resume", f"output={run}",
                                 f"load={env['other']}"])
    assert result.exit_code == 2 and "is not the base this adapter was trained on" in result.output, result.output
    record = json.loads((run / "peft.json").read_text())
    record["base"]["path"] = str(env["other"])  # a record pointing at a model with other weights
    (run / "peft.json").write_text(json.dumps(record))
    result = runner.invoke(app, ["generate", "--megatron", str(run), "--prompt", "hi", "--max-new-tokens", "2"])
    assert result.exit_code == 2 and "is not the base" in result.output, result.output


@pytest.mark.parametrize("override, message", [
    ("peft.rank=0", "peft.rank must be an integer > 0"),
    ("peft.alpha=0", "peft.alpha must be > 0"),
    ("peft.dropout=1", "peft.dropout must lie in [0, 1)"),
    ("peft.targets=linear_qkv,lm_head", "unknown target 'lm_head'"),
    ("peft.targets=q_proj,o_proj", "adapt all of them"),
    ("peft.method=qlora", "peft.method is 'qlora'"),
])
def test_bad_peft_values_exit_2_with_one_line(env, override, message, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["sft", "--config", str(CONFIG), f"load={env['base']}", f"data.train={env['train']}",
                                 f"output={out}", "peft.method=lora", override, "--dry-run"])
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not out.exists()


def test_dry_run_shows_trainable_parameters_and_optimizer_memory(env):
    from megallama.peft.config import PeftConfig, trainable_parameters
    from megallama.spec import ModelSpec

    result = runner.invoke(app, ["sft", "--config", str(CONFIG), f"load={env['base']}", f"data.train={env['train']}",
                                 f"output={env['root'] / 'dry'}", "peft.method=lora", f"peft.rank={RANK}", "--dry-run"])
    assert result.exit_code == 0, result.output
    spec = ModelSpec.from_dict(json.loads((env["base"] / "megallama.json").read_text())["spec"])
    n = trainable_parameters(spec, PeftConfig(method="lora", rank=RANK))
    # rank x (in + out) per linear: 4 x ((64 + 128) + (64 + 64) + (64 + 352) + (176 + 64)) x 4 layers
    assert n == RANK * ((64 + 128) + (64 + 64) + (64 + 352) + (176 + 64)) * 4
    flat = " ".join(result.output.split())
    assert f"{n:,} of" in flat and "optimizer state" in flat and "lora rank 4" in flat


# ---------------------------------------------------------------- peft.init_from
def test_init_from_an_exported_adapter_continues_it(ref, env, tmp_path):
    """The reference run's adapters, exported as HF PEFT (per projection), come back through peft.init_from as
    fused adapters (q/k/v rank 3r with block-diagonal B, padded to one rank, alpha rescaled) whose deltas
    s * B @ A equal the run's; a tiny LR keeps them there through the run's step."""
    from megallama.peft.hf_adapter import export_run
    from megallama.peft.store import read_adapters

    export_run(ref, tmp_path / "adapter")
    bad, _ = sft(env, "init-bad", f"peft.init_from={tmp_path / 'adapter'}", "peft.rank=12", "--dry-run",
                 method="dora")
    assert bad.exit_code == 2 and "is a lora adapter" in bad.output, bad.output
    result, output = sft(env, "init-from", f"peft.init_from={tmp_path / 'adapter'}", "peft.rank=12", "peft.alpha=6",
                         "train.steps=1", "train.warmup_steps=0", "train.lr=1e-12", "train.min_lr=1e-12")
    assert result.exit_code == 0, result.output
    old, new = read_adapters(ref), read_adapters(output)
    for key in [k for k in old.tensors if k.endswith("linear_in.weight")]:
        prefix = key.removesuffix("linear_in.weight")
        delta = [s.record.scale * s.tensors[prefix + "linear_out.weight"] @ s.tensors[key] for s in (old, new)]
        torch.testing.assert_close(delta[1], delta[0], rtol=0, atol=1e-8)

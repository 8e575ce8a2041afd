"""`megallama data prepare` and the data `sft` reads: megatron-core reads our .bin/.idx, masks equal masks written
out by hand (alpaca, messages, a Llama-3-style chat template), Parquet = JSONL = Hub id byte for byte, training
from a prepared prefix equals training from its JSONL step by step, a megatron-core corpus trains as continued
pretraining, and every refusal is one line, exit 2, with no PREFIX file left behind."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from megallama.cli import app
from megallama.data.indexed import prefix_files
from megallama.data.sources import load_source
from megallama.sft.data import IGNORE_INDEX, learnable_lines, load_dataset, load_tokenizer, make_learnable_dataset
from megallama.sft.report import read_metrics
from megallama.sft.templates import ALPACA_TEMPLATE, ALPACA_TEMPLATE_NO_INPUT, ROLE_HEADERS
from megallama.tiny import make_hf_checkpoint, train_tokenizer

runner = CliRunner()
CONFIG = Path(__file__).parents[1] / "configs" / "sft" / "tiny-cpu.yaml"

# ---------------------------------------------------------------- a word-level tokenizer with Llama 3's template
# Word-level, so the expected tokens of a text can be written out by hand: words, runs of whitespace and runs of
# punctuation are one token each. The chat template is Llama 3 Instruct's, which has no {% generation %} markers.
PATTERN = r"\s+|\w+|[^\w\s]+"
BOS, EOT, SH, EH = "<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Say bye"},
        {"role": "assistant", "content": "Bye now"}]
ALPACA = [{"instruction": "Say hi", "input": "", "output": "Hi there"},
          {"instruction": "Repeat the words.", "input": "cat dog", "output": "cat dog"}]


@pytest.fixture(scope="module")
def word_tok(tmp_path_factory) -> Path:
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    texts = [ALPACA_TEMPLATE, ALPACA_TEMPLATE_NO_INPUT, *ROLE_HEADERS.values(), "\n\n \n",
             *(m["content"] for m in CHAT), *(v for r in ALPACA for v in r.values()), "system user assistant"]
    specials = ["<unk>", BOS, EOT, SH, EH]
    words = sorted({t for text in texts for t in re.findall(PATTERN, text)})
    model = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + words)}, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Split(Regex(PATTERN), behavior="isolated")
    model.add_special_tokens(specials)
    tok = PreTrainedTokenizerFast(tokenizer_object=model, bos_token=BOS, eos_token=EOT, unk_token="<unk>")
    tok.chat_template = LLAMA3_TEMPLATE
    out = tmp_path_factory.mktemp("wordtok")
    tok.save_pretrained(str(out))
    return out


def prepare(*args: str):
    return runner.invoke(app, ["data", "prepare", *args])


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def written(prefix: Path) -> list[tuple[list[str], list[int]]]:
    """(tokens, mask) of every sample of a prepared prefix, read back with megatron-core's IndexedDataset."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    hf = load_tokenizer(Path(json.loads(Path(f"{prefix}.json").read_text())["tokenizer"]["path"])).backend
    tokens, masks = IndexedDataset(str(prefix)), IndexedDataset(f"{prefix}_mask")
    return [(hf.convert_ids_to_tokens(tokens[i].tolist()), masks[i].tolist()) for i in range(len(tokens))]


def by_hand(*segments: tuple[str | list[str], int]) -> tuple[list[str], list[int]]:
    """Expected (tokens, mask): text segments split the word-level way, special tokens given as lists."""
    tokens, mask = [], []
    for seg, flag in segments:
        pieces = seg if isinstance(seg, list) else re.findall(PATTERN, seg)
        tokens += pieces
        mask += [flag] * len(pieces)
    return tokens, mask


# ---------------------------------------------------------------- masks against masks written out by hand
def test_alpaca_masks_by_hand(word_tok, tmp_path):
    result = prepare("--input", str(write_jsonl(tmp_path / "a.jsonl", ALPACA)), "--format", "alpaca",
                     "--tokenizer", str(word_tok), "--output", str(tmp_path / "a"), "--workers", "1")
    assert result.exit_code == 0, result.output
    first = by_hand(([BOS], 0), (ALPACA_TEMPLATE_NO_INPUT.format(instruction="Say hi"), 0),
                    ("Hi there", 1), ([EOT], 1))
    second = by_hand(([BOS], 0), (ALPACA_TEMPLATE.format(instruction="Repeat the words.", input="cat dog"), 0),
                     ("cat dog", 1), ([EOT], 1))
    assert written(tmp_path / "a") == [first, second]


def test_messages_default_layout_masks_by_hand(word_tok, tmp_path):
    result = prepare("--input", str(write_jsonl(tmp_path / "m.jsonl", [{"messages": CHAT}])), "--format",
                     "messages", "--tokenizer", str(word_tok), "--output", str(tmp_path / "m"), "--no-chat-template",
                     "--workers", "1")
    assert result.exit_code == 0, result.output
    expected = by_hand(([BOS], 0), ("<|system|>\nBe brief.\n<|user|>\nHi there\n<|assistant|>\n", 0), ("Hello", 1),
                       ([EOT], 1), ("<|user|>\nSay bye\n<|assistant|>\n", 0), ("Bye now", 1), ([EOT], 1))
    assert written(tmp_path / "m") == [expected]


def test_llama3_chat_template_masks_by_hand(word_tok, tmp_path):
    """Llama 3's template has no {% generation %} markers; the assistant replies and their <|eot_id|> are still
    the only targets (Megatron-Bridge fell back to all-ones here), and the tokens are the template's own."""
    result = prepare("--input", str(write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}])), "--format",
                     "messages", "--tokenizer", str(word_tok), "--output", str(tmp_path / "c"), "--chat-template",
                     "--workers", "1")
    assert result.exit_code == 0, result.output
    expected = by_hand(([BOS, SH], 0), ("system", 0), ([EH], 0), ("\n\nBe brief.", 0), ([EOT, SH], 0), ("user", 0),
                       ([EH], 0), ("\n\nHi there", 0), ([EOT, SH], 0), ("assistant", 0), ([EH], 0), ("\n\n", 0),
                       ("Hello", 1), ([EOT], 1),
                       ([SH], 0), ("user", 0), ([EH], 0), ("\n\nSay bye", 0), ([EOT, SH], 0), ("assistant", 0),
                       ([EH], 0), ("\n\n", 0), ("Bye now", 1), ([EOT], 1))
    assert written(tmp_path / "c") == [expected]
    meta = json.loads((tmp_path / "c.json").read_text())
    assert meta["template"] == "tokenizer chat template" and meta["chat_template_sha256"]
    assert meta["counts"]["loss_tokens"] == sum(expected[1]) == 6  # Hello, eot, Bye, " ", now, eot


# ---------------------------------------------------------------- megatron-core reads our files
@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A tiny LLaMA-2 whose tokenizer knows the learnable task's words (short samples), as test_sft builds it."""
    return make_hf_checkpoint(tmp_path_factory.mktemp("model") / "hf", "llama2", tokenizer_lines=learnable_lines())


@pytest.fixture(scope="module")
def alpaca(tmp_path_factory, hf_dir) -> dict:
    """The learnable alpaca set as JSONL and Parquet, prepared from JSONL."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("prep")
    jsonl = make_learnable_dataset(root / "train.jsonl", n=64, seed=0)
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    schema = pa.schema([(k, pa.string()) for k in ("instruction", "input", "output")])
    pq.write_table(pa.Table.from_pylist(records, schema=schema), root / "train.parquet")
    result = prepare("--input", str(jsonl), "--format", "alpaca", "--tokenizer", str(hf_dir), "--output",
                     str(root / "jsonl"), "--workers", "2")
    assert result.exit_code == 0, result.output
    return {"root": root, "jsonl": jsonl, "parquet": root / "train.parquet", "prefix": root / "jsonl",
            "records": records}


def test_indexed_dataset_and_gpt_dataset_read_our_files(alpaca, hf_dir):
    """Every sample, read by megatron-core's IndexedDataset, is sft's tokenization of its record; GPTDataset (what
    Megatron-LM's --data-path builds for pretraining) draws its samples from those documents."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tok = load_tokenizer(hf_dir)
    ref = load_dataset(alpaca["jsonl"], fmt="alpaca", tokenizer=tok, seq_length=4096)
    data, masks = IndexedDataset(str(alpaca["prefix"])), IndexedDataset(f"{alpaca['prefix']}_mask")
    assert len(data) == len(masks) == len(ref) == 64 and data.index.dtype == np.uint16  # vocab 320 < 65,500
    assert list(data.document_indices) == list(range(65))  # one document per sample
    for i in range(len(data)):
        ids = data[i].astype(np.int64)
        n = len(ids)
        assert ids[:-1].tolist() == ref.input_ids[i, : n - 1].tolist()
        assert np.where(masks[i][1:] == 1, ids[1:], IGNORE_INDEX).tolist() == ref.labels[i, : n - 1].tolist()

    class Tok:  # GPTDataset asks its tokenizer only for these
        eod, pad, vocab_size, unique_identifiers = tok.eos_id, tok.pad_id, tok.vocab_size, {"class": "test"}

    config = GPTDatasetConfig(random_seed=1, sequence_length=32, blend=([str(alpaca["prefix"])], None),
                              split="1,0,0", path_to_cache=str(alpaca["root"] / "cache"), tokenizer=Tok(),
                              reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False)
    train = BlendedMegatronDatasetBuilder(GPTDataset, [20, None, None], lambda: True, config).build()[0]
    stream = np.concatenate([data[int(d)] for d in train.document_index]).astype(np.int64).tobytes()
    for i in range(20):
        sample = train[i]
        window = np.concatenate([np.asarray(sample["tokens"]), np.asarray(sample["labels"][-1:])]).astype(np.int64)
        assert len(window) == 33 and stream.find(window.tobytes()) % 8 == 0  # a window of the documents


def test_parquet_hub_and_jsonl_give_identical_files(alpaca, hf_dir, tmp_path, monkeypatch):
    """Parquet (1 worker), JSONL (2 workers, the fixture) and a Hub dataset id from an offline HF cache: the same
    bytes in every file, and sft reads Parquet and the Hub id directly to the JSONL's rows."""
    result = prepare("--input", str(alpaca["parquet"]), "--format", "alpaca", "--tokenizer", str(hf_dir),
                     "--output", str(tmp_path / "pq"), "--workers", "1")
    assert result.exit_code == 0, result.output
    cache = tmp_path / "hub"
    snapshot = cache / "datasets--test-org--tiny-alpaca" / "snapshots" / ("c" * 40)
    (snapshot / "data").mkdir(parents=True)
    (snapshot / "data" / "train.jsonl").write_bytes(alpaca["jsonl"].read_bytes())
    (cache / "datasets--test-org--tiny-alpaca" / "refs").mkdir()
    (cache / "datasets--test-org--tiny-alpaca" / "refs" / "main").write_text("c" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    result = prepare("--input", "test-org/tiny-alpaca", "--format", "alpaca", "--tokenizer", str(hf_dir),
                     "--output", str(tmp_path / "hub"), "--workers", "2")
    assert result.exit_code == 0, result.output
    for other in (tmp_path / "pq", tmp_path / "hub"):
        for ours, theirs in zip(prefix_files(alpaca["prefix"])[:4], prefix_files(other)[:4], strict=True):
            assert ours.read_bytes() == theirs.read_bytes(), theirs
    tok = load_tokenizer(hf_dir)
    ref = load_dataset(alpaca["jsonl"], fmt="alpaca", tokenizer=tok, seq_length=64)
    for source in (str(alpaca["parquet"]), "test-org/tiny-alpaca:train"):
        rows = load_source(source, fmt="alpaca", tokenizer=tok, seq_length=64)
        assert rows.input_ids.equal(ref.input_ids) and rows.labels.equal(ref.labels), source


def test_blend_weights_and_concatenation(alpaca, hf_dir):
    tok = load_tokenizer(hf_dir)
    one = load_source(str(alpaca["prefix"]), fmt="megatron", tokenizer=tok, seq_length=128)
    assert len(one) == 64 and one.stats.truncated == one.stats.dropped_empty == 0
    both = load_source(f"{alpaca['prefix']} {alpaca['prefix']}", fmt="megatron", tokenizer=tok, seq_length=128)
    assert both.input_ids.equal(one.input_ids.repeat(2, 1))
    blend = load_source([0.75, str(alpaca["prefix"]), 0.25, str(alpaca["prefix"])], fmt="megatron", tokenizer=tok,
                        seq_length=128)  # (the YAML list form; the config loader joins it into "0.75 A 0.25 B")
    # 128 samples: 96 from A (its 64, then wrapping to its first 32), 32 from B
    assert len(blend) == 128 and blend.input_ids[:96].equal(one.input_ids.repeat(2, 1)[:96])
    assert blend.input_ids[96:].equal(one.input_ids[:32]) and blend.labels[96:].equal(one.labels[:32])


# ---------------------------------------------------------------- sft from a prepared prefix
@pytest.fixture(scope="module")
def megatron_dir(hf_dir, tmp_path_factory) -> Path:
    from megallama.convert import convert

    root = tmp_path_factory.mktemp("meg")
    convert(hf_dir, root / "pth", src_format="hf", dst_format="meta")
    convert(root / "pth", root / "meg", src_format="meta", dst_format="megatron", tp=1, pp=1, ckpt_format="torch")
    return root / "meg"


def sft(megatron_dir: Path, output: Path, *overrides: str):
    return runner.invoke(app, ["sft", "--config", str(CONFIG), f"load={megatron_dir}", f"output={output}",
                               "train.steps=3", "train.warmup_steps=1", "train.save_interval=100",
                               "checkpoint.format=torch", *overrides])


@pytest.mark.slow
def test_sft_from_prepared_prefix_equals_sft_from_jsonl(alpaca, megatron_dir, tmp_path):
    """The same samples per step with the same masks: per-step loss, trained tokens and grad norm bit-identical."""
    runs = {}
    for name, overrides in (("jsonl", [f"data.train={alpaca['jsonl']}"]),
                            ("prefix", [f"data.train={alpaca['prefix']}", "data.format=megatron"])):
        result = sft(megatron_dir, tmp_path / name, *overrides)
        assert result.exit_code == 0, result.output
        runs[name] = [(r["step"], r["loss"], r["loss_tokens"], r["grad_norm"])
                      for r in read_metrics(tmp_path / name) if "loss" in r]
    assert len(runs["jsonl"]) == 3 and runs["prefix"] == runs["jsonl"]


def test_megatron_core_corpus_is_continued_pretraining(hf_dir, megatron_dir, tmp_path):
    """A corpus as Megatron-LM's preprocess_data.py writes it (megatron-core's IndexedDatasetBuilder, BOS ...
    EOD documents, no masks): every next-token prediction inside each document is trained exactly once, in pieces
    of at most seq_length + 1 tokens, and sft packs the pieces (plan note; attention stays inside each piece)."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    tok = load_tokenizer(hf_dir)
    documents = [[tok.bos_id, *tok.encode(line), tok.eos_id] for line in learnable_lines()[:12]]
    builder = IndexedDatasetBuilder(str(tmp_path / "corpus.bin"), dtype=np.uint16)
    for doc in documents:
        builder.add_item(torch.tensor(doc))
        builder.end_document()
    builder.finalize(str(tmp_path / "corpus.idx"))
    seq = 8
    rows = load_source(str(tmp_path / "corpus"), fmt="megatron", tokenizer=tok, seq_length=seq, vocab_size=320)
    assert rows.stats.loss_tokens == sum(len(d) - 1 for d in documents)  # loss on every token
    pieces = [(d[k: k + seq + 1]) for d in documents for k in range(0, len(d) - 1, seq)]
    assert len(rows) == len(pieces)
    for i, piece in enumerate(pieces):
        n = len(piece) - 1
        assert rows.input_ids[i, :n].tolist() == piece[:-1] and rows.labels[i, :n].tolist() == piece[1:]
        assert (rows.labels[i, n:] == IGNORE_INDEX).all()
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": line} for line in learnable_lines()[:12]])
    same = load_source(str(text), fmt="text", tokenizer=tok, seq_length=seq, vocab_size=320)
    assert same.input_ids.equal(rows.input_ids) and same.labels.equal(rows.labels)  # data.format: text
    result = sft(megatron_dir, tmp_path / "run", f"data.train={tmp_path / 'corpus'}", "data.format=megatron",
                 "--dry-run")
    assert result.exit_code == 0, result.output
    assert "data.pack turned on" in " ".join(result.output.split())


# ---------------------------------------------------------------- refusals: one line, exit 2, nothing written
def assert_refused(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert message.startswith("error:") and all(n in message for n in needles), message


def test_prepare_refusals_leave_no_prefix_files(hf_dir, tmp_path, monkeypatch):
    good = {"instruction": "Say hi", "output": "hi"}
    bad = write_jsonl(tmp_path / "bad.jsonl", [good, good, {"instruction": "no output"}, good])
    assert_refused(prepare("--input", str(bad), "--format", "alpaca", "--tokenizer", str(hf_dir), "--output",
                           str(tmp_path / "out"), "--workers", "2", "--overwrite"),
                   f"{bad}:3", "alpaca record lacks 'output'")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    assert_refused(prepare("--input", "test-org/missing", "--format", "alpaca", "--tokenizer", str(hf_dir),
                           "--output", str(tmp_path / "out")), "test-org/missing", "HF_HUB_OFFLINE is set")
    assert_refused(prepare("--input", str(bad), "--format", "chat", "--tokenizer", str(hf_dir), "--output",
                           str(tmp_path / "out")), "unknown data format 'chat'")
    assert [p.name for p in tmp_path.iterdir() if "out" in p.name] == []  # no PREFIX file, no staging folder


def test_sft_refusals(alpaca, megatron_dir, tmp_path):
    prefix = str(alpaca["prefix"])
    cases = [
        (["data.train=0.7 A -0.3 B"], "blend weight '-0.3' for B: expected a finite number >= 0"),
        ([f"data.train=0.7 {prefix} x {prefix}"], "blend weight 'x'"),
        ([f"data.train={prefix} 0.5"], "'0.5' looks like a weight"),
    ]
    for overrides, needle in cases:
        assert_refused(sft(megatron_dir, tmp_path / "run", "data.format=megatron", *overrides, "--dry-run"), needle)
    # a .idx without its .bin, and a truncated .bin
    (tmp_path / "lonely.idx").write_bytes(Path(f"{prefix}.idx").read_bytes())
    assert_refused(sft(megatron_dir, tmp_path / "run", "data.format=megatron", f"data.train={tmp_path / 'lonely'}",
                       "--dry-run"), "lonely.idx has no lonely.bin beside it")
    (tmp_path / "cut.idx").write_bytes(Path(f"{prefix}.idx").read_bytes())
    (tmp_path / "cut.bin").write_bytes(Path(f"{prefix}.bin").read_bytes()[:-10])
    assert_refused(sft(megatron_dir, tmp_path / "run", "data.format=megatron", f"data.train={tmp_path / 'cut'}",
                       "--dry-run"), "cut.bin is truncated")
    # data prepared with a tokenizer that does not match the model's vocabulary
    big = train_tokenizer(tmp_path / "big", vocab_size=400, extra_lines=learnable_lines())
    result = prepare("--input", str(alpaca["jsonl"]), "--format", "alpaca", "--tokenizer", str(big), "--output",
                     str(tmp_path / "big-data"), "--workers", "1")
    assert result.exit_code == 0, result.output
    assert_refused(sft(megatron_dir, tmp_path / "run", "data.format=megatron", f"data.train={tmp_path / 'big-data'}",
                       "--dry-run"), "prepared with a tokenizer of 400 tokens", "model's vocabulary has 320")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- chunked, batch-tokenized = the per-record rule
EDGE_ALPACA = [*ALPACA, {"instruction": "Tell a long story.", "output": " ".join(["cat dog bird"] * 30)},
               {"instruction": "Say nothing", "input": "", "output": ""},
               {"instruction": "Repeat the words. " * 20, "input": "cat dog", "output": "cat"}]
EDGE_TEXT = [{"text": "Hi there, cat dog."}, {"text": ""}, {"text": "  two  spaces\tand\ttabs "},
             {"text": "héllo 日本 \u2028 line"}, {"text": "x"}]
EDGE_PRETOKENIZED = [{"input_ids": [1, 5, 6, 7], "labels": [-100, 5, 6, 7]}, {"input_ids": [1]},
                     {"input_ids": [1, 2, 3], "labels": [-100, -100, -100]},
                     {"input_ids": [1, 8, 9, 10, 11], "attention_mask": [1, 1, 1, 0, 0]}]
SHAREGPT = {"conversations": [{"from": "human", "value": "Hi there"}, {"from": "gpt", "value": "Hello " * 12}]}
EDGE_MESSAGES = [{"messages": CHAT}, SHAREGPT, {"messages": CHAT[:2]}]


def per_record_reference(path: Path, prefix: Path, tokenizer: Path, rules) -> dict:
    """The rule one record at a time, as `data prepare` first did it: encode_record + fit_sample per record, and
    megatron-core's add_item + end_document per sample. Returns the counts."""
    import torch
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    from megallama.data.records import open_records, parse_payload
    from megallama.data.samples import encode_record, fit_sample

    tok = load_tokenizer(tokenizer)
    builders = [IndexedDatasetBuilder(f"{prefix}.bin", dtype=DType.optimal_dtype(tok.vocab_size)),
                IndexedDatasetBuilder(f"{prefix}_mask.bin", dtype=np.uint8)]
    counts = {"samples": 0, "tokens": 0, "loss_tokens": 0, "truncated": 0, "dropped": {}}
    for where, payload in open_records(path):
        ids, mask, cut, why = fit_sample(*encode_record(parse_payload(payload, where), where, rules, tok), rules)
        if why is not None:
            counts["dropped"][why] = counts["dropped"].get(why, 0) + 1
            continue
        for builder, values in zip(builders, (ids, mask), strict=True):
            builder.add_item(torch.tensor(values, dtype=torch.int64))
            builder.end_document()
        counts = {**counts, "samples": counts["samples"] + 1, "tokens": counts["tokens"] + len(ids),
                  "loss_tokens": counts["loss_tokens"] + sum(mask[1:]), "truncated": counts["truncated"] + cut}
    builders[0].finalize(f"{prefix}.idx")
    builders[1].finalize(f"{prefix}_mask.idx")
    return counts


@pytest.mark.parametrize("fmt, records, tokenizer, seq_length, chat_template, cases", [
    ("alpaca", EDGE_ALPACA, "sp", 40, None, {"truncated", "no trained token left after the cut to seq_length"}),
    ("alpaca", EDGE_ALPACA, "word", None, None, set()),
    ("text", EDGE_TEXT, "sp", 4, None, {"empty text"}),  # text is never cut
    ("text", EDGE_TEXT, "word", None, None, {"empty text"}),
    ("messages", EDGE_MESSAGES, "word", 30, False, {"truncated", "no trained token"}),  # default layout
    ("messages", EDGE_MESSAGES, "word", 30, True, {"truncated", "no trained token"}),  # chat template
    ("pretokenized", EDGE_PRETOKENIZED, "sp", 2, None, {"truncated", "fewer than 2 tokens", "no trained token"}),
])
def test_chunked_prepare_equals_per_record_rule(fmt, records, tokenizer, seq_length, chat_template, cases, hf_dir,
                                                word_tok, tmp_path):
    """Chunks of 2 records, texts tokenized in one batch call, cut and masks by numpy over the chunk, one write
    per chunk: the same bytes in all four files and the same counts as the rule applied record by record."""
    from megallama.data.prepare import prepare as prepare_data
    from megallama.data.samples import SampleRules

    tok = {"sp": hf_dir, "word": word_tok}[tokenizer]
    data = write_jsonl(tmp_path / "in.jsonl", records * 3)
    expected = per_record_reference(data, tmp_path / "ref", tok, SampleRules(
        fmt, chat_template=bool(chat_template), seq_length=seq_length))
    report = prepare_data(str(data), fmt=fmt, tokenizer=tok, output=tmp_path / "out", seq_length=seq_length,
                          workers=1, chat_template=chat_template, chunk_size=2)
    files = prefix_files(tmp_path / "out")[:4] if fmt != "text" else prefix_files(tmp_path / "out")[:4:3]
    for ours in files:
        assert ours.read_bytes() == (tmp_path / ours.name.replace("out", "ref")).read_bytes(), ours.name
    assert {k: getattr(report, k) for k in expected} == expected
    assert report.samples > 0 and cases == set(report.dropped) | ({"truncated"} if report.truncated else set())


def test_two_workers_many_chunks_equal_the_per_record_rule(hf_dir, tmp_path):
    """8 chunks of 3 records over 2 spawned workers: the per-record rule's bytes, in input order."""
    from megallama.data.prepare import prepare as prepare_data
    from megallama.data.samples import SampleRules

    data = write_jsonl(tmp_path / "in.jsonl", EDGE_ALPACA * 8)
    expected = per_record_reference(data, tmp_path / "ref", hf_dir, SampleRules("alpaca", seq_length=40))
    report = prepare_data(str(data), fmt="alpaca", tokenizer=hf_dir, output=tmp_path / "out", seq_length=40,
                          workers=2, chunk_size=3)
    for ours in prefix_files(tmp_path / "out")[:4]:
        assert ours.read_bytes() == (tmp_path / ours.name.replace("out", "ref")).read_bytes(), ours.name
    assert report.samples == expected["samples"] and report.dropped == expected["dropped"]


@pytest.mark.parametrize("kind", ["sentencepiece", "hf", "word"])
def test_encode_batch_equals_encode(kind, hf_dir, word_tok):
    tok = load_tokenizer({"sentencepiece": hf_dir, "hf": hf_dir / "tokenizer_config.json", "word": word_tok}[kind])
    assert tok.kind == ("sentencepiece" if kind == "sentencepiece" else "hf")
    texts = ["", " ", "Hi there", "  two  spaces\tand\ttabs ", "line\nbreaks\r\n", "héllo 日本 \u2028",
             ALPACA_TEMPLATE, "What is the capital of France? " * 40]
    assert [ids.tolist() for ids in tok.encode_batch(texts)] == [tok.encode(t) for t in texts]


def test_jsonl_chunks_keep_line_numbers(hf_dir, tmp_path):
    """Blank lines and CRLF line ends across chunk edges: a bad record is still named by its line."""
    good = json.dumps({"instruction": "Say hi", "output": "hi"})
    path = tmp_path / "gaps.jsonl"
    path.write_bytes(("\r\n".join([good, "", good, "   ", good, good, "", good, '{"instruction": "x"}', good])
                      + "\r\n").encode())
    from megallama.data.prepare import prepare as prepare_data
    from megallama.data.records import JsonLines
    from megallama.errors import InputError

    with pytest.raises(InputError, match=f"^{re.escape(str(path))}:9: alpaca record lacks 'output'"):
        prepare_data(str(path), fmt="alpaca", tokenizer=hf_dir, output=tmp_path / "out", workers=1, chunk_size=4)

    chunks = list(JsonLines(path).chunks(4))
    assert [c.first_line for c in chunks] == [1, 5, 9]
    assert [where for c in chunks for where, _ in c.records()] == [f"{path}:{n}" for n in (1, 3, 5, 6, 8, 9, 10)]
    path.write_bytes(path.read_bytes().replace(b'{"instruction": "x"}', b""))
    report = prepare_data(str(path), fmt="alpaca", tokenizer=hf_dir, output=tmp_path / "out", workers=1,
                          chunk_size=3)
    assert report.records == report.samples == 6


def test_tokenizing_workers_import_no_torch(hf_dir):
    """What a spawned worker runs, set-up and one chunk, imports no torch: it starts fast and stays small."""
    import subprocess
    import sys

    code = ("import sys, numpy; from megallama.data import encode; from megallama.data.samples import SampleRules; "
            "encode.init_worker(sys.argv[1], SampleRules('alpaca'), numpy.uint16); "
            "r = encode.encode_chunk([('x', '{\"instruction\": \"Say hi\", \"output\": \"hi\"}')]); "
            "print(len(r.lengths), sorted(m for m in ('torch', 'megatron') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code, str(hf_dir / "tokenizer.model")], capture_output=True,
                         text=True)
    assert run.returncode == 0 and run.stdout.strip() == "1 []", run.stdout + run.stderr

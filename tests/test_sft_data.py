"""SFT data: formats, templates, exact loss masks, truncation, refusals and deterministic batching."""

from __future__ import annotations

import json
from itertools import islice

import pytest

from megallama.errors import InputError
from megallama.sft.data import (
    IGNORE_INDEX,
    describe_sample,
    dp_microbatches,
    global_batches,
    learnable_lines,
    load_dataset,
    load_tokenizer,
    make_learnable_dataset,
)
from megallama.sft.templates import ALPACA_TEMPLATE, ALPACA_TEMPLATE_NO_INPUT, ROLE_HEADERS
from megallama.tiny import train_tokenizer

VOCAB = 320
INST_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
                 "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
ZEPHYR_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{% if m['role'] == 'assistant' %}"
                   "{{ eos_token }}{% endif %}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
CHAT = [{"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris"},
        {"role": "user", "content": "Reverse the words. cat dog"}, {"role": "assistant", "content": "dog cat"}]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(out, vocab_size=VOCAB, extra_lines=learnable_lines())
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def row(ds, i=0):
    """(input_ids, labels) of row i as lists, cut to the real length."""
    n = int((ds.labels[i] != IGNORE_INDEX).nonzero().max()) + 1
    return ds.input_ids[i, :n].tolist(), ds.labels[i, :n].tolist()


def expected_row(segments, train_on_prompt=False):
    """Shifted (input_ids, labels) for [(ids, trained)...], the way the data module must build them."""
    ids = [t for seg, _ in segments for t in seg]
    targets = [t if (m or train_on_prompt) else IGNORE_INDEX for seg, m in segments for t in seg]
    return ids[:-1], targets[1:]


# ---------------------------------------------------------------- tokenizers


def test_load_tokenizer_variants(tok_dir, tmp_path):
    sp = load_tokenizer(tok_dir / "tokenizer.model")
    assert (sp.kind, sp.vocab_size, sp.bos_id, sp.eos_id) == ("sentencepiece", VOCAB, 1, 2)
    assert load_tokenizer(tok_dir).kind == "sentencepiece"
    assert sp.decode(sp.encode("cat dog sun")) == "cat dog sun"
    with pytest.raises(InputError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(InputError, match="no tokenizer.model"):
        load_tokenizer(tmp_path)


# ---------------------------------------------------------------- alpaca


@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_alpaca_masks_prompt_exactly(tok, tmp_path, train_on_prompt):
    rec = {"instruction": "Repeat the words.", "input": "cat dog", "output": "cat dog"}
    path = write_jsonl(tmp_path / "a.jsonl", [rec])
    ds = load_dataset(path, fmt="alpaca", tokenizer=tok, seq_length=256, train_on_prompt=train_on_prompt)
    prompt = ALPACA_TEMPLATE.format(instruction=rec["instruction"], input=rec["input"])
    segments = [([tok.bos_id], False), (tok.encode(prompt), False), (tok.encode("cat dog"), True), ([tok.eos_id], True)]
    assert row(ds) == expected_row(segments, train_on_prompt)
    ids, labels = row(ds)
    assert labels[-1] == tok.eos_id  # EOS is trained on
    if not train_on_prompt:  # the response positions hold exactly the response tokens
        assert [t for t in labels if t != IGNORE_INDEX] == tok.encode("cat dog") + [tok.eos_id]
    assert ds.stats.loss_tokens == sum(t != IGNORE_INDEX for t in labels)
    assert ds.input_ids.shape == ds.labels.shape == (1, 256)
    assert (ds.labels[0, len(ids):] == IGNORE_INDEX).all() and (ds.input_ids[0, len(ids):] == tok.pad_id).all()


def test_alpaca_json_array_without_input(tok, tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"instruction": "What is the capital of Peru?", "output": "Lima"}], indent=2))
    ds = load_dataset(path, fmt="alpaca", tokenizer=tok, seq_length=256)
    prompt = ALPACA_TEMPLATE_NO_INPUT.format(instruction="What is the capital of Peru?")
    segments = [([tok.bos_id], False), (tok.encode(prompt), False), (tok.encode("Lima"), True), ([tok.eos_id], True)]
    assert row(ds) == expected_row(segments)
    runs = describe_sample(ds, 0, tok)
    assert [flag for _, flag in runs] == [False, True] and runs[1][0].strip() == "Lima"


# ---------------------------------------------------------------- chat: default template, ShareGPT


def default_chat_segments(tok, messages):
    segments, prompt = [([tok.bos_id], False)], ""
    for m in messages:
        if m["role"] != "assistant":
            prompt += f"{ROLE_HEADERS[m['role']]}{m['content']}\n"
            continue
        segments += [(tok.encode(prompt + ROLE_HEADERS["assistant"]), False), (tok.encode(m["content"]), True),
                     ([tok.eos_id], True)]
        prompt = ""
    return segments


@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_messages_default_template_trains_assistant_turns_only(tok, tmp_path, train_on_prompt):
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": CHAT}])
    ds = load_dataset(path, fmt="messages", tokenizer=tok, seq_length=128, train_on_prompt=train_on_prompt)
    assert row(ds) == expected_row(default_chat_segments(tok, CHAT), train_on_prompt)


def test_sharegpt_conversations_match_messages(tok, tmp_path):
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    sharegpt = [{"from": names[m["role"]], "value": m["content"]} for m in CHAT]
    a = load_dataset(write_jsonl(tmp_path / "m.jsonl", [{"messages": CHAT}]), fmt="messages", tokenizer=tok,
                     seq_length=128)
    b = load_dataset(write_jsonl(tmp_path / "s.jsonl", [{"conversations": sharegpt}]), fmt="sharegpt",
                     tokenizer=tok, seq_length=128)
    assert a.input_ids.equal(b.input_ids) and a.labels.equal(b.labels)


# ---------------------------------------------------------------- chat: the tokenizer's own template


@pytest.fixture(scope="module", params=[INST_TEMPLATE, ZEPHYR_TEMPLATE], ids=["inst", "zephyr"])
def hf_chat_dir(request, tok_dir, tmp_path_factory):
    from transformers import LlamaTokenizer

    hf = LlamaTokenizer.from_pretrained(str(tok_dir))
    hf.chat_template = request.param
    out = tmp_path_factory.mktemp("hfchat")
    hf.save_pretrained(str(out))
    return out


def test_chat_template_masks_assistant_turns(hf_chat_dir, tmp_path):
    tok = load_tokenizer(hf_chat_dir)
    assert tok.kind == "hf" and tok.chat_template
    chat = CHAT[1:]  # the [INST] template has no system role
    ds = load_dataset(write_jsonl(tmp_path / "c.jsonl", [{"messages": chat}]), fmt="messages", tokenizer=tok,
                      seq_length=128, vocab_size=VOCAB)
    text = tok.backend.apply_chat_template(chat, tokenize=False)
    full = tok.encode(text)
    full = full if full[0] == tok.bos_id else [tok.bos_id, *full]
    ids, labels = row(ds)
    assert ids == full[: len(ids)]  # the row is the template's own tokenization
    runs, current = [], []  # runs of consecutive trained targets, one per assistant turn
    for t in labels + [IGNORE_INDEX]:
        if t != IGNORE_INDEX:
            current.append(t)
        elif current:
            runs, current = runs + [current], []
    replies = [m["content"] for m in chat if m["role"] == "assistant"]
    assert len(runs) == len(replies)
    for run, reply in zip(runs, replies, strict=True):
        decoded = tok.backend.decode(run).strip()
        assert decoded.startswith(reply) and decoded[len(reply):].startswith("</s>")  # reply + EOS, no header
    assert tok.eos_id in runs[-1]


# ---------------------------------------------------------------- pretokenized


def test_pretokenized_shift_labels_and_padding(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"input_ids": [1, 5, 6, 7, 2], "labels": [-100, -100, 6, 7, 2]},
        {"input_ids": [1, 8, 9]},  # no labels: every token is trained on
        {"input_ids": [1, 10, 11, 0, 0], "labels": [-100, 10, 11, -100, -100], "attention_mask": [1, 1, 1, 0, 0]},
    ])
    ds = load_dataset(path, fmt="pretokenized", tokenizer=None, seq_length=6, vocab_size=VOCAB)
    assert ds.input_ids.tolist() == [[1, 5, 6, 7, 0, 0], [1, 8, 0, 0, 0, 0], [1, 10, 0, 0, 0, 0]]
    assert ds.labels.tolist() == [[-100, 6, 7, 2, -100, -100], [8, 9, -100, -100, -100, -100],
                                  [10, 11, -100, -100, -100, -100]]
    assert (ds.stats.samples, ds.stats.tokens, ds.stats.loss_tokens) == (3, 8, 7)


def test_pretokenized_refusals(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"input_ids": [1, 5, 2]}, {"input_ids": [1, VOCAB, 2]}])
    with pytest.raises(InputError, match=rf"p\.jsonl:2: token id {VOCAB} is outside the model's vocabulary"):
        load_dataset(path, fmt="pretokenized", tokenizer=None, seq_length=8, vocab_size=VOCAB)
    path = write_jsonl(tmp_path / "q.jsonl", [{"input_ids": [1, 5, 2], "labels": [1, 5]}])
    with pytest.raises(InputError, match=r"q\.jsonl:1: 'labels' has 2 entries"):
        load_dataset(path, fmt="pretokenized", tokenizer=None, seq_length=8)
    with pytest.raises(InputError, match="train_on_prompt has no effect"):
        load_dataset(path, fmt="pretokenized", tokenizer=None, seq_length=8, train_on_prompt=True)


# ---------------------------------------------------------------- truncation, refusals


def test_truncation_is_counted_and_prompt_only_rows_dropped(tok, tmp_path):
    long_reply = " ".join(["cat dog sun moon"] * 20)
    long_prompt = " ".join(["tree fish bird"] * 30)
    path = write_jsonl(tmp_path / "t.jsonl", [
        {"messages": [{"role": "user", "content": "Repeat."}, {"role": "assistant", "content": "cat"}]},
        {"messages": [{"role": "user", "content": "Repeat."}, {"role": "assistant", "content": long_reply}]},
        {"messages": [{"role": "user", "content": long_prompt}, {"role": "assistant", "content": "cat"}]},
    ])
    ds = load_dataset(path, fmt="messages", tokenizer=tok, seq_length=32)
    assert (ds.stats.samples, ds.stats.truncated, ds.stats.dropped_empty) == (2, 2, 1)
    assert ds.labels[1, -1] != IGNORE_INDEX and (ds.input_ids[1] != tok.pad_id).all()  # cut mid-reply: a full row
    assert ds.stats.tokens == (ds.labels[0] != IGNORE_INDEX).nonzero().max().item() + 1 + 32


def test_input_refusals_name_file_and_line(tok, tmp_path):
    good = {"instruction": "Repeat the words.", "input": "cat", "output": "cat"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(good) + "\n" + '{"instruction": "x", "output": \n')
    with pytest.raises(InputError, match=r"bad\.jsonl:2: malformed JSON line"):
        load_dataset(bad, fmt="alpaca", tokenizer=tok, seq_length=64)
    missing = write_jsonl(tmp_path / "missing.jsonl", [good, good, {"instruction": "x"}])
    with pytest.raises(InputError, match=r"missing\.jsonl:3: alpaca record lacks 'output'"):
        load_dataset(missing, fmt="alpaca", tokenizer=tok, seq_length=64)
    role = write_jsonl(tmp_path / "role.jsonl", [{"messages": [{"role": "robot", "content": "hi"}]}])
    with pytest.raises(InputError, match=r"role\.jsonl:1: turn 0 has unknown role 'robot'"):
        load_dataset(role, fmt="messages", tokenizer=tok, seq_length=64)
    with pytest.raises(InputError, match="unknown data format 'csv'"):
        load_dataset(missing, fmt="csv", tokenizer=tok, seq_length=64)
    with pytest.raises(InputError, match="does not exist"):
        load_dataset(tmp_path / "none.jsonl", fmt="alpaca", tokenizer=tok, seq_length=64)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(InputError, match="no usable alpaca samples"):
        load_dataset(tmp_path / "empty.jsonl", fmt="alpaca", tokenizer=tok, seq_length=64)
    with pytest.raises(InputError, match=f"has {VOCAB} tokens but the model's vocabulary has 256"):
        load_dataset(missing, fmt="alpaca", tokenizer=tok, seq_length=64, vocab_size=256)


# ---------------------------------------------------------------- batching


def test_global_batches_deterministic_epochs_and_resume():
    first = list(islice(global_batches(10, global_batch_size=5, seed=3), 8))
    assert first == list(islice(global_batches(10, global_batch_size=5, seed=3), 8))
    assert first != list(islice(global_batches(10, global_batch_size=5, seed=4), 8))
    for epoch in range(4):  # each pair of steps is one epoch: every sample exactly once, reshuffled
        assert sorted(first[2 * epoch] + first[2 * epoch + 1]) == list(range(10))
    assert first[0] + first[1] != first[2] + first[3]
    # 7 samples in batches of 3: batches straddle epochs; resuming at any step continues the same stream.
    stream = list(islice(global_batches(7, global_batch_size=3, seed=0), 12))
    for k in (1, 2, 5, 7):
        assert list(islice(global_batches(7, global_batch_size=3, seed=0, start_step=k), 12 - k)) == stream[k:]


@pytest.mark.parametrize("dp_size,micro", [(1, 1), (1, 12), (2, 3), (3, 2), (4, 1), (6, 2), (12, 1)])
def test_dp_microbatches_cover_global_batch_once(dp_size, micro):
    batch = next(global_batches(50, global_batch_size=12, seed=1))
    pieces = [dp_microbatches(batch, dp_rank=r, dp_size=dp_size, micro_batch_size=micro) for r in range(dp_size)]
    assert all(len(mb) == micro for rank in pieces for mb in rank)
    assert [i for rank in pieces for mb in rank for i in mb] == batch


def test_dp_microbatches_refuses_uneven_split():
    with pytest.raises(InputError, match="not a multiple of micro_batch_size"):
        dp_microbatches(list(range(12)), dp_rank=0, dp_size=5, micro_batch_size=1)


# ---------------------------------------------------------------- the learnable dataset


@pytest.mark.parametrize("fmt", ["alpaca", "messages", "sharegpt"])
def test_make_learnable_dataset_loads(tok, tmp_path, fmt):
    path = make_learnable_dataset(tmp_path / f"{fmt}.jsonl", n=64, seed=0, fmt=fmt)
    assert path.read_text() == make_learnable_dataset(tmp_path / "again.jsonl", n=64, seed=0, fmt=fmt).read_text()
    ds = load_dataset(path, fmt=fmt, tokenizer=tok, seq_length=128, vocab_size=VOCAB)
    assert (len(ds), ds.stats.truncated, ds.stats.dropped_empty) == (64, 0, 0)
    assert int(ds.input_ids.max()) < VOCAB and ds.stats.loss_tokens > 64

"""Spec parsing and the pure transforms: every pair round-trips bit-exactly; layouts are pinned."""

import pytest
import torch
from helpers import BIG_HEADS, big_shaped_spec, small_spec

from megallama import transforms as T
from megallama.errors import InputError
from megallama.spec import ModelSpec, check_parallel, meta_ffn_params, meta_ffn_size, padded_vocab_size
from megallama.tiny import PRESETS

E = small_spec()


@pytest.mark.parametrize("n_heads,rows", [(4, 64), (2, 32)])
def test_rotary_round_trip(n_heads, rows):
    w = torch.randn(rows, 64)
    assert torch.equal(T.hf_to_meta_rotary(T.meta_to_hf_rotary(w, n_heads), n_heads), w)
    assert not torch.equal(T.meta_to_hf_rotary(w, n_heads), w)


def test_rotary_row_order_pinned():
    # head_dim 16: new order is old rows 0,2,...,14,1,3,...,15 inside each head (formats.md 2.2)
    w = torch.arange(32).float().unsqueeze(1)
    hf = T.meta_to_hf_rotary(w, 2).squeeze(1).long().tolist()
    assert hf[:16] == list(range(0, 16, 2)) + list(range(1, 16, 2))
    assert hf[16:] == [16 + i for i in hf[:16]]


def test_qkv_round_trip_and_layout():
    q, k, v = torch.randn(64, 64), torch.randn(32, 64), torch.randn(32, 64)
    qkv = T.fuse_qkv(q, k, v, num_heads=4, num_kv_heads=2)
    assert qkv.shape == (128, 64)
    # group 0 = q0, q1, k0, v0 (formats.md 3.5, E)
    assert torch.equal(qkv[:64], torch.cat([q[:32], k[:16], v[:16]]))
    assert torch.equal(qkv[64:], torch.cat([q[32:], k[16:], v[16:]]))
    for a, b in zip(T.split_qkv(qkv, num_heads=4, num_kv_heads=2), (q, k, v), strict=True):
        assert torch.equal(a, b)


def test_gate_up_round_trip():
    g, u = torch.randn(88, 64), torch.randn(88, 64)
    fc1 = T.fuse_gate_up(g, u)
    assert torch.equal(fc1[:88], g)
    g2, u2 = T.split_gate_up(fc1)
    assert torch.equal(g2, g) and torch.equal(u2, u)


def test_vocab_pad_round_trip():
    w = torch.randn(320, 8)
    p = T.pad_vocab(w, 384)
    assert p.shape == (384, 8) and torch.all(p[320:] == 0)
    assert torch.equal(T.unpad_vocab(p, 320), w)


@pytest.mark.parametrize("kind", list(T.Split))
def test_shard_round_trip(kind):
    w = torch.randn(8, 12)
    parts = T.shard(w, kind, 2)
    assert all(p.untyped_storage().nbytes() == p.numel() * 4 for p in parts)  # no views of the whole
    assert torch.equal(T.unshard(parts, kind), w)


def test_unshard_replicated_detects_disagreement():
    with pytest.raises(ValueError, match="differs"):
        T.unshard([torch.zeros(3), torch.ones(3)], T.Split.REPLICATED)


def test_stage_layers():
    assert T.stage_layers(4, 2) == [range(0, 2), range(2, 4)]


def test_inverse_table_complete():
    assert set(T.INVERSE) >= {T.meta_to_hf_rotary, T.fuse_qkv, T.fuse_gate_up, T.pad_vocab, T.shard}


@pytest.mark.parametrize("dim,ffn", [(4096, 11008), (5120, 13824), (8192, 28672), (4096, 14336), (2048, 8192),
                                     (3072, 8192), (16384, 53248), (64, 176), (2048, 5632), (64, 172), (288, 768)])
def test_meta_ffn_params_reproduce_size(dim, ffn):
    multiple_of, mult = meta_ffn_params(dim, ffn)
    assert meta_ffn_size(dim, multiple_of, mult) == ffn


def test_padded_vocab_table():
    # formats.md 3.8
    assert padded_vocab_size(32000, 4) == 32256
    assert padded_vocab_size(128256, 8) == 129024
    assert padded_vocab_size(128, 2) == 256
    assert padded_vocab_size(49953, 2, divisible_by=1) == 49954


def test_hf_config_round_trip_all_presets():
    for spec in PRESETS.values():
        assert ModelSpec.from_hf_config(spec.to_hf_config()) == spec


def test_hf_config_4x_spelling():
    cfg = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 176, "vocab_size": 100,
           "rope_theta": 500000.0, "torch_dtype": "bfloat16",
           "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    spec = ModelSpec.from_hf_config(cfg)
    assert spec.rope_theta == 500000.0 and spec.rope_scaling["factor"] == 32.0 and spec.dtype == "bfloat16"


def test_unsupported_rope_scaling_refused():
    cfg = PRESETS["llama2"].to_hf_config() | {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
    with pytest.raises(InputError, match="unsupported rope scaling type 'yarn'"):
        ModelSpec.from_hf_config(cfg)


def test_meta_params_round_trip():
    for spec in PRESETS.values():
        back = ModelSpec.from_meta_params(spec.to_meta_params(), extra=spec.meta_extra(), dtype=spec.dtype)
        assert back == spec


def test_check_parallel_messages():
    check_parallel(E, tp=2, pp=2)
    with pytest.raises(InputError, match="TP=4 does not divide the 2 KV heads"):
        check_parallel(E, tp=4, pp=1)
    with pytest.raises(InputError, match="PP=3 does not divide the 4 layers"):
        check_parallel(E, tp=1, pp=3)


# ---------------------------------------------------------------- the head counts of the big models
def head_labels(heads: int, head_dim: int, tag: int) -> torch.Tensor:
    """[heads*dh, 1]: row d of head i holds tag*1e6 + i*1e3 + d, so every row says which head and row it is."""
    return torch.tensor([[tag * 1e6 + i * 1e3 + d] for i in range(heads) for d in range(head_dim)],
                        dtype=torch.float64)


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
@pytest.mark.parametrize("model", list(BIG_HEADS))
def test_qkv_fuse_and_tp_shard_at_the_big_models_head_counts(model, tp):
    """4, 8 and 16 queries per KV head (Llama 3 8B, 70B, 405B) at TP up to 8: TP rank r's slice of the fused
    linear_qkv is, built here head by head from formats.md 3.5, its KV groups in order, each [its query heads;
    k; v]; the slice is also what fuse_qkv gives on that rank's own heads, and everything inverts exactly."""
    spec = big_shaped_spec(model)
    nh, ng, dh = spec.num_heads, spec.num_kv_heads, spec.head_dim
    qpg = nh // ng
    q, k, v = head_labels(nh, dh, 1), head_labels(ng, dh, 2), head_labels(ng, dh, 3)
    fused = T.fuse_qkv(q, k, v, num_heads=nh, num_kv_heads=ng)
    parts = T.shard(fused, T.Split.COLUMN, tp)
    groups = ng // tp
    for r, part in enumerate(parts):
        expected = []
        for g in range(r * groups, (r + 1) * groups):
            expected += [q[(g * qpg + j) * dh:(g * qpg + j + 1) * dh] for j in range(qpg)]
            expected += [k[g * dh:(g + 1) * dh], v[g * dh:(g + 1) * dh]]
        assert torch.equal(part, torch.cat(expected)), r
        rank_heads = slice(r * groups * qpg * dh, (r + 1) * groups * qpg * dh)
        rank_kv = slice(r * groups * dh, (r + 1) * groups * dh)
        assert torch.equal(part, T.fuse_qkv(q[rank_heads], k[rank_kv], v[rank_kv], num_heads=groups * qpg,
                                            num_kv_heads=groups))
    back = T.split_qkv(T.unshard(parts, T.Split.COLUMN), num_heads=nh, num_kv_heads=ng)
    assert all(torch.equal(a, b) for a, b in zip(back, (q, k, v), strict=True))
    # rotary order is per head, so it inverts at these head counts too
    assert torch.equal(T.hf_to_meta_rotary(T.meta_to_hf_rotary(q, nh), nh), q)


@pytest.mark.parametrize("model", list(BIG_HEADS))
def test_big_models_parallel_plans(model):
    """TP 8 (one KV group per rank) is the most these models split into; PP stages split their real depth."""
    spec = big_shaped_spec(model, head_dim=128)
    for tp in (1, 2, 4, 8):
        check_parallel(spec.replace(ffn_hidden_size=8 * 128), tp=tp, pp=1)
    with pytest.raises(InputError, match="TP=16 does not divide the 8 KV heads"):
        check_parallel(spec, tp=16, pp=1)
    assert [len(r) for r in T.stage_layers(spec.num_layers, 2)] == [spec.num_layers // 2] * 2


def test_sixteen_layers_in_four_pipeline_stages():
    stages = T.stage_layers(16, 4)
    assert stages == [range(0, 4), range(4, 8), range(8, 12), range(12, 16)]
    with pytest.raises(ValueError, match="PP=3 does not divide 16 layers"):
        T.stage_layers(16, 3)

"""Mixture-of-experts layers (Llama 4) in megatron-core's local spec, as data; their torch_dist keys; MoE args.

A MoE layer of `get_gpt_layer_local_spec(num_experts=E, moe_grouped_gemm=False)` (megatron-core 0.16.1's
`SequentialMLP`, checked against a built GPTModel's state dict) holds, after the attention half of a dense layer:

    decoder.layers.{j}.mlp.router.weight                              [E, h]      replicated over TP
    decoder.layers.{j}.mlp.experts.local_experts.{le}.linear_fc1.weight  [2F/t, h]   [gate_r; up_r], like a dense fc1
    decoder.layers.{j}.mlp.experts.local_experts.{le}.linear_fc2.weight  [h, F/t]    split by input features
    decoder.layers.{j}.mlp.shared_experts.linear_fc1.weight / linear_fc2.weight

`le` is the expert's index on its expert-parallel rank: global expert e lives on EP rank e // (E/EP) as
local expert e % (E/EP). Expert tensor parallelism equals TP (megatron-core's default).

torch_dist (a model whose `moe_layer_freq` is a list, as ours always is, saves every layer under its own number,
not stacked): experts are one global tensor per layer and projection with a leading expert axis,
`decoder.layers.{i}.mlp.experts.experts.linear_fc1.weight [E, 2F, h]` (gate rows then up rows, two chunks per
expert) and `...linear_fc2.weight [E, h, F]`, so the files do not depend on EP (nor on TP or PP).
"""

from __future__ import annotations

from megallama.errors import InputError
from megallama.formats.megatron.rules import Kind, Rule
from megallama.names import EXPERT, ROUTER, SHARED_EXPERT
from megallama.spec import ModelSpec

LOCAL_EXPERT = "decoder.layers.{j}.mlp.experts.local_experts.%d.%s.weight"
DIST_EXPERTS = "decoder.layers.%d.mlp.experts.experts.%s.weight"


def moe_mlp_rules(spec: ModelSpec, *, ep_rank: int = 0, ep: int = 1) -> tuple[Rule, ...]:
    """The MLP half of a MoE layer on EP rank `ep_rank` (unbound: `{j}` stage-local, `{i}` global layer)."""
    per = spec.num_experts // ep
    rules = [Rule("decoder.layers.{j}.mlp.router.weight", (ROUTER,), Kind.REPLICATED)]
    for le in range(per):
        e = ep_rank * per + le
        rules += [
            Rule(LOCAL_EXPERT % (le, "linear_fc1"), (_expert(e, "gate_proj"), _expert(e, "up_proj")), Kind.GATE_UP,
                 extra_state=True),
            Rule(LOCAL_EXPERT % (le, "linear_fc2"), (_expert(e, "down_proj"),), Kind.ROW, extra_state=True),
        ]
    if spec.shared_expert_ffn_hidden_size:
        rules += [
            Rule("decoder.layers.{j}.mlp.shared_experts.linear_fc1.weight",
                 (SHARED_EXPERT.replace("{proj}", "gate_proj"), SHARED_EXPERT.replace("{proj}", "up_proj")),
                 Kind.GATE_UP, extra_state=True),
            Rule("decoder.layers.{j}.mlp.shared_experts.linear_fc2.weight",
                 (SHARED_EXPERT.replace("{proj}", "down_proj"),), Kind.ROW, extra_state=True),
        ]
    return tuple(rules)


def _expert(e: int, proj: str) -> str:
    return EXPERT.replace("{e}", str(e)).replace("{proj}", proj)


def check_moe_layout(layout_name: str, spec: ModelSpec) -> None:
    if spec.is_moe and layout_name != "mcore-local":
        raise InputError(f"layout {layout_name}: mixture-of-experts models are converted for megatron-core's local "
                         "spec only (--transformer-impl local)")


def expert_of(target: str) -> int | None:
    """The local expert index of a bound local-spec key (`...local_experts.{le}.`), else None."""
    marker = ".mlp.experts.local_experts."
    if marker not in target:
        return None
    return int(target.split(marker)[1].split(".")[0])


def dist_expert_key(target: str, layer: int) -> str:
    """torch_dist key of a bound local-expert key: `decoder.layers.{i}.mlp.experts.experts.linear_fcN.weight`."""
    proj = target.rsplit(".", 2)[-2]  # linear_fc1 | linear_fc2
    suffix = target.rsplit(".", 1)[-1]  # weight | _extra_state
    return (DIST_EXPERTS % (layer, proj)).removesuffix(".weight") + "." + suffix


# ---------------------------------------------------------------- Megatron-LM args and flags
def moe_args(spec: ModelSpec, *, ep: int = 1) -> dict:
    """The MoE / Llama 4 fields of the saved args (Megatron-LM's names); empty for a dense model."""
    if not spec.is_moe:
        return {}
    return {
        "num_experts": spec.num_experts, "moe_ffn_hidden_size": spec.moe_ffn_hidden_size,
        "moe_shared_expert_intermediate_size": spec.shared_expert_ffn_hidden_size, "moe_router_topk": spec.moe_top_k,
        "moe_router_score_function": "sigmoid", "moe_router_pre_softmax": False, "moe_grouped_gemm": False,
        "moe_layer_freq": [int(spec.is_moe_layer(i)) for i in range(spec.num_layers)],
        "moe_apply_probs_on_input": True, "moe_router_enable_expert_bias": False, "moe_aux_loss_coeff": 0.0,
        "moe_token_dispatcher_type": "alltoall", "expert_model_parallel_size": ep,
        "no_rope_freq": [int(not spec.uses_rope(i)) for i in range(spec.num_layers)],
        "qk_l2_norm": spec.qk_norm == "l2", "qk_layernorm": spec.qk_norm == "l2",
    }


def moe_flags(args) -> list[str]:
    """Megatron-LM launch flags for the MoE fields of `args` (none for a dense model)."""
    a = vars(args)
    if not a.get("num_experts"):
        return []
    flags = [f"--num-experts {a['num_experts']}", f"--moe-ffn-hidden-size {a['moe_ffn_hidden_size']}",
             f"--moe-router-topk {a['moe_router_topk']}", "--moe-router-score-function sigmoid",
             f"--moe-layer-freq {_list(a['moe_layer_freq'])}", "--export-moe-apply-probs-on-input",
             f"--moe-token-dispatcher-type {a['moe_token_dispatcher_type']}", "--moe-aux-loss-coeff 0.0",
             f"--expert-model-parallel-size {a['expert_model_parallel_size']}",
             f"--no-rope-freq {_list(a['no_rope_freq'])}"]
    if a.get("moe_shared_expert_intermediate_size"):
        flags.append(f"--moe-shared-expert-intermediate-size {a['moe_shared_expert_intermediate_size']}")
    if a.get("qk_l2_norm"):
        # Megatron-LM's flag puts the L2 norm on every layer; Llama 4 has it on rope layers only (megallama's
        # engine builds a per-layer spec): a Megatron-LM run differs on the NoPE layers.
        flags += ["--qk-layernorm", "--export-qk-l2-norm"]
    return flags


def _list(values) -> str:
    return '"[' + ",".join(str(int(v)) for v in values) + ']"'

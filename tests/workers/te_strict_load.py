"""Load a TE-layout rank file strictly into megatron-core's Transformer Engine GPTModel (needs CUDA + TE).

Usage: python tests/workers/te_strict_load.py CKPT_DIR   (TP=1, PP=1; prints "OK" on success)
"""

from __future__ import annotations

import sys
from pathlib import Path

import megallama.engine.runtime  # noqa: F401  (filters megatron-core start-up noise before it is imported)


def main(ckpt: Path) -> None:
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    from megallama.engine.model import transformer_config
    from megallama.engine.runtime import destroy_distributed, init_distributed
    from megallama.formats.megatron.torch_format import MODEL_FILE, checkpoint_dir, open_megatron

    with open_megatron(ckpt) as reader:
        spec, padded = reader.spec, reader.padded_vocab_size
    init_distributed(tp=1, pp=1)
    layer_spec = get_gpt_layer_with_transformer_engine_spec()
    model = GPTModel(config=transformer_config(spec), transformer_layer_spec=layer_spec, vocab_size=padded,
                     max_sequence_length=spec.max_position_embeddings, position_embedding_type="rope",
                     rotary_base=int(spec.rope_theta),
                     share_embeddings_and_output_weights=spec.tie_embeddings).cuda()
    import torch

    state = torch.load(checkpoint_dir(ckpt, None, 0, 0, 1) / MODEL_FILE, weights_only=False)["model"]
    model.load_state_dict(state, strict=True)
    destroy_distributed()
    print("OK")


if __name__ == "__main__":
    main(Path(sys.argv[1]))

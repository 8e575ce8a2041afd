"""`megallama generate`: complete prompts with a Megatron checkpoint on megatron-core. Docs: docs/generate.md."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.text import Text

from megallama.cli.common import ModelConfig, err, handle_errors, out, step_progress
from megallama.errors import InputError


def register(app: typer.Typer) -> None:
    @app.command("generate", no_args_is_help=True)
    @handle_errors
    def generate(
        megatron: Path = typer.Option(..., "--megatron", "--load",
                                      help="Megatron folder (convert, sft) or Hub id; runs at its own TP x PP."),
        revision: str = typer.Option(None, "--revision", help="Branch, tag or commit when --megatron is a Hub id."),
        prompt: str = typer.Option(None, "--prompt", help="One prompt (plain text)."),
        prompts: Path = typer.Option(None, "--prompts",
                                     help="JSONL, one prompt a line: a string, {\"prompt\"}, an Alpaca record "
                                          "(instruction, input) or a chat record (messages)."),
        max_new_tokens: int = typer.Option(64, "--max-new-tokens", "--max_new_tokens", "--tokens-to-generate",
                                           help="Stop after this many new tokens (or at EOS)."),
        temperature: float = typer.Option(0.0, "--temperature", help="0 (default) is greedy; > 0 samples."),
        top_p: float = typer.Option(1.0, "--top-p", "--top_p", help="Nucleus sampling: keep this much mass."),
        seed: int = typer.Option(1234, "--seed", help="Sampling seed."),
        chat: bool = typer.Option(False, "--chat",
                                  help="Wrap plain prompts as a user turn in sft's chat template (the tokenizer's "
                                       "own chat template when it has one)."),
        json_out: Path = typer.Option(None, "--json", help="Write [{prompt, completion, completion_ids}] here."),
        tokenizer: Path = typer.Option(None, "--tokenizer", help="Tokenizer (default: the checkpoint's own)."),
        dtype: str = typer.Option(None, "--dtype", help="Compute dtype: fp32, bf16, fp16 (default: checkpoint's)."),
        tp: int = typer.Option(None, "--tp", help="Run at this TP instead of the checkpoint's own."),
        pp: int = typer.Option(None, "--pp", help="Run at this PP instead of the checkpoint's own."),
        batch_size: int = typer.Option(16, "--batch-size", help="Prompts decoded together (one KV cache)."),
        ep: int = typer.Option(None, "--ep", help="Expert parallelism (Llama 4): run at this EP instead of the "
                                                  "checkpoint's own (TP x PP x EP processes)."),
        model_config: ModelConfig = None,
    ) -> None:
        """Complete prompts with the real megatron-core GPTModel under torchrun; stops at EOS.

        \b
        Examples:
          megallama generate --megatron runs/sft --prompt "The capital of France is" --max-new-tokens 16
          megallama generate --megatron runs/sft --prompts prompts.jsonl --json answers.json
          megallama generate --megatron runs/chat --chat --prompt "Hi!" --temperature 0.7 --top-p 0.9 --seed 1
          megallama generate --megatron fork-ckpt --model-config llama-7b/params.json --prompt "Hello"

        Docs: docs/generate.md
        """
        from megallama.generate.driver import Prompt, Settings, read_prompts, write_json
        from megallama.generate.driver import generate as run
        from megallama.hub import resolve_model_config, resolve_model_path

        if (prompt is None) == (prompts is None):
            raise InputError("give exactly one of --prompt TEXT and --prompts FILE.jsonl")
        if json_out is not None:
            from megallama.staging import check_writable_file

            check_writable_file(json_out)  # before the model runs, not after
        items = [Prompt(prompt)] if prompt is not None else read_prompts(prompts)
        settings = Settings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                            chat=chat, dtype=dtype, tp=tp, pp=pp, batch_size=batch_size, ep=ep)
        megatron = resolve_model_path(megatron, revision)
        model_config = resolve_model_config(model_config)
        with step_progress() as on_progress:
            done = run(megatron, items, settings, tokenizer=tokenizer, on_progress=on_progress,
                       model_config=model_config)
        for n, c in enumerate(done):
            if len(done) > 1:
                out.print(Text(f"[{n + 1}] {c.prompt}", style="bold"), soft_wrap=True)
            out.print(Text(c.completion), soft_wrap=True)
        if json_out is not None:
            write_json(done, json_out)
            err.print(f"wrote {json_out}", highlight=False)

"""A Hugging Face transformers model whose weights are the daemon's shared memory.

The model is built from its config (no hub download) with parameters on ``meta``, then
``ckptd.load_into`` makes every parameter the loaded tensor itself: through the daemon,
every worker maps one copy. ``save_pretrained`` drops the output head tied to the
embeddings; ``load_into`` keeps such ties.

    pip install transformers
    python examples/hf_worker.py save /tmp/ckptd-demo/tiny-llama
    ckptd serve --socket /tmp/ckptd-demo/ckptd.sock --root /tmp/ckptd-demo &
    CKPTD_URL=unix:///tmp/ckptd-demo/ckptd.sock python examples/hf_worker.py run /tmp/ckptd-demo/tiny-llama
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import ckptd

CONFIG = LlamaConfig(
    vocab_size=1024,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=True,
)


def build(directory: str, *, url: str | None = None) -> tuple[LlamaForCausalLM, float]:
    """The model from ``directory``'s config, its weights loaded without a copy; and the load's seconds."""
    config = LlamaConfig.from_pretrained(directory)
    with ckptd.meta_parameters():  # rotary inv_freq (a non-persistent buffer) is still computed
        model = LlamaForCausalLM(config)
    weights = Path(directory) / "model.safetensors"
    if not weights.exists():
        weights = Path(directory) / "model.safetensors.index.json"  # sharded
    started = time.perf_counter()
    ckptd.load_into(model, weights, map_location="cpu", server=url)
    return model.eval(), time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    save = sub.add_parser("save", help="write a tiny random Llama with save_pretrained")
    save.add_argument("directory")
    run = sub.add_parser("run", help="build the model from its config, load the weights without copying, generate")
    run.add_argument("directory")
    run.add_argument("--url", default=os.environ.get("CKPTD_URL"), help="daemon URL (default: $CKPTD_URL; none: in-process)")
    args = parser.parse_args(argv)

    if args.command == "save":
        torch.manual_seed(0)
        LlamaForCausalLM(CONFIG).save_pretrained(args.directory)
        print(f"wrote {args.directory}")
        return 0

    model, loaded = build(args.directory, url=args.url)
    tokens = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        out = model.generate(tokens, max_new_tokens=8, do_sample=False)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the tie survived
    print(f"loaded in {loaded * 1000:.1f} ms ({args.url or 'in-process'}); generated {out[0].tolist()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

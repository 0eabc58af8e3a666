"""A plain PyTorch inference worker whose weights are the daemon's shared memory.

Run a daemon, write a demo checkpoint, then start as many workers as you like: each one
maps the one copy the daemon holds instead of loading its own.

    ckptd serve --socket /tmp/ckptd-demo/ckptd.sock --root /tmp/ckptd-demo &
    python examples/worker.py save /tmp/ckptd-demo/tinylm.pt
    CKPTD_URL=unix:///tmp/ckptd-demo/ckptd.sock python examples/worker.py run /tmp/ckptd-demo/tinylm.pt

Without ``CKPTD_URL`` (or ``--url``) the worker loads in-process (the embedded engine).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

import torch
from torch import nn

import ckptd


class TinyLM(nn.Module):
    """A small decoder-style language model: embeddings tied to the output head, a
    non-persistent position buffer (not in checkpoints), transformer blocks."""

    def __init__(self, vocab: int = 1024, dim: int = 256, layers: int = 4, heads: int = 4, max_len: int = 128) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.register_buffer("positions", torch.arange(max_len), persistent=False)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True) for _ in range(layers)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos(self.positions[: tokens.shape[1]])
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def build(path: str, *, url: str | None = None) -> tuple[TinyLM, float]:
    """The worker's model (parameters on ``meta`` while it is built, then the loaded
    tensors themselves) and the seconds ``load_into`` took."""
    with ckptd.meta_parameters():
        model = TinyLM()
    started = time.perf_counter()
    ckptd.load_into(model, path, map_location="cpu", server=url)
    return model.eval(), time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    save = sub.add_parser("save", help="write a demo checkpoint (random weights)")
    save.add_argument("path")
    run = sub.add_parser("run", help="load the checkpoint into a model without copying it, and generate")
    run.add_argument("path")
    run.add_argument("--hold", action="store_true", help="stay up (holding the model) until SIGTERM, like a server")
    run.add_argument("--url", default=os.environ.get("CKPTD_URL"), help="daemon URL (default: $CKPTD_URL; none: in-process)")
    args = parser.parse_args(argv)

    if args.command == "save":
        torch.manual_seed(0)
        os.makedirs(os.path.dirname(os.path.abspath(args.path)), exist_ok=True)  # `save checkpoints/tinylm.pt` in a fresh clone
        torch.save(TinyLM().state_dict(), args.path)
        print(f"wrote {args.path}")
        return 0

    model, loaded = build(args.path, url=args.url)
    tokens = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        for _ in range(8):  # greedy decoding
            next_token = model(tokens)[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, next_token], dim=1)
    where = args.url or "in-process"
    print(f"loaded in {loaded * 1000:.1f} ms ({where}); generated {tokens[0].tolist()}", flush=True)
    if args.hold:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        signal.pause()  # a real worker would serve requests here
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Train a small GPT from scratch on the text shipped in ``examples/data``, on CPU.

    python examples/train_tiny_gpt.py                 # about two minutes
    python examples/train_tiny_gpt.py --steps 20      # a quick look
    llmtop attach examples/train_tiny_gpt.py          # the same run, watched live (`make demo`)

The run is the same with and without llmtop: same output, same losses for a given seed.
Everything is offline: the tokenizer is trained on the text (and cached), the model is randomly
initialized from a ``GPT2Config``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import llmtop.agent
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm
from transformers import GPT2LMHeadModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tinylib  # noqa: E402  (lives next to this script)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps (default 1000, about two minutes)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=192)
    p.add_argument("--n-head", type=int, default=6)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: 5%% of --steps)")
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping threshold")
    p.add_argument("--log-every", type=int, default=25, help="print the loss every N steps")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--generate", type=int, default=48, help="tokens to sample greedily at the end (0: none)")
    p.add_argument("--tokenizer-dir", default=None, help="tokenizer cache (default ~/.cache/llmtop/...)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or args.seq_len < 2:
        p.error("--steps and --batch-size must be >= 1 and --seq-len >= 2")
    return args


def cosine_with_warmup(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def batches(loader: DataLoader):
    """Cycle through the loader for as many epochs as needed."""
    while True:
        yield from loader


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)

    with llmtop.agent.span("build tokenizer", category="text_preprocessing"):
        tokenizer = tinylib.build_tokenizer(args.tokenizer_dir, vocab_size=args.vocab_size)
    with llmtop.agent.span("tokenize", category="text_preprocessing"):
        ids = tinylib.encode_text(tokenizer)
        dataset = tinylib.TokenBlocks(ids, args.seq_len)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                        num_workers=args.num_workers,
                        generator=torch.Generator().manual_seed(args.seed))

    with llmtop.agent.span("build model", category="model_loading"):
        config = tinylib.tiny_gpt_config(vocab_size=len(tokenizer), n_layer=args.n_layer,
                                         n_embd=args.n_embd, n_head=args.n_head,
                                         n_positions=max(args.seq_len, 64))
        model = GPT2LMHeadModel(config)
        # GPT2LMHeadModel's class name does not name its loss; say it, rather than get a warning.
        model.loss_type = "ForCausalLM"
    n_params = sum(p.numel() for p in model.parameters())
    print(f"tiny GPT: {n_params / 1e6:.2f}M parameters, {len(ids)} tokens of text, "
          f"{len(dataset)} blocks of {args.seq_len}, batch {args.batch_size}, {args.steps} steps", flush=True)

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    warmup = args.warmup if args.warmup is not None else max(1, args.steps // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(warmup, args.steps))

    model.train()
    started = time.perf_counter()
    bar = tqdm(total=args.steps, desc="train", unit="step", disable=args.no_progress, file=sys.stderr)
    data = batches(loader)
    with llmtop.agent.span("train", category="training_loop"):
        for step in range(1, args.steps + 1):
            batch = next(data)
            out = model(input_ids=batch, labels=batch)
            out.loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            bar.update(1)
            if step % args.log_every == 0 or step == args.steps:
                loss = out.loss.item()  # read only when printed: no sync on every step
                bar.set_postfix(loss=f"{loss:.3f}")
                tqdm.write(f"step {step:5d}  loss {loss:.4f}  grad_norm {float(grad_norm):.3f}  "
                           f"lr {scheduler.get_last_lr()[0]:.2e}", file=sys.stdout)
    bar.close()
    elapsed = time.perf_counter() - started

    if args.generate > 0:
        model.eval()
        with llmtop.agent.span("sample", category="model_inference"), torch.no_grad():
            prompt = tokenizer("The old fisherman", return_tensors="pt")
            out_ids = model.generate(**prompt, max_new_tokens=args.generate, do_sample=False,
                                     pad_token_id=tokenizer.eos_token_id)
        print("sample: " + tokenizer.decode(out_ids[0]).replace("\n", " "), flush=True)

    print(f"done: {args.steps} steps in {elapsed:.1f}s ({1000 * elapsed / args.steps:.0f} ms/step)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

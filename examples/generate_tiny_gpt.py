"""Generate text with a tiny GPT-2 loaded from a local checkpoint directory, on CPU.

    python examples/generate_tiny_gpt.py                  # a few seconds
    llmtop attach examples/generate_tiny_gpt.py           # the same run, watched (Inference view)

Everything is offline: the tokenizer is trained on the shipped text (and cached), the model is
randomly initialised from a ``GPT2Config``, saved to a temporary directory and loaded back with
``from_pretrained``, so the real loading code runs. Greedy decoding with random weights gives
gibberish, but the timing (prefill, per-token decode, KV-cache growth) is the real thing.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hf_local  # noqa: E402  (lives next to this script)
import tinylib  # noqa: E402

PROMPTS = [
    "The old harbour was quiet when",
    "In the morning the engineers",
    "She opened the letter and read",
    "A small model can still",
    "The river ran past the mill and",
    "Nobody expected the experiment to",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2, help="passes over the prompts (default 2)")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    # Tiny matrices: one thread is faster than several fighting over a shared CPU.
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--bf16", action="store_true", help="generate under CPU autocast to bfloat16")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    tok_dir = hf_local.gpt_tokenizer_dir()
    with tempfile.TemporaryDirectory(prefix="llmtop-gpt-") as ckpt:
        config = tinylib.tiny_gpt_config(n_layer=args.n_layer, n_embd=args.n_embd)
        hf_local.save_model(GPT2LMHeadModel(config), tok_dir, ckpt)

        tokenizer = AutoTokenizer.from_pretrained(ckpt)
        model = AutoModelForCausalLM.from_pretrained(ckpt).eval()
        tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"  # decoder-only models continue from the right edge

        for r in range(args.rounds):
            for i, prompt in enumerate(PROMPTS):
                enc = tokenizer(prompt, return_tensors="pt")
                t0 = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                    out = model.generate(**enc, max_new_tokens=args.max_new_tokens,
                                         min_new_tokens=args.max_new_tokens, do_sample=False,
                                         pad_token_id=tokenizer.pad_token_id)
                ms = (time.perf_counter() - t0) * 1e3
                prompt_len = enc["input_ids"].shape[1]
                text = tokenizer.decode(out[0, prompt_len:])
                print(f"gen round={r} prompt={i} batch=1 prompt_tokens={prompt_len} "
                      f"new_tokens={out.shape[1] - prompt_len} ms={ms:.1f} | {text[:40]!r}")

        # One batched call: left padding, and the KV cache holds every row.
        enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
        out = model.generate(**enc, max_new_tokens=args.max_new_tokens,
                             min_new_tokens=args.max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        prompt_len = enc["input_ids"].shape[1]
        print(f"gen batched batch={out.shape[0]} prompt_tokens={prompt_len} "
              f"new_tokens={out.shape[1] - prompt_len}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

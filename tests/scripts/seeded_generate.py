"""Sampling with generate() on a small random-init GPT-2: the same samples with and without llmtop."""
import random

import numpy as np
import torch
import transformers


def states() -> None:
    """Everything the script can see of its random streams at the end, as text."""
    import hashlib
    import pickle

    print("torch", hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest(), torch.rand(1).item())
    print("random", hashlib.sha256(pickle.dumps(random.getstate())).hexdigest(), random.random())
    print("numpy", hashlib.sha256(pickle.dumps(np.random.get_state())).hexdigest(), float(np.random.rand()))
    print("settings", torch.get_num_threads(), torch.is_grad_enabled(), torch.get_default_dtype(),
          torch.are_deterministic_algorithms_enabled(), torch.is_autocast_enabled("cpu"))


transformers.logging.set_verbosity_error()
torch.manual_seed(5)
random.seed(5)
np.random.seed(5)
cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=300, n_positions=64)
model = transformers.GPT2LMHeadModel(cfg).eval()
prompt = torch.randint(0, 300, (2, 6))
for temp in (0.7, 1.3):
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, temperature=temp,
                         top_k=50, top_p=0.95, max_new_tokens=12, pad_token_id=0)
    print("sample", temp, out.tolist())
states()

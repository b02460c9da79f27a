"""HF Trainer fine-tuning a small random-init BERT (``BertConfig``) with a locally trained WordPiece
tokenizer: examples/trainer_tiny_bert.py with a short schedule, gradient accumulation, an evaluation
every few steps and Trainer's log history printed as JSON (one loss per optimizer step).

    python trainer_bert.py [steps] [eval_steps] [grad_accum]
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import trainer_tiny_bert  # noqa: E402

steps = sys.argv[1] if len(sys.argv) > 1 else "8"
eval_steps = sys.argv[2] if len(sys.argv) > 2 else "4"
accum = sys.argv[3] if len(sys.argv) > 3 else "2"
with tempfile.TemporaryDirectory() as tmp:
    hist = Path(tmp) / "history.json"
    trainer_tiny_bert.main(["--steps", steps, "--eval-steps", eval_steps, "--grad-accum", accum,
                            "--logging-steps", "1", "--batch-size", "8", "--log-history", str(hist)])
    history = json.loads(hist.read_text())
print(json.dumps({"losses": [h["loss"] for h in history if "loss" in h],
                  "eval_at": [h["step"] for h in history if "eval_loss" in h],
                  "steps": int(steps), "batch": 8 * int(accum)}), flush=True)

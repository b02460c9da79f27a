"""The agent's memory stays flat: 20 000 tiny training steps under `llmtop attach --headless` with
per-layer timing on every step, RSS read by the child itself at step 2 000 and at step 20 000."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import textwrap
from pathlib import Path

import pytest

from tests.conftest import LLMTOP, ROOT, child_env

STEPS, FIRST = 20_000, 2_000
LIMIT_MB = 20

CHILD = textwrap.dedent(f"""
    import json
    import psutil
    import torch
    from torch import nn

    import llmtop.agent
    from llmtop.agent.runtime import core

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = torch.randn(4, 8), torch.randn(4, 4)
    proc = psutil.Process()
    rss = {{}}
    for i in range(1, {STEPS} + 1):
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i in ({FIRST}, {STEPS}):
            rss[i] = proc.memory_info().rss
    print(json.dumps({{"rss": rss, "running": llmtop.agent.is_running(),
                       "agent_step": getattr(core.ACTIVE, "current_step", None)}}))
""")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llmtop.launch") is None
                    or importlib.util.find_spec("llmtop.agent.runtime.agent") is None,
                    reason="llmtop attach (llmtop/launch.py, agent/runtime.py) not built yet")
def test_rss_flat_over_20000_steps(short_tmp: Path) -> None:
    script = short_tmp / "tiny_steps.py"
    script.write_text(CHILD)
    env = child_env(LLMTOP_SOCKET=str(short_tmp / "a.sock"), LLMTOP_LAYER_EVERY="1")
    proc = subprocess.run([LLMTOP, "attach", "--headless", str(script)], cwd=ROOT, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    # The agent really ran and counted the steps: otherwise flat memory would prove nothing.
    assert report["running"] is True
    assert report["agent_step"] is not None and report["agent_step"] >= STEPS - 1
    growth_mb = (report["rss"][str(STEPS)] - report["rss"][str(FIRST)]) / 2**20
    assert growth_mb < LIMIT_MB, f"RSS grew {growth_mb:.1f} MB between step {FIRST} and {STEPS}"

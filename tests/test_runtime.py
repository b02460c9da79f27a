"""Agent runtime pieces: options from the environment, socket claiming, history rings, failing instruments."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from llmtop.agent.runtime.agent import Agent, History, core
from llmtop.agent.runtime.options import options_from_env, resolve_socket
from llmtop.protocol.events import (
    AgentWarning,
    LayerFlops,
    Metric,
    ModelTree,
    Session,
    SnapshotDone,
    Step,
    decode_one,
    encode,
)
from llmtop.protocol.frames import FrameDecoder
from llmtop.protocol.stream import Connection


def test_options_from_env_and_overrides(capsys: pytest.CaptureFixture[str]) -> None:
    env = {"LLMTOP_TICK": "0.25", "LLMTOP_LAYER_EVERY": "4", "LLMTOP_BUDGET": "1.5", "LLMTOP_OPS_EVERY": "0",
           "LLMTOP_FLOPS": "off", "LLMTOP_HISTORY": "50", "LLMTOP_CLIENT_BUFFER": "1024",
           "LLMTOP_RECORD": "/tmp/x.llmtop", "LLMTOP_SOCKET": "/tmp/s.sock", "LLMTOP_STALL_S": "3"}
    o = options_from_env(env, history=7, layer_call_ns=3.0)
    assert (o.tick_s, o.layer_every, o.budget_pct, o.ops_every, o.flops) == (0.25, 4, 1.5, 0, False)
    assert (o.history, o.client_buffer, o.record) == (7, 1024, "/tmp/x.llmtop")
    assert (o.socket, o.stall_s, o.layer_call_ns) == ("/tmp/s.sock", 3.0, 3.0)
    assert capsys.readouterr().err == ""
    o = options_from_env({}, custom="yes")  # no such option: ignored, with one line
    assert o == core.Options()
    assert capsys.readouterr().err == "llmtop: ignoring unknown option custom='yes'\n"


def test_bad_env_values_are_ignored_with_one_line_each(capsys: pytest.CaptureFixture[str]) -> None:
    o = options_from_env({"LLMTOP_TICK": "fast", "LLMTOP_LAYER_EVERY": "-2", "LLMTOP_FLOPS": "maybe"})
    defaults = core.Options()
    assert (o.tick_s, o.layer_every, o.flops) == (defaults.tick_s, defaults.layer_every, defaults.flops)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and all(line.startswith("llmtop: ignoring LLMTOP_") for line in err)


def test_socket_claiming_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    opts = options_from_env({}, socket="/tmp/d/run.sock")
    me, parent = os.getpid(), os.getppid()
    beside = Path(f"/tmp/d/{me}.sock")
    assert resolve_socket(opts, {"LLMTOP_PARENT_PID": str(parent)}) == Path("/tmp/d/run.sock")
    assert resolve_socket(opts, {"LLMTOP_PARENT_PID": str(parent + 1)}) == beside
    assert resolve_socket(opts, {}) == Path("/tmp/d/run.sock")  # first to bind wins
    assert resolve_socket(opts, {"RANK": "3"}) == beside
    assert resolve_socket(opts, {"RANK": "0"}) == Path("/tmp/d/run.sock")
    monkeypatch.setattr("sys.orig_argv", ["python", "-m", "torch.distributed.run", "train.py"])
    assert resolve_socket(opts, {}) == beside  # the launcher leaves the socket to its ranks
    from llmtop.protocol.paths import socket_path_for

    assert resolve_socket(options_from_env({}), {}) == socket_path_for(me)


def test_history_keeps_latest_tree_per_model_and_flops_per_signature_in_order() -> None:
    h = History(3)

    def add(ev) -> None:
        h.add(ev, encode(ev))

    add(Session(pid=1, argv=["a"]))
    add(ModelTree(model=0, name="Old", ids=[0], paths=[""], classes=["Old"], params=[1], parents=[-1]))
    for i in range(5):
        add(Step(step=i, t=float(i), dur_ms=1.0))
    add(LayerFlops(signature="s1", ids=[0], flops=[1.0], bytes=[1.0]))
    add(LayerFlops(signature="s1", ids=[0], flops=[2.0], bytes=[1.0]))
    add(ModelTree(model=0, name="New", ids=[0], paths=[""], classes=["New"], params=[1], parents=[-1]))
    add(Session(pid=1, argv=["b"]))
    add(SnapshotDone(events=0))  # per connection: never history
    events = [decode_one(b) for f in h.snapshot() for b in FrameDecoder().feed(f)]
    assert isinstance(events[0], Session) and events[0].argv == ["b"]
    assert isinstance(events[1], ModelTree) and events[1].name == "New"
    rest = events[2:]
    assert [e.step for e in rest if isinstance(e, Step)] == [2, 3, 4]
    assert [e.flops for e in rest if isinstance(e, LayerFlops)] == [[2.0]]
    assert isinstance(rest[-1], LayerFlops)  # published after the steps, so it comes after them


class Failing:
    name = "failing"

    def __init__(self, where: str) -> None:
        self.where = where
        self.uninstalled = False

    def install(self, ctx) -> None:
        if self.where == "install":
            raise RuntimeError("install broke")

    def poll(self, now: float):
        if self.where == "poll":
            raise ValueError("poll broke")
        return [Metric(name="ok", value=1.0, t=now)]

    def uninstall(self) -> None:
        self.uninstalled = True


def test_failing_instrument_is_disabled_reported_and_others_go_on(short_tmp: Path) -> None:
    bad_poll, bad_install, good = Failing("poll"), Failing("install"), Failing("none")
    agent = Agent(options_from_env({}, socket=str(short_tmp / "r.sock"), tick_s=0.05),
                  instruments=[bad_install, bad_poll, good]).start()
    try:
        conn = Connection(agent.socket_path, timeout=5)
        warnings: list[str] = []
        oks = 0
        for ev in conn.events():
            if isinstance(ev, AgentWarning):
                warnings.append(ev.message)
            oks += isinstance(ev, Metric)
            if oks >= 3 and len(warnings) >= 2:
                break
        conn.close()
        good_uninstalled_while_running = good.uninstalled
    finally:
        agent.stop()
    assert any("install failed" in w and "install broke" in w for w in warnings)
    assert any("poll failed" in w and "poll broke" in w for w in warnings)
    assert bad_poll.uninstalled and bad_install.uninstalled
    assert not good_uninstalled_while_running and good.uninstalled  # the healthy one: only at stop
    assert oks >= 3  # and it kept being polled


PLANTED = """
import sys
if "broken" in __name__:
    raise ImportError("planted: this instrument cannot be imported")


class Planted:
    name = "planted"

    def __init__(self, options):
        pass

    def install(self, ctx):
        raise RuntimeError("planted: this instrument cannot install")

    def poll(self, now):
        return []

    def uninstall(self):
        pass
"""


def test_an_instrument_that_fails_to_import_or_install_is_reported_once_on_stderr_and_to_viewers(
        short_tmp: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> None:
    import sys

    from llmtop.agent import instruments

    (short_tmp / "planted_broken.py").write_text(PLANTED)
    (short_tmp / "planted_ok.py").write_text(PLANTED)
    monkeypatch.syspath_prepend(str(short_tmp))
    monkeypatch.setattr(instruments, "INSTRUMENTS", (("planted_broken", "Planted"), ("planted_ok", "Planted")))
    for name in ("planted_broken", "planted_ok"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    agent = Agent(options_from_env({}, socket=str(short_tmp / "p.sock"), tick_s=0.05)).start()
    try:
        conn = Connection(agent.socket_path, timeout=5)
        warnings: list[AgentWarning] = []
        for ev in conn.events():
            if isinstance(ev, AgentWarning):
                warnings.append(ev)
            if len(warnings) >= 2 and agent.ticks >= 3:  # a few ticks more: nothing is repeated
                break
        conn.close()
        running = list(agent._instruments)
    finally:
        agent.stop()
    err = [line for line in capfd.readouterr().err.splitlines() if line.startswith("llmtop: ")]
    assert err == [
        "llmtop: planted_broken: instrument Planted not loaded: ImportError: planted: this instrument cannot be imported",
        "llmtop: planted: install failed, instrument disabled: RuntimeError: planted: this instrument cannot install",
    ]
    assert [(w.source, w.message) for w in warnings] == [(line.split(": ", 2)[1], line.split(": ", 2)[2])
                                                         for line in err]
    assert running == []  # neither one runs


def test_a_viewer_connecting_as_the_agent_starts_gets_the_session_first(
        short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The socket exists as soon as it is bound; the session is published a moment later (made
    # long here). A viewer connecting in between must still get the session in its snapshot.
    import threading

    path = short_tmp / "s.sock"
    publish = Agent._publish

    def slow_publish(self: Agent, events: list, now: float | None = None) -> None:
        if any(isinstance(e, Session) for e in events):
            deadline = time.monotonic() + 10
            while not path.exists() and time.monotonic() < deadline:
                time.sleep(0.005)
            time.sleep(0.3)  # the viewer below connects meanwhile
        publish(self, events, now)

    monkeypatch.setattr(Agent, "_publish", slow_publish)
    first: list[object] = []

    def viewer() -> None:
        while not path.exists():
            time.sleep(0.005)
        conn = Connection(path, timeout=10)
        first.append(next(iter(conn.events())))
        conn.close()

    t = threading.Thread(target=viewer)
    t.start()
    agent = Agent(options_from_env({}, socket=str(path), tick_s=0.05), instruments=[]).start()
    try:
        t.join(15)
    finally:
        agent.stop()
    assert len(first) == 1 and isinstance(first[0], Session)


def test_emit_is_bounded_and_cheap_without_a_tick(short_tmp: Path) -> None:
    agent = Agent(options_from_env({}, socket=str(short_tmp / "q.sock"), tick_s=3600), instruments=[]).start()
    try:
        ev = Metric(name="m", value=1.0, t=time.time())
        for _ in range(300_000):
            agent.emit(ev)
        assert len(agent._queue) == agent._queue.maxlen  # oldest dropped, memory bounded
    finally:
        agent.stop()


def test_encoding_failure_skips_the_event_with_one_warning(short_tmp: Path) -> None:
    agent = Agent(options_from_env({}, socket=str(short_tmp / "e.sock"), tick_s=0.05), instruments=[]).start()
    try:
        conn = Connection(agent.socket_path, timeout=5)
        for _ in range(3):
            agent.emit(Metric(name="bad", value=object(), t=0.0))  # type: ignore[arg-type]
        agent.emit(Metric(name="good", value=2.0, t=0.0))
        got = []
        for ev in conn.events():
            if isinstance(ev, (AgentWarning, Metric)):
                got.append(ev)
            if isinstance(ev, Metric):
                break
        conn.close()
    finally:
        agent.stop()
    assert [type(e).__name__ for e in got] == ["AgentWarning", "Metric"] and got[1].name == "good"


def test_a_long_tick_hands_the_gil_over_between_batches(short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a thread waiting for the GIL waits up to the switch interval (5 ms) unless the holder lets go:
    # the agent thread lets go every YIELD_EVERY events it encodes and before every instrument poll
    handovers: list[float] = []
    monkeypatch.setattr(core, "let_script_run", lambda: handovers.append(time.monotonic()))
    agent = Agent(options_from_env({}, socket=str(short_tmp / "g.sock"), tick_s=3600), instruments=[]).start()
    try:
        for i in range(1000):
            agent.emit(Metric(name="m", value=float(i), t=0.0))
        handovers.clear()
        agent._tick()
    finally:
        agent.stop()
    assert len(handovers) >= 1000 // core.YIELD_EVERY


def test_events_beyond_the_queue_are_counted_and_said_in_the_stream(monkeypatch: pytest.MonkeyPatch,
                                                                    short_tmp: Path) -> None:
    """The queue between ticks is bounded; what it pushes out is counted and said once in the stream
    (so the viewer and the recording know what is missing), then again only for new losses."""
    from llmtop.agent.runtime import agent as agent_mod

    monkeypatch.setattr(agent_mod, "QUEUE_MAX", 10)
    agent = Agent(options_from_env({}, socket=str(short_tmp / "q.sock")), instruments=[])
    for i in range(25):
        agent.emit(Metric(t=float(i), name="m", value=float(i)))
    first = agent._drain()
    assert [e.value for e in first if isinstance(e, Metric)] == [float(i) for i in range(15, 25)]
    [warning] = [e for e in first if isinstance(e, AgentWarning)]
    assert warning.message.startswith("15 events lost: more than 10 waited for one tick")
    assert agent.queue_dropped == 15
    agent.emit(Metric(t=0.0, name="m", value=0.0))
    assert not [e for e in agent._drain() if isinstance(e, AgentWarning)]  # nothing new lost

"""The recording file format: round trip, keyframes and seek, kill -9, and every kind of bad file."""

from __future__ import annotations

import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from llmtop.protocol.events import (
    PHASES,
    End,
    HostSample,
    LayerStats,
    LogLine,
    Metric,
    ModelTree,
    Session,
    Span,
    Step,
    encode,
)
from llmtop.protocol.frames import FrameDecoder, ProtocolError
from llmtop.protocol.recording import (
    BLOCK,
    FILE_HEADER,
    KeyframeBuilder,
    RecordingError,
    RecordingReader,
    RecordingWriter,
    append_exit,
    peek_kind,
)
from llmtop.tui.session.model import SessionModel

SESSION = Session(pid=4242, argv=["train.py", "--lr", "3e-4"], cwd="/work", started=1000.0,
                  hostname="box", python="3.11", torch="2.13", devices=["cpu"])
TREE = ModelTree(model=0, name="Net", ids=[0, 1, 2, 3], paths=["", "enc", "enc.fc", "head"],
                 classes=["Net", "Seq", "Linear", "Linear"], params=[0, 0, 4160, 650],
                 parents=[-1, 0, 1, 0])


def step_events(n: int, t: float) -> list:
    """One step's events as the agent sends them; layer times in whole nanoseconds."""
    leaf = [(1_000 + 37 * n) / 1e6, (2_500 + 11 * n) / 1e6]
    enc = leaf[0] + 0.004
    fwd = [enc + leaf[1] + 0.002, enc, leaf[0], leaf[1]]
    self_ms = [0.002, 0.004, leaf[0], leaf[1]]
    phases = {p: 1.0 + i for i, p in enumerate(PHASES)}
    return [
        Step(step=n, t=t, dur_ms=sum(phases.values()), phases=phases, loss=2.0 / (n + 1), lr=1e-3,
             samples=8, tokens=256, overhead_us=42.0),
        LayerStats(step=n, ids=[0, 1, 2, 3], fwd_ms=fwd, fwd_self_ms=self_ms, calls=[1, 1, 1, 1],
                   bwd_ms=[2 * x for x in fwd], bwd_self_ms=[2 * x for x in self_ms]),
    ]


def run_events(steps: int, rate: float = 10.0) -> list:
    events: list = [TREE]
    for n in range(steps):
        t = 1001.0 + n / rate
        events += step_events(n, t)
        if n % 5 == 0:
            events.append(HostSample(t=t, cpu_pct=99.5, rss=1 << 30, sys_used=8 << 30, sys_total=16 << 30))
        if n % 7 == 0:
            events.append(Span(name="tokenize", category="text_preprocessing", start=t - 0.01, dur_ms=3.0, step=n))
            events.append(LogLine(t=t, text=f"step {n}"))
    return events


def write(path: Path, events: list, *, block_every: int = 10, keyframe_every: int = 0,
          end: End | None = None) -> RecordingWriter:
    """Write like a live run: a block every ``block_every`` steps, a keyframe every N steps."""
    writer = RecordingWriter(str(path), SESSION, flush_s=1e9)
    builder = KeyframeBuilder()
    builder.add(encode(SESSION), SESSION)
    steps = 0
    for event in events:
        frame = encode(event)
        writer.append(frame, event)
        builder.add(frame, event)
        if isinstance(event, LayerStats):
            steps += 1
            if steps % block_every == 0:
                writer.flush()
            if keyframe_every and steps % keyframe_every == 0:
                writer.keyframe(builder.frames())
    writer.close(end)
    return writer


def model_of(events) -> SessionModel:
    model = SessionModel()
    model.apply_all(events)
    return model


def test_round_trip_gives_back_every_event(tmp_path: Path) -> None:
    events = run_events(50)
    end = End(t=1010.0, exit_code=0, reason="exit")
    path = tmp_path / "run.lrec"
    write(path, events, end=end)
    with RecordingReader(path) as r:
        got = list(r.events())
        assert r.warning is None
        assert r.session == SESSION
        assert got == [SESSION, *events, end]  # layer times survive the compact encoding exactly
        assert r.steps == 50 and r.first_step == 0 and r.last_step == 49
        assert r.duration == pytest.approx(1010.0 - r.start)


def test_layer_times_not_in_whole_nanoseconds_stay_within_half_a_nanosecond(tmp_path: Path) -> None:
    odd = LayerStats(step=0, ids=[0, 1], fwd_ms=[0.1234567891, 1 / 3], fwd_self_ms=[0.01, 0.1],
                     calls=[1, 2])
    path = tmp_path / "odd.lrec"
    write(path, [TREE, odd])
    (got,) = [e for e in RecordingReader(path).events() if isinstance(e, LayerStats)]
    assert got.bwd_ms == [] and got.calls == [1, 2]
    for a, b in zip(got.fwd_ms + got.fwd_self_ms, odd.fwd_ms + odd.fwd_self_ms, strict=True):
        assert abs(a - b) <= 0.5e-6


def test_trailer_and_forward_scan_find_the_same_blocks(tmp_path: Path) -> None:
    path = tmp_path / "run.lrec"
    w = write(path, run_events(60), keyframe_every=20)
    with_trailer = RecordingReader(path).blocks
    data = path.read_bytes()
    last = w.blocks[-1]
    path.write_bytes(data[: last.offset + BLOCK.size + last.comp_len])  # as if killed before close
    r = RecordingReader(path)
    assert r.warning is None
    assert [b.row() for b in r.blocks] == [b.row() for b in with_trailer]
    assert len(r.keyframes) == 3
    assert len(list(r.events())) == len(run_events(60)) + 1


def test_seek_lands_on_the_state_of_a_linear_replay(tmp_path: Path) -> None:
    events = run_events(100)
    path = tmp_path / "run.lrec"
    write(path, events, keyframe_every=25)
    r = RecordingReader(path)
    assert len(r.keyframes) == 4
    linear = [SESSION] + events
    for target in (0, 24, 25, 26, 61, 99):
        seek = r.seek_step(target)
        assert len(seek) < len(linear) or target < 25  # starts at a keyframe, not at the file start
        # The linear state right after step ``target``: everything before step target+1's record.
        cut = next((i for i, e in enumerate(linear) if isinstance(e, Step) and e.step > target), len(linear))
        want, got = model_of(linear[:cut]), model_of(seek)
        assert got.last_step == want.last_step and got.last_step.step == target
        for mid, layer in want.layers.items():
            assert got.layers[mid].fwd_ms == layer.fwd_ms and got.layers[mid].bwd_self_ms == layer.bwd_self_ms
        assert list(got.steps)[-20:] == list(want.steps)[-20:]  # the keyframe brings recent history
        assert got.host[-1] == want.host[-1] and got.session == SESSION
    end = model_of(r.seek_end())
    assert end.last_step.step == 99


def test_seek_time_and_positions(tmp_path: Path) -> None:
    path = tmp_path / "run.lrec"
    write(path, run_events(100), keyframe_every=30)
    r = RecordingReader(path)
    # Step n ends at 1001 + n/10; start is the first event's time.
    t = 1001.0 + 4.25 - r.start
    got = model_of(r.seek_time(t))
    assert got.last_step.step == 42
    assert model_of(r.seek_time(-5)).last_step is None
    assert model_of(r.seek_time(r.duration + 100)).last_step.step == 99
    pos = r.position_of_step(42)
    assert r.time_at(pos) == pytest.approx(1001.0 + 4.2 - r.start)


def test_flushes_a_block_once_the_oldest_frame_is_flush_s_old(tmp_path: Path) -> None:
    path = tmp_path / "run.lrec"
    w = RecordingWriter(str(path), SESSION, flush_s=0.0)
    for e in run_events(3):
        w.append(encode(e), e)
    # flush_s=0: every append is due at once, so everything is on disk without flush() or close().
    assert RecordingReader(path).n_events == len(run_events(3))
    w.close()


def test_agent_style_keyframes_are_rate_limited(tmp_path: Path) -> None:
    w = RecordingWriter(str(tmp_path / "r.lrec"), SESSION, keyframe_s=10.0)
    t0 = w._last_keyframe
    assert not w.wants_keyframe(t0 + 5)  # too soon
    assert not w.wants_keyframe(t0 + 11)  # nothing written since
    for e in run_events(20):
        w.append(encode(e), e)
    w.flush()
    assert w.wants_keyframe(t0 + 11)
    w.keyframe([encode(e) for e in run_events(200)])  # a snapshot far bigger than the data so far
    assert not w.wants_keyframe(t0 + 1000)  # waits until the data outweighs it
    w.close()


KILLED_WRITER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    from test_recording import SESSION, run_events
    from llmtop.protocol.events import encode
    from llmtop.protocol.recording import RecordingWriter
    w = RecordingWriter({path!r}, SESSION, flush_s=1e9)
    events = run_events(40)
    for e in events:
        w.append(encode(e), e)
    w.flush()
    for e in run_events(5):  # appended, never flushed: lost with the process
        w.append(encode(e), e)
    print(len(events), flush=True)
    time.sleep(60)
""")


def test_kill_9_leaves_everything_flushed_readable(tmp_path: Path) -> None:
    path = tmp_path / "killed.lrec"
    script = KILLED_WRITER.format(tests=str(Path(__file__).parent), path=str(path))
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        flushed = int(child.stdout.readline())
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    r = RecordingReader(path)
    assert r.warning is None  # no trailer, but every block is whole
    events = list(r.events())
    assert events == [SESSION, *run_events(40)] and len(events) == flushed + 1


def test_truncated_tail_is_a_warning_not_an_error(tmp_path: Path) -> None:
    path = tmp_path / "run.lrec"
    w = write(path, run_events(50))
    data = path.read_bytes()
    last = w.blocks[-1]
    assert last.n_steps == 0 and w.blocks[-2].last_step == 49  # steps 40-49, then a span and a log line
    last = w.blocks[-2]
    path.write_bytes(data[: last.offset + BLOCK.size + last.comp_len // 2])  # a block cut in half
    r = RecordingReader(path)
    assert r.warning and "truncated" in r.warning and "\n" not in r.warning
    assert len(r.blocks) == len(w.blocks) - 2
    assert [e.step for e in r.events() if isinstance(e, Step)] == list(range(40))
    path.write_bytes(data[: last.offset + 10])  # cut inside a block header
    r = RecordingReader(path)
    assert r.warning and r.steps == 40


def test_exit_status_appended_after_close_replaces_the_agents_end(tmp_path: Path) -> None:
    path = tmp_path / "run.lrec"
    agent_end = End(t=1010.0, reason="exception", traceback="Traceback …\nValueError: no")
    w = write(path, run_events(30), end=agent_end)
    closed = path.read_bytes()
    end = append_exit(path, exit_code=1)
    assert path.read_bytes()[: len(closed)] == closed  # append-only
    assert (end.exit_code, end.signal, end.reason, end.traceback, end.t) == (1, None, "exception",
                                                                              agent_end.traceback, 1010.0)
    expected = [SESSION, *run_events(30), end]
    r = RecordingReader(path)  # by the new index
    assert r.warning is None and len(r.blocks) == len(w.blocks) + 1
    assert list(r.events()) == expected and r.last_end() == end
    assert r.seek_end()[-1] == end and sum(isinstance(e, End) for e in r.seek_end()) == 1
    data = path.read_bytes()
    path.write_bytes(data[:-5])  # the new footer cut short: the scan steps over the old footer
    r = RecordingReader(path)
    assert r.warning and "15 bytes" in r.warning and list(r.events()) == expected


def test_exit_status_of_a_killed_writer_cuts_its_truncated_tail(tmp_path: Path) -> None:
    path = tmp_path / "run.lrec"
    w = write(path, run_events(50))
    last = w.blocks[-2]
    path.write_bytes(path.read_bytes()[: last.offset + BLOCK.size + last.comp_len // 2])
    end = append_exit(path, signal=int(signal.SIGKILL), t=2000.0)
    assert (end.exit_code, end.signal, end.reason, end.traceback) == (None, signal.SIGKILL, "signal", None)
    r = RecordingReader(path)
    assert r.warning is None  # the half block is gone; nothing readable was lost
    events = list(r.events())
    assert [e.step for e in events if isinstance(e, Step)] == list(range(40))
    assert events[-1] == end and r.last_end() == end


def test_exit_status_is_not_added_while_a_writer_holds_the_file(tmp_path: Path) -> None:
    path = tmp_path / "live.lrec"
    writer = RecordingWriter(str(path), SESSION)
    try:
        with pytest.raises(RecordingError, match="still being written"):
            append_exit(path, exit_code=0)
    finally:
        writer.close()
    assert RecordingReader(path).last_end() is None


def test_session_versions_learnt_after_the_header_are_the_readers_session(tmp_path: Path) -> None:
    early = Session(pid=4242, argv=["train.py"], started=1000.0, python="3.11")  # before `import torch`
    late = Session(pid=4242, argv=["train.py"], started=1000.0, python="3.11", torch="2.13",
                   transformers="5.24")
    path = tmp_path / "run.lrec"
    writer = RecordingWriter(str(path), early, flush_s=1e9)
    for event in [*run_events(5), late, *run_events(3)]:
        writer.append(encode(event), event)
        if isinstance(event, Session):
            writer.flush()
    writer.flush()
    killed = path.read_bytes()  # as a kill -9 would leave it: no index
    writer.close(End(t=1100.0))
    assert RecordingReader(path).session == late  # from the index
    path.write_bytes(killed)
    assert RecordingReader(path).session == late  # from the last blocks
    append_exit(path, exit_code=0)
    assert RecordingReader(path).session == late  # from the index append_exit wrote


def one_line_error(path: Path, *, read_all: bool = False) -> str:
    with pytest.raises(RecordingError) as info:
        r = RecordingReader(path)
        if read_all:
            list(r.events())
    message = str(info.value)
    assert message and "\n" not in message and path.name in message
    assert isinstance(info.value, ProtocolError)
    return message


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.lrec"
    path.write_bytes(b"")
    assert "empty" in one_line_error(path)


def test_wrong_magic(tmp_path: Path) -> None:
    path = tmp_path / "notes.lrec"
    path.write_text("these are not the bytes you are looking for\n" * 10)
    assert "not an llmtop recording" in one_line_error(path)


def test_future_version(tmp_path: Path) -> None:
    path = tmp_path / "future.lrec"
    write(path, run_events(5))
    data = bytearray(path.read_bytes())
    struct.pack_into(">H", data, 8, 99)  # format major
    path.write_bytes(bytes(data))
    message = one_line_error(path)
    assert "99.0" in message and "upgrade" in message


def test_truncated_header(tmp_path: Path) -> None:
    path = tmp_path / "short.lrec"
    write(path, run_events(5))
    path.write_bytes(path.read_bytes()[: FILE_HEADER.size + 5])
    assert "truncated" in one_line_error(path)


def test_corrupt_header(tmp_path: Path) -> None:
    path = tmp_path / "bad.lrec"
    write(path, run_events(5))
    data = bytearray(path.read_bytes())
    data[FILE_HEADER.size + 10] ^= 0xFF  # inside the session frame
    path.write_bytes(bytes(data))
    assert "corrupt" in one_line_error(path)


def test_corrupt_block_payload(tmp_path: Path) -> None:
    path = tmp_path / "bad.lrec"
    w = write(path, run_events(50))
    data = bytearray(path.read_bytes())
    middle = w.blocks[2]
    data[middle.offset + BLOCK.size + middle.comp_len // 2] ^= 0x55
    path.write_bytes(bytes(data))
    assert "checksum" in one_line_error(path, read_all=True)


def test_corrupt_block_header_without_trailer(tmp_path: Path) -> None:
    path = tmp_path / "bad.lrec"
    w = write(path, run_events(50))
    data = bytearray(path.read_bytes()[: w.blocks[-1].offset + BLOCK.size + w.blocks[-1].comp_len])
    data[w.blocks[1].offset + 12] ^= 0xFF  # a length field: the scan cannot trust what follows
    path.write_bytes(bytes(data))
    assert "corrupt" in one_line_error(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RecordingError, match="cannot open"):
        RecordingReader(tmp_path / "nope.lrec")


def test_keyframe_builder_keeps_state_and_recent_history() -> None:
    b = KeyframeBuilder(history=40)
    for e in [SESSION, TREE, *run_events(50)]:
        b.add(encode(e), e)
    frames = b.frames()
    assert frames[0] == encode(SESSION) and frames[1] == encode(TREE)
    assert sum(1 for f in frames if f == encode(SESSION)) == 1
    kinds = [body["k"] for body in FrameDecoder().feed(b"".join(frames))]
    assert kinds.count("step") == 40 and kinds.count("layers") == 32  # big tables: only the latest


def test_keyframes_keep_only_the_latest_layer_tables(tmp_path: Path) -> None:
    events = [SESSION, TREE, *run_events(100)]
    frames = [encode(e) for e in events]
    assert [peek_kind(f) for f in frames] == [e.KIND for e in events]
    for e in (End(t=1.0), HostSample(t=1.0, cpu_pct=1.0, rss=1, sys_used=1, sys_total=2)):
        assert peek_kind(encode(e)) == e.KIND
    assert peek_kind(b"\x00\x00\x00\x03abc") is None
    path = tmp_path / "r.lrec"
    w = RecordingWriter(str(path), SESSION)
    w.keyframe(frames)  # an agent snapshot with 100 layer tables
    w.close()
    r = RecordingReader(path)
    kept = r.keyframe_events(r.keyframes[0])
    assert sum(isinstance(e, LayerStats) for e in kept) == 32
    assert [e.step for e in kept if isinstance(e, LayerStats)] == list(range(68, 100))
    assert sum(isinstance(e, Step) for e in kept) == 100


AGENT_SCRIPT = textwrap.dedent("""
    import sys, time
    import torch
    from torch import nn
    import llmtop.agent

    llmtop.agent.start()
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(32, 8), torch.randn(32, 1)
    step = 0
    while True:
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step == 30:
            print("ready", flush=True)
        time.sleep(0.01)
""")


def test_kill_9_of_a_recording_script(short_tmp: Path) -> None:
    """The agent records (LLMTOP_RECORD) while the script trains; kill -9 leaves a readable file with
    everything up to the last flush, at most a second before the kill."""
    from tests.conftest import child_env

    path = short_tmp / "agent.lrec"
    (short_tmp / "train.py").write_text(AGENT_SCRIPT)
    env = child_env(LLMTOP_RECORD=str(path), LLMTOP_SOCKET=str(short_tmp / "a.sock"), LLMTOP_TICK="0.1")
    child = subprocess.Popen([sys.executable, "train.py"], cwd=short_tmp, env=env, stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout.readline() == "ready\n"
        # Steps 1..30 are done; the agent publishes them within a tick and writes a block within a
        # second. Wait until the file holds them, then kill without warning.
        deadline = time.monotonic() + 30
        while True:
            try:
                if RecordingReader(path).steps >= 30:
                    break
            except RecordingError:
                pass  # not written yet
            assert time.monotonic() < deadline, "the agent wrote no steps"
            time.sleep(0.1)
        time.sleep(1.5)  # more steps run; those older than a second must be on disk when killed
        child.send_signal(signal.SIGKILL)
        child.wait()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
    r = RecordingReader(path)
    assert r.warning is None or "truncated" in r.warning
    events = list(r.events())
    steps = [e.step for e in events if isinstance(e, Step)]
    assert len(steps) > 30 and steps == sorted(steps)
    assert not any(isinstance(e, End) for e in events)  # killed: no End, no trailer, still readable
    assert isinstance(events[0], Session) and events[0].pid == child.pid


def test_a_second_writer_of_the_same_path_writes_beside_it(tmp_path: Path) -> None:
    """torchrun under `attach --record`: every rank inherits LLMTOP_RECORD; no rank may clobber another."""
    path = tmp_path / "run.lrec"
    first = RecordingWriter(str(path), SESSION)
    script = (f"from llmtop.protocol.recording import RecordingWriter\n"
              f"from tests.test_recording import SESSION\n"
              f"w = RecordingWriter({str(path)!r}, SESSION); w.close(); print(w.path)")
    other = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                           cwd=Path(__file__).parent.parent)
    assert other.returncode == 0, other.stderr
    beside = Path(other.stdout.strip())
    assert beside != path and beside.parent == path.parent and beside.name.startswith("run.")
    assert beside.suffix == ".lrec" and RecordingReader(beside).session == SESSION
    for e in run_events(5):
        first.append(encode(e), e)
    first.close()
    assert first.path == str(path) and RecordingReader(path).steps == 5


CLOCK_SCRIPT = textwrap.dedent("""
    import time
    import llmtop.agent
    t0 = time.time()
    while True:
        llmtop.agent.metric("clock", time.time())
        if time.time() - t0 > 1.5 and t0:
            print("ready", flush=True)
            t0 = 0.0
        time.sleep(0.01)
""")


@pytest.mark.parametrize("tick", ["0.5", "0.2"])
def test_kill_9_of_a_recording_agent_loses_at_most_the_documented_second(tmp_path: Path, tick: str) -> None:
    """What README promises for `kill -9` (at most RECORD_LOSS_S of the run lost), measured: the
    script records its own clock as a metric every 10 ms, is killed at a known time, and the newest
    clock in the file says how much was lost."""
    from llmtop.agent.runtime.agent import RECORD_LOSS_S

    from .conftest import child_env

    path = tmp_path / "clock.lrec"
    script = tmp_path / "clock.py"
    script.write_text(CLOCK_SCRIPT)
    env = child_env(LLMTOP="1", LLMTOP_RECORD=str(path), LLMTOP_TICK=tick, LLMTOP_SOCKET=str(tmp_path / "c.sock"),
                    LLMTOP_OPS_EVERY="0", LLMTOP_FLOPS="0")
    child = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout.readline().strip() == "ready"
        time.sleep(0.73)  # any phase against the ticks
        killed = time.time()
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()
        child.stdout.close()
    clocks = [e.value for e in RecordingReader(path).events() if isinstance(e, Metric) and e.name == "clock"]
    assert clocks, "nothing recorded"
    lost = killed - max(clocks)
    assert 0 <= lost < max(RECORD_LOSS_S, float(tick)), f"lost {lost:.2f} s of the run"

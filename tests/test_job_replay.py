"""`llmtop replay` of a whole job: every rank's recording on one clock in the job view, with the
one-process transport (tui/session/job_recording_source.py, tui/commands/replay.py).

A real 2-rank torchrun gloo job recorded by `llmtop attach --record` (shared by the module), and
written jobs for what that cannot plant: ranks that started far apart, keyframes to seek back
through, a truncated, an unreadable and a corrupt rank file."""

from __future__ import annotations

import argparse
import dataclasses
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from llmtop.protocol.events import End, Step
from llmtop.protocol.recording import RecordingReader
from llmtop.protocol.recording.job import job_files
from llmtop.tui.commands.replay import _open, job_at_end
from llmtop.tui.session.job_recording_source import JobRecordingSource
from llmtop.tui.session.recording_source import MAX_SPEED, RecordingSource
from llmtop.tui.views.replay import ReplayApp

from tests.conftest import LLMTOP, ROOT, VENV_BIN, child_env
from tests.test_job_readers import cli
from tests.test_recording import SESSION, run_events, write
from tests.test_replay import _bad_late_block, aio, state
from tests.test_tmux import Tmux, env_for

SCRIPT = ROOT / "tests" / "scripts" / "straggler_ddp.py"


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``llmtop attach --headless --record run.lrec -- torchrun --nproc_per_node=2``: rank 1's data
    loader sleeps 20 ms a step, so the job's steps take a few seconds to replay."""
    d = tmp_path_factory.mktemp("job")
    cmd = [LLMTOP, "attach", "--headless", "--record", str(d / "run.lrec"), "--", str(VENV_BIN / "torchrun"),
           "--standalone", "--nproc_per_node=2", str(SCRIPT), "--steps", "60", "--slow-rank", "1",
           "--cause", "data", "--delay-ms", "20"]
    done = subprocess.run(cmd, cwd=d, capture_output=True, text=True, timeout=240,
                          env=child_env(OMP_NUM_THREADS="1", LLMTOP_TICK="0.2", LLMTOP_OPS_EVERY="0",
                                        LLMTOP_SOCKET=str(d / "a.sock")))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert [f.name for f in job_files(d / "run.lrec")] == ["run.rank0.lrec", "run.rank1.lrec"]
    return d / "run.lrec"


def write_rank(path: Path, rank: int, *, shift: float = 0.0, steps: int = 60, world: int = 2) -> None:
    """One rank's recording as the agent writes it (a block every 5 steps, a keyframe every 25), its
    clock ``shift`` seconds after rank 0's: the rank started that much later."""
    session = dataclasses.replace(SESSION, pid=100 + rank, started=SESSION.started + shift, job="j-7",
                                  launcher="torchrun", rank=rank, local_rank=rank, world_size=world, node_rank=0)
    events = [session]
    for event in run_events(steps):
        if hasattr(event, "t"):
            event = dataclasses.replace(event, t=event.t + shift)
        elif hasattr(event, "start"):
            event = dataclasses.replace(event, start=event.start + shift)
        events.append(event)
    write(path, events, block_every=5, keyframe_every=25, end=End(t=1001.0 + steps / 10 + shift, exit_code=0,
                                                                   reason="exit"))


def written_job(d: Path, shifts: tuple[float, ...] = (0.0, 1.5)) -> Path:
    for rank, shift in enumerate(shifts):
        write_rank(d / f"run.rank{rank}.lrec", rank, shift=shift, world=len(shifts))
    return d / "run.lrec"


def timeline(path: Path) -> tuple[float, list[tuple[float, int]]]:
    """A rank file's start and its steps as (seconds from that start, step), read straight from the file."""
    with RecordingReader(path) as reader:
        return reader.start, [(t, e.step) for _, e, t in reader.timed_events() if isinstance(e, Step)]


def expected_steps(files: list[Path], position: float) -> dict[int, int | None]:
    """Each rank's last step at ``position`` seconds into the job, the job's clock starting at the
    earliest rank's first event: what the job replay must show there."""
    lines = {rank: timeline(f) for rank, f in enumerate(files)}
    t0 = min(start for start, _ in lines.values())
    return {rank: next((n for t, n in reversed(steps) if t <= position - (start - t0)), None)
            for rank, (start, steps) in lines.items()}


def mid_run(files: list[Path]) -> float:
    """Seconds into the job halfway between rank 0's first and last step."""
    lines = [timeline(f) for f in files]
    t0 = min(start for start, _ in lines)
    start, steps = lines[0]
    return start - t0 + (steps[0][0] + steps[-1][0]) / 2


def shown_steps(src: JobRecordingSource) -> dict[int, int | None]:
    out = {}
    for lane in src.lanes:
        with lane.model.lock:
            out[lane.rank] = lane.model.last_step.step if lane.model.last_step else None
    return out


def per_rank_state(src: JobRecordingSource) -> dict[int | None, dict[str, Any]]:
    out = {}
    for lane in src.lanes:
        with lane.model.lock:
            out[lane.rank] = state(lane.model)
    return out


async def settle(pilot: Any, check: Any, tries: int = 400) -> None:
    for _ in range(tries):
        await pilot.pause(0.025)
        if check():
            return
    raise AssertionError("the replay did not get there")


def fresh_at(files: list[Path], kind: str, value: float) -> JobRecordingSource:
    """A fresh job replay, paused, moved once to a step or a time (its worker left running)."""
    src = JobRecordingSource(files, playing=False)
    threading.Thread(target=src.run, daemon=True).start()
    assert src.done.wait(30)
    seeks = src.seeks
    src.seek_step(int(value)) if kind == "step" else src.seek_time(value)
    deadline = time.monotonic() + 30
    while src.seeks == seeks and time.monotonic() < deadline:
        time.sleep(0.01)
    return src


# --- (a) every rank in the job view, on one clock ------------------------------------------------------


@aio
async def test_a_recorded_job_replays_every_rank_together(job: Path) -> None:
    files = job_files(job)
    src = JobRecordingSource(files, path=str(job), playing=False)
    app = ReplayApp(src, refresh_hz=10)
    async with app.run_test(size=(120, 32)) as pilot:
        await settle(pilot, lambda: src.seeks >= 1 and app.job_shown)
        await pilot.press("8")  # the Ranks view
        await settle(pilot, lambda: app.active_view == "ranks")
        assert sorted(r.rank for r in app.job.rows()) == [0, 1]
        assert shown_steps(src) == {0: None, 1: None}
        await pilot.press("greater_than_sign", "greater_than_sign", "k")  # play at 4x
        assert src.playing and src.speed == 4.0
        seen: list[dict[int, int | None]] = []
        for _ in range(400):
            await pilot.pause(0.25)
            src.pause()  # the worker finishes its pass, then the clock holds still
            await pilot.pause(0.1)
            steps = shown_steps(src)
            # each rank shows exactly the steps it had finished at that moment of the job
            assert steps == expected_steps(files, src.position), (src.position, steps)
            seen.append(steps)
            if src.at_end:
                break
            src.play()
        rows = {r.rank: r for r in app.job.rows()}
        assert set(rows) == {0, 1} and all(r.step is not None for r in rows.values())
        await pilot.press("q")
    assert len(seen) >= 3, seen  # it was caught on the way, not only at the end
    moving = [s for s in seen if None not in s.values()]
    assert [s[0] for s in moving] == sorted(s[0] for s in moving)  # the clock only goes forward
    assert all(abs(s[0] - s[1]) <= 1 for s in moving), seen  # DDP: the ranks step together
    assert seen[-1] == expected_steps(files, src.duration) == {0: 59, 1: 59}


def test_ranks_that_started_apart_stay_apart(tmp_path: Path) -> None:
    """Rank 1 started 1.5 s after rank 0 (both steps 10 a second from 1 s after their start): at 2.0 s
    into the job it has no step yet, at 4.0 s it is 15 steps behind rank 0, exactly as the two ran."""
    files = job_files(written_job(tmp_path))
    early = fresh_at(files, "time", 2.0)
    assert shown_steps(early) == expected_steps(files, 2.0) == {0: 10, 1: None}
    assert early.lanes[1].model.session is not None and early.lanes[1].model.session.rank == 1
    later = fresh_at(files, "time", 4.0)
    assert shown_steps(later) == expected_steps(files, 4.0) == {0: 30, 1: 15}
    assert later.duration == pytest.approx(8.5)  # rank 0's Session to rank 1's End
    for src in (early, later):
        src.stop()


# --- (b) seeking back gives the state of a fresh replay to that time ---------------------------------------


@pytest.mark.parametrize("which", ["real", "written"])
@aio
async def test_seeking_back_gives_the_state_of_a_fresh_replay(which: str, job: Path, tmp_path: Path) -> None:
    files = job_files(job if which == "real" else written_job(tmp_path))
    src = JobRecordingSource(files, playing=False)
    app = ReplayApp(src, refresh_hz=10)
    async with app.run_test(size=(120, 32)) as pilot:
        await settle(pilot, lambda: src.seeks >= 1)
        src.set_speed(MAX_SPEED)
        await pilot.press("k")  # play through to the end: everything applied in order
        await settle(pilot, lambda: src.at_end and not src.playing, tries=2000)
        end_steps = shown_steps(src)
        assert None not in end_steps.values()
        target = round(mid_run(files), 2)  # halfway through rank 0's steps (a job starts slowly)
        seeks = src.seeks
        await pilot.press("g", *f"{target}s", "enter")  # back there through the go-to box
        await settle(pilot, lambda: src.seeks > seeks)
        assert src.position == pytest.approx(target)
        back = per_rank_state(src)
        fresh = fresh_at(files, "time", target)
        assert back == per_rank_state(fresh)
        steps = shown_steps(src)
        assert steps == expected_steps(files, target)
        assert any(n is not None and n < end_steps[r] for r, n in steps.items())  # truly back, mid-run
        # a step back from there: the reference rank (0) one step earlier, every rank at that moment
        seeks = src.seeks
        await pilot.press("comma")
        await settle(pilot, lambda: src.seeks > seeks)
        assert src.step == steps[0] - 1
        fresh.stop()
        fresh = fresh_at(files, "step", steps[0] - 1)
        assert per_rank_state(src) == per_rank_state(fresh) and fresh.position == src.position
        fresh.stop()
        await pilot.press("q")


# --- (c) bad rank files: a note, the other ranks replay --------------------------------------------------


@aio
async def test_a_truncated_or_unreadable_rank_leaves_the_others_replaying(tmp_path: Path) -> None:
    files = job_files(written_job(tmp_path, (0.0, 0.2, 0.4)))
    data = files[1].read_bytes()
    files[1].write_bytes(data[: len(data) // 2])  # cut inside a block: a kill -9 without its index
    files[2].write_bytes(b"not a recording at all")
    src = JobRecordingSource(files, playing=False)
    assert [lane.rank for lane in src.lanes] == [0, 1]
    assert "run.rank2.lrec is not an llmtop recording" in (src.warning or "")
    assert "run.rank1.lrec: truncated tail" in (src.warning or "")
    app = ReplayApp(src, refresh_hz=10)
    async with app.run_test(size=(120, 32)) as pilot:
        await settle(pilot, lambda: src.seeks >= 1 and app.job_shown)
        assert any("not an llmtop recording" in n.message for n in app._notifications)
        src.set_speed(MAX_SPEED)
        await pilot.press("k")
        await settle(pilot, lambda: src.at_end and not src.playing, tries=2000)
        steps = shown_steps(src)
        assert steps[0] == 59  # rank 0 replayed to its end
        assert steps[1] is not None and steps[1] < 59  # rank 1 up to where its file was cut
        with RecordingReader(files[1]) as reader:
            assert steps[1] == reader.last_step
        await pilot.press("q")


@aio
async def test_a_bad_block_stops_its_rank_and_the_others_go_on(tmp_path: Path) -> None:
    files = job_files(written_job(tmp_path))
    _bad_late_block(files[1], files[1])  # rank 1's last block with a step of the wrong type
    src = JobRecordingSource(files, playing=False)
    assert src.warning is None  # opening reads only the index: the defect shows once replayed
    app = ReplayApp(src, refresh_hz=10)
    async with app.run_test(size=(120, 32)) as pilot:
        await settle(pilot, lambda: src.seeks >= 1)
        src.set_speed(MAX_SPEED)
        await pilot.press("k")
        await settle(pilot, lambda: src.at_end and not src.playing, tries=2000)
        assert src.error is None and app.is_running  # the replay goes on with rank 0
        (note,) = src.notes
        assert note.startswith("rank 1 stopped: run.rank1.lrec: block at byte")
        await settle(pilot, lambda: any(n.message == note for n in app._notifications))  # the next frame says it
        assert shown_steps(src)[0] == 59
        rows = {r.rank: r for r in app.job.rows()}
        assert rows[1].state == "lost" and rows[0].status == "done"
        # a seek tries it again: back before the bad block it replays as the others do
        await pilot.press("home")
        await settle(pilot, lambda: src.position == 0 and not src.lanes[1].failed)
        assert {r.rank: (r.state, r.status) for r in app.job.rows()} == {0: ("live", "replay"),
                                                                           1: ("live", "replay")}
        await pilot.press("q")


@aio
async def test_a_replayed_hang_is_named_at_the_time_it_hung(tmp_path: Path) -> None:
    """Ranks 0 and 2 waited in all_reduce #9 from 1001.6 s to 1006 s (rank 1 crashed, rank 3 left no file):
    replayed, the Ranks view names the hang on the recording's clock, not on today's wall clock."""
    from tests.test_job_readers import written_job as hung_job

    src = JobRecordingSource(job_files(hung_job(tmp_path)), playing=False, start="end")
    app = ReplayApp(src, refresh_hz=10)
    async with app.run_test(size=(140, 32)) as pilot:
        await settle(pilot, lambda: src.seeks >= 1 and app.job_shown)
        await pilot.press("8")
        info = app.query_one("#ranks-info")
        await settle(pilot, lambda: "hang in all_reduce #9" in str(info.render()), tries=200)
        text = str(info.render())
        assert "never arrived: 1, 3" in text and "waiting: 0, 2" in text
        assert app.clock() == pytest.approx(1006.0)  # the recording's time at its end
        await pilot.press("q")


def test_a_job_with_no_readable_rank_is_one_line(tmp_path: Path) -> None:
    written_job(tmp_path)
    for rank in (0, 1):
        (tmp_path / f"run.rank{rank}.lrec").write_bytes(b"garbage")
    done = cli("replay", str(tmp_path / "run.lrec"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("llmtop replay: no rank of the job can be read: ") and "run.rank1.lrec" in line


# --- (d) the command picks the job replay ------------------------------------------------------------------


def replay_args(*argv: str) -> argparse.Namespace:
    from llmtop.tui.commands.replay import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_the_command_opens_the_job_replay_unless_one_rank_is_asked_for(job: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    files = job_files(job)
    for given, shown in ((job, 0), (files[1], 1), (files[0], 0)):
        opened: list[RecordingSource] = []
        assert _open(replay_args(str(given)), opened) == 0
        (src,) = opened
        assert isinstance(src, JobRecordingSource) and [lane.rank for lane in src.lanes] == [0, 1]
        assert src.playing and src.primary_key == (src.lanes[shown].key if given != job else None)
    opened = []
    _open(replay_args(*map(str, files)), opened)  # the job's files, named one by one
    assert isinstance(opened[0], JobRecordingSource) and len(opened[0].lanes) == 2
    opened = []
    _open(replay_args(str(job), "--rank", "1"), opened)  # one rank, alone
    assert type(opened[0]) is RecordingSource and opened[0].path == str(files[1])
    assert "replaying rank 1" in capsys.readouterr().err
    end = job_at_end(str(job))  # --end: the job replay at its end, paused
    assert isinstance(end, JobRecordingSource) and not end.playing and end._request == ("end", 0.0)
    bad = cli("replay", str(job), "--rank", "5")
    assert bad.returncode == 2 and bad.stderr.strip() == ("llmtop replay: no recording of rank 5 "
                                                          "(recorded ranks: 0, 1)")


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
def test_llmtop_replay_of_a_job_shows_its_ranks_in_a_terminal(job: Path) -> None:
    """The real command in a real terminal (tmux): `llmtop replay run.lrec --end` opens the job replay
    (both ranks in the header, the transport at the last step, the Ranks view), and q quits with 0."""
    last = timeline(job_files(job)[0])[1][-1][1]
    # the shell prints the exit status: tmux 3.3a can leave a pane's exited process unreaped for seconds
    # (a zombie), and then has no status to give (seen in 6 of about 25 quits here)
    tmux = Tmux(f"sh -c '{LLMTOP} replay {job} --end; echo llmtop exited with $?'",
                env_for(job.with_name("unused.sock")), width=140, height=32)
    try:
        screen = tmux.wait(lambda s: "ranks 2/2" in s and f"step {last}/{last}" in s, 60, "the job at its end")
        assert "▸ rank 0" in screen and "■ 1x" in screen  # paused at the end
        tmux.keys("8")
        # (the Overview names the straggler too: wait for the Ranks view's rows)
        tmux.wait(lambda s: "straggler" in s and len(re.findall(r"^\W*[01]\s.*done", s, re.M)) == 2, 30,
                  "the Ranks view with both ranks done")
        tmux.keys("q")
        tmux.wait(lambda s: "llmtop exited with" in tmux.history(), 30, "the replay to quit")
        assert "llmtop exited with 0" in tmux.history()
    finally:
        tmux.kill()


def test_the_diagnosis_lines_follow_a_replay_seek_at_once() -> None:
    """The lines are worked out at most once a second, but a replay's seek moves the clock: then at once
    (a hang named at 1006 s is gone when the clock is taken back to before it began)."""
    import dataclasses

    from llmtop.protocol.events import CollectiveWait
    from llmtop.tui.session.job import JobModel
    from llmtop.tui.views.ranks import diagnosis_notes

    from tests.test_recording import SESSION

    job = JobModel()
    for rank in (0, 1):
        model = job.model_for(f"box:{rank}")
        with model.lock:
            model.apply(dataclasses.replace(SESSION, pid=100 + rank, job="j", launcher="torchrun", rank=rank,
                                            world_size=2))
    waiting = job.model_for("box:0")
    with waiting.lock:
        waiting.apply(CollectiveWait(t=1006.0, op="all_reduce", since=1001.0, seq=9, step=5))
    assert any(n.startswith("hang in all_reduce #9") for n in diagnosis_notes(job, clock=1006.0))
    with waiting.lock:  # what a seek back to 1000 s rebuilds: the wait had not begun
        waiting.apply(CollectiveWait(t=1006.5, op="all_reduce", since=1001.0, seq=9, step=5, done=True))
    assert any(n.startswith("hang") for n in diagnosis_notes(job, clock=1006.5))  # within the second: kept
    assert not any(n.startswith("hang") for n in diagnosis_notes(job, clock=1000.0))

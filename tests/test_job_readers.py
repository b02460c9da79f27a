"""The file commands on a job's recording (one `run.rank{R}.lrec` per rank): `report` (Ranks section and
--json), `export` (Chrome trace: one process per rank; CSV with a rank column), `diff` (job-level and
per rank) and `replay` (one rank, said on stderr). Real torchrun gloo jobs on CPU, plus written jobs
for what a short CPU job cannot plant here (a hang, a crashed rank, a rank with no file)."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import subprocess
from pathlib import Path

import pytest
from llmtop.protocol.events import CollectiveWait, End, Step, encode
from llmtop.protocol.recording import RecordingReader, RecordingWriter

from tests.conftest import LLMTOP, ROOT, child_env
from tests.test_recording import SESSION, run_events
from tests.test_stragglers import run_job

jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is in the dev extras (pip install -e .[dev])")
SCHEMA = json.loads((ROOT / "docs" / "report.schema.json").read_text())


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two real 2-rank jobs: rank 1's data loader sleeps 160 ms a step in "slow"; "even" has no straggler:
    every rank's loader takes 100 ms a step (with ~1 ms of compute a step, a loaded machine made one
    rank persistently late, a real straggler; 5 % of a 100 ms step is above such noise)."""
    out = {}
    for name, args in (("slow", ("--slow-rank", "1", "--cause", "data", "--delay-ms", "160")),
                       ("even", ("--every-rank-ms", "100"))):
        d = tmp_path_factory.mktemp(name)
        run_job(d, 2, "--steps", "40", *args)
        out[name] = d / "run.lrec"
    return out


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LLMTOP, *args], capture_output=True, text=True, timeout=120, env=child_env())


def steps_of(path: Path) -> list[Step]:
    with RecordingReader(str(path)) as reader:
        return [e for e in reader.events() if isinstance(e, Step) and e.mode == "train"]


def steps_job(path: Path) -> str:
    with RecordingReader(str(path.with_name("run.rank0.lrec"))) as reader:
        return reader.session.job


def valid(text: str) -> dict:
    data = json.loads(text)
    jsonschema.validate(data, SCHEMA, cls=jsonschema.Draft202012Validator)
    return data


# --- report -------------------------------------------------------------------------------------------


def test_report_of_a_job_has_a_ranks_section(jobs: dict[str, Path]) -> None:
    rec = jobs["slow"]
    done = cli("report", str(rec))
    assert done.returncode == 0, done.stderr
    # any rank file names the same job
    assert cli("report", str(rec.with_name("run.rank1.lrec"))).stdout == done.stdout
    lines = done.stdout.splitlines()
    assert lines[0].startswith("ranks  job") and "2 of 2 ranks recorded" in lines[0]
    rows = [ln.split() for ln in lines[2:4]]
    assert [r[0] for r in rows] == ["0", "1"]
    assert [int(r[2]) for r in rows] == [len(steps_of(rec.with_name(f"run.rank{r}.lrec"))) for r in (0, 1)]
    straggler = next(ln for ln in lines if ln.startswith("  straggler: "))
    assert "rank 1 is the straggler" in straggler and "cause: data wait" in straggler
    assert "rank 0 in detail" in done.stdout
    assert f"  rank 0 of 2, job {steps_job(rec)}" in lines


def test_report_json_of_a_job(jobs: dict[str, Path]) -> None:
    done = cli("report", str(jobs["slow"]), "--json")
    assert done.returncode == 0, done.stderr
    data = valid(done.stdout)
    ranks = data["ranks"]
    assert (ranks["rank"], ranks["world_size"], ranks["files"]) == (0, 2, 2)
    per = ranks["per_rank"]
    assert [r["rank"] for r in per] == [0, 1]
    for r in per:
        steps = steps_of(Path(r["file"]))
        assert r["steps"] == len(steps) == 40
        assert r["last_loss"] == steps[-1].loss
        assert r["ended_normally"]
    assert data["steps"]["count"] == per[0]["steps"]  # the rest of the object is rank 0's
    s = ranks["straggler"]
    assert (s["rank"], s["cause"], s["basis"]) == (1, "data", "collectives") and s["late_pct"] >= 90
    assert ranks["hangs"] == [] and ranks["died"] == [] and ranks["unrecorded"] == []
    even = valid(cli("report", str(jobs["even"]), "--json").stdout)["ranks"]
    assert even["straggler"] is None and len(even["per_rank"]) == 2


def written_job(directory: Path) -> Path:
    """A 4-rank job whose rank 3 left no file: ranks 0 and 2 hang in all_reduce #9 at step 5 (reported
    each tick), rank 1 crashed before it."""
    for rank in (0, 1, 2):
        session = dataclasses.replace(SESSION, pid=100 + rank, job="j-42", launcher="torchrun", rank=rank,
                                      local_rank=rank, world_size=4, node_rank=0)
        w = RecordingWriter(str(directory / f"run.rank{rank}.lrec"), session, flush_s=1e9)
        events = run_events(6 if rank != 1 else 4)
        if rank in (0, 2):
            events += [CollectiveWait(t=1002.0 + i, op="all_reduce", since=1001.6, seq=9, step=5) for i in range(5)]
        for e in events:
            w.append(encode(e), e)
        if rank == 1:
            end = End(t=1001.5, exit_code=1, reason="exception", traceback="Traceback …\nRuntimeError: boom")
            w.append(encode(end), end)
        w.close()
    return directory / "run.lrec"


def test_report_names_hangs_dead_and_unrecorded_ranks(tmp_path: Path) -> None:
    rec = written_job(tmp_path)
    data = valid(cli("report", str(rec), "--json").stdout)
    ranks = data["ranks"]
    assert (ranks["job"], ranks["launcher"], ranks["world_size"], ranks["files"]) == ("j-42", "torchrun", 4, 3)
    assert ranks["unrecorded"] == [3]
    assert [d["rank"] for d in ranks["died"]] == [0, 1, 2]  # 0 and 2 never ended: killed while hanging
    assert "exit 1" in ranks["died"][1]["text"] or "exception" in ranks["died"][1]["text"]
    (hang,) = ranks["hangs"]
    assert (hang["op"], hang["seq"], hang["step"], hang["waiting"], hang["missing"]) == ("all_reduce", 9, 5,
                                                                                         [0, 2], [1, 3])
    assert hang["wait_s"] == pytest.approx(4.4)
    text = cli("report", str(rec)).stdout
    assert "3 of 4 ranks recorded" in text
    assert "ranks 0, 2 wait in all_reduce #9 (step 5) for 4.4 s" in text
    assert "ranks 1, 3 never arrived: rank 1 ended (" in text
    assert "no recording of rank 3" in text
    assert "  died: rank 1: " in text


def test_single_file_report_has_no_job(tmp_path: Path) -> None:
    from tests.test_recording import write

    rec = tmp_path / "one.lrec"
    write(rec, run_events(5))
    data = valid(cli("report", str(rec), "--json").stdout)
    assert data["ranks"] is None
    assert "ranks  job" not in cli("report", str(rec)).stdout


def test_a_bad_rank_file_is_one_line(tmp_path: Path) -> None:
    written_job(tmp_path)
    (tmp_path / "run.rank2.lrec").write_bytes(b"not a recording at all")
    for cmd in (["report"], ["export", "-f", "chrome"], ["diff", str(tmp_path / "run.lrec")]):
        done = cli(*cmd, str(tmp_path / "run.lrec"))
        assert done.returncode == 2, (cmd, done.stdout, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr, done.stderr
        assert "run.rank2.lrec" in done.stderr or "not an llmtop recording" in done.stderr, done.stderr
    # replay --rank opens that rank alone: its defect is one line before any screen
    (tmp_path / "run.rank0.lrec").write_bytes(b"not a recording either")
    done = cli("replay", str(tmp_path / "run.lrec"), "--rank", "0")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.splitlines()[0].startswith("llmtop replay: a job of 3 recorded ranks: replaying rank 0")
    assert len(done.stderr.strip().splitlines()) == 2, done.stderr


# --- export -------------------------------------------------------------------------------------------


def test_chrome_trace_of_a_job_has_a_process_per_rank(jobs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "trace.json"
    done = cli("export", str(jobs["slow"]), "-f", "chrome", "-o", str(out))
    assert done.returncode == 0, done.stderr
    trace = json.loads(out.read_text())
    names = {e["pid"]: e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "process_name"}
    hosts = {}
    for r in (0, 1):
        with RecordingReader(str(jobs["slow"].with_name(f"run.rank{r}.lrec"))) as reader:
            hosts[r] = reader.session.hostname
    assert names == {r: f"rank {r} ({hosts[r]})" for r in (0, 1)}
    for r in (0, 1):
        steps = steps_of(jobs["slow"].with_name(f"run.rank{r}.lrec"))
        slices = [e for e in trace["traceEvents"] if e["pid"] == r and e.get("cat") == "step"]
        assert [e["name"] for e in slices] == [f"step {s.step}" for s in steps]
    # one time axis: the same step ends at about the same moment on both ranks (the all-reduce)
    ends = {r: {e["name"]: e["ts"] + e["dur"] for e in trace["traceEvents"] if e["pid"] == r and e.get("cat") == "step"}
            for r in (0, 1)}
    late = [abs(ends[0][k] - ends[1][k]) for k in ends[0]]
    assert sorted(late)[len(late) // 2] < 20_000  # µs: the median step ends within 20 ms on both ranks
    data_phases = {r: sum(e["dur"] for e in trace["traceEvents"] if e["pid"] == r and e["name"] == "data")
                   for r in (0, 1)}
    assert data_phases[1] > 10 * data_phases[0]  # the straggler's data wait is in its own process


def test_csv_of_a_job_has_a_rank_column(jobs: dict[str, Path]) -> None:
    done = cli("export", str(jobs["even"].with_name("run.rank1.lrec")), "-f", "csv")
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(io.StringIO(done.stdout)))
    counts = {r: len(steps_of(jobs["even"].with_name(f"run.rank{r}.lrec"))) for r in (0, 1)}
    assert [int(r["rank"]) for r in rows] == [0] * counts[0] + [1] * counts[1]


def test_json_export_of_a_job_says_it_is_one_rank(jobs: dict[str, Path]) -> None:
    done = cli("export", str(jobs["even"].with_name("run.rank1.lrec")), "-f", "json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["recording"]["file"].endswith("run.rank1.lrec")
    assert done.stderr.strip().splitlines() == [
        f"llmtop export: json of rank 1 only ({jobs['even'].with_name('run.rank1.lrec')}); chrome and csv export "
        "every rank of the job"]


# --- diff ---------------------------------------------------------------------------------------------


def test_diff_of_two_jobs(jobs: dict[str, Path]) -> None:
    done = cli("diff", str(jobs["even"]), str(jobs["slow"]), "--json")
    assert done.returncode == 0, done.stderr
    job = json.loads(done.stdout)["job"]
    assert job["a_ranks"] == job["b_ranks"] == [0, 1]
    assert [d["name"] for d in job["ranks"] if d["name"].endswith("step")] == ["rank 0 step", "rank 1 step"]
    assert job["step"]["b_ms"] > job["step"]["a_ms"] + 20  # rank 1's 160 ms data wait holds back every rank
    assert job["a_straggler"] is None and "rank 1 is the straggler" in job["b_straggler"]
    gate = cli("diff", str(jobs["even"]), str(jobs["slow"]), "--fail-if-slower", "20")
    assert gate.returncode == 1 and "job step time (every rank)" in gate.stdout and "SLOWER" in gate.stdout
    assert "per rank (median ms)" in gate.stdout and "straggler in B: rank 1" in gate.stdout
    # the other way round the job got faster: neither the job's step nor a rank's step is a regression
    # (rank 0's layers, compared in detail, are tiny CPU modules: their noise is not this test's subject)
    back = json.loads(cli("diff", str(jobs["slow"]), str(jobs["even"]), "--fail-if-slower", "20", "--json").stdout)
    assert back["job"]["step"]["delta_ms"] < -20
    assert not [d for d in back["regressions"] if d["what"] in ("step", "rank")]


# --- replay -------------------------------------------------------------------------------------------


def test_replay_of_a_job_replays_one_rank(jobs: dict[str, Path]) -> None:
    from llmtop.tui.commands.replay import replay_path

    path, note = replay_path(str(jobs["slow"]))
    assert path == str(jobs["slow"].with_name("run.rank0.lrec"))
    assert note is not None and "replaying rank 0" in note and "2 recorded ranks" in note
    path, note = replay_path(str(jobs["slow"].with_name("run.rank1.lrec")))
    assert path.endswith("run.rank1.lrec") and "replaying rank 1" in (note or "")
    single = str(jobs["slow"].with_name("other.lrec"))
    assert replay_path(single) == (single, None)


def test_replay_end_of_a_job_opens_every_rank_in_the_job_view(jobs: dict[str, Path]) -> None:
    import asyncio

    from llmtop.tui.commands.replay import job_at_end
    from llmtop.tui.views.app import LlmtopApp

    source = job_at_end(str(jobs["slow"]))
    app = LlmtopApp(source, refresh_hz=10)

    async def drive() -> tuple[list, list[str]]:
        async with app.run_test(size=(100, 30)) as pilot:
            assert source.done.wait(30)
            for _ in range(50):
                await pilot.pause(0.1)
                if app.job_shown:
                    break
            await pilot.press("8")  # the Ranks view
            await pilot.pause(1.2)
            app.frame(force=True)
            await pilot.pause()
            rows = app.job.rows()
            from llmtop.tui.views.ranks import diagnosis_notes
            return rows, diagnosis_notes(app.job)

    rows, notes = asyncio.run(drive())
    assert sorted(r.rank for r in rows) == [0, 1]
    assert all(r.step == len(steps_of(jobs["slow"].with_name(f"run.rank{r.rank}.lrec"))) - 1 for r in rows)
    assert any(n.startswith("straggler: rank 1, data wait") for n in notes), notes

"""Recordings with valid checksums but bad contents: every reader fails with one line, or succeeds.

The mutations are structural, not byte flips (a byte flip only tests the checksums): the file is
parsed into its header, blocks and frames, a value, a type, a length or a nesting is changed, and
the file is written again with valid checksums, a valid index and valid compression. Each mutated
file then goes through ``report``, ``report --json``, ``export`` (csv, json, chrome), ``diff`` and
a headless replay (the ``RecordingSource`` worker, seeking and playing), in a separate process
capped in memory (``RLIMIT_AS``): a command must exit 0 or exit 2 with one line on stderr, never a
traceback, never an "internal error" (the commands' last-resort net), never a hang.

Cases that once failed are kept as files under tests/corpus/ and replayed by a plain test.
``LLMTOP_FUZZ_EXAMPLES=N`` runs more examples; ``LLMTOP_FUZZ_SAVE=DIR`` keeps every failing file.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from llmtop.protocol.events import (
    AgentWarning,
    Anomaly,
    DeviceSample,
    End,
    Generation,
    HostSample,
    LayerFlops,
    LayerStats,
    LogLine,
    Metric,
    ModelTree,
    Ops,
    Session,
    Span,
    Stats,
    Step,
    encode,
)
from llmtop.protocol.frames import HEADER
from llmtop.protocol.recording import BLOCK, CRC, FILE_HEADER, KeyframeBuilder, RecordingWriter, append_exit

ROOT = Path(__file__).resolve().parent.parent
CORPUS = Path(__file__).resolve().parent / "corpus"
FOOTER = struct.Struct(">QI8s")
FOOTER_TAG = b"LTIDXEND"
INDEX = 2
BLOCK_FIELDS = ["4s", "B", "B", "H", "I", "I", "I", "I", "q", "q", "d", "d", "I", "I"]
USES_DICT, DICT_SOURCE = 4, 2
MEMORY_CAP = 1536 << 20  # address space of the process that runs the commands
CASE_TIMEOUT_S = 120.0  # a hang guard, not a speed check: a small file takes well under a second

SESSION = Session(pid=4242, argv=["train.py", "--lr", "3e-4"], cwd="/work", started=1000.0, hostname="box",
                  python="3.11", torch="2.13", devices=["cpu"], options={"record": True, "nested": {"a": [1]}})
TREE = ModelTree(model=0, name="Net", ids=[0, 1, 2, 3], paths=["", "enc", "enc.fc", "head"],
                 classes=["Net", "Seq", "Linear", "Linear"], params=[0, 0, 4160, 650], parents=[-1, 0, 1, 0],
                 trainable=[True, True, True, True], dtypes=["", "", "float32", "float32"])


def run_events(steps: int) -> list[Any]:
    """Every kind of event, a few of each, as a live run sends them."""
    events: list[Any] = [TREE, LayerFlops(signature="(8, 16)", ids=[0, 1, 2, 3], flops=[4e6, 3e6, 3e6, 1e6],
                                          bytes=[1e5, 8e4, 8e4, 2e4], peak_flops=1e12, peak_bw=1e11, device="cpu")]
    for n in range(steps):
        t = 1001.0 + n / 10
        fwd = [0.5 + n * 1e-3, 0.3, 0.25, 0.1]
        events += [
            Step(step=n, t=t, dur_ms=10.0, phases={"forward": 4.0, "backward": 5.0, "other": 1.0},
                 loss=2.0 / (n + 1), grad_norm=1.5, lr=1e-3, samples=8, tokens=256, overhead_us=40.0,
                 cuda_allocated=1 << 20),
            LayerStats(step=n, ids=[0, 1, 2, 3], fwd_ms=fwd, fwd_self_ms=[0.1, 0.05, 0.25, 0.1],
                       calls=[1, 1, 1, 1], bwd_ms=[2 * x for x in fwd], bwd_self_ms=[0.2, 0.1, 0.5, 0.2]),
        ]
        if n % 4 == 0:
            events += [HostSample(t=t, cpu_pct=99.0, rss=1 << 30, sys_used=8 << 30, sys_total=16 << 30, threads=9),
                       DeviceSample(t=t, index=0, name="GPU", util_pct=90.0, mem_used=1 << 30, mem_total=8 << 30),
                       Span(name="eval", category="loop", start=t - 0.01, dur_ms=3.0, step=n, attrs={"k": [1, 2]}),
                       Metric(name="acc", value=0.5, t=t, step=n), LogLine(t=t, text=f"step {n}"),
                       Stats(t=t, dropped=0, clients=1)]
        if n % 9 == 0:
            events += [Ops(step=n, names=["aten::mm", "aten::add"], self_ms=[1.0, 0.2], calls=[3, 4],
                           flops=[1e6, 0.0], shapes=["[8, 16]", "[8]"], coverage=0.9),
                       Anomaly(t=t, what="slow_step", message="slow", step=n),
                       AgentWarning(t=t, source="ops", message="x"),
                       Generation(t=t, batch=1, prompt_tokens=8, new_tokens=4, ttft_ms=5.0, decode_ms=[1.0, 1.1])]
    return events


def write_base(path: Path, steps: int = 24) -> None:
    """A small recording with data blocks, a dictionary, keyframes, the agent's End and an exit
    status added by ``append_exit`` (so an old index and footer are dead bytes in the middle)."""
    writer = RecordingWriter(str(path), SESSION, flush_s=1e9)
    builder = KeyframeBuilder()
    builder.add(encode(SESSION), SESSION)
    for i, event in enumerate(run_events(steps)):
        frame = encode(event)
        writer.append(frame, event)
        builder.add(frame, event)
        if isinstance(event, LayerStats) and event.step % 6 == 5:
            writer.flush()
            if event.step % 12 == 11:
                writer.keyframe(builder.frames())
        del i
    writer.close(End(t=1010.0, exit_code=0, reason="exit"))
    append_exit(path, exit_code=3)


# --- the file as a structure -------------------------------------------------------------------


@dataclass
class Block:
    head: list[Any]  # BLOCK fields, checksums last (recomputed on write)
    frames: list[Any] | None = None  # data and keyframe blocks: the frame maps
    index: Any = None  # the index block: its map


@dataclass
class Recording:
    header: list[Any]  # FILE_HEADER fields (the frame length is recomputed)
    session: Any
    items: list[Any] = field(default_factory=list)  # Block, or "footer"
    fix_index: bool = True  # rebuild every index from the blocks as written
    fix_raw_len: bool = True  # set each block's raw length to what it holds


def parse(data: bytes) -> Recording:
    header = list(FILE_HEADER.unpack_from(data))
    at = FILE_HEADER.size
    frame = data[at:at + header[5]]
    rec = Recording(header, msgpack.unpackb(frame[HEADER.size:], raw=False, strict_map_key=False))
    at += header[5] + CRC.size
    zdict = None
    while at < len(data):
        if data[at:at + FOOTER.size].endswith(FOOTER_TAG):
            rec.items.append("footer")
            at += FOOTER.size
            continue
        head = list(BLOCK.unpack_from(data, at))
        comp = data[at + BLOCK.size: at + BLOCK.size + head[7]]
        do = zlib.decompressobj(zdict=zdict) if head[2] & USES_DICT else zlib.decompressobj()
        raw = do.decompress(comp) + do.flush()
        if head[2] & DICT_SOURCE:
            zdict = raw[-32 * 1024:]
        if head[1] == INDEX:
            rec.items.append(Block(head, index=msgpack.unpackb(raw, raw=False)))
        else:
            rec.items.append(Block(head, frames=list(_frames(raw))))
        at += BLOCK.size + head[7]
    return rec


def _frames(raw: bytes) -> Any:
    at = 0
    while at < len(raw):
        (n,) = HEADER.unpack_from(raw, at)
        yield msgpack.unpackb(raw[at + HEADER.size: at + HEADER.size + n], raw=False, strict_map_key=False)
        at += HEADER.size + n


def _pack(value: Any) -> bytes:
    body = msgpack.packb(value, use_bin_type=True)
    return HEADER.pack(len(body)) + body


def build(rec: Recording) -> bytes:
    """The file again, with valid checksums and compression; the index and the raw lengths are made
    to fit unless ``fix_index`` / ``fix_raw_len`` is off."""
    frame = _pack(rec.session)
    h = list(rec.header)
    h[5] = len(frame)
    out = bytearray(FILE_HEADER.pack(*h) + frame)
    out += CRC.pack(zlib.crc32(bytes(out)))
    rows: list[list[Any]] = []
    zdict = None
    index_at = 0
    for item in rec.items:
        if item == "footer":
            out += FOOTER.pack(index_at, zlib.crc32(struct.pack(">Q", index_at)), FOOTER_TAG)
            continue
        head = list(item.head)
        if item.index is not None:
            index = item.index
            if rec.fix_index and isinstance(index, dict):
                index = {**index, "blocks": [list(r) for r in rows]}
            raw = msgpack.packb(index, use_bin_type=True)
            index_at = len(out)
        else:
            raw = b"".join(_pack(f) for f in item.frames)
        flags = head[2]
        if flags & DICT_SOURCE and not flags & USES_DICT:
            zdict = raw[-32 * 1024:]
        if flags & USES_DICT and zdict is not None:
            co = zlib.compressobj(6, zdict=zdict)
            payload = co.compress(raw) + co.flush()
        else:
            payload = zlib.compress(raw, 6) if flags & 1 else raw
        head[7] = len(payload)
        if rec.fix_raw_len:
            head[6] = len(raw)
        packed = BLOCK.pack(*head[:12], 0, 0)[: -2 * CRC.size]
        block = packed + CRC.pack(zlib.crc32(packed)) + CRC.pack(zlib.crc32(payload))
        if item.index is None:
            rows.append([len(out), head[1], head[4], head[5], head[7], head[6], *head[8:12], head[2]])
        out += block + payload
    return bytes(out)


# --- mutations -----------------------------------------------------------------------------------

INT64 = st.integers(-(1 << 63), (1 << 63) - 1)
SCALARS = st.one_of(st.none(), st.booleans(), INT64, st.integers(0, (1 << 64) - 1),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                    st.binary(max_size=24))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=5),
                                                       st.dictionaries(st.one_of(st.text(max_size=6), INT64),
                                                                       inner, max_size=4)), max_leaves=12)


def _deep(depth: int, leaf: Any = 0) -> Any:
    value = leaf
    for i in range(depth):
        value = [value] if i % 2 else {"x": value}
    return value


def _blocks(rec: Recording) -> list[Block]:
    return [b for b in rec.items if isinstance(b, Block)]


def _frame_refs(rec: Recording) -> list[tuple[Any, Any]]:
    refs: list[tuple[Any, Any]] = [(None, rec.session)]
    for b in _blocks(rec):
        refs += [(b, f) for f in (b.frames or [])]
    return refs


@st.composite
def mutations(draw: st.DrawFn, base: Path) -> tuple[bytes, str]:
    rec = parse(base.read_bytes())
    what: list[str] = []
    for _ in range(draw(st.integers(1, 3))):
        what.append(_mutate(draw, rec))
    return build(rec), "; ".join(what)


def _mutate(draw: st.DrawFn, rec: Recording) -> str:
    kind = draw(st.sampled_from(["value", "value", "value", "drop", "kind", "length", "nest", "block",
                                 "index", "header", "layers"]))
    refs = _frame_refs(rec)
    _, frame = refs[draw(st.integers(0, len(refs) - 1))]
    if not isinstance(frame, dict):
        return "none"
    keys = sorted(frame, key=str)
    key = keys[draw(st.integers(0, len(keys) - 1))] if keys else "k"
    if kind == "value":
        frame[key] = draw(VALUES)
        return f"{frame.get('k')}.{key} = value"
    if kind == "drop":
        frame.pop(key, None)
        return f"{frame.get('k')}.{key} dropped"
    if kind == "kind":
        frame["k"] = draw(st.sampled_from(["step", "layers", "model", "session", "end", "ops", "flops", "span",
                                           "host", "device", "generation", "hello", "snapshot_done", "zzz"]))
        return f"kind -> {frame['k']}"
    if kind == "length":
        lists = [k for k in keys if isinstance(frame[k], (list, bytes))]
        if not lists:
            return "none"
        k = lists[draw(st.integers(0, len(lists) - 1))]
        v = frame[k]
        n = draw(st.integers(0, 3 * len(v) + 3))
        frame[k] = (v * (n // max(1, len(v)) + 1))[:n] if v else draw(st.lists(SCALARS, max_size=n))
        return f"{frame.get('k')}.{k} length {n}"
    if kind == "nest":
        depth = draw(st.sampled_from([17, 40, 200, 500]))  # msgpack packs at most 511 deep
        frame[key] = _deep(depth)
        return f"{frame.get('k')}.{key} nested {depth}"
    if kind == "layers":  # the file form of a layer table: its byte arrays and exact-value patches
        tables = [f for _, f in refs if isinstance(f, dict) and f.get("enc") == "ns2"]
        if not tables:
            return "none"
        t = tables[draw(st.integers(0, len(tables) - 1))]
        k = draw(st.sampled_from(["fwd_ms", "bwd_ms", "fwd_self_ms", "bwd_self_ms", "exact", "enc"]))
        t[k] = draw(st.one_of(st.binary(max_size=80), VALUES,
                              st.dictionaries(st.sampled_from(["fwd_ms", "x"]),
                                              st.dictionaries(INT64, SCALARS, max_size=3), max_size=2)))
        return f"layers.{k}"
    blocks = _blocks(rec)
    b = blocks[draw(st.integers(0, len(blocks) - 1))]
    if kind == "block":
        i = draw(st.sampled_from([1, 2, 4, 5, 6, 8, 9, 10, 11]))
        fmt = BLOCK_FIELDS[i]
        if fmt in "dq":
            b.head[i] = draw(st.floats(allow_nan=True, allow_infinity=True) if fmt == "d" else INT64)
        else:
            bits = {"B": 8, "H": 16, "I": 32}[fmt]
            b.head[i] = draw(st.integers(0, (1 << bits) - 1))
        if i == 6:
            rec.fix_raw_len = False  # keep the claimed raw length: inflation must stop at it
        return f"block field {i} = {b.head[i]!r}"
    if kind == "index":
        index = next((x.index for x in blocks if x.index is not None), None)
        if not isinstance(index, dict) or not index.get("blocks"):
            return "none"
        rec.fix_index = False
        rows = index["blocks"]
        if draw(st.booleans()):
            row = rows[draw(st.integers(0, len(rows) - 1))]
            row[draw(st.integers(0, len(row) - 1))] = draw(VALUES)
        else:
            index["blocks"] = draw(VALUES)
        return "index row"
    i = draw(st.sampled_from([1, 2, 3, 4]))
    rec.header[i] = draw(st.floats(allow_nan=True, allow_infinity=True) if i == 4 else st.integers(0, 3))
    return f"header field {i}"


# --- running the readers ------------------------------------------------------------------------

WORKER = textwrap.dedent("""
    import contextlib, io, json, os, resource, sys, threading
    resource.setrlimit(resource.RLIMIT_AS, ({cap}, {cap}))
    from llmtop.cli import main
    from llmtop.protocol.frames import ProtocolError
    from llmtop.tui.session.model import SessionModel
    from llmtop.tui.session.recording_source import RecordingSource
    out = os.fdopen(os.dup(1), "w")

    def command(argv):
        err, std = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(std):
            try:
                rc = main(argv)
            except BaseException as exc:
                import traceback
                traceback.print_exc(file=err)
                rc = "raised " + type(exc).__name__
        return {{"argv": argv[0], "rc": rc, "err": err.getvalue()}}

    def replay(path):
        # the replay worker, headless: open, jump to the end, back to the start, a step, play
        try:
            src = RecordingSource(path, start="end", playing=False)
        except ProtocolError as exc:  # the command says this in one line and exits 2
            return {{"argv": "replay", "rc": 2, "err": str(exc) + "\\n"}}
        except BaseException as exc:
            return {{"argv": "replay", "rc": "raised", "err": repr(exc) + "\\n"}}
        model = SessionModel()
        escaped = []

        def run():
            try:
                src.run(model)
            except BaseException as exc:
                escaped.append(repr(exc))

        t = threading.Thread(target=run)
        t.start()
        src.done.wait(30)
        for go in (src.seek_start, src.next_step, lambda: src.seek_step(7), src.seek_end):
            go()
        src.set_speed(16)
        src.seek_time(0.0)
        src.play()
        for _ in range(200):
            if src.error or (src.at_end and not src.playing):
                break
            threading.Event().wait(0.01)
        src.stop()
        t.join(30)
        if escaped or t.is_alive():
            return {{"argv": "replay", "rc": "raised", "err": "".join(escaped) or "worker hung\\n"}}
        return {{"argv": "replay", "rc": 2 if src.error else 0, "err": (src.error + "\\n") if src.error else ""}}

    for line in sys.stdin:
        job = json.loads(line)
        path, other, tmp = job["path"], job["other"], job["tmp"]
        results = [command(["report", path]), command(["report", path, "--json"]),
                   command(["diff", other, path])]
        for fmt in ("csv", "json", "chrome"):
            results.append(command(["export", path, "--format", fmt, "-o", os.path.join(tmp, "x." + fmt)]))
        results.append(replay(path))
        out.write(json.dumps(results) + "\\n")
        out.flush()
""")


class Readers:
    """One capped process that runs every reader on each file it is given."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER.format(cap=MEMORY_CAP)], cwd=ROOT,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def run(self, path: Path, other: Path) -> list[dict[str, Any]]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"path": str(path), "other": str(other), "tmp": str(self.tmp)}) + "\n")
        self.proc.stdin.flush()
        line = _readline(self.proc, CASE_TIMEOUT_S)
        assert line, f"the readers' process died or hung on {path} (exit {self.proc.poll()})"
        return json.loads(line)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _readline(proc: subprocess.Popen[str], timeout: float) -> str:
    import selectors

    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    ready = sel.select(timeout)
    sel.close()
    if not ready:
        proc.kill()
        return ""
    return proc.stdout.readline()


def problems(results: list[dict[str, Any]]) -> list[str]:
    """What is wrong with the readers' answers: anything but success or one clean line and exit 2."""
    bad = []
    for r in results:
        err, rc, name = r["err"], r["rc"], r["argv"]
        lines = err.splitlines()
        if "Traceback" in err or "internal error" in err or rc not in (0, 2):
            bad.append(f"{name}: rc {rc}: {err.strip()[-600:]}")
        elif rc == 2 and (len(lines) != 1 or not (lines[0].startswith("llmtop ") or name == "replay")):
            bad.append(f"{name}: exit 2 with {len(lines)} lines on stderr: {err.strip()[-300:]}")
    return bad


@pytest.fixture(scope="module")
def fuzz_env(tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = tmp_path_factory.mktemp("fuzz")
    base = tmp / "base.lrec"
    write_base(base)
    readers = Readers(tmp)
    yield base, readers, tmp
    readers.close()


def test_the_structure_round_trips_and_the_base_recording_reads_cleanly(fuzz_env: Any) -> None:
    base, readers, tmp = fuzz_env
    data = base.read_bytes()
    again = tmp / "again.lrec"
    again.write_bytes(build(parse(data)))
    for path in (base, again):
        results = readers.run(path, base)
        assert problems(results) == []
        assert all(r["rc"] == 0 for r in results), results  # the untouched file is fine everywhere


EXAMPLES = int(os.environ.get("LLMTOP_FUZZ_EXAMPLES", "60"))
@settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("LLMTOP_FUZZ_RANDOM"),
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(data=st.data())
def test_structural_mutations_fail_in_one_line_or_read(fuzz_env: Any, data: st.DataObject) -> None:
    base, readers, tmp = fuzz_env
    mutated, what = data.draw(mutations(base), label="mutation")
    path = tmp / "mutated.lrec"
    path.write_bytes(mutated)
    bad = problems(readers.run(path, base))
    if bad and os.environ.get("LLMTOP_FUZZ_SAVE"):
        keep = Path(os.environ["LLMTOP_FUZZ_SAVE"])
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, keep / f"{zlib.crc32(mutated):08x}.lrec")
    assert bad == [], f"{what}: " + " | ".join(bad)


def test_a_block_that_inflates_past_its_declared_size_is_refused_at_that_size(fuzz_env: Any) -> None:
    """A zip bomb: a block of 1 MiB that inflates to 1 GiB and claims 100 bytes, checksums valid. The
    readers run capped at ``MEMORY_CAP``; inflating it whole (and copying it) would not fit."""
    base, readers, tmp = fuzz_env
    data = bytearray(base.read_bytes())
    rec = parse(bytes(data))
    at = FILE_HEADER.size + rec.header[5] + CRC.size
    for item in rec.items:  # the offset of the first data block compressed without a dictionary
        if item != "footer" and item.frames and not item.head[2] & USES_DICT:
            break
        at += FOOTER.size if item == "footer" else BLOCK.size + item.head[7]
    old = BLOCK.unpack_from(data, at)
    co = zlib.compressobj(9)
    payload = co.compress(_pack({"v": 1, "k": "log", "t": 1.0, "text": "x"}))
    zeros = bytes(16 << 20)
    for _ in range(64):
        payload += co.compress(zeros)
    payload += co.flush()
    head = [*old[:12]]
    head[6], head[7] = 100, len(payload)
    packed = BLOCK.pack(*head, 0, 0)[: -2 * CRC.size]
    # the blocks after it move: the index no longer fits them, and the forward scan reads the file
    data[at:at + BLOCK.size + old[7]] = packed + CRC.pack(zlib.crc32(packed)) + CRC.pack(zlib.crc32(payload)) + payload
    out = tmp / "bomb.lrec"
    out.write_bytes(bytes(data))
    results = readers.run(out, base)
    assert problems(results) == []
    assert all(r["rc"] == 2 for r in results), results
    assert all("does not inflate to its declared 100 bytes" in r["err"] for r in results), results


def test_a_fifo_or_a_device_is_refused_at_once(fuzz_env: Any, tmp_path: Path) -> None:
    base, readers, _ = fuzz_env
    fifo = tmp_path / "fifo.lrec"
    os.mkfifo(fifo)  # nobody ever writes to it: opening it for reading would block forever
    for path in (fifo, Path("/dev/zero"), tmp_path):
        results = readers.run(path, base)
        assert problems(results) == []
        assert all(r["rc"] == 2 for r in results), results
        assert all("regular file" in r["err"] or "directory" in r["err"] for r in results), results


def corpus_files() -> list[Path]:
    return sorted(CORPUS.glob("*.lrec")) if CORPUS.is_dir() else []


@pytest.mark.parametrize("path", corpus_files(), ids=lambda p: p.name)
def test_corpus_of_past_crashes(fuzz_env: Any, path: Path) -> None:
    base, readers, _ = fuzz_env
    assert problems(readers.run(path, base)) == []

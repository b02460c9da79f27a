"""Frames and events: round trips, every protocol error, forward compatibility, fuzzing."""

from __future__ import annotations

import dataclasses
import io
import random
import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from llmtop.protocol import checks
from llmtop.protocol import events as ev
from llmtop.protocol.frames import (
    DEFAULT_MAX_FRAME,
    PROTOCOL_MAJOR,
    FrameDecoder,
    ProtocolError,
    pack_map,
    read_frame,
    unpack_map,
)


def sample_events() -> list[ev.Event]:
    """One real instance of every event kind, with non-default values where it matters."""
    return [
        ev.Hello(role="agent", pid=42),
        ev.Session(pid=42, argv=["train.py", "--lr", "3e-4"], cwd="/w", started=1.5, devices=["cpu"],
                   options={"tick_s": 0.5}, job="5d78833e", launcher="torchrun", rank=1, local_rank=1,
                   world_size=2, node_rank=0),
        ev.ModelTree(model=0, name="GPT2LMHeadModel", ids=[0, 1, 2], paths=["", "transformer", "lm_head"],
                     classes=["GPT2LMHeadModel", "GPT2Model", "Linear"], params=[0, 10, 20],
                     parents=[-1, 0, 0], trainable=[True, True, True], dtypes=["", "float32", "float32"],
                     compiled=[False, False, False]),
        ev.Step(step=3, t=2.0, dur_ms=120.5, phases={"data": 1.0, "forward": 40.0, "backward": 70.0,
                                                     "optimizer": 9.0, "h2d": 0.0, "other": 0.5},
                loss=2.5, grad_norm=1.25, lr=3e-4, samples=8, tokens=1024, overhead_us=55.0, comm_ms=20.0,
                comm_calls=3, comm_bytes=4096),
        ev.LayerStats(step=3, ids=[0, 1], fwd_ms=[40.0, 30.0], fwd_self_ms=[10.0, 30.0], calls=[1, 2],
                      bwd_ms=[70.0, 50.0], bwd_self_ms=[20.0, 50.0]),
        ev.HostSample(t=2.0, cpu_pct=180.0, rss=1 << 30, sys_used=5 << 30, sys_total=24 << 30, threads=7),
        ev.DeviceSample(t=2.0, index=0, name="NVIDIA H100", util_pct=None, mem_used=1 << 30),
        ev.Span(name="tokenize", category="text_preprocessing", start=1.0, dur_ms=3.5, depth=1,
                attrs={"tokens": 100}),
        ev.Metric(name="reward", value=0.7, t=2.0, step=3),
        ev.LogLine(t=2.0, text="\x1b[31mred\x1b[0m 50%", stream="stderr", replace=True),
        ev.Anomaly(t=2.0, what="nan_loss", message="loss is NaN since step 3", step=3),
        ev.AgentWarning(t=2.0, source="layers", message="hook failed: boom"),
        ev.Ops(step=3, names=["aten::mm"], self_ms=[5.0], calls=[12], flops=[1e9], shapes=["[8, 64]"]),
        ev.LayerFlops(signature="(8,128)", ids=[0], flops=[1e9], bytes=[1e6], peak_flops=1e12),
        ev.StepFlops(step=3, ids=[0], flops=[2e9], bytes=[2e6], roots=[0], root_calls=[2], fwd_flops=2e9,
                     flops_total=6e9, dur_ms=10.0, achieved_flops=6e11, mfu=0.6, peak_flops=1e12),
        ev.Generation(t=2.0, batch=2, prompt_tokens=16, new_tokens=8, ttft_ms=12.0, decode_ms=[3.0] * 7),
        ev.CollectiveWait(t=2.0, op="all_reduce", since=1.5, seq=7, step=3),
        ev.Stats(t=2.0, dropped=5, clients=2),
        ev.SnapshotDone(events=12),
        ev.End(t=3.0, exit_code=1, traceback="Traceback ...", reason="exception"),
    ]


def test_every_kind_is_covered_by_the_samples() -> None:
    assert {type(e).KIND for e in sample_events()} == set(ev.REGISTRY)


@pytest.mark.parametrize("event", sample_events(), ids=lambda e: e.KIND)
def test_event_round_trip_through_a_frame(event: ev.Event) -> None:
    frame = ev.encode(event)
    (length,) = struct.unpack(">I", frame[:4])
    assert length == len(frame) - 4
    body = unpack_map(frame[4:])
    assert body["v"] == PROTOCOL_MAJOR and body["k"] == event.KIND
    assert ev.EventDecoder().decode(body) == event


def test_decoder_handles_byte_at_a_time_and_many_frames_per_chunk() -> None:
    stream = b"".join(ev.encode(e) for e in sample_events())
    dec = FrameDecoder()
    one_by_one = [m for i in range(len(stream)) for m in dec.feed(stream[i : i + 1])]
    assert dec.pending == 0
    all_at_once = list(FrameDecoder().feed(stream))
    assert one_by_one == all_at_once
    assert len(all_at_once) == len(sample_events())


def test_a_consumer_that_stops_early_or_feeds_again_meanwhile_loses_and_repeats_no_frame() -> None:
    frames = [ev.encode(e) for e in sample_events()]
    stream = b"".join(frames)
    expected = [unpack_map(f[4:]) for f in frames]
    dec = FrameDecoder()
    got = []
    first = dec.feed(stream[:len(stream) // 2])
    got.append(next(first))  # one frame taken, the generator left suspended
    got += list(dec.feed(stream[len(stream) // 2:]))  # fed again meanwhile: the rest, in order
    got += list(first)  # the suspended one resumes: nothing left, nothing repeated
    assert got == expected and dec.pending == 0
    dec = FrameDecoder()
    for i in range(0, len(stream), 97):  # a consumer that takes one frame per chunk and drops the rest
        got2 = next(iter(dec.feed(stream[i:i + 97])), None)
        if got2 is not None:
            got.append(got2)
    got += list(dec.feed(b""))
    assert got[len(expected):] == expected and dec.pending == 0


def test_oversized_frame_is_refused_from_the_prefix_alone() -> None:
    dec = FrameDecoder(max_frame=1024)
    with pytest.raises(ProtocolError, match="exceeds the 1024-byte limit"):
        list(dec.feed(struct.pack(">I", 1025)))  # no body sent: refused before allocation
    with pytest.raises(ProtocolError, match="exceeds"):
        read_frame(io.BytesIO(struct.pack(">I", DEFAULT_MAX_FRAME + 1)))


def test_wrong_major_version_gets_a_clear_message() -> None:
    frame = pack_map({"v": PROTOCOL_MAJOR + 1, "k": "hello", "role": "agent"})
    with pytest.raises(ProtocolError, match=r"protocol version 2 is not supported.*speaks 1"):
        list(FrameDecoder().feed(frame))


def test_hello_with_other_major_version_string_is_refused() -> None:
    with pytest.raises(ProtocolError, match="not supported"):
        ev.check_hello(ev.Hello(role="agent", version="7.3"))
    with pytest.raises(ProtocolError, match="did not start with hello"):
        ev.check_hello(ev.Stats(t=0.0))
    assert ev.check_hello(ev.Hello(role="viewer", version="1.9")).role == "viewer"


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"\xc1", "malformed frame"),  # 0xc1 is never valid msgpack
        (msgpack.packb([1, 2, 3]), "expected a map"),
        (msgpack.packb({"k": "step"}), "no protocol version"),
        (msgpack.packb({"v": 1}), "no event kind"),
        (msgpack.packb({"v": 1, "k": "step"}) + b"junk", "malformed frame"),
    ],
)
def test_malformed_frames(payload: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        list(FrameDecoder().feed(struct.pack(">I", len(payload)) + payload))


def test_truncated_frames_from_a_file() -> None:
    frame = ev.encode(ev.Stats(t=1.0))
    assert read_frame(io.BytesIO(b"")) is None
    with pytest.raises(ProtocolError, match="truncated frame header"):
        read_frame(io.BytesIO(frame[:2]))
    with pytest.raises(ProtocolError, match="truncated frame: expected"):
        read_frame(io.BytesIO(frame[:-1]))


def test_unknown_kinds_are_skipped_and_counted() -> None:
    dec = ev.EventDecoder()
    assert dec.decode({"v": 1, "k": "from_the_future", "x": 1}) is None
    assert dec.decode({"v": 1, "k": "from_the_future"}) is None
    assert dec.unknown == {"from_the_future": 2} and dec.skipped == 2


def test_unknown_fields_from_a_newer_peer_are_ignored() -> None:
    body = ev.Stats(t=1.0, dropped=3).to_map() | {"new_field": [1, 2]}
    assert ev.EventDecoder().decode(body) == ev.Stats(t=1.0, dropped=3)


def test_missing_required_field_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="malformed 'step' event"):
        ev.EventDecoder().decode({"v": 1, "k": "step", "step": 1})


def test_fuzzed_streams_raise_only_protocol_errors() -> None:
    """Random corruption of a valid stream never escapes as anything but ProtocolError."""
    rng = random.Random(1234)
    valid = b"".join(ev.encode(e) for e in sample_events())
    for _ in range(400):
        data = bytearray(valid)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        dec, events = FrameDecoder(max_frame=64 * 1024), ev.EventDecoder()
        try:
            for body in dec.feed(bytes(data)):
                events.decode(body)
        except ProtocolError as exc:
            assert "\n" not in str(exc)


def test_events_are_plain_dataclasses_with_wire_safe_defaults() -> None:
    for cls in ev.REGISTRY.values():
        assert dataclasses.is_dataclass(cls)
        for f in dataclasses.fields(cls):
            assert f.name not in ("v", "k"), f"{cls.__name__}.{f.name} clashes with the frame keys"


# --- decoded events are type-checked ------------------------------------------------------------


@pytest.mark.parametrize("field, value, expected", [
    ("step", "7", "field 'step'"),  # a string where an int belongs
    ("step", 1.5, "field 'step'"),
    ("dur_ms", True, "field 'dur_ms'"),  # a bool is not a number here
    ("phases", [1.0], "field 'phases'"),
    ("phases", {"forward": "fast"}, "field 'phases'"),
    ("loss", {"a": 1}, "field 'loss'"),
    ("mode", None, "field 'mode'"),
])
def test_a_field_of_the_wrong_type_is_a_decoding_error(field: str, value: object, expected: str) -> None:
    body = ev.Step(step=3, t=2.0, dur_ms=1.0).to_map()
    body[field] = value
    with pytest.raises(ProtocolError, match=expected):
        ev.decode_one(body)


def test_every_sample_event_passes_its_own_check_and_the_checks_allow_what_agents_send() -> None:
    for event in sample_events():
        assert ev.decode_one(event.to_map()) == event
    # ints for floats (an agent may send 0), None for optional fields, NaN losses
    step = ev.decode_one({"v": 1, "k": "step", "step": 1, "t": 2, "dur_ms": 0, "loss": float("nan"), "lr": None})
    assert isinstance(step, ev.Step) and step.t == 2 and step.lr is None


def test_ragged_parallel_arrays_and_deep_values_are_decoding_errors() -> None:
    layers = ev.LayerStats(step=1, ids=[0, 1], fwd_ms=[1.0, 2.0], fwd_self_ms=[1.0, 2.0], calls=[1, 1]).to_map()
    with pytest.raises(ProtocolError, match="calls has 1 values for 2 ids"):
        ev.decode_one({**layers, "calls": [1]})
    with pytest.raises(ProtocolError, match="bwd_ms has 1 values for 2 ids"):
        ev.decode_one({**layers, "bwd_ms": [1.0]})
    assert ev.decode_one({**layers, "bwd_ms": [], "bwd_self_ms": []}) is not None  # empty: no backward
    tree = ev.ModelTree(model=0, name="N", ids=[0], paths=[""], classes=["N"], params=[0], parents=[-1]).to_map()
    with pytest.raises(ProtocolError, match="parents has 2 values for 1 ids"):
        ev.decode_one({**tree, "parents": [-1, 0]})
    deep: object = 1
    for _ in range(40):
        deep = [deep]
    with pytest.raises(ProtocolError, match="field 'attrs'"):
        ev.decode_one(ev.Span(name="s", category="c", start=1.0, dur_ms=1.0, attrs={"x": deep}).to_map())
    shallow = ev.Span(name="s", category="c", start=1.0, dur_ms=1.0, attrs={"x": [[1, {"y": 2}]]})
    assert ev.decode_one(shallow.to_map()) == shallow


@pytest.mark.parametrize("value", [float("inf"), float("nan"), 1e300, -1e13])
def test_times_must_be_finite_dates(value: float) -> None:
    for event in (ev.Step(step=1, t=value, dur_ms=1.0), ev.Step(step=1, t=1.0, dur_ms=value),
                  ev.Span(name="s", category="c", start=value, dur_ms=1.0),
                  ev.Session(pid=1, argv=[], started=value)):
        with pytest.raises(ProtocolError, match="has a bad value"):
            ev.decode_one(event.to_map())
    assert ev.decode_one(ev.Step(step=1, t=1.0, dur_ms=1.0, loss=value).to_map()) is not None  # a measurement


# --- the generated decoders against the checked path ------------------------------------------

_M = checks.MAX_INT
# Values at and beyond every bound the checks draw (as far as msgpack carries: -2**63 .. 2**64-1),
# plus each wire type in and out of a container
EDGES: list[object] = [
    0, 1, -1, _M - 1, _M, -_M, (1 << 64) - 1, 1e12, -1e12, 999999999999.5, 1e300, -1e13,
    float("nan"), float("inf"), float("-inf"), 0.0, True, False, None, "", "x", b"x",
    [], [1], [1.0, 2], [True], [None], ["a"], [(1 << 64) - 1], [_M], [1.0, "a"], [[1.0]], [{"a": 1}],
    {}, {"a": 1.0}, {"a": 1}, {"a": _M}, {"a": True}, {"a": None}, {1: 1.0}, {"a": [1, {"b": 2}]},
    {"a": float("nan")}, {"a": b"x"}, [[[[[[[[[[[[[[[[[[0]]]]]]]]]]]]]]]]]], {"a": [[[[[[[[[[[[[[[[0]]]]]]]]]]]]]]]]},
]
WIRE = st.recursive(st.one_of(st.sampled_from(EDGES), st.integers(-(1 << 63), (1 << 64) - 1), st.floats(),
                              st.text(max_size=4), st.booleans(), st.none()),
                    lambda inner: st.one_of(st.lists(inner, max_size=4),
                                            st.dictionaries(st.one_of(st.text(max_size=3), st.integers(-3, 3)),
                                                            inner, max_size=3)), max_leaves=8)


def _outcome(decode: object, body: dict[str, object]) -> tuple[object, ...]:
    try:
        event = decode(body)  # type: ignore[operator]
    except ProtocolError as exc:
        return ("error", str(exc))
    # the same class, the same attributes in the same order (the encoder relies on it), same values
    return ("event", type(event), list(vars(event).items()))


@st.composite
def mutated_bodies(draw: st.DrawFn) -> dict[str, object]:
    """A sample event's map after a few edits (a field replaced, removed, or one array element
    poisoned or dropped), sent through msgpack so the values are what a peer can send."""
    event = draw(st.sampled_from(sample_events()))
    body = event.to_map()
    names = [f.name for f in dataclasses.fields(event)]
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(names))
        how = draw(st.sampled_from(["replace", "drop", "poison", "shorten", "extra"]))
        value = body.get(name)
        if how == "replace":
            body[name] = draw(WIRE)
        elif how == "drop":
            body.pop(name, None)
        elif how == "poison" and isinstance(value, list) and value:
            value[draw(st.integers(0, len(value) - 1))] = draw(WIRE)
        elif how == "poison" and isinstance(value, dict) and value:
            value[draw(st.sampled_from(sorted(value, key=str)))] = draw(WIRE)
        elif how == "shorten" and isinstance(value, list) and value:
            value.pop()
        elif how == "extra":
            body[draw(st.text(max_size=5))] = draw(WIRE)
    return msgpack.unpackb(msgpack.packb(body, use_bin_type=True), raw=False, strict_map_key=False)


@settings(max_examples=1500, deadline=None, derandomize=True)
@given(mutated_bodies())
def test_the_generated_decoder_accepts_and_refuses_exactly_as_the_checked_path(body: dict[str, object]) -> None:
    cls = ev.REGISTRY[body["k"]]  # type: ignore[index]
    assert _outcome(ev.EventDecoder().decode, body) == _outcome(cls._from_map_checked, body)
    assert _outcome(cls.from_map, body) == _outcome(cls._from_map_checked, body)


@pytest.mark.parametrize("value", EDGES, ids=repr)
def test_every_edge_value_in_every_field_decodes_as_the_checked_path_does(value: object) -> None:
    for event in sample_events():
        for f in dataclasses.fields(event):
            body = msgpack.unpackb(msgpack.packb({**event.to_map(), f.name: value}), raw=False,
                                   strict_map_key=False)
            assert _outcome(ev.decode_one, body) == _outcome(type(event)._from_map_checked, body), f.name


def _refuse(body: dict[str, object]) -> ev.Event:
    raise AssertionError(f"the fast path handed a good {body['k']!r} event to the checked path")


def test_what_agents_send_never_leaves_the_fast_path() -> None:
    """The speed is in the generated function: the events agents send (samples, a 200-module
    layer table, a canned session) must pass it without the checked path."""
    from llmtop.tui.session.canned import session_events

    layers = ev.LayerStats(step=1, ids=list(range(200)), fwd_ms=[0.5] * 200, fwd_self_ms=[0.25] * 200,
                           calls=[1] * 200, bwd_ms=[1.0] * 200, bwd_self_ms=[0.5] * 200)
    nested = ev.Span(name="s", category="c", start=1.0, dur_ms=1.0, attrs={"x": [[1, {"y": 2}]], "n": 3})
    ints = ev.Step(step=1, t=2, dur_ms=0, phases={"data": 0, "forward": 1.5})  # ints where floats go
    events = [*sample_events(), layers, nested, ints, *session_events(20, n_layer=2, gpu=True)]
    for event in events:
        body = unpack_map(ev.encode(event)[4:])
        decoded = checks.fast_decoder(type(event), _refuse)(body)
        assert decoded == event and list(vars(decoded)) == list(vars(event))
        assert ev.encode(decoded) == ev.encode(event)


def test_the_generated_source_tests_every_field_inline() -> None:
    """Every field of the common kinds has an inline test: a compiled check is called only after
    it (``inline or C3(f3)``: maps and free-form values the one-pass test did not take)."""
    for cls in (ev.Step, ev.LayerStats, ev.HostSample, ev.Span, ev.LogLine, ev.ModelTree, ev.Session):
        source = checks._build(cls, _refuse)[1]
        assert "if not C" not in source, cls.__name__
        tests = [line for line in source.splitlines() if line.startswith("    if not ")]
        assert len(tests) == len(dataclasses.fields(cls)), cls.__name__
        for f in dataclasses.fields(cls):
            assert repr(f.name) in source

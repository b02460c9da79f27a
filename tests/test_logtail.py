"""Following a detached script's log file: complete lines only, bounded start, truncation."""

from __future__ import annotations

from pathlib import Path

from llmtop.tui.session.logtail import LogTail, detached_log_path


def test_complete_lines_only_and_partial_lines_wait(tmp_path: Path) -> None:
    path = tmp_path / "123.log"
    tail = LogTail(path)
    assert tail.read() == []  # no file yet
    path.write_bytes(b"one\ntw")
    assert tail.read() == ["one"]
    with path.open("ab") as f:
        f.write(b"o\nthree\n")
    assert tail.read() == ["two", "three"]
    assert tail.read() == []


def test_opening_a_large_file_reads_only_its_tail_from_a_line_start(tmp_path: Path) -> None:
    path = tmp_path / "1.log"
    path.write_text("".join(f"line {i}\n" for i in range(10_000)))
    lines = LogTail(path, tail_bytes=100).read()
    assert lines and lines[-1] == "line 9999"
    assert all(line.startswith("line ") for line in lines) and len(lines) < 20  # no cut first line


def test_a_truncated_file_is_read_again_from_its_start(tmp_path: Path) -> None:
    path = tmp_path / "1.log"
    path.write_text("a\nb\n")
    tail = LogTail(path)
    assert tail.read() == ["a", "b"]
    path.write_text("c\n")
    assert tail.read() == ["c"]


def test_invalid_utf8_is_replaced_not_raised(tmp_path: Path) -> None:
    path = tmp_path / "1.log"
    path.write_bytes(b"ok \xff\xfe\n")
    assert LogTail(path).read() == ["ok \ufffd\ufffd"]


def test_the_log_sits_beside_the_socket_named_by_the_scripts_pid(tmp_path: Path) -> None:
    assert detached_log_path(tmp_path / "a.sock", 4242) == tmp_path / "4242.log"

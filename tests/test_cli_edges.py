"""The CLIs at the edges of the machine: a file that cannot be written, a reader that closes stdout, a port
that is taken, a name that cannot be a route. Each is one line on stderr and a documented exit code
(docs/errors.md), never a traceback."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from nezha.runtime.cli import guarded
from serve_fixtures import _cli


def _raise(e: Exception):
    def run():
        raise e
    return run


def test_guarded_turns_a_file_error_into_one_line_and_exit_2(capsys):
    assert guarded("bench", _raise(NotADirectoryError(20, "Not a directory", "/etc/passwd/x"))) == 2
    assert capsys.readouterr().err == "nezha bench: error: [Errno 20] Not a directory: '/etc/passwd/x'\n"


def test_a_command_whose_output_cannot_be_written_fails_in_one_line(artifacts):
    with open("/dev/full", "w") as full:
        r = subprocess.run([sys.executable, "-m", "nezha.cli", "recommend", str(artifacts[0]), "--history",
                            "100,101", "--json"], stdout=full, stderr=subprocess.PIPE, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("nezha recommend: error:"), r.stderr
    assert "No space left on device" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_a_reader_that_closes_stdout_ends_the_command_quietly(artifacts):
    histories = ["--history", "100,101"] * 400                                  # ~0.3 MB of JSON: over a pipe's buffer
    proc = subprocess.Popen([sys.executable, "-m", "nezha.cli", "recommend", str(artifacts[0]), *histories, "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.read(10).startswith(b"[")     # like `| head -c 10`: read a little, then close
    proc.stdout.close()
    assert proc.wait(60) == 0
    assert proc.stderr.read() == b""


def test_a_taken_http_port_is_one_line_before_the_model_loads(artifacts):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = _cli("serve", str(artifacts[0]), "--port", str(port))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"--port {port}: cannot listen on 127.0.0.1" in r.stderr


@pytest.mark.parametrize("name", ["", "a/b", "x" * 65, "_leading", "é"])
def test_a_model_name_that_cannot_be_a_route_is_refused(name):
    r = _cli("serve", "unused", "--name", name)
    assert r.returncode == 2 and "--name must be 1 to 64 letters, digits" in r.stderr, r.stderr


def test_an_unreadable_admin_token_file_is_named(artifacts, tmp_path):
    r = _cli("serve", str(artifacts[0]), "--admin-token-file", str(tmp_path / "nope"))
    assert r.returncode == 2 and r.stderr.strip().endswith(f"--admin-token-file {tmp_path / 'nope'}: No such file or directory")


@pytest.mark.parametrize("flag", ["--out", "--save-baseline"])
def test_a_bench_that_could_not_write_its_results_is_refused_before_it_runs(artifacts, tmp_path, flag):
    (tmp_path / "file").write_text("")
    r = _cli("bench", str(artifacts[0]), "--quick", flag, str(tmp_path / "file" / "x" / "y"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"cannot write results to {tmp_path / 'file' / 'x'}" in r.stderr


@pytest.mark.parametrize("args, message", [
    (["--quick", "--beams", "99999"], "--quick runs one fixed small workload: drop --beams or --quick"),
    (["--batch-sizes", "0"], "--batch-sizes must be at least 1, got [0]"),
    (["--instructions", "--requests", "0"], "--requests must be at least 1, got 0"),
    (["--tolerance", "nan"], "--tolerance is a fraction in [0, 1), got nan")])
def test_bench_workload_options_are_checked_not_overridden(artifacts, tmp_path, args, message):
    r = _cli("bench", str(artifacts[0]), *args, "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and r.stderr.strip() == f"nezha bench: error: {message}", r.stderr

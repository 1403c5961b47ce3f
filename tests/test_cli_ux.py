"""What a new operator sees at the command line (issue 11): readable `--help`, a typo
answered with its own command's usage, `worker validate`'s positions, and clear
messages for a path where a URL belongs."""

from __future__ import annotations

import argparse
from pathlib import Path

import orjson
import pytest

from worker.cli import build_parser, main

COMMANDS = ("run", "emulator", "demo", "check", "validate", "publish", "dlq", "schema")


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exited:
        main(list(argv))
    out, err = capsys.readouterr()
    code = exited.value.code
    return (code if isinstance(code, int) else 1), out, err


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_describes_itself(command: str) -> None:
    parser = subcommands(build_parser(command))[command]
    assert parser.description, f"worker {command} --help has no description"


def test_dlq_actions_describe_themselves() -> None:
    for name, parser in subcommands(subcommands(build_parser("dlq"))["dlq"]).items():
        assert parser.description, name


@pytest.mark.parametrize(
    ("argv", "usage", "unknown"),
    [
        (("run", "--sorce", "x"), "usage: worker run", "--sorce"),
        (("dlq", "list", "file:x", "--bogus"), "usage: worker dlq list", "--bogus"),
        (("validate", "-", "--api-versoin", "v2"), "usage: worker validate", "--api-versoin"),
    ],
)
def test_a_typo_in_a_flag_shows_that_commands_usage(
    capsys: pytest.CaptureFixture[str], argv: tuple[str, ...], usage: str, unknown: str
) -> None:
    code, _, err = run_main(capsys, *argv)
    assert code == 2
    assert err.startswith(usage), err
    assert f"unrecognized arguments: {unknown}" in err
    assert "COMMAND ..." not in err  # not the top-level usage


def test_a_typo_gets_the_closest_flag_suggested(capsys: pytest.CaptureFixture[str]) -> None:
    _, _, err = run_main(capsys, "run", "--sorce", "x")
    assert "did you mean --source?" in err


def test_check_and_demo_help_names_what_goes_where(capsys: pytest.CaptureFixture[str]) -> None:
    check = " ".join(subcommands(build_parser("check"))["check"].format_help().split())
    assert "--url URL" in check
    assert "--timeout DURATION" in check
    demo = " ".join(subcommands(build_parser("demo"))["demo"].format_help().split())
    assert "--events N" in demo
    assert "--rate-limit RATE" in demo
    assert "--workdir DIR" in demo


def test_check_takes_a_duration(capsys: pytest.CaptureFixture[str]) -> None:
    # Nothing listens on port 9: not ready, quickly, whatever the unit.
    code, out, _ = run_main(
        capsys, "check", "--url", "http://127.0.0.1:9/readyz", "--timeout", "500ms"
    )
    assert code == 1
    assert "not ready" in out
    code, _, err = run_main(capsys, "check", "--timeout", "soon")
    assert code == 2
    assert "usage: worker check" in err
    assert "--timeout: expected a duration such as 30d, 12h, 60s, 500ms or 1.5" in err


# --- worker validate ------------------------------------------------------------------------


def test_validate_gives_one_position_per_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = orjson.dumps({"orderRef": "x"}).decode()  # invalid: no contact, but JSON
    lines = ["", good, '{"orderRef": "a",, "b": 1}', "not json at all"]
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join(lines) + "\n")
    code, out, _ = run_main(capsys, "validate", str(path))
    assert code == 1
    problems = out.splitlines()[:-1]
    assert problems[1] == "line 3, column 18: malformed_json: event is not valid UTF-8 JSON"
    assert problems[2] == "line 4, column 1: malformed_json: event is not valid UTF-8 JSON"
    assert problems[0].startswith("line 2: ")
    assert all(problem.count("line") == 1 for problem in problems), problems


# --- worker dlq list ------------------------------------------------------------------------


def test_dlq_list_shows_no_python_none(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    letters = [
        {"reason": "malformed_json", "eventId": "line-3", "attempts": 0, "raw": "{"},
        {"deadAt": "2026-11-27T10:00:00.000Z", "reason": "cdp_rejected", "status": 400},
        {"note": "a letter from an older release, with nothing we know"},
    ]
    path = tmp_path / "dead-letter.jsonl"
    path.write_bytes(b"".join(orjson.dumps(letter) + b"\n" for letter in letters))
    code, out, _ = run_main(capsys, "dlq", "list", f"file:{path}")
    assert code == 0
    assert "None" not in out
    assert "3 dead letters" in out
    assert "reason=cdp_rejected" in out
    assert "status=400" in out
    assert "eventId=line-3" in out


def test_dlq_list_of_a_missing_file_says_so_and_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "typo.jsonl"
    code, out, err = run_main(capsys, "dlq", "list", f"file:{missing}")
    assert code == 2
    assert "does not exist" in err
    assert "0 dead letters" not in out
    assert not missing.exists()


@pytest.mark.parametrize("action", [("list",), ("replay", "--to", "file:/dev/null")])
def test_a_bare_path_for_the_sink_gets_a_suggestion(
    capsys: pytest.CaptureFixture[str], action: tuple[str, ...]
) -> None:
    code, _, err = run_main(capsys, "dlq", action[0], "dead.jsonl", *action[1:])
    assert code == 2
    assert "did you mean file:dead.jsonl?" in err


def test_replay_to_a_bare_path_or_state_path_gets_a_suggestion(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the default state store is ./worker-state.db
    monkeypatch.delenv("WORKER_STATE", raising=False)
    letters = tmp_path / "dead-letter.jsonl"
    letters.write_bytes(orjson.dumps({"reason": "invalid_event", "orderRef": "o1"}) + b"\n")
    code, _, err = run_main(capsys, "dlq", "replay", f"file:{letters}", "--to", "again.jsonl")
    assert (code, "did you mean file:again.jsonl?" in err) == (2, True), err
    assert not (tmp_path / "worker-state.db").exists(), "the state store was touched first"
    code, _, err = run_main(
        capsys, "dlq", "replay", f"file:{letters}", "--to", f"file:{tmp_path / 'again.jsonl'}",
        "--state", "./state.db",
    )  # fmt: skip
    assert (code, "did you mean sqlite:///./state.db?" in err) == (2, True), err


def test_dlq_errors_list_only_the_sinks_it_reads(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(capsys, "dlq", "list", "kafka://user:pw@x/t")
    assert code == 2
    assert "worker dlq list" in err
    assert "file:PATH" in err
    assert "redis://" in err
    assert "file:-" not in err  # stdin is a source, never a sink
    assert "group=" not in err  # a consumer group is the source's
    assert "user:pw" not in err


def test_run_errors_list_the_sources(capsys: pytest.CaptureFixture[str]) -> None:
    from worker.errors import ConfigError
    from worker.sources import open_source

    with pytest.raises(ConfigError) as refused:
        open_source("kafka://x/t")
    assert "file:-" in str(refused.value)
    assert "group=" in str(refused.value)
    with pytest.raises(ConfigError, match=r"did you mean file:\./events\.jsonl\?"):
        open_source("./events.jsonl")


def test_output_cut_short_by_its_reader_ends_quietly(tmp_path: Path) -> None:
    import subprocess
    import sys

    events = tmp_path / "events.jsonl"
    events.write_bytes(b"{bad\n" * 50_000)
    process = subprocess.Popen(
        [sys.executable, "-m", "worker", "validate", str(events)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None
    assert process.stdout.readline().startswith(b"line 1, column 2: malformed_json")
    process.stdout.close()  # as `| head -1` does
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 1
    assert stderr == b""  # no BrokenPipeError traceback


@pytest.mark.parametrize("timeout", ["0", "-1", "inf", "nan"])
def test_check_refuses_a_timeout_that_is_no_duration(
    capsys: pytest.CaptureFixture[str], timeout: str
) -> None:
    code, out, err = run_main(capsys, "check", "--timeout", timeout)
    assert code == 2
    assert "--timeout: expected a duration above 0" in err
    assert out == ""

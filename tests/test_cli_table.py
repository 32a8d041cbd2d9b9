"""The CLI table checks itself: every row of lmstack.cli.STAGES imports, defines COMMANDS (a callable, a
ConfigCommand, or a dict of them), and every action builds its parser: `lmstack <stage> [<action>] --help`
exits 0 and its usage names the action. A row that points at a missing module fails with the row named."""
import importlib

import pytest

from lmstack.cli import STAGES, run
from lmstack.config import ConfigCommand


def route_problems(stage: str, module_name: str) -> list[str]:
    """What is wrong with one row of the table ([] when nothing is)."""
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        return [f"route {stage!r} -> {module_name}: module not found ({e.name})"]
    commands = getattr(module, "COMMANDS", None)
    if commands is None:
        return [f"route {stage!r} -> {module_name}: the module defines no COMMANDS"]
    actions = commands.items() if isinstance(commands, dict) else [(None, commands)]
    return [f"route {stage!r} -> {module_name}: action {name!r} is {type(command).__name__}, "
            "not a callable or ConfigCommand"
            for name, command in actions if not (isinstance(command, ConfigCommand) or callable(command))]


def help_text(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as info:
        run(argv)
    assert info.value.code == 0, argv
    return capsys.readouterr().out


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_route_imports_and_every_action_builds_its_help(capsys, stage):
    assert route_problems(stage, STAGES[stage]) == []
    commands = importlib.import_module(STAGES[stage]).COMMANDS
    if not isinstance(commands, dict):
        out = help_text(capsys, [stage, "--help"])
        assert out.startswith(f"usage: lmstack {stage} "), out[:200]
        return
    assert commands, f"route {stage!r} has an empty COMMANDS dict"
    assert run([stage, "--help"]) is None  # the stage's own help lists its actions
    assert f"actions: {', '.join(commands)}" in capsys.readouterr().out
    for action in commands:
        out = help_text(capsys, [stage, action, "--help"])
        assert out.startswith(f"usage: lmstack {stage} {action} "), out[:200]


def test_a_route_to_a_missing_module_is_named():
    problems = route_problems("ghost", "lmstack.ghost.commands")
    assert len(problems) == 1 and "'ghost' -> lmstack.ghost.commands" in problems[0] and "not found" in problems[0]
    # a module that exists but is no command at all is caught too
    assert "defines no COMMANDS" in route_problems("errors", "lmstack.errors")[0]


def test_a_route_without_commands_is_a_clear_error(capsys, monkeypatch):
    from lmstack.cli import main

    monkeypatch.setitem(STAGES, "errors", "lmstack.errors")
    assert main(["errors"]) == 2
    assert "routes 'errors' to lmstack.errors, which defines no COMMANDS" in capsys.readouterr().err


def test_the_overview_lists_every_route(capsys):
    assert run(["--help"]) is None
    listed = [line.split()[0] for line in capsys.readouterr().out.split("stages:\n")[1].splitlines()
              if line.startswith("  ")]
    assert listed == list(STAGES)

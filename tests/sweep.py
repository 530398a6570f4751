"""The bad-input sweep, by construction (issue 32): every numeric flag of every run script is given nan, 0, a
negative and a huge value, and every reader a truncated, empty, wrongly typed and wrongly encoded file. Each must
be refused in one line (exit status 2) that names the flag and the value, or the file; or, for a flag, accepted
by the argument validation. The sweep stops at argument validation and at reading: nothing trains.

The flags come from the settings dataclasses of each recipe (a new flag is swept without a line here); the files
from a valid example of each reader, spoiled in the same four ways."""

from __future__ import annotations

import importlib
import types
import typing
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

import pytest

from core.config import RunConfig
from core.shell import Recipe, cli, parse_recipe

HUGE_INT = "1" + "0" * 30
VALUES = ("nan", "0", "-1", "huge")


def recipe_of(module_name: str) -> Recipe:
    """The Recipe a run script runs: its RECIPE, or the LLM recipe of its METHOD."""
    module = importlib.import_module(module_name)
    if hasattr(module, "RECIPE"):
        return module.RECIPE
    from core.pipeline import llm_recipe

    return llm_recipe(module.METHOD)


def _number_type(hint) -> type | None:
    """int or float for a numeric field (also `int | None`), None otherwise (bool is not a number here)."""
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union else ()
    candidates = [a for a in args if a is not type(None)] if args else [hint]
    if len(candidates) == 1 and candidates[0] in (int, float):
        return candidates[0]
    return None


def numeric_flags(recipe: Recipe) -> list[tuple[str, type, type]]:
    """Every numeric flag of a recipe, from its settings dataclasses (and the shell's): (--flag, int|float, the
    dataclass that holds it)."""
    out = {}
    for cls in (*recipe.configs, RunConfig):
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            kind = _number_type(hints[f.name])
            if kind is not None and f.init:
                out.setdefault("--" + f.name.replace("_", "-"), (kind, cls))
    return [(flag, kind, cls) for flag, (kind, cls) in sorted(out.items())]


def flag_cases(modules: list[str]) -> list:
    """pytest parameters (module, flag, kind, value): every numeric flag of the modules' recipes, each value. A
    dataclass's flag is swept once, through the first module that uses it (the LLM methods share five of them):
    its checks are its own __post_init__'s and core.config.check_numbers', whoever parses it."""
    cases, seen = [], set()
    for module in modules:
        for flag, kind, cls in numeric_flags(recipe_of(module)):
            if (cls, flag) in seen:
                continue
            seen.add((cls, flag))
            cases += [pytest.param(module, flag, kind, v, id=f"{module}:{flag}={v}") for v in VALUES]
    return cases


def error_line(capsys) -> str:
    """The one 'error:' line on stderr; no traceback and nothing else starting with error:."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    return lines[0]


def check_flag(module: str, flag: str, kind: type, value: str, tmp_path: Path, capsys) -> None:
    """Parse `flag value` as the script does: refused in one line naming the flag and the value (nan always), or
    accepted."""
    text = {"huge": HUGE_INT if kind is int else "1e30"}.get(value, value)
    recipe = recipe_of(module)
    argv = [flag, text, "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache")]
    try:
        cli(lambda a: parse_recipe(recipe, a), argv)
    except SystemExit as exc:
        assert exc.code == 2, f"exit status {exc.code}"
        line = error_line(capsys)
        shown = {text, str(kind(float(text))) if kind is float else text}
        if kind is float and value == "huge":
            shown.add("1e+30")
        assert flag in line or flag.replace("-", "_")[2:] in line, f"{flag} not named in {line!r}"
        assert any(s in line for s in shown), f"the value {text} not named in {line!r}"
        return
    assert value != "nan", f"{flag} nan was accepted (no setting means anything at nan)"
    assert not (tmp_path / "run").exists(), "argument validation created the run folder"


# -- files ---------------------------------------------------------------------------------------------------------

SPOILS = ("truncated", "empty", "typed", "latin1", "utf16")


def _retyped_json(good: bytes) -> bytes | None:
    """The same JSON (an array, or one object per line) with every value of the first record a number: the right
    syntax, the wrong types. None when `good` is not JSON."""
    import json

    text = good.decode("utf-8")
    try:
        rows, lines = (json.loads(text), False) if text.lstrip().startswith("[") else (
            [json.loads(line) for line in text.splitlines() if line.strip()], True)  # fmt: skip
    except json.JSONDecodeError:
        return None
    if not rows or not isinstance(rows[0], dict):
        return None
    rows[0] = {key: 12345 for key in rows[0]}
    return ("".join(json.dumps(r) + "\n" for r in rows) if lines else json.dumps(rows)).encode()


def spoilt(good: bytes, kind: str) -> bytes:
    """A valid file's bytes spoilt one way: truncated mid-way, empty, of the wrong type (JSON: numbers where text
    belongs; any other file: binary noise), with a byte that is not UTF-8, or in UTF-16."""
    if kind == "truncated":
        return good[: max(1, len(good) // 2 - 3)]
    if kind == "empty":
        return b""
    if kind == "typed":
        try:
            retyped = _retyped_json(good)
        except UnicodeDecodeError:
            retyped = None
        return retyped if retyped is not None else bytes(range(256)) * 4
    if kind == "latin1":
        return good.replace(b"e", b"\xe9", 1) if b"e" in good else b"\xe9" + good
    if kind == "utf16":
        return good.decode("utf-8", errors="replace").encode("utf-16")
    raise ValueError(kind)


def check_reader(read: Callable[[], object], names: tuple[str, ...], capsys) -> None:
    """`read()` on a spoilt file: a one-line error (through cli, exit 2) naming one of `names` (the file or its
    flag), or a result (a truncation that still parses is no error)."""

    def main(_argv):
        read()

    try:
        cli(main, [])
    except SystemExit as exc:
        assert exc.code == 2, f"exit status {exc.code}"
        line = error_line(capsys)
        assert any(n in line for n in names), f"none of {names} in {line!r}"

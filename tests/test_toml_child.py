"""The daemon parses its config in a child process: same data, same errors, no tomllib left behind."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memwatchd import toml_child
from memwatchd.config import load_config
from memwatchd.types import ConfigError

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "memwatchd.toml"


@pytest.mark.parametrize("text", [
    EXAMPLE.read_text(),
    "",
    "[daemon]\ninterval = 1.5\nevents = ''\n[[watch]]\nname = 'a'\npid = 1\nlimit = '1G'\n",
    "x = [1, 2.5, 'three', true, {y = -4}]\nz = inf\n",
    "a = 1\na = 2\n",                       # duplicate key
    "[daemon\n",                            # broken table header
    "when = 1979-05-27T07:32:00Z\n",        # a date
    "[[watch]]\nat = [{t = 07:32:00}]\n",   # a time, nested
    "x = " + "[" * 2000 + "]" * 2000 + "\n",  # deep nesting
])
def test_child_and_in_process_agree(text):
    assert toml_child.parse_in_child(text) == toml_child.parse(text)


def test_errors_name_what_is_wrong():
    assert toml_child.parse("a = 1\na = 2\n") == (False, "invalid TOML: Cannot overwrite a value (at line 2, column 6)")
    valid, reason = toml_child.parse_in_child("[[watch]]\nat = [{t = 07:32:00}]\n")
    assert not valid and reason == "watch[0].at[0].t: dates and times are not used in this file, got 07:32:00"


toml_text = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=20)
toml_scalars = st.one_of(st.integers(-2**63, 2**63 - 1), st.booleans(), toml_text, st.floats(allow_nan=False))
toml_tables = st.recursive(
    st.dictionaries(toml_text.filter(bool), toml_scalars, max_size=4),
    lambda inner: st.dictionaries(toml_text.filter(bool), st.one_of(inner, st.lists(toml_scalars, max_size=3)),
                                  max_size=3),
    max_leaves=12)


@settings(max_examples=25, deadline=None)
@given(toml_tables)
def test_child_returns_exactly_what_was_written(table):
    """Round trip through JSON-style TOML inline syntax: the child's data equals the original."""
    text = "".join(f"{_quote(k)} = {_toml_value(v)}\n" for k, v in table.items())
    assert toml_child.parse_in_child(text) == (True, table)


def _quote(text):
    """A TOML basic string: JSON's escapes are TOML's, except astral characters stay raw."""
    return json.dumps(text, ensure_ascii=False)


def _toml_value(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (int, str)):
        return _quote(value) if isinstance(value, str) else str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{_quote(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"


def test_the_daemon_never_imports_the_parser(tmp_path):
    """What the child is for: after loading a config, tomllib (and typing) are not in the daemon."""
    path = tmp_path / "m.toml"
    path.write_text(EXAMPLE.read_text())
    # Only what memwatchd adds: an editable install's import hook loads typing on Python 3.9.
    code = ("import sys; before = set(sys.modules); from memwatchd.config import load_config; "
            f"c = load_config({str(path)!r}, insecure=True, parse_in_child=True); "
            "print(len(c.watches), sorted(m for m in ('tomllib', 'tomli', 'typing', 'datetime') "
            "if m in sys.modules and m not in before))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split(" ", 1)
    assert int(out[0]) >= 1
    assert out[1].strip() == "[]"
    assert load_config(str(path), insecure=True, parse_in_child=True) == load_config(str(path), insecure=True)


def test_bad_file_through_the_child_names_the_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[daemon]\ninterval = \n")
    with pytest.raises(ConfigError, match=rf"^{path}: invalid TOML: .*line 2"):
        load_config(str(path), insecure=True, parse_in_child=True)


def test_falls_back_to_parsing_here_when_no_child_can_start(monkeypatch):
    monkeypatch.setattr(sys, "executable", "/nonexistent/python3")
    fds_before = len(os.listdir("/proc/self/fd"))
    assert toml_child.parse_in_child("a = 1\n") == (True, {"a": 1})
    assert len(os.listdir("/proc/self/fd")) == fds_before


def test_a_hung_child_is_killed_and_the_text_parsed_here(monkeypatch, tmp_path):
    hang = tmp_path / "hang.py"
    hang.write_text("import time; time.sleep(60)\n")
    monkeypatch.setattr(toml_child, "CHILD_TIMEOUT", 0.5)
    monkeypatch.setattr(toml_child, "CHILD_SCRIPT", str(hang))
    fds_before = len(os.listdir("/proc/self/fd"))
    started = time.monotonic()
    assert toml_child.parse_in_child("a = 1\n") == (True, {"a": 1})
    assert time.monotonic() - started < 5
    assert len(os.listdir("/proc/self/fd")) == fds_before


def test_a_child_that_answers_garbage_is_ignored_and_the_text_parsed_here(monkeypatch, tmp_path):
    """Exit status 0 but no marshal blob on stdout (say, a site hook that printed):
    still a parse, never an exception out of a reload."""
    chatty = tmp_path / "chatty.py"
    chatty.write_text("import sys; sys.stdin.read(); print('hello from a site hook')\n")
    monkeypatch.setattr(toml_child, "CHILD_SCRIPT", str(chatty))
    assert toml_child.parse_in_child("a = 1\n") == (True, {"a": 1})

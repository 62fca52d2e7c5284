"""Parse TOML text, in this process or in a short-lived child.

The daemon reads its config file at start and on reload only, but importing
tomllib would keep typing, datetime and the parser's regexes resident for its
whole life: about 1.1 MiB of a 12 MiB budget. So the daemon hands the text to
``python -I <this file>``, which parses it and sends the result back as a
``marshal`` blob (plain dicts, lists, strings and numbers). The child gets
the text on stdin, never the path: it reads nothing the parent did not check.

This file imports nothing from memwatchd, so the child runs it as a plain
script, with no dependence on how memwatchd is installed. `check-config`,
`watch` and the tests parse in-process with the same ``parse`` function, so
both ways give the same data and the same error messages.
"""
from __future__ import annotations

import marshal
import os
import select
import signal
import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Tuple

CHILD_TIMEOUT = 10.0  # seconds; parsing a config takes milliseconds
CHILD_SCRIPT = os.path.abspath(__file__)


def parse(text: str) -> Tuple[bool, Any]:
    """(True, data) for valid TOML, else (False, a one-line reason).

    Dates and times are refused here, since no memwatchd key takes one and
    marshal cannot carry them; the reason names the dotted key.
    """
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        return False, f"invalid TOML: {e}"
    except RecursionError:
        return False, "invalid TOML: nested too deeply"
    where = _first_date(data, "")
    if where is not None:
        key, value = where
        return False, f"{key}: dates and times are not used in this file, got {value}"
    return True, data


def _first_date(value: Any, key: str) -> Any:
    """(dotted key, value) of the first date/time value inside ``value``, or None."""
    if isinstance(value, dict):
        for name, item in value.items():
            found = _first_date(item, f"{key}.{name}" if key else name)
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _first_date(item, f"{key}[{i}]")
            if found is not None:
                return found
    elif not isinstance(value, (str, int, float, bool)):
        return key, value.isoformat()
    return None


def parse_in_child(text: str) -> Tuple[bool, Any]:
    """``parse(text)`` run by a fresh interpreter, so tomllib never loads here.

    Falls back to parsing in-process when the child cannot be started, dies, hangs
    or answers with anything but a marshal blob (the memory is a goal, not worth
    refusing a valid config for, nor worth crashing a reload over).
    """
    argv = [sys.executable, "-I", CHILD_SCRIPT]
    to_child_r, to_child_w = os.pipe()
    from_child_r, from_child_w = os.pipe()
    try:
        pid = os.posix_spawn(sys.executable, argv, {}, file_actions=[
            (os.POSIX_SPAWN_DUP2, to_child_r, 0), (os.POSIX_SPAWN_DUP2, from_child_w, 1)])
    except OSError:
        pid = 0
    finally:
        os.close(to_child_r)
        os.close(from_child_w)
    output = None
    try:
        if pid:
            output = _exchange(to_child_w, from_child_r, text.encode("utf-8"))
        else:
            os.close(to_child_w)
    finally:
        os.close(from_child_r)
        if pid:
            if output is None:  # it overran CHILD_TIMEOUT: our own child, killed by PID
                os.kill(pid, signal.SIGKILL)
            status = os.waitpid(pid, 0)[1]
    if output is not None and status == 0:
        try:
            return marshal.loads(output)
        except (EOFError, ValueError, TypeError):
            pass  # e.g. a site hook that printed to stdout
    return parse(text)


def _exchange(write_fd: int, read_fd: int, data: bytes) -> Any:
    """Write all of data, close write_fd (always), read to EOF; None after CHILD_TIMEOUT.

    The child reads all of its input before it writes, so writing first cannot deadlock.
    """
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(write_fd, view):]
    except BrokenPipeError:
        pass
    finally:
        os.close(write_fd)
    chunks = []
    deadline = time.monotonic() + CHILD_TIMEOUT
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([read_fd], [], [], left)[0]:
            return None
        chunk = os.read(read_fd, 65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def main() -> None:
    """The child: TOML text on stdin, marshal of parse()'s result on stdout."""
    text = sys.stdin.buffer.read().decode("utf-8")
    sys.stdout.buffer.write(marshal.dumps(parse(text)))


if __name__ == "__main__":
    main()

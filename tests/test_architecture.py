"""The stages read one way (docs/architecture.md): no import cycle among memwatchd's modules.

Imports are read with ast, including those inside functions (a lazy import still ties two
modules together); only `if TYPE_CHECKING:` blocks are skipped, since they never run."""
from __future__ import annotations

import ast
import os
import subprocess
import sys

from tests.pidns import needs_pidns, run_scenario

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "memwatchd")


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def module_imports(source: str, modules: set) -> set:
    """The memwatchd modules (by short name) that this source imports, anywhere in it."""
    found = set()

    def visit(node):
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "memwatchd" and len(parts) > 1:
                    found.add(parts[1])
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            parts = node.module.split(".")
            if parts[0] == "memwatchd":
                if len(parts) > 1:
                    found.add(parts[1])
                else:
                    found.update(a.name for a in node.names if a.name in modules)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(source))
    return found & modules


def import_graph(package: str = PACKAGE) -> dict:
    names = {f[:-3] for f in os.listdir(package) if f.endswith(".py") and f != "__init__.py"}
    graph = {}
    for name in sorted(names):
        with open(os.path.join(package, name + ".py")) as f:
            graph[name] = module_imports(f.read(), names) - {name}
    return graph


def find_cycle(graph: dict):
    """One import cycle as a list of modules (first == last), or None."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(graph, WHITE)
    path = []

    def dfs(node):
        colour[node] = GREY
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if colour.get(nxt) == GREY:
                return path[path.index(nxt):] + [nxt]
            if colour.get(nxt) == WHITE:
                found = dfs(nxt)
                if found:
                    return found
        path.pop()
        colour[node] = BLACK
        return None

    for node in sorted(graph):
        if colour[node] == WHITE:
            found = dfs(node)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_lazy_and_direct_cycles():
    mods = {"a", "b", "c"}
    a = module_imports("from memwatchd import b\n", mods)
    b = module_imports("def f():\n    from memwatchd.c import x\n", mods)
    c = module_imports("import memwatchd.a as m\nif TYPE_CHECKING:\n    from memwatchd import b\n", mods)
    assert (a, b, c) == ({"b"}, {"c"}, {"a"})
    assert find_cycle({"a": a, "b": b, "c": c}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_memwatchd_has_no_import_cycle():
    graph = import_graph()
    assert "cli" in graph and "daemon" in graph["cli"]     # the reader sees the real modules
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_nothing_imports_the_console_script():
    """entry.py dispatches to cli.py; a module importing entry would close a circle."""
    assert not [name for name, deps in import_graph().items() if "entry" in deps and name != "__main__"]


# ------------------------------------------------------------------ the daemon's import path
# `memwatchd run` stays resident on every host and its RSS is a goal (issue 18:
# benchmarks/footprint.py). These modules cost it from 0.1 to 18 MiB each and the guard-only
# daemon needs none of them: the CLI's (typer, click, rich), the TOML parser (parsed in a
# child, toml_child.py), typing/dataclasses (and the inspect/ast they pull in), subprocess
# (only unit watches and on_action), threading. (sdnotify and the socket.py it loads, about
# 0.4 MiB, stay: the notify client is the project's chosen library.)
NOT_IN_THE_DAEMON = ("typer", "click", "rich", "tomllib", "tomli", "typing", "dataclasses",
                     "inspect", "ast", "subprocess",
                     "threading", "asyncio", "prometheus_client", "difflib", "traceback")

# Run as `memwatchd run` is (the console script calls memwatchd.entry.main), with a helper
# thread (_thread: already loaded by offload.py) that, once the daemon has said READY=1 and
# written its state file, writes sys.modules out and stops the daemon with SIGTERM.
_DUMP_MODULES = r"""
import _thread, os, signal, sys, time
out, state, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
def dump():
    deadline = time.monotonic() + 30
    while not os.path.exists(state) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.5)                    # a few more passes of the loop and a watchdog ping
    with open(out + ".tmp", "w") as f:
        f.write("\n".join(sorted(sys.modules)))
    os.rename(out + ".tmp", out)
    os.kill(os.getpid(), signal.SIGTERM)
_thread.start_new_thread(dump, ())
sys.argv = ["memwatchd"] + argv
from memwatchd.entry import main
main()
"""


def _heavy(modules) -> list:
    return sorted(m for m in modules if m.split(".")[0] in NOT_IN_THE_DAEMON)


def test_importing_the_run_path_loads_no_heavy_module():
    """What `memwatchd run` imports before it reads its config (entry -> daemon, notify)."""
    code = ("import sys\nbefore = set(sys.modules)\n"
            "from memwatchd import entry, daemon, systemd\n"
            "print('\\n'.join(sorted(set(sys.modules) - before)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(PACKAGE)).stdout.split()
    assert "memwatchd.daemon" in out and "memwatchd.config" in out   # it really imported them
    assert _heavy(out) == []


@needs_pidns
def test_the_running_guard_only_daemon_has_no_heavy_module_loaded():
    """The real daemon, as the unit runs it (default config: guard, state file, a
    NOTIFY_SOCKET with a watchdog), after READY=1, status and a state write: what its loop
    imported lazily (the notify socket, the state file's encoder) counts too."""
    res = run_scenario(r'''
import socket
notify_path = os.path.join(WORK, "notify.sock")
listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
listener.bind(notify_path)
listener.settimeout(20)
state, out = os.path.join(WORK, "state.json"), os.path.join(WORK, "modules.txt")
config = write_config(f"""
[daemon]
events = "{EVENTS}"
state = "{state}"
""")
daemon = subprocess.Popen([sys.executable, "-c", DUMP, out, state, "run", "--config", config],
                          env=dict(os.environ, NOTIFY_SOCKET=notify_path, WATCHDOG_USEC="2000000"),
                          stderr=subprocess.PIPE, text=True)
messages = []
try:
    while not any(m.startswith("READY=1") for m in messages):
        messages.append(listener.recv(4096).decode())
    code = daemon.wait(timeout=40)
finally:
    stop(daemon)
listener.settimeout(0.5)
try:
    while True:
        messages.append(listener.recv(4096).decode())
except OSError:
    pass
with open(out) as f:
    modules = f.read().split()
result(code=code, modules=modules, messages=messages, state=os.path.exists(state),
       stderr=daemon.stderr.read())
'''.replace("DUMP", repr(_DUMP_MODULES)))
    assert res["code"] == 0, res["stderr"]
    assert res["state"] and any(m.startswith("READY=1") for m in res["messages"])
    assert "WATCHDOG=1" in res["messages"]            # the notify socket really was used
    assert "memwatchd.daemon" in res["modules"] and "memwatchd.state" in res["modules"]
    assert _heavy(res["modules"]) == [], res["stderr"]


def test_run_forgets_the_console_scripts_directory_and_still_imports(tmp_path):
    """/usr/bin heads sys.path for /usr/bin/memwatchd: its finder would cache 1,300 names
    for the daemon's life. forget_script_dir drops a script's directory (and that cache),
    after which memwatchd's modules still import; `-c` (the working directory) is kept."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for i in range(50):
        (bindir / f"tool-{i}").write_text("")
    script = bindir / "memwatchd"
    script.write_text(
        "import sys\nimport memwatchd.entry as entry\n"
        "first = sys.path[0]\ncached = first in sys.path_importer_cache\n"
        "entry.forget_script_dir()\n"
        "import memwatchd.daemon, memwatchd.cmdmatch, json\n"   # later imports still work
        "print(first, cached, first in sys.path, first in sys.path_importer_cache)\n")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(PACKAGE))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env,
                         check=True).stdout.split()
    assert out == [str(bindir), "True", "False", "False"]
    code = ("import sys; import memwatchd.entry as e; e.forget_script_dir(); "
            "print(repr(sys.path[0]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True).stdout.strip()
    assert out == "''"

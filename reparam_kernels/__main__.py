"""``python -m reparam_kernels <command> [options]``.

Each command is a module ``reparam_kernels/cli/<command>.py`` with a docstring
(its first line is the help) and ``main(argv) -> exit code``. Modules are found
by name and imported only when their command runs, so a command whose
dependencies are missing cannot break the others.
"""
import ast
import importlib
import importlib.util
import os
import pkgutil
import sys

from . import cli


def commands():
    return sorted(m.name for m in pkgutil.iter_modules(cli.__path__) if not m.name.startswith("_"))


def _help():
    lines = ["usage: python -m reparam_kernels <command> [options]", "", "commands:"]
    for name in commands():
        spec = importlib.util.find_spec(f"{cli.__name__}.{name}")
        first = ""
        try:
            with open(spec.origin) as f:
                src = f.read()
            doc = ast.get_docstring(ast.parse(src)) or ""
            first = doc.strip().splitlines()[0] if doc.strip() else ""
        except (OSError, SyntaxError):
            pass
        lines.append(f"  {name:10} {first}")
    return "\n".join(lines)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_help())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in commands():
        print(f"reparam_kernels: unknown command {name!r}\n\n{_help()}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"{cli.__name__}.{name}")
    try:
        return module.main(rest) or 0
    except ValueError as e:
        # the library's ValueErrors name the argument and what it takes: say that, not a traceback
        # (REPARAM_TRACEBACK=1 shows where it came from)
        if os.environ.get("REPARAM_TRACEBACK") == "1":
            raise
        print(f"python -m reparam_kernels {name}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

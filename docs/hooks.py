"""MkDocs hook: each ``<!-- options: COMMAND -->`` marker in a page becomes a table of that command's arguments and
options, read from the click command itself (``safetyscope.cli.main``), so the docs never drift from ``-h``.
``COMMAND`` is the command path without the program name: ``classify``, ``synth audit``, ``sae train``.
An unknown command is an error, so ``mkdocs build --strict`` fails on a stale marker."""

from __future__ import annotations

import re

import click

MARKER = re.compile(r"<!--\s*options:\s*([a-z][a-z0-9 -]*?)\s*-->")


def commands(group: click.Group | None = None, prefix: tuple[str, ...] = ()) -> dict[str, click.Command]:
    """Every leaf command of the CLI by its path ("classify", "synth audit"), groups walked."""
    if group is None:
        from safetyscope.cli import main as group
    out: dict[str, click.Command] = {}
    for name, cmd in sorted(group.commands.items()):
        if isinstance(cmd, click.Group):
            out.update(commands(cmd, (*prefix, name)))
        else:
            out[" ".join((*prefix, name))] = cmd
    return out


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _type(p: click.Parameter) -> str:
    if isinstance(p, click.Option) and p.is_flag and not p.secondary_opts:
        return "flag"
    if isinstance(p.type, click.Choice):
        return " \\| ".join(f"`{c}`" for c in p.type.choices)
    t = p.type.name.lower()
    return f"{t}, repeatable" if getattr(p, "multiple", False) else t


def _default(p: click.Parameter) -> str:
    if p.required:
        return "required"
    d = p.default
    if d is None or callable(d) or "UNSET" in repr(d) or d == () or d == []:
        return ""
    if isinstance(p, click.Option) and p.is_flag and not p.secondary_opts:
        return "on" if d else ""
    if isinstance(d, bool) and isinstance(p, click.Option) and p.secondary_opts:
        return f"`{p.opts[0] if d else p.secondary_opts[0]}`"
    if isinstance(d, (list, tuple)):
        d = ",".join(map(str, d))
    return f"`{d}`"


def options_table(path: str) -> str:
    cmds = commands()
    if path not in cmds:
        raise KeyError(f"<!-- options: {path} -->: no such command (known: {', '.join(cmds)})")
    cmd = cmds[path]
    args = [p for p in cmd.params if isinstance(p, click.Argument)]
    lines = []
    if args:
        usage = " ".join(a.make_metavar(click.Context(cmd)) for a in args)
        lines += [f"Arguments: `{usage}`", ""]
    lines += ["| Option | Type | Default | What it does |", "|---|---|---|---|"]
    for p in cmd.params:
        if not isinstance(p, click.Option) or p.hidden:
            continue
        names = ", ".join(f"`{o}`" for o in (*p.opts, *p.secondary_opts))
        lines.append(f"| {names} | {_type(p)} | {_default(p)} | {_cell(p.help or '')} |")
    lines.append("| `-h`, `--help` | flag |  | Show the command's help and exit. |")
    return "\n".join(lines) + "\n"


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ARG001 - MkDocs hook signature
    return MARKER.sub(lambda m: options_table(m.group(1)), markdown)

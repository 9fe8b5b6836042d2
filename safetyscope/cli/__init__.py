"""The `safetyscope` command line: the click group, Ctrl-C and usage-error handling, and one module per job's
commands (cli -> jobs -> core: nothing below this package imports click)."""

from __future__ import annotations

import sys

import click

from .options import INTERRUPTED, quiet_libraries


class _Group(click.Group):
    """Ctrl-C is not a crash: one line and exit code 130 wherever it lands (click would print "Aborted!" and
    exit 1 for an interrupt that reaches it, e.g. one raised while a command unwinds). A usage error (unknown
    command or option, bad or missing value) is one ``error:`` line and exit code 2 like any other user
    mistake, not click's usage block."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:  # the group's own options are parsed here, before invoke
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.ClickException as e:
            _usage_error(e)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.ClickException as e:  # the subcommand's arguments are parsed inside invoke
            _usage_error(e)
        except KeyboardInterrupt:
            click.echo(INTERRUPTED, err=True)
            sys.exit(130)


def _usage_error(e: click.ClickException):
    ctx = getattr(e, "ctx", None)
    where = f"{ctx.command_path}: " if ctx is not None else ""
    hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
    msg = " ".join(e.format_message().split())
    click.echo(f"error: {where}{msg}{hint}", err=True)
    sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="safetyscope")
def main():
    """SAE features of language models as safety and toxicity data tools."""
    quiet_libraries()


def _register_subcommands() -> None:
    """Every job's commands; the job code itself is imported lazily inside each command."""
    from . import audit, discovery, eval, features, steer, synthesis, train

    main.add_command(features.features)
    main.add_command(steer.steer)
    main.add_command(train.sae_group)
    for cmd in (discovery.discover, discovery.classify, discovery.explain):
        main.add_command(cmd)
    main.add_command(eval.eval_command)
    synthesis.synth_group.add_command(audit.audit)
    for cmd in (synthesis.synth_group, synthesis.coverage, synthesis.synthesize):
        main.add_command(cmd)
    main.add_command(eval.overlap_command)


_register_subcommands()

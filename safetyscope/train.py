"""Training TopK SAEs on a layer of a model (work in progress)."""

import click


@click.group("sae")
def sae_group():
    """Train and inspect SAEs."""

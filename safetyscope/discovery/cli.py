"""CLI commands of the discovery job: discover, classify, explain."""


def register(main) -> None:
    pass

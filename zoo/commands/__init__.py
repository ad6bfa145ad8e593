"""Subcommands of the `zoo` command line, one module each (see zoo.cli)."""

"""The `fedrec` command: a thin shell over the library."""

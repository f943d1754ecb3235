"""CLI subcommands: thin layers over the library API, one module each."""

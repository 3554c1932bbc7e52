"""One module per CLI command, a thin shell over the library: optional ``add_arguments(parser)``
and ``main(cfg, args) -> dict`` returning the JSON report (schema: ``dualpipe_mhc.reports``).
Each command's one-line help, default preset and output rule live in ``dualpipe_mhc.cli.COMMANDS``."""

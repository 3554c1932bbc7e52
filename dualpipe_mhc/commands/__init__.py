"""One module per CLI command. Each defines ``HELP``, ``DEFAULT_CONFIG``, optional
``add_arguments(parser)``, and ``main(cfg, args) -> dict`` returning the JSON report."""

"""CLI commands: one module each, providing ``add_parser(subparsers)``."""

"""The subcommands of `timelit` other than fit / validate / test (LightningCLI's, timelit/training/lightning_cli.py):
one module per subcommand, each a typed function that jsonargparse turns into `--help` and options and dispatches to
(timelit/commands/cli.py). The work lives in the layers they call (`study`, `merging`, `data`, `flops`).

Nothing is imported here: `timelit sweep` and `timelit report` must not pay for torch, which `merge` and `budget`
need.
"""

"""The `d3s` commands, one module per group; :mod:`services.run.cli` registers them in the
order ``d3s --help`` lists them."""

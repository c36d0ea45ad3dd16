"""The `d3s` command line: the app, and its commands (:mod:`services.run.commands`) in the order
``d3s --help`` lists them."""

from __future__ import annotations

import typer

from services.run.commands import components, evaluation, info, models, training

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode="rich",
    help="D3S-RL: RL post-training with Dynamic Dual-Level Down-Sampling.\n\n"
    "Train with [bold]d3s run CONFIG[/bold] (asynchronous service) or [bold]d3s train CONFIG[/bold] "
    "(synchronous, one process). Every command takes a YAML config and [bold]--set key=value[/bold] overrides.",
)
app.command()(training.train)
app.command()(training.run)
app.command()(components.rollout)
app.command()(components.selector)
app.command()(components.learner)
app.command()(components.api)
app.command()(models.warmstart)
app.command("prepare-model")(models.prepare_model)
app.command()(info.status)
app.command("eval")(evaluation.eval_)
app.command()(models.export)
app.command()(evaluation.report)
app.command("validate")(info.validate_config)
app.command()(info.presets)


def main() -> None:
    app()


if __name__ == "__main__":
    main()

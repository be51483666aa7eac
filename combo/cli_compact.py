"""`combo store compact`: derive a compact store (int8, PCA, or both) from a full-size one."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from .cli_extract import human_bytes, progress_bars
from .clikit import friendly_errors, say


def compact_spec(pca: int | None, int8: bool, compact: str | None):
    """The encoding from --pca/--int8 or --compact (one way, not both)."""
    from store_schema.compact import CompactSpec, CompactSpecError

    if compact and (pca is not None or int8):
        raise CompactSpecError("give the encoding once: --compact pca:R,int8, or --pca R and/or --int8")
    if compact:
        return CompactSpec.parse(compact)
    if pca is None and not int8:
        raise CompactSpecError("choose an encoding: --int8, --pca R, or both (e.g. --pca 128 --int8)")
    if pca is not None and pca < 1:
        raise CompactSpecError(f"--pca {pca}: PCA needs at least 1 component per layer")
    return CompactSpec(pca=pca, int8=int8)


@friendly_errors
def compact_command(
    source: Annotated[str, typer.Argument(help="Full-size store to compact: folder, .zip or URL.")],
    target: Annotated[str, typer.Argument(help="Folder of the compact store to write (e.g. stores/sam/vtab-int8.zarr).")],
    pca: Annotated[Optional[int], typer.Option("--pca", help="Keep R principal components per layer, fitted on "
                   "each task's training split only (train800 for VTAB).")] = None,
    int8: Annotated[bool, typer.Option("--int8", help="int8 codes with per-channel and per-token scales "
                    "(a token's 2 largest values kept at float16).")] = False,
    compact: Annotated[Optional[str], typer.Option("--compact", help="The same as one text: int8, pca:R or pca:R,int8.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace TARGET if it holds another store.")] = False,
) -> None:
    """Write a compact copy of a store: every task, the tokens encoded, the rest as it is."""
    from store_schema.compactor import compact_store

    spec = compact_spec(pca, int8, compact)
    with progress_bars() as factory:
        result = compact_store(source, target, spec, overwrite=overwrite, progress=factory,
                               log=lambda line: say(("fit", "cyan"), " ", line))
    ratio = f", {result.bytes_on_disk / result.source_bytes:.3f} of the source's {human_bytes(result.source_bytes)}" \
        if result.source_bytes else ""
    say(("compacted", "green"), f" {len(result.tasks)} task(s) to ", str(result.store),
        f" ({spec.name}: {spec.describe()}): {human_bytes(result.bytes_on_disk)}{ratio}")

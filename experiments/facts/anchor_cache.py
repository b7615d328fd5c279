"""The facts demo with the anchor-state cache in its CALM rows (LOG.md runs 27, 28): `lmcompose demo facts` with the
preset but ``cache_anchor_states=True``, so each CALM row replays SmolLM2's blocks 0-18 instead of running them at
every step. Put a finished demo's ``anchor/`` and ``augments/`` into OUT first to time the rows and the scoring with
the augments cached (the cache does not key the augments). ``--set NAME=JSON`` changes one more setting of the
preset (config.with_settings), e.g. ``--set 'dc_wordings=["statement","question","flat","where"]'`` (LOG.md run 30).
Prints the demo's report, seconds included.

    python anchor_cache.py OUT [--seed 1] [--set NAME=JSON ...]
"""
import argparse
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="the demo's output directory")
    p.add_argument("--seed", type=int, default=1, help="the demo's seed")
    p.add_argument("--set", action="append", default=[], metavar="NAME=JSON",
                   help="a FactsPipelineConfig field (task.NAME: a FactsTaskConfig one), its value as JSON")
    args = p.parse_args()

    from lmcompose.demos.facts.config import preset, with_settings
    from lmcompose.demos.facts.pipeline import run_demo

    try:
        config = with_settings(preset(args.seed, cache_anchor_states=True), args.set)
    except ValueError as err:
        raise SystemExit(f"--set: {err}") from None
    run_demo(str(args.out), config=config)
    print((args.out / "results.md").read_text())


if __name__ == "__main__":  # the demo's workers are spawned: they import this file, and must not run it
    main()

"""Ray Jobs entrypoint for fine-tuning: parse ``--config`` / ``--set`` and run :func:`run_training`.

Submitted by ``chatray train submit`` (which uploads the source tree as the job's working dir), or by hand:

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/finetune.py --config jobs/finetune_tiny.yaml --set train.max_steps=100
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# Running from a source checkout without `pip install -e .`: make platform/ importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from chatray.config import ConfigError, FinetuneConfig, load_config  # noqa: E402
from chatray.errors import ChatrayError  # noqa: E402
from chatray.train.trainer import run_training  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, train, print ``summary: {json}``; exit 1 with one line on bad input."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file (jobs/finetune_tiny.yaml, ...)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. train.max_steps=200 (repeatable)")
    args = p.parse_args(argv)
    try:
        summary = run_training(load_config(FinetuneConfig, args.config, args.overrides), progress=False)
    except (ChatrayError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        if getattr(e, "hint", None):
            print(f"hint: {e.hint}", file=sys.stderr)
        return 1
    print("summary: " + json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

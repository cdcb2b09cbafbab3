"""Package a finished run of configs/pretrained.yaml as the pretrained model (cvae/pretrained/).

    python -m jobs.pipeline --config configs/pretrained.yaml      # trains, answers, evaluates
    python -m jobs.export_pretrained --run runs/pretrained         # writes cvae/pretrained/

Writes model.pt (the best checkpoint's weights), checkpoint.json (with provenance and the
evaluation), MODEL_CARD.md and SHA256SUMS; see cvae/export.py.
"""
from __future__ import annotations

import argparse
import sys

from cvae.logs import add_level_option, configure
from jobs import reports_errors


@reports_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.export_pretrained", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/pretrained", help="the pipeline's output folder")
    parser.add_argument("--out", default=None, help="where to write (default: cvae/pretrained/ in the package)")
    add_level_option(parser)
    args = parser.parse_args(argv)
    configure(args.log_level)

    from cvae.export import export  # torch, after the arguments' check
    from cvae.model.checkpoint import PRETRAINED_DIR

    out = args.out or PRETRAINED_DIR
    meta = export(args.run, out)
    o = meta["evaluation"]["overall"] or {}
    print(f"wrote the pretrained model to {out}: epoch {meta['epoch']}, "
          f"{meta['provenance']['training_seconds'] / 60:.1f} min of training; "
          f"IoU {o.get('iou')}, effectiveness {o.get('effectiveness')}, preservation {o.get('preservation')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The picture of docs/api.md: the notebook API (cvae.serve.api) on a trained checkpoint.

    python -m benchmarks.api_figure --checkpoint runs/local/train --out docs/api.png

Rows: a counterfactual of one source image under several interventions (the factual image
first), then samples of an intervention, then samples conditioned on a shape. Every image
comes from `CausalModel`, as a notebook would get it.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from cvae import CausalModel, Value
from cvae.data.grid import FACTORS, SHAPE_NAMES, classes_to_index, index_to_classes

# ellipse, scale 3, orientation 0, pos_x 10, pos_y 20: on the reduced training grids too
SOURCE = int(classes_to_index(np.array([[1, 3, 0, 10, 20]]))[0])
INTERVENTIONS = [
    ("shape=square", {"shape": "square"}),
    ("shape=heart", {"shape": "heart"}),
    ("scale=0", {"scale": 0}),
    ("scale=5", {"scale": 5}),
    ("orientation=12", {"orientation": 12}),
    ("pos_x=0.9", {"pos_x": Value(0.9)}),  # the official value: class 28
    ("pos_y=0.2", {"pos_y": Value(0.2)}),  # class 6
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a checkpoint folder or a training run folder")
    parser.add_argument("--out", default="docs/api.png")
    parser.add_argument("--source-index", type=int, default=SOURCE)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from cvae.figures import save_image_grid  # matplotlib only here

    t = time.perf_counter()
    m = CausalModel.load(args.checkpoint)
    classes = dict(zip(FACTORS, index_to_classes(np.array([args.source_index]), with_color=False)[0].tolist()))
    factual = m.scm.ground_truth.images(np.array([args.source_index]))[0]
    counterfactuals = [m.counterfactual(source_index=args.source_index, do=do, seed=args.seed)
                       for _, do in INTERVENTIONS]
    intervened = m.intervene(do={"scale": 5}, num_samples=args.samples, seed=args.seed)
    conditioned = m.condition(given={"shape": "heart"}, num_samples=args.samples, seed=args.seed)
    source = f"{SHAPE_NAMES[classes['shape']]} " + " ".join(f"{f}={classes[f]}" for f in FACTORS[1:])
    path = save_image_grid(
        args.out,
        [np.stack([factual, *counterfactuals]), intervened, conditioned],
        row_labels=[f"counterfactual\nsource_index={args.source_index}\n({source})",
                    'intervene\ndo={"scale": 5}', 'condition\ngiven={"shape": "heart"}'],
        col_labels=["factual"] + [f"do {name}" for name, _ in INTERVENTIONS],
        title=f"cvae.CausalModel on {m.checkpoint}",
    )
    print(f"figure: {path} ({time.perf_counter() - t:.1f} s)")


if __name__ == "__main__":
    main()

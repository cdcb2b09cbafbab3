"""Fit the renderer's geometry (`cvae.data.render.SHAPES`) to official frames.

    python -m benchmarks.fit_renderer [--shape heart] [--steps 800] [--holdout]

Per shape, starting from the current `SHAPES`, the parameters of `ShapeGeometry` (size =
slope * scale + offset, the coverage threshold, and the outline: the square's half-side, the
ellipse's axis ratio, the heart's radius at 33 angles; the square's size is fixed at its
measured 10 * scale) are fitted by gradient descent on a smooth stand-in for pixel
agreement: each pixel's coverage is the mean of 6 x 6 samples of a sigmoid of the signed
distance to the outline, and a frame's pixels pay softplus((threshold - coverage) / 0.05)
when on (the reverse when off). The heart's radii also pay for curvature (a smoothness
prior, so the outline does not chase single pixels). The result is printed as the
`ShapeGeometry` to paste into `cvae/data/render.py`, with the IoU of the exact renderer.

--holdout fits on every other frame of each shape and prints the IoU of the frames left out:
what a fit says about official frames it has not seen.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from cvae.data.fidelity import REFERENCE, load_reference
from cvae.data.grid import LATENT_VALUES, SHAPE_NAMES
from cvae.data.render import ORIGIN, SHAPES, STEP

SAMPLES = 6  # per pixel side
WINDOW = 32  # pixels around the shape's centre
KNOTS = 33  # heart radii from straight up to straight down


def frame_samples(frames: np.ndarray, labels: np.ndarray):
    """Per frame: sample points in the shape's own axes (u, v; v up), the window's target
    pixels, and the scale value."""
    o = (np.arange(SAMPLES) + 0.5) / SAMPLES - 0.5
    us, vs, targets = [], [], []
    for frame, (_, _, orientation, x, y) in zip(frames, labels):
        cx, cy = ORIGIN + STEP * x, ORIGIN + STEP * y
        x0, y0 = int(np.floor(cx)) - WINDOW // 2 + 1, int(np.floor(cy)) - WINDOW // 2 + 1
        r = (np.arange(WINDOW)[:, None] + o[None, :]).reshape(-1)
        dx, dy = (x0 + r)[None, :] - cx, (y0 + r)[:, None] - cy
        angle = np.mod(LATENT_VALUES["orientation"][orientation], 2 * np.pi)
        c, s = np.cos(angle), np.sin(angle)
        us.append(c * dx - s * dy)
        vs.append(-s * dx - c * dy)
        padded = np.zeros((64 + 2 * WINDOW, 64 + 2 * WINDOW), dtype=bool)
        padded[WINDOW:WINDOW + 64, WINDOW:WINDOW + 64] = frame
        targets.append(padded[y0 + WINDOW:y0 + 2 * WINDOW, x0 + WINDOW:x0 + 2 * WINDOW])
    scale = LATENT_VALUES["scale"][labels[:, 1]]
    return (torch.tensor(np.stack(us)), torch.tensor(np.stack(vs)),
            torch.tensor(np.stack(targets)), torch.tensor(scale)[:, None, None])


def signed_distance(name: str, u, v, outline):
    """Signed distance (negative inside) to a shape of size 1; for the heart a radial gap."""
    if name == "square":
        qx, qy = u.abs() - 1, v.abs() - 1
        return torch.hypot(qx.clamp(min=0), qy.clamp(min=0)) + torch.maximum(qx, qy).clamp(max=0)
    if name == "ellipse":
        ratio = outline[0]
        k = torch.sqrt(u ** 2 + (v / ratio) ** 2)
        return (k - 1) * k / (torch.sqrt(u ** 2 + (v / ratio ** 2) ** 2) + 1e-9)
    pos = torch.atan2(u.abs(), v) / np.pi * (KNOTS - 1)
    i0 = pos.floor().clamp(0, KNOTS - 2).long()
    w = pos - i0
    return torch.hypot(u, v) - (outline[i0] * (1 - w) + outline[i0 + 1] * w)


def coverage(name, data, slope, offset, outline, soft: float):
    u, v, _, scale = data
    size = slope * scale + offset
    d = signed_distance(name, u / size, v / size, outline) * size
    inside = torch.sigmoid(-d / soft) if soft > 0 else (d <= 0).double()
    n = u.shape[0]
    return inside.reshape(n, WINDOW, SAMPLES, WINDOW, SAMPLES).mean(dim=(2, 4))


def fit(name: str, data, steps: int):
    start = SHAPES[name]
    sized = name != "square"  # the square's size is measured, not fitted (see SHAPES)
    slope = torch.tensor(start.slope, dtype=torch.float64, requires_grad=sized)
    offset = torch.tensor(start.offset, dtype=torch.float64, requires_grad=sized)
    threshold = torch.tensor(start.threshold, dtype=torch.float64, requires_grad=True)
    params = [threshold] + ([slope, offset] if sized else [])
    outline = torch.tensor(start.params or (1.0,), dtype=torch.float64)
    if name != "square":
        outline.requires_grad_(True)
        params.append(outline)
    opt = torch.optim.Adam(params, lr=0.005)
    target = data[2]
    for step in range(steps):
        cov = coverage(name, data, slope, offset, outline, soft=0.08)
        margin = torch.where(target, threshold - cov, cov - threshold) / 0.05
        loss = torch.nn.functional.softplus(margin).sum()
        if name == "heart":
            loss = loss + 5 * ((outline[2:] - 2 * outline[1:-1] + outline[:-2]) ** 2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0:
            print(f"  {name} step {step}: loss {loss.item():.1f}", flush=True)
    return slope.item(), offset.item(), threshold.item(), outline.detach().numpy()


def scores(name, data, fitted) -> np.ndarray:
    slope, offset, threshold, outline = fitted
    with torch.no_grad():
        on = coverage(name, data, slope, offset, torch.tensor(outline), soft=0) >= threshold
    target = data[2]
    return ((on & target).sum((1, 2)) / (on | target).sum((1, 2))).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", default=str(REFERENCE))
    parser.add_argument("--shape", choices=SHAPE_NAMES, action="append")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--holdout", action="store_true", help="fit on half, score the other half")
    args = parser.parse_args()
    torch.set_num_threads(2)
    frames, labels = load_reference(args.reference)
    for name in args.shape or SHAPE_NAMES:
        rows = np.flatnonzero(labels[:, 0] == SHAPE_NAMES.index(name))
        train = rows[::2] if args.holdout else rows
        fitted = fit(name, frame_samples(frames[train], labels[train]), args.steps)
        slope, offset, threshold, outline = fitted
        shown = "" if name == "square" else ", (" + ", ".join(f"{r:.4f}" for r in outline) + ",)"
        print(f"{name!r}: ShapeGeometry({slope:.4f}, {offset:.4f}, {threshold:.4f}{shown})")
        for part, which in [("fitted", train), ("held out", rows[1::2] if args.holdout else [])]:
            if len(which):
                s = scores(name, frame_samples(frames[which], labels[which]), fitted)
                print(f"  {part}: {len(s)} frames, IoU min {s.min():.4f} median "
                      f"{np.median(s):.4f}, exact {(s == 1).sum()} (6x6 samples per pixel)")


if __name__ == "__main__":
    main()

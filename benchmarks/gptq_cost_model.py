"""Fit the GPTQ cost model of gptq_fsdp/distributed/schedule.py to this machine: time GPTQ on a grid of shapes.

    python benchmarks/gptq_cost_model.py [--threads 1]

Prints seconds ~ a·cols³ + b·rows·cols² + c·cols + d·rows·cols (least squares on relative error).
"""

from __future__ import annotations

import argparse
import itertools
import time

import numpy as np
import torch

from gptq_fsdp.config import GPTQConfig
from gptq_fsdp.core.gptq import gptq_quantize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    torch.set_num_threads(parser.parse_args().threads)
    args = GPTQConfig.from_options(group_size=64).weights
    timings = []
    for rows, cols in itertools.product([192, 576, 1536, 3072], [576, 1536, 2304]):
        x = torch.randn(2048, cols)
        hessian, weight = x.T @ x, torch.randn(rows, cols) * 0.02
        gptq_quantize(weight, hessian, args)  # warm-up
        start = time.perf_counter()
        gptq_quantize(weight, hessian, args)
        timings.append((rows, cols, time.perf_counter() - start))
    features = np.array([[c**3, r * c * c, c, r * c] for r, c, _ in timings], dtype=float)
    seconds = np.array([t for *_, t in timings])
    coef, *_ = np.linalg.lstsq(features / seconds[:, None], np.ones(len(seconds)), rcond=None)
    print("a (cols^3), b (rows*cols^2), c (cols), d (rows*cols):", " ".join(f"{v:.3e}" for v in coef))
    for (rows, cols, measured), predicted in zip(timings, features @ coef, strict=True):
        print(f"{rows:>5} x {cols:<5} measured {measured:.4f} s  predicted {predicted:.4f} s")


if __name__ == "__main__":
    main()

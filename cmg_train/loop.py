"""The one training loop: AdamW, one-cycle schedule, gradient clipping, progress, log lines.

Every trained part (teacher image tower, CMER scorer, local anomaly model, CMLE head)
differs only in how it draws a batch and computes its loss, which is `step_fn`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch
from tqdm.auto import tqdm


def fit(
    params: Iterable[torch.nn.Parameter],
    steps: int,
    lr: float,
    step_fn: Callable[[int], torch.Tensor | tuple[torch.Tensor, dict]],
    *,
    desc: str,
    progress: bool = True,
    log: Callable[[dict], None] | None = None,
    weight_decay: float = 1e-4,
    clip: float | None = 1.0,
    after_step: Callable[[], None] | None = None,
    log_every: int = 10,
) -> dict:
    """Run `steps` optimiser steps; `step_fn(step)` returns the loss (or (loss, extras)).

    Returns {"loss_first", "loss_last", "steps"} with losses averaged over the first and last
    tenth of the run (a single step is noise); every `log_every` steps a record goes to `log`.
    """
    params = [p for p in params if p.requires_grad]
    if steps < 1:
        raise ValueError(f"{desc}: steps must be >= 1, got {steps}")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    # OneCycleLR divides by the length of its warm-up, which must span more than one step: a
    # short run (the CMLE head on a folder of 32 frames or fewer: 10 epochs of one batch) warms
    # up over 1.5 steps; one of 1 or 2 steps runs at the constant rate.
    warm = max(0.1, 1.5 / steps)
    sched = (torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=warm) if warm < 1
             else torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0))
    losses: list[float] = []
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
    for step in bar:
        out = step_fn(step)
        loss, extras = out if isinstance(out, tuple) else (out, {})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        sched.step()
        if after_step:
            after_step()
        value = float(loss.detach())
        if not np.isfinite(value):
            raise FloatingPointError(f"{desc}: loss became {value} at step {step}")
        losses.append(value)
        if step % log_every == 0 or step == steps - 1:
            record = {"stage": desc, "step": step, "loss": value,
                      **{k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in extras.items()}}
            if log:
                log(record)
            bar.set_postfix(loss=f"{value:.3f}")
    tenth = max(1, steps // 10)
    return {"loss_first": float(np.mean(losses[:tenth])), "loss_last": float(np.mean(losses[-tenth:])),
            "steps": steps}


def batched(fn: Callable, *tensors: torch.Tensor, batch_size: int = 64, progress: bool = False,
            desc: str = "") -> tuple:
    """Run `fn` over aligned tensors in chunks without grad; concatenate each output.

    Why chunks: every scoring pass (teacher embeddings, patch maps, held-out scores) holds
    a frame batch's activations at 384 px; the whole set at once does not fit in memory."""
    outs: list[tuple] = []
    n = tensors[0].shape[0]
    with torch.no_grad():
        for i in tqdm(range(0, n, batch_size), desc=desc, disable=not progress, leave=False):
            res = fn(*(t[i:i + batch_size] for t in tensors))
            outs.append(tuple(res) if isinstance(res, tuple | list) else (res,))
    return tuple(torch.cat(parts) for parts in zip(*outs, strict=True))

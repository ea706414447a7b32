"""One training loop for both memories: AdamW, linear schedule, grad clipping, resumable checkpoints."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from memdec_fast import ranges

__all__ = ["TrainConfig", "train"]


@dataclass
class TrainConfig:
    """Optimisation settings; the defaults are upstream's where upstream has one.

    Attributes
    ----------
    epochs : number of passes over the datastore.
    batch_size : examples per step (blocks for a decoder, keys for an MLP Memory).
    lr : AdamW peak learning rate, decayed linearly to 0.
    warmup_steps : linear warm-up from 0.
    weight_decay, grad_clip, alpha : AdamW decay, max gradient norm, weight of the KL term.
    save_every : steps between checkpoints.
    seed : order of the examples and any initialisation.
    """

    epochs: int = 1
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    alpha: float = 0.5
    save_every: int = 200
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "lr", "warmup_steps", "grad_clip", "alpha", "save_every", "seed"):
            ranges.check(f"train.{name}", getattr(self, name), name)


def _schedule(cfg: TrainConfig, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        return max(0.0, (total - step) / max(1, total - cfg.warmup_steps))

    return factor


def train(
    model: torch.nn.Module,
    loss_fn: Callable[[object], tuple[torch.Tensor, dict[str, torch.Tensor]]],
    epoch_batches: Callable[[int, int], Iterator[object]],
    steps_per_epoch: int,
    cfg: TrainConfig,
    checkpoint: Path,
    desc: str = "train",
) -> list[float]:
    """Run ``cfg.epochs`` epochs; resume from ``checkpoint`` (a .pt file) when it exists.

    ``loss_fn(batch)`` returns the loss and named values to show on the progress bar.

    ``epoch_batches(epoch, skip)`` yields the batches of an epoch, in a
    deterministic order, after its first ``skip``: a resumed run skips exactly
    the steps already done.

    Returns
    -------
    list[float]
        The loss of each step run in this call.
    """
    total = cfg.epochs * steps_per_epoch
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg, total))
    step = 0
    if checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=False)
        if state["config"] != asdict(cfg):
            raise ValueError(f"checkpoint {checkpoint} was written with other settings; delete it to start over")
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as err:
            raise ValueError(f"checkpoint {checkpoint} belongs to another model; delete it to start over") from err
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step = state["step"]

    def save() -> None:
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        tmp = checkpoint.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "step": step, "config": asdict(cfg)}, tmp)
        tmp.replace(checkpoint)

    losses: list[float] = []
    model.train()
    bar = tqdm(total=total, initial=step, desc=desc, unit="step")
    for epoch in range(step // steps_per_epoch, cfg.epochs):
        for batch in epoch_batches(epoch, step - epoch * steps_per_epoch):
            loss, logs = loss_fn(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            step += 1
            losses.append(loss.item())
            bar.update(1)
            shown = {k: float(v.detach()) if torch.is_tensor(v) else v for k, v in logs.items()}
            bar.set_postfix({"loss": f"{losses[-1]:.3f}", **{k: f"{v:.3f}" for k, v in shown.items()}})
            if step % cfg.save_every == 0:
                save()
    bar.close()
    save()
    model.eval()
    return losses

"""The paper's optimizer: SGD with momentum over parameter groups with their own lr multipliers and decay; weight
averaging.

    optimizer = make_optimizer(model, cfg)        # weights decayed, biases 2× lr, the class-map layer 0.1× lr
    buffers = optimizer_state(optimizer)          # what a checkpoint stores; load_optimizer_state restores it
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from nin.engine.config import TrainConfig
from nin.models import NiN

__all__ = ["param_groups", "make_optimizer", "optimizer_state", "load_optimizer_state", "Ema"]


def param_groups(model: NiN, cfg: TrainConfig) -> list[dict]:
    """SGD groups: weights (decayed), biases (2x lr, no decay), class-map layer (0.1x, its bias too), norms (no decay)."""
    class_map = {id(p) for p in model.class_map_layer.parameters()}
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            is_norm = isinstance(module, nn.BatchNorm2d)
            is_bias = name == "bias"
            mult = cfg.bias_lr_mult if (is_bias and not is_norm) else 1.0
            if id(p) in class_map:  # Caffe's cccp6: 0.1x for its weights and its bias alike
                mult = cfg.class_map_lr_mult * (cfg.class_map_bias_lr_mult if is_bias else 1.0)
            decay = 0.0 if (is_bias or is_norm) else cfg.weight_decay  # NiN paper: decay on weights only
            groups.setdefault((mult, decay), []).append(p)
    return [{"params": ps, "lr_mult": mult, "weight_decay": decay, "lr": cfg.lr * mult}
            for (mult, decay), ps in groups.items()]


def make_optimizer(model: NiN, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD with momentum over `param_groups`: fused into one kernel where torch offers it."""
    kwargs = dict(lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    try:
        return torch.optim.SGD(param_groups(model, cfg), fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.SGD(param_groups(model, cfg), foreach=True, **kwargs)


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The momentum buffers, keyed "<group>.<index>" (plain SGD has no other state)."""
    return {f"{g}.{j}": optimizer.state[p]["momentum_buffer"]
            for g, group in enumerate(optimizer.param_groups) for j, p in enumerate(group["params"])
            if optimizer.state.get(p, {}).get("momentum_buffer") is not None}


def load_optimizer_state(optimizer: torch.optim.Optimizer, buffers: dict[str, torch.Tensor]) -> None:
    """Put back the buffers `optimizer_state` took: one for every parameter (every nin model trains them all),
    or none (a run checkpointed before its first step, or without momentum).

    Raises:
        ValueError: Buffers for some parameters only, for parameters the optimizer does not have, or of
            another shape than their parameter's (a damaged checkpoint, or another model's).
    """
    params = {f"{g}.{j}": p for g, group in enumerate(optimizer.param_groups) for j, p in enumerate(group["params"])}
    if buffers:
        unknown, missing = sorted(set(buffers) - set(params)), sorted(set(params) - set(buffers))
        if unknown or missing:
            raise ValueError(f"momentum buffer {(unknown or missing)[0]} "
                             f"{'has no parameter' if unknown else 'is missing'}")
        wrong = [k for k, p in params.items() if buffers[k].shape != p.shape]
        if wrong:
            raise ValueError(f"momentum buffer {wrong[0]} has shape {tuple(buffers[wrong[0]].shape)}, "
                             f"its parameter {tuple(params[wrong[0]].shape)}")
    for key, p in params.items():
        if key in buffers:
            # empty_like keeps the parameter's memory format (channels_last): the fused step walks raw memory
            optimizer.state[p]["momentum_buffer"] = torch.empty_like(p).copy_(buffers[key])


class Ema:
    """Exponential moving average of a model's parameters and buffers (weight averaging)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema = list(self.model.state_dict().values())
        live = list(model.state_dict().values())
        floats = [(e, m) for e, m in zip(ema, live) if e.is_floating_point()]
        torch._foreach_lerp_([e for e, _ in floats], [m for _, m in floats], 1.0 - self.decay)
        for e, m in zip(ema, live):
            if not e.is_floating_point():
                e.copy_(m)

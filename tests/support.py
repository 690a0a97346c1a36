"""Helpers shared by several test files (test files never import each other)."""

from __future__ import annotations

import torch


class FakeFinite(torch.Tensor):
    """A tensor subclass that lies to the checks it meets (issue 18): isfinite is always True and abs() is 0,
    whatever it holds."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.isfinite, torch.Tensor.isfinite):
            return torch.ones(args[0].shape, dtype=torch.bool)
        if func in (torch.abs, torch.Tensor.abs):
            return torch.zeros(args[0].shape)
        return super().__torch_function__(func, types, args, kwargs)

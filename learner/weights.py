"""The learner's weights as a broadcast source under ZeRO-3: gathered one bucket at a time.

Under ZeRO-3 each parameter is sharded across the learner's ranks. Gathering the whole model to
publish it would hold it twice on the device (or, as a host copy, once more in host memory);
:class:`ZeroShardedWeights` lets the publisher gather exactly the parameters of the bucket it is
about to send and release them once packed into its ring of two bucket buffers, so rank 0 holds
its shard, one gathered bucket and the two packed ones, never the whole model (the catch-up
files gather each bucket once more, after the broadcast, into two host staging buffers). Gathering is collective: with several ranks,
``announce`` tells the followers which names to gather, so every rank enters each all-gather
together (:func:`learner.multirank.follow` answers it with :func:`gather_and_release`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from services.policy.lora import adapter_params, is_lora, param_name
from services.weightsync.base import GatheredWeights


def _params_and_aliases(
    module: torch.nn.Module,
) -> tuple[dict[str, torch.nn.Parameter], dict[str, str]]:
    """Unique parameters by their first name, and every other name of a shared (tied) one."""
    first: dict[int, str] = {}
    params: dict[str, torch.nn.Parameter] = {}
    aliases: dict[str, str] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
            params[name] = p
    return params, aliases


def _full_shape(p: torch.Tensor) -> tuple[int, ...]:
    # A ZeRO-3 parameter's own shape is its (empty) local shard's; ds_shape is the whole one.
    return tuple(getattr(p, "ds_shape", p.shape))


class ZeroShardedWeights(GatheredWeights):
    """A ZeRO-3 module's state (parameters and buffers, under their ``state_dict`` names) for
    :meth:`~services.weightsync.collective.CollectivePublisher.publish`.

    Args:
        module: The DeepSpeed engine's module.
        announce: Called with the names before each gather on rank 0 of a multi-rank learner,
            so the followers gather the same parameters (None: one rank).
    """

    def __init__(
        self,
        module: torch.nn.Module,
        announce: Callable[[list[str]], None] | None = None,
        adapter_dtype: torch.dtype | None = None,
    ) -> None:
        self.module = module
        self.announce = announce
        self.dtype: torch.dtype | None = None
        self._in_model: dict[str, str] = {}
        if is_lora(module):
            # A LoRA model publishes its adapter alone, under the wire names, in the engines' dtype.
            self.params, self._aliases, self.buffers = dict(adapter_params(module)), {}, {}
            self._in_model = {n: param_name(n) for n in self.params}
            self.dtype = adapter_dtype
            return
        self.params, self._aliases = _params_and_aliases(module)
        self.buffers = {
            n: b for n, b in module.named_buffers() if n in module.state_dict(keep_vars=True)
        }

    def layout(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        out = {n: (_full_shape(p), self.dtype or p.dtype) for n, p in self.params.items()}
        out.update({n: (tuple(b.shape), b.dtype) for n, b in self.buffers.items()})
        return out

    def aliases(self) -> dict[str, str]:
        return dict(self._aliases)

    def device(self) -> torch.device:
        return next(iter(self.params.values())).device

    @contextlib.contextmanager
    def gather(self, names: list[str]) -> Iterator[dict[str, torch.Tensor]]:
        in_model = [self._in_model.get(n, n) for n in names]
        if self.announce is not None:
            self.announce(in_model)
        params = {self._in_model.get(n, n): p for n, p in self.params.items()}
        with gather_and_release(self.module, in_model, params):
            out = {
                n: self.params[n].data.to(self.dtype or self.params[n].dtype)
                for n in names
                if n in self.params
            }
            out.update({n: self.buffers[n] for n in names if n in self.buffers})
            yield out


@contextlib.contextmanager
def gather_and_release(
    module: torch.nn.Module,
    names: list[str],
    params: dict[str, torch.nn.Parameter] | None = None,
) -> Iterator[None]:
    """All-gather the named parameters (a collective over the learner's ranks) for the body of
    the ``with``, then release them to their shards unchanged."""
    import deepspeed

    if params is None:
        params, _ = _params_and_aliases(module)
    wanted = [params[n] for n in names if n in params]
    with deepspeed.zero.GatheredParameters(wanted, modifier_rank=None):
        yield


def host_weights(
    module: torch.nn.Module, zero3: bool, adapter_dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The weights a version carries, copied to the host: a LoRA model's adapter under its wire
    names in ``adapter_dtype`` (the engines' dtype), else the whole state dict in float32.
    Under ZeRO-3 the parameters are gathered first (a collective: every rank calls it)."""
    if is_lora(module):
        adapter = adapter_params(module)
        with _gathered(list(adapter.values()), zero3):
            return {k: p.detach().to("cpu", adapter_dtype).clone() for k, p in adapter.items()}
    with _gathered(list(module.parameters()), zero3):
        return {
            k: v.detach().to("cpu", torch.float32).clone() for k, v in module.state_dict().items()
        }


def live_weights(module: torch.nn.Module, adapter_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The weights a version carries where training holds them (ZeRO 0-2): the live tensors of
    a full model (no copy), or a LoRA model's adapter cast to ``adapter_dtype``."""
    if is_lora(module):
        return {k: p.detach().to(adapter_dtype) for k, p in adapter_params(module).items()}
    return {k: v.detach() for k, v in module.state_dict().items()}


@contextlib.contextmanager
def _gathered(params: list[torch.Tensor], zero3: bool) -> Iterator[None]:
    if not zero3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield

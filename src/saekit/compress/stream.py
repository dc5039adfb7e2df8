"""Run a transformer's decoder blocks one at a time on cached inputs.

:func:`capture` runs the model once per calibration batch with every block replaced by a
pass-through recorder: it keeps the first block's input hidden states (in the model's
dtype) and, for every block, the other arguments the model passes it (attention mask,
position embeddings, ...; one stored object per distinct argument, on CPU). Afterwards
:meth:`BlockStream.forward` runs any block on any batch from those, so a pipeline needs
O(L) block forwards instead of re-running the model from the embeddings at every step.

Hidden states live in an :class:`ActivationCache`: CPU memory, a directory of safetensors
files, or the device. Blocks are moved to the device only while they run. ``forwards``
counts block forward passes (one per block per batch).
"""

from __future__ import annotations

import contextlib
import re
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from saekit.compress.lowrank import block_of
from saekit.errors import ConfigError

_TF_TUPLE_BLOCKS: bool | None = None


def _blocks_return_tuples() -> bool:
    """transformers < 5 decoder blocks return tuples, >= 5 return the hidden states."""
    global _TF_TUPLE_BLOCKS
    if _TF_TUPLE_BLOCKS is None:
        try:
            import transformers

            _TF_TUPLE_BLOCKS = int(transformers.__version__.split(".")[0]) < 5
        except ImportError:  # pragma: no cover
            _TF_TUPLE_BLOCKS = False
    return _TF_TUPLE_BLOCKS


def hidden_of(out: object) -> Tensor:
    """The hidden states of a block's output (a tensor, or the first item of a tuple)."""
    return out if isinstance(out, Tensor) else out[0]  # type: ignore[index]


def find_stack(model: nn.Module, names: Iterable[str]) -> tuple[str, list[str]]:
    """The ``nn.ModuleList`` of numbered blocks holding ``names``: (its name, block names)."""
    parents = {block_of(n).rpartition(".")[0] for n in names}  # type: ignore[union-attr]
    if len(parents) != 1:
        raise ConfigError(
            f"layers to compress lie in {len(parents)} block stacks {sorted(parents)}; "
            "streaming needs one stack of numbered blocks (use include/exclude to pick one)"
        )
    stack = parents.pop()
    mods = model.get_submodule(stack)
    if not isinstance(mods, nn.ModuleList):
        raise ConfigError(f"{stack} is a {type(mods).__name__}, not an nn.ModuleList of blocks")
    return stack, [f"{stack}.{i}" for i in range(len(mods))]


class ActivationCache:
    """Per-batch hidden states, kept in CPU memory (``"cpu"``), on the compute device
    (``"device"``) or as safetensors files in a temporary directory (``"disk"``)."""

    def __init__(self, where: str = "cpu", device: torch.device | str = "cpu", root: str = ""):
        if where not in ("cpu", "disk", "device"):
            raise ConfigError(f"cache must be 'cpu', 'disk' or 'device', got {where!r}")
        self.where, self.device = where, torch.device(device)
        self._items: dict[int, Tensor] = {}
        self._tmp = tempfile.TemporaryDirectory(dir=root or None) if where == "disk" else None
        self._shapes: dict[int, tuple[tuple[int, ...], torch.dtype]] = {}

    def _path(self, i: int) -> Path:
        return Path(self._tmp.name) / f"{i}.safetensors"  # type: ignore[union-attr]

    def put(self, i: int, t: Tensor) -> None:
        t = t.detach()
        self._shapes[i] = (tuple(t.shape), t.dtype)
        if self.where == "disk":
            from safetensors.torch import save_file

            save_file({"h": t.contiguous().cpu()}, str(self._path(i)))
        else:
            self._items[i] = t.to("cpu" if self.where == "cpu" else self.device, copy=False)

    def get(self, i: int) -> Tensor:
        if self.where == "disk":
            from safetensors.torch import load_file

            return load_file(str(self._path(i)))["h"].to(self.device)
        return self._items[i].to(self.device)

    def __len__(self) -> int:
        return len(self._shapes)

    def copy(self) -> ActivationCache:
        """An independent cache with the same contents (same placement)."""
        root = str(Path(self._tmp.name).parent) if self._tmp else ""
        new = ActivationCache(self.where, self.device, root)
        for i in range(len(self)):
            new.put(i, self.get(i).clone() if self.where != "disk" else self.get(i))
        return new

    def nbytes(self) -> int:
        """Bytes of the cached hidden states (wherever they are)."""
        return sum(
            torch.Size(s).numel() * torch.empty((), dtype=d).element_size()
            for s, d in self._shapes.values()
        )


class _Stop(Exception):
    pass


class _Recorder(nn.Module):
    """Stands in for block ``index`` during :func:`capture`: records its call, passes through."""

    def __init__(self, block: nn.Module, index: int, sink: Callable, last: bool) -> None:
        super().__init__()
        self.__dict__["_block"] = block  # not a submodule: model.to() leaves it in place
        self.index, self.sink, self.last = index, sink, last

    def __getattr__(self, name: str):  # block attributes a model may read (attention_type)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_block"], name)

    def forward(self, *args, **kwargs):
        if args:
            hidden, rest = args[0], args[1:]
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        self.sink(self.index, hidden, rest, kwargs)
        if self.last:
            raise _Stop
        return (hidden,) if _blocks_return_tuples() else hidden


def _map(obj: object, fn: Callable[[Tensor], Tensor]) -> object:
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(_map(o, fn) for o in obj)
    if isinstance(obj, list):
        return [_map(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: _map(v, fn) for k, v in obj.items()}
    return obj


def _no_cache(obj: object) -> object:
    """KV-cache objects are never passed on (blocks run with ``use_cache=False``)."""
    return None if type(obj).__name__.endswith("Cache") else obj


def model_forward(model: nn.Module, batch: Tensor | dict, device: torch.device) -> object:
    """``model(batch)`` on ``device`` with the KV cache off."""
    if isinstance(batch, dict):
        return model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False)
    return model(batch.to(device), use_cache=False)


class BlockStream:
    """The blocks of ``model`` (the stack holding ``names``) as separately runnable steps.

    ``device``: where blocks run (default: where the model's first parameter is).
    ``cache``: where hidden states are kept (see :class:`ActivationCache`).
    """

    def __init__(
        self,
        model: nn.Module,
        names: Sequence[str],
        device: torch.device | str | None = None,
        cache: str = "cpu",
        cache_dir: str = "",
    ) -> None:
        self.model = model
        self.stack, self.blocks = find_stack(model, names)
        self.home = next(model.parameters()).device
        self.device = torch.device(device) if device else self.home
        self.cache_kind, self.cache_dir = cache, cache_dir
        self.calls: list[list[tuple[tuple, dict]]] = []  # [batch][block] -> (args, kwargs)
        self.forwards = 0

    def new_cache(self) -> ActivationCache:
        return ActivationCache(self.cache_kind, self.device, self.cache_dir)

    @torch.no_grad()
    def capture(self, batches: Iterable[Tensor | dict]) -> ActivationCache:
        """First-block inputs of every batch (and every block's other arguments)."""
        stack = self.model.get_submodule(self.stack)
        originals = list(stack)
        first = self.new_cache()
        batch_calls: list[tuple[tuple, dict]] = []
        seen: dict[int, object] = {}

        def keep(obj: object) -> object:
            return _map(
                obj,
                lambda t: seen.setdefault(id(t), t.detach().to("cpu")),  # type: ignore[arg-type]
            )

        def sink(i: int, hidden: Tensor, args: tuple, kwargs: dict) -> None:
            if i == 0:
                first.put(len(self.calls), hidden)
            args = tuple(keep(_no_cache(a)) for a in args)
            kwargs = {k: keep(_no_cache(v)) for k, v in kwargs.items()}
            batch_calls.append((args, kwargs))

        for i, blk in enumerate(originals):
            stack[i] = _Recorder(blk, i, sink, last=i == len(originals) - 1)
        try:
            self.model.to(self.device)
            for batch in batches:
                batch_calls, seen = [], {}
                with contextlib.suppress(_Stop):
                    model_forward(self.model, batch, self.device)
                if len(batch_calls) != len(originals):
                    raise RuntimeError(
                        f"{len(batch_calls)} of {len(originals)} blocks ran in the forward pass"
                    )
                self.calls.append(batch_calls)
        finally:
            for i, blk in enumerate(originals):
                stack[i] = blk
            self.model.to(self.home)
        return first

    def block(self, i: int) -> nn.Module:
        return self.model.get_submodule(self.blocks[i])

    def forward(self, block: nn.Module, i: int, b: int, hidden: Tensor) -> Tensor:
        """Block ``block`` (as block ``i``) on batch ``b`` with input ``hidden``."""
        args, kwargs = self.calls[b][i]
        dev = hidden.device

        def to_dev(t: Tensor) -> Tensor:
            return t.to(dev)

        self.forwards += 1
        out = block(hidden, *_map(args, to_dev), **_map(kwargs, to_dev))  # type: ignore[arg-type]
        return hidden_of(out)


def relative_name(block_name: str, layer: str) -> str:
    """``model.layers.3.mlp.up_proj`` relative to ``model.layers.3`` -> ``mlp.up_proj``."""
    return re.sub(rf"^{re.escape(block_name)}\.", "", layer)

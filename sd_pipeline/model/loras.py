"""LoRA adapters chosen per request, applied per batch row inside one shared denoiser call.

Adapters are loaded into the served pipeline with diffusers' own loader (``load_lora_weights``:
kohya / AUTOMATIC1111 and diffusers / PEFT files alike) under their names, and PEFT's own
application of them is switched off: the shared weights are never merged or changed. Each LoRA
layer's forward is replaced by ours: its base layer, then, for each row of the batch, the
low-rank deltas of the adapters that row's request chose, times that request's weight (PEFT's
mixed-batch forward, with several adapters per row and a weight each), in the denoiser and the
text encoders alike. Outside ``rows`` a LoRA layer is its base layer.

Loading is split so that running requests do not wait for a file: ``prefetch`` (called when a
request is submitted) reads the file and hashes it on a thread of its own, and the engine admits
the request once that is done; only diffusers' conversion and the injection into the model run
between two steps, from the page cache. The loaded adapters are kept on the device, least
recently used first out when their bytes pass ``cache_bytes`` (adapters the engine's current
requests use are never evicted).
"""

from __future__ import annotations

import functools
import logging
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft.tuners.lora.layer import LoraLayer
from torch.nn import functional

from sd_pipeline.contract.errors import InvalidRequestError, OutOfMemoryError
from sd_pipeline.contract.loras import LoraChoice
from sd_pipeline.loras.folder import FetchedLora
from sd_pipeline.loras.sources import LoraSource
from sd_pipeline.model.failures import is_out_of_memory, raise_if_device_failed

logger = logging.getLogger(__name__)
RowChoices = tuple[LoraChoice, ...]  # one batch row's adapters


@dataclass(frozen=True)
class _Group:
    """The rows of a batch one adapter applies to (None: every row) and each row's weight."""

    rows: torch.Tensor | None
    weights: torch.Tensor | float


@dataclass(frozen=True)
class _OnePerRow:
    """A batch whose rows each have at most one adapter: row ``i`` gets ``names[slot[i]]`` times
    ``weight[i]`` (0 for a row without). Lets a layer apply every adapter in two batched matmuls."""

    names: tuple[str, ...]
    slot: torch.Tensor
    weight: torch.Tensor


class LoraAdapters:
    """The adapters loaded into one pipeline, and which batch rows each applies to."""

    def __init__(self, pipeline: Any, source: LoraSource | None, *, cache_bytes: int, observer: Any = None) -> None:
        self.pipeline = pipeline
        self.source = source
        self.cache_bytes = cache_bytes
        self.observer = observer
        self._loaded: OrderedDict[str, int] = OrderedDict()  # name -> bytes, least recently used first
        self._hashes: dict[str, str] = {}  # name -> AUTOMATIC1111's short hash of the file loaded
        self._plan: dict[str, _Group] | None = None
        self._stacks: dict[int, tuple[tuple[str, ...], _Stacked | None]] = {}  # layer id -> the last set stacked
        self._low_ranks: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, float] | None] = {}
        self._uniform: tuple[str, float] | None = None  # the one adapter and weight of every row, if so
        self._one_per_row: _OnePerRow | None = None
        self._reading: dict[str, Future[FetchedLora]] = {}  # name -> its file found and hashed off the step loop
        self._reader: ThreadPoolExecutor | None = None
        self._read_done = threading.Event()

    @property
    def loaded_bytes(self) -> int:
        return sum(self._loaded.values())

    def loaded(self) -> list[str]:
        return list(self._loaded)

    # Loading.
    def prefetch(self, choices: Sequence[LoraChoice]) -> None:
        """Start finding (downloading from the store if need be) and hashing the chosen adapters'
        files (any thread). A loaded adapter's file is looked at too: when its source now has
        another version, ``ensure`` loads that one once no running request uses the old."""
        if self.source is None:
            return
        for choice in choices:
            if choice.name in self._reading:
                continue
            if self._reader is None:
                self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora-read")
            future = self._reader.submit(self.source.fetch, choice.name)
            future.add_done_callback(lambda _: self._read_done.set())
            self._reading[choice.name] = future

    def ready(self, choices: Sequence[LoraChoice]) -> bool:
        """Whether loading the chosen adapters now needs no file read (a failed read is ready: loading says why)."""
        return all(
            choice.name in self._loaded or choice.name not in self._reading or self._reading[choice.name].done()
            for choice in choices
        )

    def wait_for_reads(self, timeout: float) -> None:
        """Block until some file read finishes (or ``timeout``): an engine with nothing else to do."""
        self._read_done.wait(timeout)
        self._read_done.clear()

    def close(self) -> None:
        if self._reader is not None:
            self._reader.shutdown(wait=False, cancel_futures=True)

    def ensure(self, choices: Sequence[LoraChoice], *, keep: set[str]) -> None:
        """Load each chosen adapter that is not loaded yet, or whose source has a new version that
        no running request (``keep``) uses, evicting unused ones past the cache size. An adapter
        that cannot serve this model raises ``InvalidRequestError`` naming the prompt."""
        running = keep
        keep = keep | {choice.name for choice in choices}
        for choice in choices:
            if choice.name in self._loaded and not self._replaced(choice.name, running):
                self._loaded.move_to_end(choice.name)
                self._count("lora_cache_hit")
                continue
            try:
                self._load(choice.name)
            except OutOfMemoryError:
                if not self._evict(keep, limit=0):
                    raise
                self._load(choice.name)  # once more, with every adapter no request uses unloaded
        self._evict(keep)

    def _replaced(self, name: str, running: set[str]) -> bool:
        """Whether loaded adapter ``name`` was unloaded for its source's new version (finished
        reading, no running request on the old one); a failed look keeps the loaded one."""
        reading = self._reading.get(name)
        if reading is None or not reading.done():
            return False
        if reading.exception() is not None or reading.result().short_hash == self._hashes.get(name):
            self._reading.pop(name)
            return False
        if name in running:
            return False  # the new version waits until the old one's requests are done
        logger.info("LoRA %s has a new version (%s): loading it", name, reading.result().short_hash)
        self._unload(name)
        self._loaded.pop(name)
        return True  # _load reads the new version's file from the finished reading

    def _load(self, name: str) -> None:
        if self.source is None:
            raise InvalidRequestError("prompt", f"names LoRA {name!r}, but this service has no LoRA folder (LORA_DIR)")
        reading = self._reading.pop(name, None)
        started = time.perf_counter()
        self._stacks.clear()
        self._low_ranks.clear()
        path: Path | None = None
        try:
            fetched = reading.result() if reading is not None else self.source.fetch(name)
            path, self._hashes[name] = fetched.path, fetched.short_hash
            self.pipeline.load_lora_weights(str(path), adapter_name=name)
            layers = self._layers_of(name)
            _check_served(name, layers, list(self._lora_layers()))
        except Exception as error:
            self._unload(name)
            self._route_forwards()  # a failed load may have switched PEFT's own application back on
            if isinstance(error, InvalidRequestError):
                raise
            if is_out_of_memory(error):
                _free_device_memory()
                raise OutOfMemoryError(f"out of GPU memory loading LoRA {name!r}; try again in a moment") from None
            raise_if_device_failed(error)
            reason = _why_not_loaded(error, path)
            raise InvalidRequestError("prompt", f"LoRA {name!r} cannot be used with this model: {reason}") from None
        size = sum(
            parameter.numel() * parameter.element_size()
            for layer in layers
            for part in (layer.lora_A[name], layer.lora_B[name])
            for parameter in part.parameters()
        )
        self._route_forwards()
        self._loaded[name] = size
        self._count("lora_load", seconds=time.perf_counter() - started, size=size)
        logger.info("LoRA %s loaded: %d layers, %.1f MB", name, len(layers), size / 1e6)

    def _evict(self, keep: set[str], *, limit: int | None = None) -> list[str]:
        """Unload the least recently used adapters not in ``keep`` while their bytes pass ``limit``
        (default: the cache's size); the names unloaded."""
        limit = self.cache_bytes if limit is None else limit
        unloaded = []
        for name in list(self._loaded):
            if self.loaded_bytes <= limit:
                break
            if name not in keep:
                self._unload(name)
                self._loaded.pop(name)
                unloaded.append(name)
                logger.info("LoRA %s unloaded to keep loaded adapters within %d bytes", name, limit)
        if unloaded:
            _free_device_memory()
        self._count("lora_cache", size=self.loaded_bytes, adapters=len(self._loaded))
        return unloaded

    def _stacked_for(self, layer: LoraLayer, names: tuple[str, ...]) -> _Stacked | None:
        """``layer``'s adapters ``names`` stacked, kept while the same set is asked for (a copy of
        those adapters' weights for this layer; a load or unload forgets every stack)."""
        kept = self._stacks.get(id(layer))
        if kept is None or kept[0] != names:
            kept = (names, _stacked(layer, names))
            self._stacks[id(layer)] = kept
        return kept[1]

    def _unload(self, name: str) -> None:
        self._stacks.clear()
        self._low_ranks.clear()
        try:
            self.pipeline.delete_adapters([name])
        except Exception:  # noqa: BLE001 - a failed load may have left nothing to delete
            logger.debug("nothing of LoRA %s to delete", name)

    def _layers_of(self, name: str) -> list[LoraLayer]:
        return [layer for layer in self._lora_layers() if name in layer.lora_A]

    def _lora_layers(self) -> Iterator[LoraLayer]:
        for component in self.pipeline.components.values():
            if isinstance(component, torch.nn.Module):
                yield from (module for module in component.modules() if isinstance(module, LoraLayer))

    def _route_forwards(self) -> None:
        """Switch PEFT's own application off on every LoRA layer and route its forward through ours
        (once per layer): its base layer, then each row's deltas. A forward of the instance's own,
        not a forward hook: no hook dispatch and no PEFT forward on every call of every LoRA layer."""
        for layer in self._lora_layers():
            layer.enable_adapters(False)
            if "forward" not in vars(layer):
                layer.forward = functools.partial(self._forward, layer)  # type: ignore[attr-defined]

    def _forward(self, layer: LoraLayer, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        output: torch.Tensor = layer.base_layer(x, *args, **kwargs)
        if self._plan is None:
            return output
        uniform = self._uniform
        if uniform is not None:  # every row the same one adapter at one weight (a lone request)
            low = self._plain_low_rank(layer, uniform[0])
            if low is not None:
                down, up, scaling = low
                hidden = functional.linear(x if x.dtype == down.dtype else x.to(down.dtype), down)
                return torch.add(output, functional.linear(hidden, up).to(output.dtype), alpha=uniform[1] * scaling)
        return self._add_deltas(layer, (x,), output)

    def _plain_low_rank(self, layer: LoraLayer, name: str) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """Adapter ``name``'s down and up weights and scaling in ``layer`` when both are bias-free
        linear layers (None otherwise, or when the adapter has no part in this layer); kept until
        the next load or unload."""
        key = (id(layer), name)
        if key not in self._low_ranks:
            down, up = (layer.lora_A[name], layer.lora_B[name]) if name in layer.lora_A else (None, None)
            plain = _bias_free_linear(down, up)
            self._low_ranks[key] = (_weight(down), _weight(up), layer.scaling[name]) if plain else None  # type: ignore[arg-type]
        return self._low_ranks[key]

    def _count(self, fact: str, **fields: Any) -> None:
        if self.observer is not None and hasattr(self.observer, fact):
            getattr(self.observer, fact)(**fields)

    def hashes(self, choices: Sequence[LoraChoice]) -> str:
        """The chosen adapters' hashes as PNG parameters carry them: ``NAME: HASH, NAME: HASH``."""
        return ", ".join(f"{choice.name}: {self._hashes.get(choice.name, '')}" for choice in choices)

    # Applying.
    @contextmanager
    def rows(self, choices: Sequence[RowChoices], device: torch.device) -> Iterator[None]:
        """Within: each row ``i`` of every LoRA layer's batch gets ``choices[i]``'s adapters."""
        plan: dict[str, tuple[list[int], list[float]]] = {}
        for row, chosen in enumerate(choices):
            for choice in chosen:
                rows, weights = plan.setdefault(choice.name, ([], []))
                rows.append(row)
                weights.append(choice.weight)
        groups = {
            name: _Group(
                rows=None if rows == list(range(len(choices))) else torch.tensor(rows, device=device),
                weights=weights[0] if len(set(weights)) == 1 else torch.tensor(weights, device=device),
            )
            for name, (rows, weights) in plan.items()
        }
        one_per_row = None
        if len(plan) > 1 and all(len(chosen) <= 1 for chosen in choices):
            names = tuple(plan)
            slot = [names.index(chosen[0].name) if chosen else 0 for chosen in choices]
            weight = [chosen[0].weight if chosen else 0.0 for chosen in choices]
            one_per_row = _OnePerRow(names, torch.tensor(slot, device=device), torch.tensor(weight, device=device))
        with self._applying(groups, one_per_row):
            yield

    @contextmanager
    def _applying(self, groups: dict[str, _Group], one_per_row: _OnePerRow | None = None) -> Iterator[None]:
        self._plan, self._one_per_row, self._uniform = groups or None, one_per_row, _uniform(groups)
        try:
            yield
        finally:
            self._plan, self._one_per_row, self._uniform = None, None, None

    def _add_deltas(self, layer: LoraLayer, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        plan = self._plan
        if plan is None:
            return output
        x = args[0]
        gathered = self._one_per_row
        if gathered is not None and x.dim() >= 2 and (stacked := self._stacked_for(layer, gathered.names)):
            return output + _gathered_deltas(stacked, gathered, x).to(output.dtype)
        for name, group in plan.items():
            if name not in layer.lora_A:
                continue
            rows = x if group.rows is None else x[group.rows]
            delta = _low_rank(layer.lora_A[name], layer.lora_B[name], rows).to(output.dtype)
            weights = group.weights
            if isinstance(weights, torch.Tensor):
                delta = delta * (weights.to(delta.dtype) * layer.scaling[name]).view(-1, *([1] * (delta.dim() - 1)))
                scale = 1.0
            else:
                scale = weights * layer.scaling[name]
            if group.rows is None:
                output = torch.add(output, delta, alpha=scale)
            else:
                output = output.index_add(0, group.rows, delta, alpha=scale)
        return output


@dataclass(frozen=True)
class _Stacked:
    """One layer's adapters ``names`` stacked for gathering by row: down (adapters x rank x in) and
    up (adapters x out x rank) matrices, the up ones already times their alpha / rank."""

    names: tuple[str, ...]
    down: torch.Tensor
    up: torch.Tensor


def _uniform(groups: dict[str, _Group]) -> tuple[str, float] | None:
    """The one adapter and weight every row of the batch carries, if it is so (a lone request)."""
    if len(groups) != 1:
        return None
    ((name, group),) = groups.items()
    if group.rows is not None or isinstance(group.weights, torch.Tensor):
        return None
    return name, group.weights


def _bias_free_linear(*modules: torch.nn.Module | None) -> bool:
    """Whether every one of ``modules`` is a linear layer without a bias (an adapter's plain down/up)."""
    return all(isinstance(module, torch.nn.Linear) and module.bias is None for module in modules)


def _stacked(layer: LoraLayer, names: tuple[str, ...]) -> _Stacked | None:
    """``names`` stacked for ``layer``; None unless each is a bias-free linear LoRA there, all of one rank."""
    if any(name not in layer.lora_A for name in names):
        return None
    downs = [layer.lora_A[name] for name in names]
    ups = [layer.lora_B[name] for name in names]
    plain = _bias_free_linear(*downs, *ups)
    if not plain or len({_weight(down).shape[0] for down in downs}) != 1:
        return None
    scaled_ups = [_weight(up) * layer.scaling[name] for up, name in zip(ups, names, strict=True)]
    return _Stacked(names, torch.stack([_weight(down) for down in downs]), torch.stack(scaled_ups))


def _gathered_deltas(stacked: _Stacked, rows: _OnePerRow, x: torch.Tensor) -> torch.Tensor:
    """Every row's own adapter's delta, all adapters at once: each row's down and up matrices
    gathered from the stacked adapters, then two batched matmuls."""
    down, up = stacked.down[rows.slot], stacked.up[rows.slot]  # rows x rank x in, rows x out x rank
    flat = x.reshape(x.shape[0], -1, x.shape[-1]).to(down.dtype)  # rows x tokens x in
    delta = torch.bmm(torch.bmm(flat, down.transpose(1, 2)), up.transpose(1, 2))
    scaled: torch.Tensor = (delta * rows.weight.to(delta.dtype).view(-1, 1, 1)).reshape(*x.shape[:-1], delta.shape[-1])
    return scaled


def _weight(module: torch.nn.Module) -> torch.Tensor:
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return weight


def _low_rank(down: torch.nn.Module, up: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``up(down(x))`` in the adapter's dtype; linear layers called as functions (no module call overhead)."""
    weight = _weight(down)
    x = x if x.dtype == weight.dtype else x.to(weight.dtype)
    if isinstance(down, torch.nn.Linear) and isinstance(up, torch.nn.Linear):
        return functional.linear(functional.linear(x, down.weight, down.bias), up.weight, up.bias)
    result: torch.Tensor = up(down(x))
    return result


def _check_served(name: str, layers: list[LoraLayer], every_layer: list[LoraLayer]) -> None:
    """An adapter whose layers all loaded as plain LoRA; anything else is refused naming what it is."""
    if any(name in getattr(layer, "lora_embedding_A", {}) for layer in every_layer):
        raise InvalidRequestError("prompt", f"LoRA {name!r} changes token embeddings, which is not served")
    if not layers:
        raise InvalidRequestError("prompt", f"LoRA {name!r} has no layer that matches this model (made for another?)")
    for layer in layers:
        if layer.use_dora.get(name) or name in getattr(layer, "lora_variant", {}):
            raise InvalidRequestError("prompt", f"LoRA {name!r} is a DoRA or other LoRA variant, which is not served")


def _free_device_memory() -> None:
    """Hand the unloaded adapters' device memory back (CUDA's caching allocator keeps it otherwise)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        torch.cuda.empty_cache()


def _why_not_loaded(error: Exception, path: Path | None) -> str:
    """A loader error in a user's words, without the server's paths."""
    text = str(error)
    if "size mismatch" in text:
        return "its layers' shapes differ from this model's (is it made for another model?)"
    unreadable = (OSError, struct.error, UnicodeDecodeError)
    if "Unable to load weights" in text or "header" in text.lower() or isinstance(error, unreadable):
        return "its file is not a readable .safetensors file"
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(error).__name__)
    return (first.replace(str(path.parent), "LORA_DIR") if path is not None else first)[:300]

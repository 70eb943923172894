"""Tensor-parallel runs of the reference model with torch.distributed, started by torchrun.

``torchrun --nproc-per-node N -m ckpt_doctor smoke-generate ...`` starts N processes; each
holds 1/N of every layer's heads and FFN width, split as Meta's ``consolidated.NN.pth`` shards
split them (docs/model.md):

- column-split along dim 0 (each process computes its own outputs): wq wk wv w1 w3, output
  (its rows of the vocabulary), and LLaMA-Adapter v2's wq/wk/wv/w1/w3 biases and wo/w2 input
  scales, as upstream's chat_demo.py shards them;
- row-split along dim 1 (partial products, summed over the processes): wo w2, and the token
  embedding's columns (gathered after the lookup);
- per head: the adapter gates [1, H, 1, 1] (dim 1);
- replicated: the norms, the adapter prompt (it goes through each process's own wk / wv, so
  each computes its own heads' prompt keys and values), the other biases and scales.

When the Meta directory holds as many shards as there are processes, process r maps only
``consolidated.{r:02d}.pth``; otherwise (another shard count, HF / safetensors) it slices
its part out of the whole tensors, reading only that part where the layout allows. NCCL on
GPUs, gloo on the CPU. Every process computes the same logits (the reductions give each the
same sums) and takes rank 0's sampled tokens, so they stay in step; rank 0 prints the report.
"""

from __future__ import annotations

import atexit
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ckpt_doctor import keys
from ckpt_doctor.errors import InternalError, UsageError
from ckpt_doctor.handles import TensorHandle
from ckpt_doctor.reader import Checkpoint, find_tokenizer, open_checkpoint

# LLaMA-Adapter v2's tuned vectors: the ones that belong to a column-split output or to a
# row-split input are this process's slice (dim 0); the others are whole on every process.
_SPLIT_VECTORS = ("wq_bias", "wk_bias", "wv_bias", "wo_scale", "w1_bias", "w3_bias", "w2_scale")
ROW_CHUNK_BYTES = 64 << 20  # slicing columns out of a whole tensor reads this much at a time


def split_dim(name: str) -> int | None:
    """The dim along which ``name`` (a model parameter) is split over the processes."""
    last = name.rsplit(".", 1)[-1]
    if last in _SPLIT_VECTORS:
        return 0
    if last == "gate":
        return 1  # [1, H, 1, 1]: the heads
    if name == "adapter_query.weight":
        return None
    return keys.meta_shard_dim(name)


@dataclass
class Shard:
    """This process's part of a tensor-parallel run."""

    rank: int
    world: int
    backend: str
    local_rank: int = 0
    files: list[str] = field(default_factory=list)  # the files this process maps
    mode: str = "sliced"  # "own shard": consolidated.{rank}.pth alone; "sliced": from the whole
    own: dict[str, TensorHandle] = field(default_factory=dict)  # own-shard base tensors
    view: dict[str, TensorHandle] = field(default_factory=dict)  # their whole-model stand-ins

    def device(self, device: torch.device) -> torch.device:
        return torch.device("cuda", self.local_rank) if device.type == "cuda" else device

    def check(self, args: Any) -> None:
        """The model splits evenly over the processes, or the run is refused up front."""
        sizes = {"heads": args.n_heads, "ffn width": args.ffn_hidden, "dim": args.dim}
        sizes["vocabulary"] = args.vocab_size
        uneven = [f"{k} {v}" for k, v in sizes.items() if v % self.world]
        if uneven:
            raise UsageError(
                f"{self.world} processes cannot split this model evenly ({', '.join(uneven)})",
                hint="run with a process count that divides the heads, the FFN width and the "
                "vocabulary (Meta's own shard count does)",
            )

    def local_handle(
        self, name: str, h: TensorHandle, full: tuple[int, ...] | None
    ) -> TensorHandle:
        """This process's part of ``h`` (a whole-model tensor named ``name``), lazily."""
        if self.own and self.view.get(name) is h:
            return self.own[name]  # the base's own shard: already this process's part
        dim = split_dim(name)
        if dim is None or full is None or h.shape != full or dim >= len(h.shape):
            return h
        return _sliced(h, dim, self.rank, self.world)

    def localize(
        self, state: dict[str, torch.Tensor], full: dict[str, tuple[int, ...]]
    ) -> dict[str, torch.Tensor]:
        """Whole-model tensors of ``state`` cut to this process's part (the ones made whole
        on the way: broadcast gates, stacked prompts, initial values)."""
        out = {}
        for name, t in state.items():
            dim = split_dim(name)
            if dim is None or tuple(t.shape) != full.get(name) or dim >= t.dim():
                out[name] = t
                continue
            n = t.shape[dim] // self.world
            out[name] = t.narrow(dim, self.rank * n, n).clone()
        return out

    def connect(self, model: Any) -> None:
        """Wire the model's reductions to the process group."""
        for layer in model.layers:
            layer.attention.reduce = layer.feed_forward.reduce = self.all_reduce
        model.gather, model.agree = self.gather_last, self.from_rank0

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        t = t.contiguous()
        dist.all_reduce(t)
        return t

    def gather_last(self, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        t = t.contiguous()
        # Plain tensors, not inference ones: torch < 2.5 refuses gloo's write into the latter.
        with torch.inference_mode(False):
            parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t)
        return torch.cat(parts, dim=-1)

    def from_rank0(self, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        t = t.contiguous()
        dist.broadcast(t, src=0)
        return t

    def to_json(self) -> dict[str, Any]:
        """How the run was split, with every process's files (collected on every rank)."""
        import torch.distributed as dist

        mine = {"rank": self.rank, "mode": self.mode, "files": self.files}
        ranks: list[Any] = [None] * self.world
        dist.all_gather_object(ranks, mine)
        return {"world_size": self.world, "backend": self.backend, "ranks": ranks}


def join(device: str) -> Shard | None:
    """This process's Shard when torchrun started several (WORLD_SIZE > 1), else None. Joins
    the process group: NCCL when the run is on CUDA, gloo on the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return None
    import torch.distributed as dist

    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    backend = "nccl" if cuda else "gloo"
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world)
        atexit.register(_leave)
    return Shard(rank, world, backend, local)


def refuse(command: str) -> None:
    """Commands other than smoke-generate run in one process: under torchrun each process
    would run the whole command and print its own report."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise UsageError(
            f"{command} runs in one process, but torchrun started {os.environ['WORLD_SIZE']}",
            hint="run it without torchrun; torchrun runs smoke-generate tensor-parallel",
        )


def _leave() -> None:
    """Destroy the group before exit (without it, gloo may abort at exit: "terminate called
    without an active exception"). Gloo's worker threads may still be freeing the last
    collective's tensors, which takes the GIL, while destroy joins them holding it (a deadlock
    seen with torch 2.4, 1 run in 4): the pause lets them finish first."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    if dist.get_backend() == "gloo":
        time.sleep(0.2)
    dist.destroy_process_group()


def open_base(path: Path, shard: Shard | None, *, trust_pickle: bool = False) -> Checkpoint:
    """The base as this process sees it (the whole of it without ``shard``). A Meta directory
    with one shard per process: only ``consolidated.{rank:02d}.pth`` is opened, behind
    stand-ins with the whole model's names and shapes (for the model's facts and checks;
    reading their values is an error). Anything else opens whole, and loading slices this
    process's part out of it."""
    path = Path(path)
    if shard is None:
        return open_checkpoint(path, trust_pickle=trust_pickle)
    shards = sorted(path.glob("consolidated.*.pth")) if path.is_dir() else []
    if len(shards) != shard.world:
        ckpt = open_checkpoint(path, trust_pickle=trust_pickle)
        shard.files, shard.mode = [str(f) for f in ckpt.files], "sliced"
        return ckpt
    own_file = shards[shard.rank]
    own = open_checkpoint(own_file, trust_pickle=trust_pickle)  # params.json comes along
    for name, h in own.tensors.items():
        shape = list(h.shape)
        dim = keys.meta_shard_dim(name)
        if dim is not None:
            shape[dim] *= shard.world
        shard.view[name] = TensorHandle(name, tuple(shape), h.dtype, _refuse(name))
    shard.own = dict(own.tensors)
    shard.files, shard.mode = [str(own_file)], "own shard"
    view = Checkpoint(path, "meta-dir", dict(shard.view), files=[own_file], params=own.params)
    view.top_level_keys = list(shard.view)
    view.pickle_globals = own.pickle_globals
    view.tokenizer_path = find_tokenizer(path)
    view.notes = [*own.notes, f"tensor-parallel rank {shard.rank} of {shard.world}: "
                  f"{own_file.name} only"]  # fmt: skip
    return view


def _refuse(name: str) -> Callable[[], np.ndarray]:
    def values() -> np.ndarray:
        raise InternalError(
            f"{name}: a tensor-parallel process reads only its own shard's values",
            hint="a bug in ckpt-doctor: report it with the command line",
        )

    return values


def _sliced(h: TensorHandle, dim: int, rank: int, world: int) -> TensorHandle:
    """Part ``rank`` of ``world`` of ``h`` along ``dim``, read lazily: rows are read alone;
    columns are cut from bounded chunks of rows, never from a whole copy of the tensor."""
    n = h.shape[dim] // world
    lo, hi = rank * n, (rank + 1) * n
    shape = (*h.shape[:dim], n, *h.shape[dim + 1 :])
    if dim == 0:
        return TensorHandle(h.name, shape, h.dtype, lambda: h.rows(lo, hi))
    cut = (slice(None),) * dim + (slice(lo, hi),)
    row_bytes = max(1, h.nbytes // max(1, h.shape[0]))
    step = max(1, ROW_CHUNK_BYTES // row_bytes)

    def values() -> np.ndarray:
        pieces = [h.rows(a, min(a + step, h.shape[0]))[cut] for a in range(0, h.shape[0], step)]
        return np.ascontiguousarray(np.concatenate(pieces, axis=0))

    return TensorHandle(h.name, shape, h.dtype, values)

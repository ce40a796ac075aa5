"""An endless, reproducible, resumable stream of training batches, produced on the device.

Like DataLoader(shuffle=True, drop_last=True) with RandomHorizontalFlip, ToTensor and
Normalize(0.5, 0.5), but the uint8 data set lives on the device once and every random draw
comes from one torch.Generator on that device: no host-side randomness, no per-step copies
or syncs, and state_dict() captures everything needed to continue bit for bit.

For a data set too big for the device's memory, ``storage="host"`` keeps the uint8 images in host
memory instead: each batch is gathered on the host into pinned memory and copied to the device
asynchronously (one host sync per epoch, to bring the permutation over). The draws are the same, so
both storages yield the same batches and share one state (a run may resume with the other storage).
"""

from __future__ import annotations

import torch

from .images import LabeledImages

STORAGES = ("device", "host")


class BatchStream:
    """next() -> (x, y): x float32 N x C x H x W in [-1, 1], y int64 (N,), both on `device`.

    Each epoch is a fresh permutation of all images cut into batches of batch_size; the last
    incomplete batch is dropped. hflip flips each image left-right with probability 0.5.

    Data parallel (world_size > 1): batch_size is the GLOBAL batch. Every rank draws the same
    permutation and flips from the same seed and returns rank ``rank``'s contiguous slice of
    batch_size // world_size images of each global batch, so the union over ranks is exactly the
    single-process batch, every rank's generator stays identical (one state resumes them all),
    and the state does not depend on the world size (a run may resume on another rank count).
    """

    def __init__(self, data: LabeledImages, batch_size: int, seed: int = 0, hflip: bool = False,
                 device: str | torch.device = "cpu", rank: int = 0, world_size: int = 1, storage: str = "device"):
        n = len(data)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if batch_size > n:
            raise ValueError(f"batch_size {batch_size} is larger than the data set ({n} images)")
        if not isinstance(world_size, int) or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} (the global batch) is not divisible by the "
                             f"world size {world_size}")
        self.rank, self.world_size = int(rank), int(world_size)
        self.local_batch_size = batch_size // world_size
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.hflip = bool(hflip)
        self.seed = int(seed)
        self.num_images = n
        if storage not in STORAGES:
            raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
        self.storage = storage
        self.labels = torch.tensor(data.labels, dtype=torch.int64, device=self.device)
        if storage == "device":
            # N x C x H x W uint8, copied to the device once (a copy: never aliases the numpy arrays).
            self.images = torch.tensor(data.images, device=self.device).permute(0, 3, 1, 2).contiguous()
        else:
            # N x H x W x C uint8 on the host, as loaded (a copy, so later edits of the arrays cannot leak in)
            self.images = torch.tensor(data.images)
        self._pin = self.device.type == "cuda"
        # host storage: the epoch's permutation on the host, and the device tensor it was copied from
        self._perm_host: torch.Tensor | None = None
        self._perm_host_of: torch.Tensor | None = None
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(self.seed)
        self.perm: torch.Tensor | None = None  # the current epoch's permutation (drawn lazily)
        self.pos = 0  # next unread position in perm
        self.epoch = 0  # index of the epoch perm belongs to

    @property
    def batches_per_epoch(self) -> int:
        return self.num_images // self.batch_size

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.batch_size
        if self.perm is None or self.pos + b > self.num_images:
            if self.perm is not None:
                self.epoch += 1
            self.perm = torch.randperm(self.num_images, generator=self.generator, device=self.device)
            self.pos = 0
        idx = self.perm[self.pos:self.pos + b]
        self.pos += b
        part = None
        if self.world_size > 1:  # this rank's slice of the global batch
            lb = self.local_batch_size
            part = slice(self.rank * lb, (self.rank + 1) * lb)
            idx = idx[part]
        x = self._gather(idx, part)
        y = self.labels.index_select(0, idx)
        if self.hflip:  # on the uint8 batch: a quarter of the bytes of the float one
            flip = torch.rand(b, generator=self.generator, device=self.device) < 0.5  # global: ranks agree
            if part is not None:
                flip = flip[part]
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
        # ToTensor then Normalize(0.5, 0.5), in the same order of float operations as torchvision.
        return x.float().div_(255.0).sub_(0.5).div_(0.5), y

    __next__ = next

    def _gather(self, idx: torch.Tensor, part: slice | None) -> torch.Tensor:
        """The uint8 N x C x H x W images at ``idx`` (this rank's part of the global batch), on the device."""
        if self.storage == "device":
            return self.images.index_select(0, idx)
        if self._perm_host_of is not self.perm:  # a new epoch (or a restored state)
            self._perm_host, self._perm_host_of = self.perm.cpu(), self.perm  # the one host sync per epoch
        lo = self.pos - self.batch_size
        host_idx = self._perm_host[lo:lo + self.batch_size]
        if part is not None:
            host_idx = host_idx[part]
        n, (h, w, c) = host_idx.numel(), self.images.shape[1:]
        staging = torch.empty((n, h, w, c), dtype=torch.uint8, pin_memory=self._pin)
        torch.index_select(self.images, 0, host_idx, out=staging)
        # the caching host allocator keeps the pinned block until this copy has finished
        x = staging.to(self.device, non_blocking=self._pin)
        return x.permute(0, 3, 1, 2).contiguous()

    def __iter__(self) -> "BatchStream":
        return self

    def state_dict(self) -> dict:
        return {
            "generator": self.generator.get_state(),
            "perm": None if self.perm is None else self.perm.cpu(),
            "pos": self.pos,
            "epoch": self.epoch,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "num_images": self.num_images,
            "hflip": self.hflip,
            "device_type": self.device.type,
        }

    def load_state_dict(self, state: dict) -> None:
        for key, mine in (("num_images", self.num_images), ("batch_size", self.batch_size), ("hflip", self.hflip)):
            if state[key] != mine:
                raise ValueError(f"stream state has {key}={state[key]!r} but this stream has {key}={mine!r}")
        if state["device_type"] != self.device.type:
            raise ValueError(f"stream state was saved on {state['device_type']!r}; its generator state "
                             f"cannot drive a generator on {self.device.type!r}")
        self.generator.set_state(state["generator"])
        self.perm = None if state["perm"] is None else state["perm"].to(self.device)
        self.pos = int(state["pos"])
        self.epoch = int(state["epoch"])
        self.seed = int(state["seed"])

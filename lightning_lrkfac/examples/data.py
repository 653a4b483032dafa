"""DataModules that need no download: sklearn's digits (embedded), mnist1d (generated),
generated token sequences, and CIFAR-10 from a local folder (torchvision, optional)."""

from __future__ import annotations

import functools

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset


def _tensor_dataset(x: np.ndarray, y: np.ndarray) -> TensorDataset:
    return TensorDataset(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.long))


def _split(x: np.ndarray, y: np.ndarray, fractions: tuple[float, float], seed: int):
    """Shuffle once with ``seed`` and cut into train / val / test by the given val and test fractions."""
    order = np.random.default_rng(seed).permutation(len(y))
    n_val, n_test = int(fractions[0] * len(y)), int(fractions[1] * len(y))
    parts = order[n_val + n_test :], order[:n_val], order[n_val : n_val + n_test]
    return [_tensor_dataset(x[p], y[p]) for p in parts]


class TensorDataModule(pl.LightningDataModule):
    """Train/val/test TensorDatasets with shuffled training batches (seeded)."""

    def __init__(self, batch_size: int, seed: int) -> None:
        super().__init__()
        self.batch_size, self.seed = batch_size, seed
        self.train_set = self.val_set = self.test_set = None

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=generator, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=1024)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=1024)


class DigitsDataModule(TensorDataModule):
    """sklearn's 8×8 handwritten digits (1,797 images, shipped with scikit-learn): 70/15/15 split.

    ``as_images=True`` yields 1×8×8 tensors for CNNs, else 64 features; pixels scaled to [0, 1].
    """

    def __init__(self, batch_size: int = 64, as_images: bool = False, seed: int = 0) -> None:
        super().__init__(batch_size, seed)
        self.as_images = as_images

    def setup(self, stage: str | None = None) -> None:
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        x = x / 16.0
        if self.as_images:
            x = x.reshape(-1, 1, 8, 8)
        self.train_set, self.val_set, self.test_set = _split(x, y, (0.15, 0.15), self.seed)


@functools.cache
def _mnist1d(num_samples: int) -> dict:
    """The mnist1d arrays, generated from templates (no download) once per process: Lightning calls ``setup`` at
    every fit, and generating 20,000 signals takes about 10 s."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as error:
        raise ImportError(
            "MNIST1DDataModule needs the mnist1d package (a dependency): `pip install mnist1d`"
        ) from error
    args = get_dataset_args()
    args.num_samples = num_samples
    return make_dataset(args)


class MNIST1DDataModule(TensorDataModule):
    """mnist1d (Greydanus 2020), generated locally from its templates: 40-long 1D signals, 10 classes.

    The package's own 80/20 train/test split is kept; 10% of train is held out for validation.
    """

    def __init__(self, batch_size: int = 128, num_samples: int = 5000, seed: int = 0) -> None:
        super().__init__(batch_size, seed)
        self.num_samples = num_samples

    def setup(self, stage: str | None = None) -> None:
        data = _mnist1d(self.num_samples)
        x, y = data["x"], data["y"]
        val = len(y) // 10
        self.train_set, self.val_set = _tensor_dataset(x[val:], y[val:]), _tensor_dataset(x[:val], y[:val])
        self.test_set = _tensor_dataset(data["x_test"], data["y_test"])


class ArithmeticSequencesDataModule(TensorDataModule):
    """Generated token sequences for language models: x_i = (start + step · i) mod vocab_size with a
    random start and step in [1, max_step], plus a share of uniformly random tokens (noise).

    Batches are (tokens, next tokens), each (batch, length − 1). After two clean tokens the
    rest of a sequence is predictable; 80/10/10 split.
    """

    def __init__(
        self,
        vocab_size: int = 32,
        length: int = 17,
        num_sequences: int = 4096,
        max_step: int = 7,
        noise: float = 0.05,
        batch_size: int = 64,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, seed)
        self.vocab_size, self.length, self.num_sequences = vocab_size, length, num_sequences
        self.max_step, self.noise = max_step, noise

    def setup(self, stage: str | None = None) -> None:
        generator = torch.Generator().manual_seed(self.seed)
        shape = (self.num_sequences, 1)
        start = torch.randint(0, self.vocab_size, shape, generator=generator)
        step = torch.randint(1, self.max_step + 1, shape, generator=generator)
        tokens = (start + step * torch.arange(self.length)) % self.vocab_size
        noisy = torch.rand(tokens.shape, generator=generator) < self.noise
        tokens = torch.where(noisy, torch.randint(0, self.vocab_size, tokens.shape, generator=generator), tokens)
        n_val = n_test = self.num_sequences // 10
        parts = tokens[n_val + n_test :], tokens[:n_val], tokens[n_val : n_val + n_test]
        self.train_set, self.val_set, self.test_set = [TensorDataset(p[:, :-1], p[:, 1:]) for p in parts]


class CIFAR10DataModule(pl.LightningDataModule):
    """CIFAR-10 from ``data_dir`` (torchvision's layout). Never downloads: a missing folder is an error."""

    def __init__(
        self, data_dir: str = "data/cifar10", batch_size: int = 128, num_workers: int = 4, seed: int = 0
    ) -> None:
        super().__init__()
        self.data_dir, self.batch_size, self.num_workers, self.seed = data_dir, batch_size, num_workers, seed

    def setup(self, stage: str | None = None) -> None:
        from .models import require_torchvision

        tv = require_torchvision()
        t = tv.transforms
        normalize = t.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
        train_tf = t.Compose([t.RandomCrop(32, padding=4), t.RandomHorizontalFlip(), t.ToTensor(), normalize])
        test_tf = t.Compose([t.ToTensor(), normalize])
        try:
            self.train_set = tv.datasets.CIFAR10(self.data_dir, train=True, transform=train_tf, download=False)
            self.test_set = tv.datasets.CIFAR10(self.data_dir, train=False, transform=test_tf, download=False)
        except RuntimeError as error:
            raise FileNotFoundError(
                f"CIFAR-10 was not found under data_dir={self.data_dir!r}. Put the extracted 'cifar-10-batches-py' "
                "folder there (this project never downloads data)."
            ) from error
        self.val_set = self.test_set

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.train_set,
            self.batch_size,
            shuffle=True,
            num_workers=self.num_workers,
            generator=generator,
            drop_last=True,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, 512, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, 512, num_workers=self.num_workers)


def python_docs_bytes() -> torch.Tensor:
    """The Python reference documentation every Python ships (``pydoc_data.topics``), as UTF-8 bytes (vocabulary 256).

    Topics in sorted order, separated by blank lines: about 0.47 MB of English prose and code, no download.
    """
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics))
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()


class TextWindows(torch.utils.data.Dataset):
    """(tokens, next tokens) windows of ``context`` bytes at fixed offsets of a byte stream."""

    def __init__(self, stream: torch.Tensor, offsets: torch.Tensor, context: int) -> None:
        self.stream, self.offsets, self.context = stream, offsets, context

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        window = self.stream[self.offsets[index] : self.offsets[index] + self.context + 1]
        return window[:-1], window[1:]


class PythonDocsDataModule(TensorDataModule):
    """Byte-level language modelling on the Python reference documentation (:func:`python_docs_bytes`).

    A fixed split of the stream: the first 90% trains, the next 5% validates, the last 5% tests. Training
    windows start at random offsets (drawn once from ``seed``; ``windows_per_epoch`` of them, by default as many
    as cover the training bytes once); validation and test windows are consecutive and do not overlap.
    Batches are (tokens, next tokens), each (batch, ``context``).
    """

    def __init__(
        self, context: int = 128, batch_size: int = 16, windows_per_epoch: int | None = None, seed: int = 0
    ) -> None:
        super().__init__(batch_size, seed)
        self.context, self.windows_per_epoch = context, windows_per_epoch

    def setup(self, stage: str | None = None) -> None:
        stream = python_docs_bytes()
        train_end, val_end = int(0.9 * len(stream)), int(0.95 * len(stream))
        train, val, test = stream[:train_end], stream[train_end:val_end], stream[val_end:]
        count = self.windows_per_epoch or len(train) // self.context
        generator = torch.Generator().manual_seed(self.seed)
        offsets = torch.randint(0, len(train) - self.context, (count,), generator=generator)
        self.train_set = TextWindows(train, offsets, self.context)
        self.val_set, self.test_set = (
            TextWindows(part, torch.arange(0, len(part) - self.context, self.context), self.context)
            for part in (val, test)
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=64)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=64)

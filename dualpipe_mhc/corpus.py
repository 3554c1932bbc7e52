"""The bundled text corpus and its byte-level tokenizer.

Tokens are UTF-8 bytes (vocabulary 256): no tokenizer file, no download, and
the same ids on every machine. The last ``val_fraction`` of the bytes is held
out so a report can quote a loss on text the model never trained on.
"""

from __future__ import annotations

from importlib import resources

import torch
from torch import Tensor

VOCAB_SIZE = 256
DEFAULT_CORPUS = "python_reference.txt"


def load_text(name: str = DEFAULT_CORPUS) -> str:
    """A bundled corpus file from ``dualpipe_mhc.data`` as text."""
    files = resources.files("dualpipe_mhc.data")
    path = files.joinpath(name)
    if not path.is_file():
        names = sorted(f.name for f in files.iterdir() if f.name.endswith(".txt"))
        raise ValueError(f"corpus {name!r} is not bundled; use one of {names}")
    return path.read_text(encoding="utf-8")


def encode(text: str) -> Tensor:
    """Text -> byte ids ``[N]`` (int64)."""
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()


def decode(ids: Tensor) -> str:
    """Byte ids -> text; a window cut inside a multi-byte character decodes with a replacement mark."""
    return bytes(ids.to(torch.uint8).tolist()).decode("utf-8", errors="replace")


class Corpus:
    """Byte ids split into train and validation parts, sampled as next-token windows."""

    def __init__(self, name: str = DEFAULT_CORPUS, val_fraction: float = 0.1) -> None:
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction={val_fraction} is invalid: use a fraction in (0, 1), e.g. 0.1")
        ids = encode(load_text(name))
        cut = int(len(ids) * (1.0 - val_fraction))
        self.train, self.val = ids[:cut], ids[cut:]

    def batch(self, batch_size: int, seq_len: int, generator: torch.Generator, split: str = "train") -> tuple[Tensor, Tensor]:
        """Random windows: ``(tokens [B, S], targets [B, S])``, targets shifted one byte ahead."""
        ids = self.train if split == "train" else self.val
        if len(ids) <= seq_len + 1:
            raise ValueError(f"seq_len={seq_len} is too long for the {split} split of {len(ids)} bytes")
        starts = torch.randint(0, len(ids) - seq_len - 1, (batch_size,), generator=generator)
        window = torch.stack([ids[s : s + seq_len + 1] for s in starts.tolist()])  # [B, S+1]
        return window[:, :-1], window[:, 1:]

"""A tiny GPT, a tiny ResNet and a character-level corpus from Python's standard library.

Plain PyTorch (no curvops): the models of the transformer tests (``tests/test_tiny_models.py``),
of ``benchmarks/transformer.py`` and of ``notebooks/05_transformer.ipynb``, which put this
folder on ``sys.path`` and ``import tiny_models``.

- :class:`TinyGPT`: token and position embeddings, pre-LN blocks (``nn.MultiheadAttention``
  with ``batch_first=True`` and a causal mask, an MLP), a final LayerNorm and a linear head,
  optionally tied to the token embedding. Token ids ``[N, S]`` in, logits ``[N, V, S]`` out
  (classes on axis 1, as ``nn.CrossEntropyLoss`` wants them with targets ``[N, S]``).
- :class:`TinyResNet`: a convolution stem with BatchNorm, residual blocks (one downsampling
  with a 1x1 projection shortcut), global average pooling and a linear head.
- :class:`Corpus`: the text of a few standard-library modules as character ids, with
  next-character batches. Nothing is downloaded.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import Tensor, nn


class Block(nn.Module):
    """A pre-LN transformer block: ``x + attention(LN(x))``, then ``x + MLP(LN(x))``."""

    def __init__(self, width: int, heads: int, tokens: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.register_buffer("causal", torch.ones(tokens, tokens, dtype=torch.bool).triu(1))

    def forward(self, x: Tensor) -> Tensor:
        tokens = x.shape[1]
        h = self.ln1(x)
        mask = self.causal[:tokens, :tokens]  # True: position t does not attend to s > t
        x = x + self.attention(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """A GPT: ``head(LN(blocks(token(ids) + position(0..S-1))))``.

    Args:
        vocabulary: the number of token ids ``V``.
        width: the model width ``D``.
        layers: the number of blocks.
        heads: attention heads per block (they divide ``width``).
        tokens: the longest sequence ``S``.
        tied: the head shares the token embedding's weight (``[V, D]``, no head bias).

    Example:
        >>> model = TinyGPT(vocabulary=11, width=8, layers=1, heads=2, tokens=5)
        >>> model(torch.randint(0, 11, (3, 5))).shape  # [N, V, S]
        torch.Size([3, 11, 5])
    """

    def __init__(
        self, vocabulary: int, width: int, layers: int, heads: int, tokens: int, tied: bool = False
    ) -> None:
        super().__init__()
        self.token = nn.Embedding(vocabulary, width)
        self.position = nn.Embedding(tokens, width)
        self.blocks = nn.Sequential(*(Block(width, heads, tokens) for _ in range(layers)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocabulary, bias=not tied)
        if tied:
            self.head.weight = self.token.weight

    def forward(self, ids: Tensor) -> Tensor:
        # positions get the batch axis too: every layer sees datum n on its first axis
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        x = self.blocks(self.token(ids) + self.position(positions))
        return self.head(self.norm(x)).movedim(-1, 1)


class ResidualBlock(nn.Module):
    """``ReLU(shortcut(x) + BN(conv(ReLU(BN(conv(x))))))``; with ``stride > 1`` the shortcut is a
    strided 1x1 convolution with BatchNorm."""

    def __init__(self, channels_in: int, channels_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels_out)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels_out)
        self.shortcut = nn.Identity()
        if stride != 1 or channels_in != channels_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(channels_in, channels_out, 1, stride=stride, bias=False),
                nn.BatchNorm2d(channels_out),
            )

    def forward(self, x: Tensor) -> Tensor:
        h = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(self.shortcut(x) + h)


class TinyResNet(nn.Module):
    """Conv-BN-ReLU stem, a residual block, a downsampling residual block (``2 x channels``),
    global average pooling and a linear head; images ``[N, C, H, W]`` in, logits ``[N, K]`` out.

    Example:
        >>> model = TinyResNet(channels_in=1, channels=4, classes=3)
        >>> model(torch.randn(2, 1, 6, 6)).shape
        torch.Size([2, 3])
    """

    def __init__(self, channels_in: int = 3, channels: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(channels_in, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU()
        )
        self.stages = nn.Sequential(
            ResidualBlock(channels, channels), ResidualBlock(channels, 2 * channels, stride=2)
        )
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(2 * channels, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.stages(self.stem(x))))


CORPUS_MODULES = ("textwrap", "heapq", "bisect", "fnmatch", "colorsys")
"""The standard-library modules whose source is the corpus (pure Python on every CPython)."""


@dataclass(frozen=True)
class Corpus:
    """Text as character ids: ``ids[i] = characters.index(text[i])``.

    Example:
        >>> corpus = Corpus.from_text("abracadabra")
        >>> corpus.characters, corpus.ids[:4].tolist()
        ('abcdr', [0, 1, 4, 0])
        >>> x, y = corpus.batch(torch.tensor([0, 1]), tokens=3)
        >>> x.tolist(), y.tolist()  # y is x shifted by one character
        ([[0, 1, 4], [1, 4, 0]], [[1, 4, 0], [4, 0, 2]])
    """

    text: str
    characters: str
    ids: Tensor

    @classmethod
    def from_text(cls, text: str) -> Corpus:
        characters = "".join(sorted(set(text)))
        lookup = {c: i for i, c in enumerate(characters)}
        return cls(text, characters, torch.tensor([lookup[c] for c in text]))

    @classmethod
    def standard_library(
        cls, modules: tuple[str, ...] = CORPUS_MODULES, characters: int | None = None
    ) -> Corpus:
        """The source of ``modules`` (``inspect.getsource``), joined, its first ``characters``."""
        text = "\n".join(inspect.getsource(__import__(name)) for name in modules)
        return cls.from_text(text[:characters])

    @property
    def vocabulary(self) -> int:
        return len(self.characters)

    def batch(self, starts: Tensor, tokens: int) -> tuple[Tensor, Tensor]:
        """Inputs ``ids[s : s + tokens]`` and next-character targets ``ids[s + 1 : s + tokens + 1]``
        for each start ``s``, as ``[len(starts), tokens]``."""
        window = starts[:, None] + torch.arange(tokens + 1)
        chunk = self.ids[window]
        return chunk[:, :-1], chunk[:, 1:]

    def batches(self, count: int, size: int, tokens: int, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
        """``count`` batches of ``size`` windows at random starts (a seeded generator)."""
        generator = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, len(self.ids) - tokens - 1, (count, size), generator=generator)
        return [self.batch(row, tokens) for row in starts]

    def split(self, every: int = 10, chunk: int = 1000) -> tuple[Corpus, Corpus]:
        """Held-out text from the whole corpus: every ``every``-th run of ``chunk`` characters is
        the second corpus, the rest the first (both with this character set).

        Example:
            >>> train, held_out = Corpus.from_text("abcdefgh").split(every=2, chunk=2)
            >>> train.text, held_out.text
            ('abef', 'cdgh')
        """
        runs = range(0, len(self.ids), chunk)
        kept = [
            [i for i in runs if (i // chunk) % every != every - 1],
            [i for i in runs if (i // chunk) % every == every - 1],
        ]
        return tuple(
            Corpus(
                "".join(self.text[i : i + chunk] for i in starts),
                self.characters,
                torch.cat([self.ids[i : i + chunk] for i in starts]),
            )
            for starts in kept
        )

    def decode(self, ids: Tensor) -> str:
        return "".join(self.characters[i] for i in ids.tolist())

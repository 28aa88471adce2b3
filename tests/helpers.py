"""Random test matrices and dense ground truth, written independently of curvops."""

import io

import torch

DOUBLE = torch.float64


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_psd(size: int, rank: int | None = None, seed: int = 0, dtype=DOUBLE, device="cpu") -> torch.Tensor:
    """A random ``B B^T`` of the given rank (full rank, shifted away from 0, if rank is None)."""
    g = generator(seed)
    if rank is None:
        b = torch.randn(size, size, generator=g, dtype=DOUBLE)
        matrix = b @ b.T / size + 0.5 * torch.eye(size, dtype=DOUBLE)
    else:
        b = torch.randn(size, rank, generator=g, dtype=DOUBLE)
        matrix = b @ b.T
    return matrix.to(dtype=dtype, device=device)


def random_orthogonal(size: int, seed: int = 0, dtype=DOUBLE) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(size, size, generator=generator(seed), dtype=DOUBLE))
    return q.to(dtype)


def kron(*matrices: torch.Tensor) -> torch.Tensor:
    """Kronecker product by explicit indexing (independent of torch.kron)."""
    result = matrices[0]
    for m in matrices[1:]:
        (p, q), (r, s) = result.shape, m.shape
        result = (result[:, None, :, None] * m[None, :, None, :]).reshape(p * r, q * s)
    return result


def dense_logdet(matrix: torch.Tensor, damping: float = 0.0) -> torch.Tensor:
    sign, value = torch.linalg.slogdet(matrix + damping * torch.eye(matrix.shape[0], dtype=matrix.dtype))
    assert sign > 0
    return value


def dense_inverse(matrix: torch.Tensor, damping: float = 0.0) -> torch.Tensor:
    return torch.linalg.inv(matrix + damping * torch.eye(matrix.shape[0], dtype=matrix.dtype))


def train_steps(model, optimizer, loss_fn, batches) -> list[float]:
    """One optimizer step per ``(x, y)`` batch of an ordinary training loop; the losses."""
    losses = []
    for x, y in batches:
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def assert_resumes_bit_for_bit(model, optimizer, twin, make_optimizer, loss_fn, batches) -> None:
    """Checkpoint ``model`` and ``optimizer`` (``torch.load(weights_only=True)``), restore them into
    ``twin`` and ``make_optimizer(twin)``, train both on ``batches``: the same parameters, bit for bit."""
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": optimizer.state_dict()}, buffer)
    train_steps(model, optimizer, loss_fn, batches)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    twin.load_state_dict(checkpoint["model"])
    resumed = make_optimizer(twin)
    resumed.load_state_dict(checkpoint["opt"])
    train_steps(twin, resumed, loss_fn, batches)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)

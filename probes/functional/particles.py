"""Two-layer networks in the mean-field (1/m) scaling.

``MeanField`` computes ``f(x) = (1/m) sum_{j=1}^m a_j sigma(w_j . x + b_j)``: each hidden
unit ``j`` is a particle ``(a_j, w_j, b_j)`` carrying mass ``1/m``, so the network is an
average over particles and has a limit as ``m -> infinity`` (Chizat & Bach 2018, "On the
global convergence of gradient descent for over-parameterized models using optimal
transport"; Mei, Montanari & Nguyen 2018). ``nn.Linear`` does not scale this way.

Time scale. With the ``1/m`` factor, the gradient with respect to one particle is ``O(1/m)``:
SGD with step ``lr`` on these parameters moves each particle by ``lr / m`` times its
mean-field velocity. The particle gradient flow of Chizat & Bach (``d theta_j / dt =
-m grad_{theta_j} F``) is therefore SGD with step ``eta * m`` (``mean_field_lr``), after which
runs of different widths share one time axis ``t = eta * steps``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["MeanField", "sphere_"]


class MeanField(nn.Module):
    """``f(x) = (1/m) sum_j a_j sigma(w_j . x + b_j)``, a two-layer net in the mean-field scaling.

    Parameters: ``hidden`` (an ``nn.Linear(in_features, width, bias)``: row ``j`` of its weight
    is ``w_j``, its bias ``b_j``), ``activation`` (default ``nn.ReLU()``), ``output`` (an
    ``nn.Linear(width, out_features, bias=False)``: column ``j`` of its weight is ``a_j``).
    ``forward`` returns ``output(activation(hidden(x))) / width``, shape ``(N, out_features)``.

    Initialisation: ``init="sphere"`` (default) puts every particle on the sphere of radius
    ``radius`` (see ``sphere_``); ``init="torch"`` keeps ``nn.Linear``'s defaults (which
    shrink the output weights like ``1/sqrt(m)`` and so are not a mean-field initialisation).

    Args:
        in_features: input dimension.
        width: ``m``, hidden units (particles).
        out_features: output dimension.
        bias: whether the hidden layer has a bias ``b_j``.
        activation: ``sigma`` (default ``nn.ReLU()``).
        init: ``"sphere"`` or ``"torch"``.
        radius: particle norm for ``init="sphere"``.
        balanced: see ``sphere_``.
        generator: the random source for ``init="sphere"``.

    Raises:
        ValueError: a dimension below 1, an unknown ``init``, or a radius that is not positive and finite.
    """

    def __init__(
        self,
        in_features: int,
        width: int,
        out_features: int = 1,
        bias: bool = True,
        activation: nn.Module | None = None,
        init: str = "sphere",
        radius: float = 1.0,
        balanced: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if int(width) < 1 or int(in_features) < 1 or int(out_features) < 1:
            raise ValueError(
                f"MeanField: in_features, width and out_features must be positive, got "
                f"{in_features}, {width}, {out_features}"
            )
        self.width = int(width)
        self.hidden = nn.Linear(in_features, width, bias=bias)
        self.activation = activation if activation is not None else nn.ReLU()
        self.output = nn.Linear(width, out_features, bias=False)
        if init == "sphere":
            sphere_(self, radius, balanced=balanced, generator=generator)
        elif init != "torch":
            raise ValueError(f"MeanField: init must be 'sphere' or 'torch', got {init!r}")

    @property
    def in_features(self) -> int:
        """Input dimension."""
        return self.hidden.in_features

    @property
    def out_features(self) -> int:
        """Output dimension."""
        return self.output.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``output(activation(hidden(x))) / width``.

        Args:
            x: inputs, ``(N, in_features)``.

        Returns:
            ``(N, out_features)``.
        """
        return self.output(self.activation(self.hidden(x))) / self.width

    def mean_field_lr(self, eta: float) -> float:
        """The SGD step on these parameters that advances mean-field time by ``eta`` per step: ``eta * m``.

        Args:
            eta: mean-field time per step.

        Returns:
            The learning rate ``eta * width``.
        """
        return float(eta) * self.width

    def extra_repr(self) -> str:
        return f"scale=1/{self.width}"


@torch.no_grad()
def sphere_(
    model: MeanField, radius: float, balanced: bool = True, generator: torch.Generator | None = None
) -> MeanField:
    """Put every particle ``theta_j = (w_j, b_j, a_j)`` on the sphere ``||theta_j|| = radius``, in place.

    ``balanced=True``: the input part ``(w_j, b_j)`` is uniform on the sphere of radius
    ``radius / sqrt(2)`` and ``a_j`` has the same norm (a random sign, or a uniform direction
    when there are several outputs). For ReLU, gradient flow conserves ``|a_j|^2 - ||(w_j, b_j)||^2``
    (positive homogeneity), so balanced particles stay balanced. ``balanced=False``: ``theta_j``
    is uniform on the sphere of radius ``radius`` in all its coordinates at once.

    Args:
        model: the ``MeanField`` network whose parameters are overwritten.
        radius: the norm of every particle.
        balanced: input and output parts of equal norm (see above).
        generator: the random source (default: torch's global generator).

    Returns:
        ``model``, for chaining.

    Raises:
        ValueError: ``radius`` is not positive and finite.
    """
    if not radius > 0 or not math.isfinite(radius):
        raise ValueError(f"sphere_: radius must be positive and finite, got {radius}")
    h, o = model.hidden, model.output
    m, d, c = h.out_features, h.in_features, o.out_features
    has_b = h.bias is not None
    dev, dt = h.weight.device, h.weight.dtype
    inner = d + int(has_b)
    g = torch.randn(m, inner + c, generator=generator, dtype=torch.float64)
    if balanced:
        u = g[:, :inner] / g[:, :inner].norm(dim=1, keepdim=True)
        v = g[:, inner:] / g[:, inner:].norm(dim=1, keepdim=True)
        theta = torch.cat([u, v], dim=1) * (radius / math.sqrt(2.0))
    else:
        theta = g / g.norm(dim=1, keepdim=True) * radius
    theta = theta.to(device=dev, dtype=dt)
    h.weight.copy_(theta[:, :d])
    if has_b:
        h.bias.copy_(theta[:, d])
    o.weight.copy_(theta[:, inner:].T)
    return model


def _complete(v: torch.Tensor, dim: int) -> torch.Tensor:
    """Extend orthonormal columns ``v`` (dim x k, k <= 2) to two orthonormal columns."""
    if v.shape[1] >= 2:
        return v[:, :2]
    eye = torch.eye(dim, dtype=v.dtype, device=v.device)
    q, _ = torch.linalg.qr(torch.cat([v, eye], dim=1))
    return q[:, :2]


def principal_plane(points: torch.Tensor, center: bool) -> torch.Tensor:
    """Top two principal directions (D x 2, float64) of the rows of ``points`` (the first two right singular
    vectors, completed to two orthonormal columns when the rank is below 2), signs made deterministic: the
    largest-magnitude entry of each direction is positive.

    Args:
        points: ``(M, D)`` positions, one row per particle.
        center: subtract the mean row first (PCA) or not (the plane of the rows themselves).

    Returns:
        ``(D, 2)`` float64 orthonormal columns.
    """
    x = points.double()
    if center:
        x = x - x.mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    v = _complete(vh[:2].T.contiguous(), x.shape[1])
    # sign convention: the largest-magnitude entry of each direction is positive
    pick = v.abs().argmax(dim=0)
    sign = torch.sign(v[pick, torch.arange(2, device=v.device)])
    return v * torch.where(sign == 0, torch.ones_like(sign), sign)

"""The demo's linen models: a CNN with BatchNorm and dropout, and an MLP."""

from __future__ import annotations

HEADS = ("bn", "leaky_relu", "relu")


def make_model(name: str, head: str = "bn"):
  """The demo's linen models. The CNN's ``Dense(64)`` head is followed by BatchNorm then ReLU
  (``head="bn"``), by a leaky ReLU, or by a bare ReLU (``"relu"``, the head of earlier
  versions, which dies under SAM and ESAM at 40% noise on MNIST-5k: see
  :mod:`sam_optax.diagnostics`). Each activation is sown in ``intermediates`` for
  :func:`sam_optax.diagnostics.linen_dead_unit_fractions`; sowing costs nothing otherwise."""
  import flax.linen as nn

  if head not in HEADS:
    raise ValueError(f"`make_model(head=...)` must be one of {HEADS}, got {head!r}.")

  def activate(module, x, name, kind="relu"):
    x = nn.leaky_relu(x, 0.1) if kind == "leaky_relu" else nn.relu(x)
    module.sow("intermediates", name, x)
    return x

  class CNN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
      x = nn.Conv(16, (3, 3))(x)
      x = activate(self, nn.BatchNorm(use_running_average=not train, momentum=0.9)(x), "conv1")
      x = nn.Conv(32, (3, 3))(x)
      x = activate(self, nn.BatchNorm(use_running_average=not train, momentum=0.9)(x), "conv2")
      x = nn.avg_pool(x, (2, 2), (2, 2)).reshape(x.shape[0], -1)
      x = nn.Dense(64)(x)
      if head == "bn":
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
      x = activate(self, x, "head", head)
      x = nn.Dropout(0.2, deterministic=not train)(x)
      return nn.Dense(10)(x)

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
      x = x.reshape(x.shape[0], -1)
      x = activate(self, nn.Dense(128)(x), "hidden")
      x = nn.Dropout(0.1, deterministic=not train)(x)
      return nn.Dense(10)(x)

  return {"cnn": CNN, "mlp": MLP}[name]()

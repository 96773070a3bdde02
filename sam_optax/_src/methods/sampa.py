"""SAMPa: SAM's two gradients at sequential depth one (evaluated side by side)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax._src import engine, radius
from sam_optax._src import tree as tu
from sam_optax._src.protocol import Method, Points, Result
from sam_optax._src.telemetry import Telemetry
from sam_optax._src.validation import check_real, check_transform

PyTree = Any


class SAMPaState(NamedTuple):
  """State of :func:`sampa`.

  Attributes:
    count: int32 number of updates applied so far (the argument of a ``rho``
      schedule).
    base: the base optimizer's state (committed once per step, by the real update).
    y_grad: :math:`\\nabla f(y_t)`, the gradient at the previous step's
      would-be point, in the params' dtypes; zeros at the start, so the first
      step is unperturbed.
    telemetry: a :class:`Telemetry` of the last step (``None`` with
      ``telemetry=False``). For SAMPa, ``clean_grad_norm`` is
      :math:`\\|\\nabla f(y_t)\\|` (the gradient that set the perturbation; the
      clean gradient is never computed), ``perturbed_grad_norm`` and
      ``perturbed_loss`` are taken at :math:`\\tilde x_t`, and ``cosine`` is
      :math:`\\cos(\\nabla f(y_t), \\nabla f(\\tilde x_t))`.

  Example:
    >>> import jax.numpy as jnp, optax, sam_optax
    >>> isinstance(sam_optax.sampa(optax.sgd(0.1)).init(jnp.ones(3)), sam_optax.SAMPaState)
    True
  """
  count: jax.Array
  base: optax.OptState
  y_grad: PyTree
  telemetry: Telemetry | None = None


def _mesh_axis_of(mesh: Any, mesh_axis: str | None) -> str:
  names = tuple(mesh.axis_names)
  if mesh_axis is None:
    if len(names) != 1:
      raise ValueError(f"`sampa(mesh=...)`: the mesh has axes {names}; name the one of size 2 "
                       "that holds the two points with `mesh_axis=`.")
    mesh_axis = names[0]
  if mesh_axis not in names:
    raise ValueError(f"`sampa(mesh_axis={mesh_axis!r})` is not an axis of the mesh {names}.")
  size = dict(mesh.shape)[mesh_axis]
  if size != 2:
    raise ValueError(f"`sampa`: the mesh axis {mesh_axis!r} has size {size}; SAMPa evaluates two "
                     "points, so it needs an axis of size 2 (e.g. "
                     "`jax.make_mesh((2,), ('pair',))`).")
  return mesh_axis


def sampa(base_optimizer: optax.GradientTransformation, rho: radius.Rho = 0.1,
          lam: float = 0.2, *, mesh: jax.sharding.Mesh | None = None, mesh_axis: str | None = None,
          vectorize: bool = True, eps: float = 1e-12, telemetry: bool = True
          ) -> optax.GradientTransformationExtraArgs:
  r"""SAMPa: SAM whose two gradients run side by side (sequential depth one).

  With :math:`\nabla f(y_t)` kept from the previous step (:math:`\nabla f(y_0) =
  0`, so the first step is unperturbed) and :math:`u(\cdot)` the base
  optimizer's update from :math:`x_t` in its current state:

  .. math::
     \tilde x_t = x_t + \rho\,\frac{\nabla f(y_t)}{\|\nabla f(y_t)\|},\qquad
     y_{t+1} = x_t + u(\nabla f(y_t))\ \text{(state not committed)},

  .. math::
     x_{t+1} = x_t + u\big((1-\lambda)\,\nabla f(\tilde x_t) + \lambda\,\nabla f(y_{t+1})\big),

  and :math:`\nabla f(y_{t+1})` is stored for the next step. Both points depend
  only on :math:`x_t` and the stored gradient, so the two gradients have no data
  dependency on each other: they are evaluated in one ``jax.vmap``-ed call of
  ``grad_fn`` over the two stacked points (or, with ``mesh=``, one point per
  device of a mesh axis of size 2), and one step takes the time of one gradient
  on two devices. The clean gradient :math:`\nabla f(x_t)` is never used: the
  values of ``updates`` are ignored (pass anything shaped like the params, e.g.
  the params themselves), so a train step need not compute it (see
  :func:`sam_optax.flax.make_linen_sampa_train_step`). With an SGD base
  :math:`y_{t+1} = x_t - \eta\nabla f(y_t)`; with momentum and weight decay the
  would-be step includes them, as in the authors' code. :math:`\lambda = 0`
  keeps the perturbation (:math:`\nabla f(y_{t+1})` is still computed and
  stored): it only drops that gradient from the update.

  ``grad_fn`` must be vmappable (a pure function of the params, as
  ``jax.grad(loss)`` is; closing over the batch and a dropout key is fine).
  Under ``vmap`` each point sees the same batch and key.

  Args:
    base_optimizer: the optimizer that makes both the would-be step and the real
      one (e.g. ``optax.sgd(lr, momentum=0.9)``).
    rho: radius :math:`\rho \ge 0`, a float or a schedule of the step count.
    lam: weight :math:`\lambda \in [0, 1]` of :math:`\nabla f(y_{t+1})` in the
      update (the paper: 0.2; 0.1 on GLUE).
    mesh: a :class:`jax.sharding.Mesh` with an axis of size 2: the two points
      are laid out along it with ``jax.shard_map`` (manual over that axis only,
      other axes stay automatic), so each device group computes one gradient and
      one exchange combines them. ``None``: one vmapped call on the devices the
      step runs on.
    mesh_axis: the axis of ``mesh`` holding the two points (default: the mesh's
      only axis).
    vectorize: with ``mesh=None``, ``True`` evaluates the two gradients in one
      vmapped call; ``False`` calls ``grad_fn`` twice on the two points, still
      without a data dependency between the calls. On XLA:CPU a vmapped
      convolution over two weight sets becomes a grouped convolution that runs
      about 2.5x slower than two plain ones; use ``False`` there.
    eps: a stored gradient with norm at or below this gives no perturbation.
    telemetry: record a :class:`Telemetry` of each step in the state.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` (a complete optimizer)
    whose ``update(updates, state, params, *, grad_fn, **extra_args)`` needs the
    params and ``grad_fn`` (or ``value_and_grad_fn``, which records the loss at
    :math:`\tilde x_t`); other extra arguments are passed to the base optimizer.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> loss = lambda w, x: jnp.sum((x @ w) ** 2)
    >>> x = jnp.ones((4, 3)); w = jnp.ones(3)
    >>> opt = sam_optax.sampa(optax.sgd(0.01), rho=0.1, lam=0.2)
    >>> state = opt.init(w)
    >>> @jax.jit
    ... def step(w, state):
    ...   grad_fn = lambda p: jax.grad(loss)(p, x)   # no clean gradient needed
    ...   updates, state = opt.update(w, state, w, grad_fn=grad_fn)
    ...   return optax.apply_updates(w, updates), state
    >>> for _ in range(3):
    ...   w, state = step(w, state)
    >>> [round(float(v), 4) for v in w]
    [0.4342, 0.4342, 0.4342]

    On two devices, one gradient each:
    ``sam_optax.sampa(base, mesh=jax.make_mesh((2,), ("pair",)))``.

  References:
    Xie, Pethick, Cevher, `SAMPa: Sharpness-aware Minimization Parallelized
    <https://arxiv.org/abs/2410.10683>`_, NeurIPS 2024.
  """
  fn = "sampa"
  check_transform("base_optimizer", base_optimizer, fn)
  rho = radius.check_rho(rho, fn)
  lam = check_real("lam", lam, fn, low=0.0, high=1.0, hint="the paper uses 0.2")
  eps = check_real("eps", eps, fn, low=0.0)
  engine.check_telemetry(telemetry, fn)
  axis = _mesh_axis_of(mesh, mesh_axis) if mesh is not None else None
  if mesh is None and mesh_axis is not None:
    raise ValueError("`sampa(mesh_axis=...)` needs `mesh=` (the mesh that axis belongs to).")
  base = optax.with_extra_args_support(base_optimizer)
  how = "mesh" if mesh is not None else ("vmap" if vectorize else "loop")

  def init(params):
    return {"base": base_optimizer.init(params), "y_grad": tu.zeros_like(params)}

  def points(s):
    y_norm = tu.norm(s.state.y_grad)
    delta = tu.scale(s.state.y_grad, s.radius * tu.safe_inverse(y_norm, eps))
    x_tilde = tu.add_scaled(s.params, 1.0, delta)
    would_be, _ = base.update(s.state.y_grad, s.state.base, s.params, **s.base_args)
    y_next = optax.apply_updates(s.params, would_be)
    stacked = jax.tree.map(lambda x, y: jnp.stack([x, y.astype(x.dtype)]), x_tilde, y_next)
    return Points(stacked, how, perturbation_norm=jnp.where(y_norm > eps, jnp.abs(s.radius), 0.0),
                         mesh=mesh, mesh_axis=axis)

  def combine(s, pts, losses, grads):
    g_tilde, g_y = jax.tree.map(lambda x: x[0], grads), jax.tree.map(lambda x: x[1], grads)
    w = jnp.asarray(lam, jnp.float32)
    mixed = tu.combine(g_tilde, 1.0 - w, g_y, w)
    out, base_state = base.update(tu.cast_like(mixed, s.updates), s.state.base, s.params,
                                  **s.base_args)
    return Result(out, {"base": base_state, "y_grad": tu.cast_like(g_y, s.state.y_grad)},
                  grad=g_tilde, loss=None if losses is None else losses[0],
                  clean_grad=s.state.y_grad)

  m = Method(fn, SAMPaState, init, points, combine, clean_gradient=False, keeps_gradient=True)
  return engine.build(m, rho=rho, eps=eps, telemetry=telemetry)

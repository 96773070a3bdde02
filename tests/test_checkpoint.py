"""``sam_optax.checkpoint``: a mismatched structure is a clear error (resuming bit for bit is
``tests/test_resume.py``'s)."""

import optax
import pytest

import sam_optax as so
from helpers import mlp_init
from sam_optax import checkpoint

SGD = lambda: optax.sgd(0.05, momentum=0.9)


def test_mismatched_checkpoint_is_a_clear_error(tmp_path):
  params = mlp_init(0)
  checkpoint.save(tmp_path / "ckpt", {"params": params, "opt_state": so.sam(SGD()).init(params)})
  other = {"params": params, "opt_state": optax.chain(so.looksam(), SGD()).init(params)}
  with pytest.raises(ValueError, match="does not match the state it is restored into.*Missing"):
    checkpoint.restore(tmp_path / "ckpt", other)

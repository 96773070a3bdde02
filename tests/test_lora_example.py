"""examples/lora_sam.py in its quick mode: SAM and Functional-SAM on LoRA adapters train the
adapters only.

One run of ``main(["--quick"])`` (a tiny byte-level transformer pretrained on stdlib ``email``,
fine-tuned with
LoRA on stdlib ``json``), then: the table is printed with the three optimizers; every optimizer ran
its steps
with finite losses; the held-out bits per byte are finite and below 8 (a uniform guess over bytes);
the base
weights of every fine-tuned model are bitwise the pretrained ones while every adapter moved; and SAM
/
Functional-SAM took steps different from AdamW's at the same seed and batches (the perturbation did
something).
"""

import importlib.util
import math
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "lora_sam.py"


@pytest.fixture(scope="module")
def example():
  spec = importlib.util.spec_from_file_location("lora_sam_example", EXAMPLE)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module   # dataclasses look their module up while the class is built
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def quick(example):
  return example.main(["--quick"])


def frozen_params(model) -> dict:
  """The non-LoRA parameters by path, ``base_module`` (the LoRA wrapper's slot) dropped from the
  path."""
  state = nnx.to_pure_dict(nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))))
  return {tuple(k.key for k in path if k.key != "base_module"): np.asarray(v)
          for path, v in jax.tree_util.tree_leaves_with_path(state)}


def adapters(model) -> dict:
  state = nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))
  leaves = jax.tree_util.tree_leaves_with_path(state)
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves}


@pytest.mark.slow
def test_quick_mode_prints_the_table(example, quick):
  text = example.table(quick)
  for label in ("no fine-tuning", "AdamW", "SAM", "Functional-SAM"):
    assert f"| {label} |" in text, text
  assert set(quick["bpb"]) == {"base", *example.METHODS}


@pytest.mark.slow
def test_all_three_optimizers_ran(example, quick):
  cfg = example.QUICK
  methods = [r["method"] for r in quick["runs"]]
  assert sorted(methods) == sorted(example.METHODS * cfg.seeds)
  for run in quick["runs"]:
    assert len(run["losses"]) == cfg.steps, run["method"]
    assert all(math.isfinite(v) for v in run["losses"]), run["method"]


@pytest.mark.slow
def test_bits_per_byte_finite_and_below_uniform(quick):
  for key, values in quick["bpb"].items():
    for v in values:
      assert math.isfinite(v) and 0 < v < 8, (key, v)


@pytest.mark.slow
def test_only_the_adapters_changed(example, quick):
  base = frozen_params(quick["base"])
  assert base and not adapters(quick["base"])   # the pretrained model has no adapters
  for run in quick["runs"]:
    model = run["model"]
    tuned = frozen_params(model)
    assert tuned.keys() == base.keys(), run["method"]
    for path, w in base.items():
      assert tuned[path].dtype == w.dtype and np.array_equal(tuned[path], w), (run["method"], path)
    init = adapters(example.add_lora(nnx.clone(quick["base"]), example.QUICK.rank, run["seed"]))
    now = adapters(model)
    assert now.keys() == init.keys()
    assert len(now) == 2 * len(example.LORA_TARGETS) * example.QUICK.layers
    for path in init:
      assert not np.array_equal(now[path], init[path]), (run["method"],
                                                         path)   # every adapter moved
      assert np.all(np.isfinite(now[path]))


@pytest.mark.slow
def test_sam_steps_differ_from_adamw(quick):
  by = {(r["method"], r["seed"]): adapters(r["model"]) for r in quick["runs"]}
  for method in ("sam", "functional_sam"):
    a, b = by[("adamw", 0)], by[(method, 0)]
    assert any(not np.allclose(a[k], b[k]) for k in a), method

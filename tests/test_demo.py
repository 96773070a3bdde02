"""The demo's model options, its dead-unit count, the note it prints when a run stalls, and its
figure: every panel draws data. (tests/test_resume.py runs the demo end to end.)"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sam_optax import demo
from sam_optax import flax as ft
from sam_optax.demo import cli
from sam_optax.demo import report as demo_report
from sam_optax.demo.models import HEADS, make_model
from sam_optax.demo.train import Run


def report(*args):
  """The note with its line breaks undone."""
  note = demo_report.stall_report(*args)
  return note if note is None else " ".join(note.split())


def fake_run(accs, loss, dead, dead_layers=None):
  return Run(accs=list(accs), train_s=1.0, steps_per_s=1.0, sharpness=None, state=None,
                  history={"loss": list(loss), "dead_units": list(dead)}, resumed_from=0,
                  dead_layers=dead_layers)


def test_a_run_that_trains_gets_no_note():
  assert report("sgd", 0, fake_run([0.5, 0.8], [2.0, 1.6], [0.1, 0.1]), 0.05) is None


def test_a_stall_names_dead_units_and_the_fixes():
  run = fake_run([0.1, 0.1, 0.1], [2.304, 2.303, 2.3026], [1.0, 1.0, 1.0],
                 {"conv1": 0.0, "head": 1.0})
  note = report("esam", 0, run, 0.1)
  assert note.startswith("! esam, seed 1: stalled: test accuracy 10.0% after 3 epochs")
  note_lines = demo_report.stall_report("esam", 0, run, 0.1).splitlines()
  assert all(len(line) <= 100 for line in note_lines)
  assert f"ln 10 = {math.log(10):.3f}" in note
  assert "dead units, 100% of the `head` layer's units inactive on all 512 probe images" in note
  assert "smaller --rho (this run: 0.1)" in note
  assert "linear_schedule" in note and "--head bn" in note


def test_a_flat_loss_counts_as_a_stall_even_above_chance():
  note = report("sam", 1, fake_run([0.3, 0.25], [2.30, 2.29], [0.2, 0.3], {"head": 0.3}), 0.05)
  assert "stalled" in note and "seed 2" in note
  assert "not dead units (at most 30%" in note and "--head bn" not in note


def test_a_slow_start_is_reported():
  note = report("sam", 0,
                fake_run([0.1, 0.1, 0.6, 0.8], [2.3, 2.3, 1.9, 1.7], [0.9, 0.8, 0.1, 0.0]),
                           0.1)
  assert "started at chance: test accuracy 10.0% after epoch 1, above 20% only from epoch 3" in note
  assert "90% of a layer's units" in note


@pytest.mark.parametrize("head", HEADS)
def test_heads_sow_their_activations(head):
  model = make_model("cnn", head)
  x = jax.random.uniform(jax.random.key(0), (8, 8, 8, 1))
  variables = model.init(jax.random.key(1), x)
  assert ("BatchNorm_2" in variables["batch_stats"]) == (head == "bn")
  state = ft.TrainState.create(apply_fn=model.apply, params=variables["params"], tx=optax.sgd(0.1),
                               batch_stats=variables["batch_stats"])
  dead = demo_report.dead_units(state, x)(state.params, state.batch_stats)
  assert list(dead) == ["conv1", "conv2", "head"]
  assert all(0.0 <= float(v) <= 1.0 for v in dead.values())


def test_dead_units_sees_a_killed_head():
  model = make_model("cnn", "relu")
  x = jax.random.uniform(jax.random.key(0), (16, 8, 8, 1))
  variables = model.init(jax.random.key(1), x)
  params = dict(variables["params"])
  params["Dense_0"] = {"kernel": params["Dense_0"]["kernel"], "bias": jnp.full((64,), -1e3)}
  state = ft.TrainState.create(apply_fn=model.apply, params=params, tx=optax.sgd(0.1),
                               batch_stats=variables["batch_stats"])
  dead = demo_report.dead_units(state, x)(state.params, state.batch_stats)
  assert float(dead["head"]) == 1.0 and float(dead["conv1"]) == 0.0
  assert demo_report.worst_layer(dead) == ("head", 1.0)


def test_unknown_head_is_refused():
  with pytest.raises(ValueError, match=r"make_model\(head=\.\.\.\)"):
    make_model("cnn", "tanh")


def test_fashion_mnist_missing_is_a_clear_cli_error(monkeypatch, capsys, tmp_path):
  from sam_optax import datasets
  monkeypatch.delenv("SAM_OPTAX_DATA", raising=False)
  monkeypatch.setattr(datasets, "FASHION_MNIST_DEBIAN_DIR", str(tmp_path))
  monkeypatch.setattr(cli, "fashion_mnist_available", lambda: False)
  with pytest.raises(SystemExit):
    demo.main(["--dataset", "fashion_mnist", "--epochs", "1"])
  err = capsys.readouterr().err
  assert "--dataset fashion_mnist" in err and "apt-get install -y dataset-fashion-mnist" in err


def test_demo_table_has_the_dead_unit_column(tmp_path, capsys):
  rc = demo.main(["--model", "mlp", "--optimizers", "sgd", "--epochs", "1", "--seeds", "1",
                  "--no-sharpness", "--no-progress", "--out", str(tmp_path)])
  assert rc == 0
  out = capsys.readouterr().out
  assert "dead units³" in out and "% -> " in out
  rows = [line for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert len(rows) == 1 and '"dead_units"' in rows[0]
  assert np.isfinite(float(rows[0].split('"dead_units": ')[1].split(",")[0]))


def test_every_panel_of_the_figure_has_data(tmp_path):
  """The figure's three panels (test accuracy, one-step sharpness, cos(g, g_adv)) each draw
  SAM's curve: the cosine panel drew nothing when the demo's SAM recorded no cosine."""
  import argparse

  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from sam_optax.datasets import load_digits
  from sam_optax.demo.recipes import optimizers
  from sam_optax.demo.train import train_one
  data = load_digits(0, 0.4)
  steps_per_epoch = len(data[1]) // 64
  table = optimizers(0.05, 2 * steps_per_epoch, 0.1, steps_per_epoch, 2)
  model = make_model("cnn")
  results = {name: [train_one(model, table[name], data, epochs=2, batch_size=64, seed=0,
                              with_sharpness=False)] for name in ("sgd", "sam")}
  args = argparse.Namespace(dataset="digits", label_noise=0.4, out=str(tmp_path))
  fig = demo_report.figure(args, results, plt)
  assert demo_report.panels_without_data(fig) == []
  assert len(fig.axes) == 3
  # a panel without data is reported (the check can fail)
  fig.axes[2].lines[0].set_ydata([float("nan")] * 2)
  assert len(demo_report.panels_without_data(fig)) == 1
  plt.close(fig)

"""Shared machinery of the long benchmarks (``auto_rho``, ``study``): tasks, methods, a
resumable store of finished runs with a progress line and an ETA.

A run is one (task, method spec, seed); its result is a JSON file under the store's folder,
written atomically when the run ends, so a rerun skips what is done. Modules:

* :mod:`benchmarks.lab.tasks`: the data, model and training loop of each task;
* :mod:`benchmarks.lab.methods`: the optimizers, by name, built from a :class:`Spec`;
* :mod:`benchmarks.lab.store`: the store and the progress line.
"""

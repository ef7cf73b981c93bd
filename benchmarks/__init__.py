"""Speed and soak scripts (run each as `python benchmarks/<name>.py`); a package so that tests can import the
helpers they share with the scripts (`benchmarks.soak_load`). Benchmarks never import tests."""

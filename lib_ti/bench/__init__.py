"""Benchmarks of the trainer (``python -m lib_ti bench ...``). ``bench quality`` lives with the
micro model it measures on (``lib_ti.micro.quality``)."""

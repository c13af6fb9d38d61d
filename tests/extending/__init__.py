"""Worked examples of README "Extending": a PEFT method, a dataset and a model family, each one file.

tests/test_extending.py trains them together through `launch.train` with `plugins=...`, editing
nothing else in the repository.
"""

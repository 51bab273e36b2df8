"""Plain functions, classes and constants shared by test modules (fixtures live in tests/conftest.py).

Test modules import these as ``helpers.<module>``; pytest puts ``tests/`` on the path (``pythonpath`` in
pyproject.toml). No test module imports another test module.
"""

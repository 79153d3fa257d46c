"""Package discovery for the three roots that install under `flashtune` (the metadata is in pyproject.toml).

`kernel/`, `db/` and `tuner/` sit at the repository root and install as `flashtune.kernel`,
`flashtune.db` and `flashtune.tuner`. Their subpackages are found, not listed, so a new one ships by itself.
"""
from setuptools import find_namespace_packages, setup

ROOTS = ("kernel", "db", "tuner")

setup(
    # Namespace discovery: a folder of modules is a package with or without an __init__.py.
    packages=[f"flashtune.{root}{'.' + sub if sub else ''}" for root in ROOTS
              for sub in ["", *find_namespace_packages(root, exclude=["*__pycache__*"])]],
    package_dir={f"flashtune.{root}": root for root in ROOTS},
)

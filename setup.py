"""Packaging for `labml_nn`: an annotated, tested implementation of the Feedback Transformer."""

from pathlib import Path

import setuptools

here = Path(__file__).parent
long_description = (here / "README.md").read_text(encoding="utf-8") if (here / "README.md").exists() else ""

# The docs generator (docs/_generator). Exact pins: `build.py --check` compares the committed docs with a
# rebuild, which must produce the same bytes.
docs_requires = ["markdown-it-py==4.3.0", "mdit-py-plugins==0.7.0", "pygments==2.20.0", "pyyaml>=6"]

setuptools.setup(
    name="labml_nn",
    version="0.1.0",
    description="An annotated, tested and fast PyTorch implementation of the Feedback Transformer",
    long_description=long_description,
    long_description_content_type="text/markdown",
    # The one place that holds the repository's address (the notebook, the docs and their tests read it)
    url="https://github.com/labml-feedback/labml_nn",
    packages=setuptools.find_packages(include=["labml_nn", "labml_nn.*"]),
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.1",
        "numpy",
        # labml_nn/experiments/labml_adapter.py uses a few private labml APIs and checks them when an experiment is
        # set up; tests/training/test_labml_adapter.py holds it to the versions tested here (labml_adapter.TESTED_LABML)
        "labml>=0.5.3,<0.6",
        "labml-helpers>=0.4.89,<0.5",
    ],
    extras_require={
        # tests/repository/test_docs.py builds docs, so the tests need the docs generator's libraries too. IPython
        # (through ipykernel) is not pinned: labml 0.5.3's notebook logger imports names that IPython 9 moved, and
        # labml_nn/experiments/labml_adapter.py puts them back (tests/training/test_notebook.py runs on the newest
        # IPython).
        "test": ["pytest>=7", "ruff==0.17.6", "matplotlib", "nbclient", "nbformat", "ipykernel",
                 "jupytext"] + docs_requires,
        "docs": docs_requires,
    },
    license="MIT",
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)

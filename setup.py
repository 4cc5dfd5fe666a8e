"""Packaging for `labml_nn`: an annotated, tested implementation of the Feedback Transformer."""

from pathlib import Path

import setuptools

here = Path(__file__).parent
long_description = (here / "README.md").read_text(encoding="utf-8") if (here / "README.md").exists() else ""

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
        "labml>=0.5.3",
        "labml-helpers>=0.4.89",
    ],
    extras_require={
        "test": ["pytest>=7", "ruff", "matplotlib", "nbclient", "nbformat", "ipykernel", "jupytext"],
        "docs": ["markdown-it-py>=3", "mdit-py-plugins>=0.4", "pygments>=2.15", "pyyaml"],
    },
    license="MIT",
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)

"""A small generator of side-by-side annotated HTML pages from Python sources (see ../README.md)."""

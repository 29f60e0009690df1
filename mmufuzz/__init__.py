"""mmufuzz: a coverage-guided, model-based differential fuzzer for hypervisor MMUs.

The repository keeps its four folders at the top (``harness/``, ``reference/``,
``fuzz/``, ``bench/``); this package links them under one name, so that an
installed mmufuzz adds a single top-level package to site-packages and none of
those generic names (each already taken on the public index) collides with an
unrelated distribution.
"""

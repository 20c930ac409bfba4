"""The method, with no file I/O: arrays and anchors in, arrays out.

Read in this order:

- ``operators``: Subset, Expand and their blend, on the axis map;
- ``ranking``: activation importance, selection of what a smaller model keeps,
  alignment of two models without lineage;
- ``pruning``: a child anchor born as the ranked Subset of its parent;
- ``lineage``: how anchors of a chain relate (steps, inherited rankings);
- ``interpolation``: theta_T = alpha Expand(S) + (1 - alpha) Subset(B);
- ``delta``: an anchor stored as a low-bit delta on its parent's Subset.
"""

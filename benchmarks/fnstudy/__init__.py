"""False-negative detection study: none / batch_quantile / glofnd / ifnd / oracle (every
registered detector), run by ``benchmarks/fn_study.py``.

Trains the same tiny CLIP (``build_tiny_hf_clip``, same seed, same data order) with each
detector on two labelled image-caption sets whose true false negatives are known:

* ``digits``: the embedded coloured-digits demo pairs (``semantic_label`` = digit + ink,
  background, position, scale: 240 classes, ~6 train pairs each, a false-negative share of
  ~0.35 % of the data per anchor);
* ``shapes``: rendered shapes generated here (6 shapes x 6 colours x 2 sizes = 72 classes,
  ~42 train pairs each, ~1.4 % per anchor) with nuisances the captions do not mention
  (position, rotation, background grey level, colour jitter).

Per epoch it records, for every step, the detector's false-negative masks against the label
oracle (pairs of the global batch, both anchor sides): precision, recall, F1 (counts summed
over the epoch's steps), the realised filtered fraction (the loss's own
``filtered_fraction_*``, after its keep-one-negative fallback) and, for IFND, the wall time of
each clustering round. For GloFND it also embeds the training set at a few points and compares
the learned thresholds with the exact per-anchor (1 - alpha) quantile over the whole data set.
At the end: zero-shot retrieval (R@1, R@5 both directions; also a class-aware R@1 that accepts
any same-class item) and classification on the validation split with ``ZeroShotEvaluator``.

One module per concern:

* ``shapes``: the generated shapes data set;
* ``recording``: the detector wrapper and loss that score the masks against the labels;
* ``snapshots``: GloFND's learned thresholds against the exact quantiles (a callback);
* ``study``: one setting (``Study``) and one training run (``run_one``), the detectors'
  order (``DETECTORS``, from the package's registry); ``fn_value.py`` uses these too;
* ``ifnd_cost``: the cost of an IFND clustering round at growing sizes;
* ``runner``: every (data set, detector) run, in worker processes, into one results file;
* ``plots`` and ``table``: the figures and the markdown table of a results file;
* ``cli``: the command line.
"""

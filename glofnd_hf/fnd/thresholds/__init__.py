"""GloFND's per-sample thresholds: the state, the update rules and their persistence.

For every sample and each anchor side (image anchors, text anchors) GloFND keeps a threshold
``lambda`` that should track the (1 - alpha) quantile of the anchor's similarity to the whole
data set. Each visit (about once per epoch) sees the anchor's similarities to one global batch
and takes a stochastic step on the pinball loss, whose gradient is

    g = alpha - mean_{j in negatives} 1[s_ij > lambda]

Three rules turn ``g`` into a step:

``pinball`` (default)
    Stochastic Newton steps on the pinball loss, ``x -= age^-gain_decay * unit * g / alpha``
    on an *iterate* ``x``, with ``unit / alpha`` the inverse density at the quantile of the
    tail fitted to earlier batches' top similarities (so the step is sized whatever the
    spread; it is taken from earlier visits only, so it does not depend on this batch's
    gradient). No caps, no pull towards another estimate: the mean step is zero exactly
    where the share of negatives above ``x`` is alpha, for any tail shape. The weight
    decays with the anchor's *age* (visits' worth of evidence), so where nothing moves the
    error shrinks with visits; the threshold that detects is a running mean of the iterates
    weighted by age and taken in rank units (of ``exp(-x / unit)``, the iterates' shares in
    the local tail), so it filters what the iterates filter on average. The first visit
    starts at the batch's tail estimate ``q_hat`` (see ``tail``) with an age equal to its
    worth in visits of pinball evidence. Drift restarts the age (to ``restart_age``):
    per anchor, a running mean of the clipped z-scores of ``q_hat`` against the running
    mean of the earlier ones (the *centre*), measured against their own scatter; per side, a
    t-test of the batch's mean innovation ``q_hat - centre`` across its anchors (embeddings
    that move together); and a run of visits without any negative above the iterate that
    had more than ``drift_level^2 / 2`` expected. Detected drift also carries the iterate,
    the threshold and the centre along by the centre's move; a common shift moves every
    other anchor too, by the share of an epoch that the batch is (the part of the shift,
    seen since the anchors' last visit, that accrued during this step), through a per-side
    offset that the state keeps and folds into the table when it is saved. A batch's
    exceedances count at most ``alpha n + 3 sqrt(alpha n) + 1`` (rarely reached at the
    quantile), so a batch far above the iterate cannot throw it to the clamp; such a batch
    lifts the iterate instead to leave no more than that many of its negatives above it.
``tail``
    A Robbins-Monro step ``lambda -= w_t * unit * g / alpha``, with
    ``w_t = max(1 / t, step_floor)`` for the anchor's t-th visit and ``unit / alpha`` the
    inverse density at the quantile of the tail fitted to the batch's top similarities (a
    running mean over visits), so that this is a Newton step whatever the spread of the
    similarities. The tail is a generalised Pareto one ending at 1 with the batch's mean
    excess ``beta`` (the *tail scale*): ``unit`` is ``beta`` for a tail far below 1 (an
    exponential one) and smaller near 1, where the same share of the negatives is packed
    into less similarity. The first visit starts at the batch's tail estimate of the
    quantile ``q_hat`` (exceedances over the batch's top-k, extrapolated to alpha). A step
    does not cross the batch's own evidence: going down, no further than its (k+1)-th
    largest negative; going up, no further than its top negative. With
    ``local_step``, where the similarities near the threshold are denser than that tail
    implies (a plateau of near-duplicates), the step shrinks to ``alpha / density``, the
    inverse of a running mean of the batches' local density around the threshold, and a
    step up passes no more than about ``step_floor`` of the batch's excess exceedances
    (``m - alpha n`` of the ``m`` above the threshold). The threshold is then
    held near a *centre*, a running mean of the visits' q_hat whose gain rises from about
    0.3 towards 1 when the estimates move by more than their own noise (a test kept per
    anchor): the offset ``x = lambda - centre`` is shrunk to ``x * c^2 / (x^2 + c^2)`` with
    ``c = band * beta``. Small offsets pass, so visits average; large ones (a threshold left
    behind when the embeddings moved faster than one visit per epoch can follow) are pulled
    back instead of leaving the threshold parked at a bound. These steps move an *iterate*;
    the threshold that detects is its running mean with gain ``averaging`` (Polyak
    averaging), whose lag behind the iterate is shrunk the same way, so it averages the
    iterate's noise but follows a quantile that moves by more than about a tail scale.
``adam`` / ``reference``
    Adam on ``g`` with learning rate ``lr`` (the reference implementation). ``reference``
    corrects Adam's bias with ``t = epoch + 1`` exactly as the reference code does; ``adam``
    with each sample's own step count. Adam's normalised step is about ``lr`` in similarity
    units whatever the spread of the similarities: where the band of similarities is
    narrower than ``lr`` or moves, the thresholds overshoot and park at the clamp.
"""

# Each rule registers itself in RULES on import.
# Each rule's module adds it to RULES when imported.
from .adam import AdamRule, adam_step
from .batch import exceedances, pinball_gradient
from .config import (
    LAMBDA,
    RULES,
    THRESHOLD_RANGE,
    UPDATE_RULES,
    GloFNDConfig,
    ThresholdRule,
    UpdateRule,
)
from .pinball import PinballRule
from .state import ThresholdState
from .tail import TailRule

__all__ = [
    "LAMBDA",
    "RULES",
    "THRESHOLD_RANGE",
    "UPDATE_RULES",
    "AdamRule",
    "GloFNDConfig",
    "PinballRule",
    "TailRule",
    "ThresholdRule",
    "ThresholdState",
    "UpdateRule",
    "adam_step",
    "exceedances",
    "pinball_gradient",
]

"""Streaming WebDataset shard loader with a stable per-sample dataset index.

GloFND keeps per-sample state (one threshold per sample) keyed by a dataset index
in ``[0, N)``.  This package streams image-text pairs out of tar shards and attaches
that index to every sample, with partitioning, epoch length and bad-data handling
that are safe for multi-process / multi-node training.

Modules: :mod:`.partition` (which shards and how many batches each rank and worker reads),
:mod:`.dataset` (:class:`ShardConfig`, :class:`ShardDataset`), :mod:`.loader`
(:class:`ShardDataLoader`, :func:`build_shard_loader`); reading shards is
:mod:`glofnd_hf.data.webdataset_io`, the bad-sample counter :mod:`glofnd_hf.data.bad_samples`.

Batches
-------
Every batch is a dict::

    pixel_values      float  B x 3 x H x W   (output of ``image_transform``)
    input_ids         long   B x L           (from ``tokenize(captions)``)
    attention_mask    long   B x L           (only if the tokenizer returns it)
    dataset_index     long   B
    bad_sample_counts long   len(BAD_SAMPLE_KINDS)   (see "Bad data" below)
    repeated_sample   bool   B   read again on purpose (re-read pass, resampled)
    sample_source     list of B str: "shard '...' key '...'"

:class:`ShardDataLoader` removes the last three before handing the batch out (after
its duplicate-index check, see "Dataset index"), so what a training loop receives has
exactly the first four keys.

Shard specs
-----------
Local shards are checked when the dataset is built: a file that does not exist, or a
pattern none of whose files exists, raises :class:`~glofnd_hf.data.errors.DataError`
naming the first missing file (glob patterns are not expanded: use brace ranges).
Remote URLs are not checked; reading them reports their failures.  In non-resampled mode
a shard listed twice is refused.

``ShardConfig.shards`` is a local path, a brace pattern
(``/data/{00000..00331}.tar``), a ``::``-joined list of those, any URL
webdataset's ``gopen`` opens (``pipe:aws s3 cp s3://b/00001.tar -``,
``file:``, ``http(s):``), or a Python list of any of these.  The expanded order
is the canonical shard order; shuffling is a permutation of it.

Partition (non-resampled mode)
------------------------------
For epoch ``e`` the canonical shard list is permuted with a RNG seeded by
``(seed, e)`` (identical on every rank), then rank ``r`` of ``R`` takes
``perm[r::R]`` and DataLoader worker ``w`` of ``W`` takes ``[w::W]`` of that,
i.e. ``perm[r + R*w :: R*W]`` - see :func:`shard_partition`.  Ranks and workers
see disjoint shards and together every shard.  ``num_shards >= R * W`` is
required (a worker with no shard would stall its rank), checked up front.

Epoch length
------------
``T = train_num_samples`` if set, else the number of samples in the selected
shards according to the sizes file(s) beside the shards (``sizes.json``
``{basename: count}`` written by :mod:`glofnd_hf.data.shard_writer`, else
img2dataset's per-shard ``NNNNN_stats.json`` ``successes``).  Every rank yields
exactly ``B = T // (R * batch_size)`` full batches per epoch (never a partial
batch), so distributed training never hangs on a rank with less data.  Worker
``w`` yields ``B // W + (1 if w < B % W else 0)`` batches (its quota); the
DataLoader's round-robin then gives batch ``i`` of an epoch from worker
``i % W``.  When shards are unevenly sized or do not divide evenly:

* samples a worker has beyond its quota are dropped for that epoch (they are
  reached in another epoch, since the shard assignment changes every epoch);
* a worker whose shards hold fewer usable samples than its quota re-reads its
  shards (a new sample-shuffle pass) to fill it, so a few samples are seen
  twice in that epoch (logged at INFO).  A full pass without a single usable
  sample raises :class:`~glofnd_hf.data.errors.DataError` (naming the first read error:
  a failing ``pipe:``, an unreadable file) instead of looping.

With equal-size shards, ``num_shards`` divisible by ``R*W`` and the per-worker
sample count divisible by ``batch_size`` (and ``B`` divisible by ``W``), each
sample is seen exactly once per epoch.

Resampled mode
--------------
``resampled=True``: every worker draws shards with replacement (RNG seeded by
seed, epoch, rank, worker, so also reproducible) and stops at its quota.  The
epoch length is ``train_num_samples`` (or the sizes total); ``num_shards`` may be
smaller than ``R * W``.

Dataset index
-------------
``index_source="field"`` (default): the ``KEY.idx`` text entry (decimal integer),
else ``"dataset_index"`` in ``KEY.json``.  ``index_source="key"``: ``int(key)`` of
the sample key's basename; img2dataset keys are zero-padded
``shard_id * 10**k + row`` strings (``"000123456"`` -> 123456), so the index space
is sparse and ``dataset_size`` must be given explicitly and be ``> max key``
(e.g. ``num_shards * 10**k``); GloFND state is then sized by that ``N``.

``N`` (``dataset_size``) defaults, in field mode, to ``glofnd_index.json``'s
``dataset_size`` beside the shards (written by the writer / ``add_index``), else
the sum of all entries of ``sizes.json``, else the sum of the selected shards'
``_stats.json`` counts.  Indices are never wrapped: a sample whose index is
missing, not an integer or outside ``[0, N)`` raises ``ValueError`` (naming the
shard and key) at its first occurrence, or with ``on_bad_index="skip"`` is
skipped and counted as ``bad_index``.  ``N`` is refused when its per-sample state
(at least :data:`~glofnd_hf.data.index_space.MIN_STATE_BYTES_PER_SAMPLE` bytes per index)
cannot fit in the machine's memory, naming where it came from
(:class:`~glofnd_hf.data.errors.IndexSpaceError`).

Every dataset index must belong to one sample: two samples with one index would share
one per-sample state.  :class:`ShardDataLoader` keeps a bitmap of the indices its rank
received in the current epoch (``N / 8`` bytes, reset at every epoch) and raises
:class:`~glofnd_hf.data.errors.DuplicateIndexError`, naming the shard and key of the
second sample, when one comes again; samples read again on purpose (a worker's re-read
pass, resampled mode) are not checked.  Duplicates between shards that different ranks
read in an epoch go unnoticed there; ``glofnd-shards verify`` reads every index
(:mod:`glofnd_hf.data.shard_verify`) and names both samples.

Bad data
--------
Corrupt/undecodable images (``corrupt_image``), samples without an image entry
(``missing_image``), missing or empty captions (``missing_caption``), bad
indices in skip mode (``bad_index``), exceptions raised by ``image_transform``
(``transform_error``) and unreadable or truncated shards (``shard_read_error``,
the rest of that shard is skipped) are skipped and counted per worker process.
Each worker logs one ``logging`` warning per kind at most every
``warn_interval_s`` seconds (with the number suppressed meanwhile).  Counts reach
the main process through the batches: ``bad_sample_counts`` holds the number of
samples of each kind the producing worker skipped since its previous batch, so
summing it over batches gives exact totals over all workers.
:class:`ShardDataLoader` does that summing (``loader.bad_sample_counts``, and
``loader.epoch_bad_sample_counts`` for the current epoch) and pops the key.

Distributed / accelerate
------------------------
The loader is already split by rank, so it must NOT be passed through
``accelerator.prepare`` (which would shard or dispatch it again).  Both the
loader and the dataset carry ``glofnd_presharded = True``; use
:func:`is_presharded_loader` in the Trainer's ``get_train_dataloader`` to return
it as is (the Trainer's ``_prepare_inputs`` still moves batches to the device).

Epochs and resume
-----------------
The whole stream (shard order, sample shuffle, batches) is a deterministic
function of ``(shards, seed, epoch, rank, world_size, num_workers, batch_size,
shuffle_buffer)``: another number of DataLoader workers gives each worker other
shards, so it orders an epoch differently (every epoch still reads every shard
once).  ``set_epoch(epoch)`` writes a value in shared memory, so persistent workers
see it.  If ``set_epoch`` is not called between two iterations of a
:class:`ShardDataLoader`, the epoch advances by one.

Resuming mid-epoch: ``set_epoch(epoch)`` alone restarts that epoch from the
beginning of its shard order (samples already seen in that epoch are seen
again).  ``set_epoch(epoch, skip_batches=k)`` continues exactly where a run
stopped after ``k`` batches of that epoch: each worker regenerates and discards
its share of the first ``k`` batches (decode cost, no transfer) and every rank
then yields ``B - k`` batches - the same batches, in the same order, as the
uninterrupted run (after ``k`` batches DataLoader worker ``j`` serves the stream of
worker ``(k + j) % W``, whose turn comes next).  Image augmentation is seeded per
sample by ``(seed, epoch, dataset index, pass)`` (:mod:`glofnd_hf.data.randomness`),
so neither the worker nor a resume changes it; worker seeds are drawn from the
loader's own generator, never from the global torch RNG.  For a
run stopped after ``n`` batches in total: ``epoch, k = divmod(n, B)`` with
``B = loader.batches_per_epoch``.

A mid-epoch resume is exact only under the same settings:
:meth:`ShardDataLoader.save_stream_settings` writes them to a checkpoint folder
(``shard_stream.json``), and ``resume_at(epoch, k, checkpoint=folder)`` refuses a
mid-epoch resume (``k > 0``) whose settings differ, another ``num_workers`` say, with
:class:`~glofnd_hf.data.errors.ShardResumeError` (at an epoch start any settings
do; a checkpoint without the file is not checked).  With the HF Trainer, set
``ignore_data_skip=True`` and call ``set_epoch(epoch, skip_batches=k)`` yourself:
``accelerate.skip_first_batches`` would rebuild a plain DataLoader around the
dataset, which neither calls ``set_epoch`` nor removes ``bad_sample_counts``.
"""

from __future__ import annotations

from .dataset import ShardConfig, ShardDataset
from .loader import (
    PRESHARDED_ATTR,
    STREAM_FILE,
    ShardDataLoader,
    build_shard_loader,
    is_presharded_loader,
    read_stream_settings,
)
from .partition import epoch_batches_per_rank, resampled_shards, shard_partition, worker_quota

__all__ = [
    "PRESHARDED_ATTR",
    "STREAM_FILE",
    "ShardConfig",
    "ShardDataLoader",
    "ShardDataset",
    "build_shard_loader",
    "epoch_batches_per_rank",
    "is_presharded_loader",
    "read_stream_settings",
    "resampled_shards",
    "shard_partition",
    "worker_quota",
]

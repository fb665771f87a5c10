"""A tiny GloFNDTrainer run, alone or under ``accelerate launch`` (tests only).

After every step the per-sample state is hashed on each rank and compared across ranks.
Rank 0 writes the final parameters, the state, the per-step digests and the logs to
``--out``.
"""

import argparse
import gc
import os
import sys

import torch
import torch.distributed as dist
from transformers import TrainerCallback

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from callbacks import StopAt  # noqa: E402

from distributed.common import shut_down_process_group  # noqa: E402

GLOBAL_BATCH = 8
TRAIN_PAIRS = 32  # the first digits pairs: dataset indices 0..31


def train_pairs():
    from glofnd_hf.data.digits import load_digits_pairs

    return load_digits_pairs(seed=0)["train"].select(range(TRAIN_PAIRS))


def write_train_shards(folder) -> str:
    """The worker's training pairs as 4 webdataset shards of 8 (for ``--shards``)."""
    from glofnd_hf.data.shard_writer import write_shards_from_dataset

    pattern, count = write_shards_from_dataset(
        train_pairs(), str(folder), index_column="dataset_index", samples_per_shard=8
    )
    assert count == TRAIN_PAIRS
    return pattern


def training_data(adapter, data, shards, batch_size):
    """The trainer's data: the map-style pairs with their collator, or with ``shards`` the
    streaming loader over them (each rank its own shards, shuffled in a buffer of 8)."""
    from glofnd_hf.data.hf import ImageTextCollator
    from glofnd_hf.data.shards import ShardConfig, build_shard_loader

    if shards is None:
        collator = ImageTextCollator(adapter.image_transform(train=False), adapter.tokenize)
        return {"train_dataset": data, "data_collator": collator}
    config = ShardConfig(
        shards=shards,
        batch_size=batch_size,
        dataset_size=TRAIN_PAIRS,
        shuffle_buffer=8,
        seed=0,
        num_workers=0,
    )
    loader = build_shard_loader(config, adapter.image_transform(train=False), adapter.tokenize)
    return {"train_dataset": loader}


class StateDigest(TrainerCallback):
    """Gathers a digest of the whole per-sample state from every rank after each step."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.digests = []

    def on_step_end(self, args, state, control, **kwargs):
        values = self.trainer.contrastive_loss.state_dict().values()
        digest = torch.stack(
            [v.double().sum() for v in values]
            + [(v.double() * torch.arange(len(v))).sum() for v in values]
        )
        if dist.is_initialized():
            parts = [torch.zeros_like(digest) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, digest)
            digest = torch.stack(parts)
        else:
            digest = digest.unsqueeze(0)
        self.digests.append(digest)


class LoadedState(TrainerCallback):
    """The whole per-sample state as training begins (after a resume loaded it)."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.state = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.state = self.trainer.contrastive_loss.state_dict()


def refuse_shard_writes(after):
    """This process's state shard writes fail (a permission error) after ``after`` of them."""
    import glofnd_hf.state_shards as shards

    write, calls = shards.write_state_shard, []

    def refuse(folder, loss, num_samples):
        calls.append(folder)
        if len(calls) <= after:
            return write(folder, loss, num_samples)
        name = shards.shard_file_name(dist.get_rank(), dist.get_world_size())
        raise PermissionError(13, "Permission denied", os.path.join(folder, name))

    shards.write_state_shard = refuse


def refuse_rng_writes(trainer, after):
    """This process's random-state writes (the Trainer's rng_state_<rank>.pth) fail (a
    permission error) after ``after`` of them."""
    save, calls = trainer._save_rng_state, []

    def refuse(output_dir):
        calls.append(output_dir)
        if len(calls) <= after:
            return save(output_dir)
        name = f"rng_state_{dist.get_rank()}.pth"
        raise PermissionError(13, "Permission denied", os.path.join(output_dir, name))

    trainer._save_rng_state = refuse


def run(
    out_dir,
    loss_type="clip",
    stop_at=None,
    resume=None,
    save_steps=2,
    world=1,
    learning_rate=0.05,
    chunk=None,
    state_sharding="replicated",
    shards=None,
    leave_group=True,
    fail_shard_write=None,
    fail_rng_write=None,
):
    from glofnd_hf.args import GloFNDTrainingArguments
    from glofnd_hf.models import build_tiny_hf_clip, build_tiny_hf_siglip
    from glofnd_hf.trainer import GloFNDTrainer

    data = train_pairs()
    build = build_tiny_hf_siglip if loss_type == "sigmoid" else build_tiny_hf_clip
    adapter = build(seed=0, texts=list(data["caption"]))
    args = GloFNDTrainingArguments(
        output_dir=out_dir,
        per_device_train_batch_size=GLOBAL_BATCH // world,
        num_train_epochs=2,
        learning_rate=learning_rate,
        optim="sgd",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="steps",
        save_steps=save_steps,
        seed=0,
        logging_steps=1,
        loss_type=loss_type,
        fn_alpha=0.1,
        detector_kwargs={"init_quantile": True},
        gamma=0.5,
        gamma_schedule="constant",
        dataloader_num_workers=0,
        contrastive_chunk_size=chunk,
        state_sharding=state_sharding,
        num_samples=None if shards is None else TRAIN_PAIRS,
    )
    # Deterministic images, so one and two processes see exactly the same pixels. SGD, as
    # Adam would blow float noise in zero-gradient parameters (attention key biases) up.
    inputs = training_data(adapter, data, shards, GLOBAL_BATCH // world)
    trainer = GloFNDTrainer(adapter, args, **inputs)
    digest = StateDigest(trainer)
    trainer.add_callback(digest)
    loaded = LoadedState(trainer)
    trainer.add_callback(loaded)
    if stop_at is not None:
        trainer.add_callback(StopAt(stop_at))
    error = None
    if fail_shard_write is not None and fail_shard_write == trainer.args.process_index:
        refuse_shard_writes(after=1)  # the first checkpoint is written, the second is not
    if fail_rng_write is not None and fail_rng_write == trainer.args.process_index:
        refuse_rng_writes(trainer, after=1)
    try:
        trainer.train(resume_from_checkpoint=resume)
    except Exception as err:
        if fail_shard_write is None and fail_rng_write is None:
            raise
        error = f"{type(err).__name__}: {err}"  # what this process raised
    params = {n: p.detach().clone() for n, p in adapter.model.named_parameters()}
    world_size = trainer.args.world_size
    result = {
        "params": params,
        "state": trainer.contrastive_loss.state_dict(),
        "digests": digest.digests,
        "loaded_state": loaded.state,
        "logs": trainer.state.log_history,
        "world": world_size,
        # Rows this process holds of each per-sample table (all N when replicated).
        "local_rows": {k: len(t.data) for k, t in trainer.contrastive_loss.shard_tables().items()},
        "error": error,
    }
    if world_size > 1:
        release(trainer, leave_group)
    return result


def release(trainer, leave_group):
    """DDP's reducer holds the group: drop every reference to the wrapped model, then leave
    the group together (a rank tearing down alone makes gloo abort the other), unless
    another run follows in it."""
    trainer.accelerator.free_memory()
    trainer.model_wrapped = None
    del trainer
    gc.collect()
    if leave_group:
        shut_down_process_group()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--loss-type", default="clip")
    parser.add_argument("--stop-at", type=int)
    parser.add_argument("--resume")
    parser.add_argument("--learning-rate", type=float, default=0.05)
    parser.add_argument("--chunk", type=int, help="contrastive_chunk_size (the cached loss)")
    parser.add_argument("--state-sharding", default="replicated", help="comma-separated")
    parser.add_argument("--shards", help="train from these webdataset shards (streaming)")
    parser.add_argument(
        "--fail-shard-write",
        type=int,
        help="this process's second state shard write fails; every process writes what it "
        "raised to {out}.rank{r}",
    )
    parser.add_argument(
        "--fail-rng-write",
        type=int,
        help="this process's second random-state write fails; as --fail-shard-write",
    )
    opts = parser.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # "replicated,sharded": one run after the other in the same processes, each in its own
    # output folder below --output-dir; --out then holds {sharding: result}.
    shardings = opts.state_sharding.split(",")
    results = {}
    for i, sharding in enumerate(shardings):
        out_dir = opts.output_dir if len(shardings) == 1 else f"{opts.output_dir}/{sharding}"
        results[sharding] = run(
            out_dir,
            opts.loss_type,
            opts.stop_at,
            opts.resume,
            world=world,
            learning_rate=opts.learning_rate,
            chunk=opts.chunk,
            state_sharding=sharding,
            shards=opts.shards,
            leave_group=i == len(shardings) - 1,
            fail_shard_write=opts.fail_shard_write,
            fail_rng_write=opts.fail_rng_write,
        )
    rank = int(os.environ.get("RANK", "0"))
    if opts.fail_shard_write is not None or opts.fail_rng_write is not None:
        torch.save(results[shardings[-1]]["error"], f"{opts.out}.rank{rank}")
    elif rank == 0:
        torch.save(results if len(shardings) > 1 else results[shardings[0]], opts.out)


if __name__ == "__main__":
    main()

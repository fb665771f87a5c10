"""``GloFNDTrainer``: a ``transformers.Trainer`` whose loss is a bimodal contrastive loss with
false-negative detection. It knows the detector only through the loss's interface."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from accelerate.utils import DistributedType
from transformers import Trainer

from .args import GloFNDTrainingArguments
from .checkpoints import (
    STATE_FILE,  # re-exported: where earlier releases had it
    disk_full_error,
    is_checkpoint_folder,
)
from .data.bad_samples import BAD_SAMPLE_KINDS, DATASETS_BAD_SAMPLE_KINDS
from .data.hf import ImageTextCollator, prepare_image_text_dataset
from .data.images import defer_image_decoding
from .data.shards import is_presharded_loader
from .loss_factory import build_contrastive_loss, resolve_state_device
from .losses import (
    BimodalContrastiveLoss,
    cached_contrastive_step,
    chunk_bounds,
)
from .losses import registry as loss_registry
from .model_card import ModelCardCallback
from .models import DualEncoderAdapter, family_of_adapter
from .trainer_callbacks import ClampLogitScale, DataEpoch, EpochSummary
from .trainer_checkpoints import CheckpointingMixin
from .trainer_hub import HubPushMixin

logger = logging.getLogger(__name__)

__all__ = ["STATE_FILE", "GloFNDTrainer", "build_contrastive_loss", "resolve_state_device"]


DEFAULT_MAX_LOGIT_SCALE = 100.0  # CLIP's cap on logit_scale.exp()


def _rows(inputs: dict[str, Any], start: int, end: int, batch: int) -> dict[str, Any]:
    """Rows ``start:end`` of every per-pair tensor of a batch; other entries as they are."""
    return {
        k: v[start:end] if isinstance(v, torch.Tensor) and v.dim() and len(v) == batch else v
        for k, v in inputs.items()
    }


class GloFNDTrainer(CheckpointingMixin, HubPushMixin, Trainer):
    """Trains a dual encoder with a contrastive loss and GloFND (or another detector).

    ``adapter`` wraps a Hugging Face CLIP-family or open_clip model (see ``models``). For a
    map-style ``datasets`` train set the dataset index column is checked (or created) and N
    defaults to the largest index + 1. ``train_dataset`` may also be a streaming shard loader
    (``data.shards.build_shard_loader``): it is used as is, never re-sharded by accelerate,
    and N comes from ``args.num_samples`` or the loader's index files.
    """

    def __init__(
        self,
        adapter: DualEncoderAdapter,
        args: GloFNDTrainingArguments,
        train_dataset: Any = None,
        evaluator: Callable[..., dict[str, float]] | None = None,
        data_collator: Callable | None = None,
        loss: BimodalContrastiveLoss | None = None,
        image_column: str = "image",
        caption_column: str = "caption",
        index_column: str = "dataset_index",
        label_column: str | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(args, GloFNDTrainingArguments):
            raise TypeError("GloFNDTrainer needs GloFNDTrainingArguments")
        self.adapter = adapter
        self.evaluator = evaluator
        if label_column is None and args.detector_spec().requires_labels:
            raise ValueError(
                f"the {args.detector} detector needs a label column (label_column=...)"
            )
        train_dataset, data_collator, num_samples = self._prepare_training_data(
            adapter,
            args,
            train_dataset,
            data_collator,
            (image_column, caption_column, index_column, label_column),
        )
        self._prepare_temperature(args)
        kwargs.setdefault("processing_class", getattr(adapter, "processor", None))
        if evaluator is not None and kwargs.get("eval_dataset") is None:
            kwargs["eval_dataset"] = getattr(evaluator, "dataset", None)
        super().__init__(
            model=adapter.model,
            args=args,
            train_dataset=train_dataset,
            data_collator=data_collator,
            **kwargs,
        )
        # Our loss is a mean over anchors: let the Trainer scale it for gradient accumulation.
        self.model_accepts_loss_kwargs = False
        if loss is None:
            if num_samples is None:
                raise ValueError(
                    "num_samples (N, the size of the dataset index space) is required when the "
                    "training data has no length (streaming)"
                )
            loss = build_contrastive_loss(
                args, num_samples, args.device, embed_width=adapter.embedding_width()
            )
        self.contrastive_loss = loss
        self._prepare_logit_bias(loss)
        self.num_samples = loss.num_samples if loss.num_samples is not None else num_samples
        self._stat_sums: dict[tuple[str, ...], tuple[torch.Tensor, int]] = {}
        self._bad_samples: dict[str, int] = {}
        self.add_callback(ClampLogitScale(adapter.logit_scale_parameter(), self._log_scale_cap))
        self.add_callback(ModelCardCallback(self))  # a model card in every checkpoint
        self.add_callback(EpochSummary(self))
        self.add_callback(DataEpoch(self))
        self._shard_resume: tuple[int, int] | None = None
        self._state_written_to: str | None = None
        self._check_metric_for_best_model()
        if args.contrastive_chunk_size is not None and (
            self.accelerator.distributed_type == DistributedType.DEEPSPEED
        ):
            # DeepSpeed owns the backward and allows one per micro-batch.
            raise ValueError("contrastive_chunk_size does not work with DeepSpeed")

    def _prepare_training_data(
        self,
        adapter: DualEncoderAdapter,
        args: GloFNDTrainingArguments,
        train_dataset: Any,
        data_collator: Callable | None,
        columns: tuple[str, str, str, str | None],
    ) -> tuple[Any, Callable, int | None]:
        """The train set as the Trainer gets it, its collator and N (None when unknown)."""
        image_column, caption_column, index_column, label_column = columns
        num_samples = args.num_samples
        self.shard_loader = None
        if is_presharded_loader(train_dataset) and hasattr(train_dataset, "batches_per_epoch"):
            # Already split by rank and worker: keep it out of accelerator.prepare, and let it
            # (not accelerate's skip_first_batches) fast-forward on a mid-epoch resume.
            self.shard_loader = train_dataset
            train_dataset = train_dataset.dataset
            num_samples = num_samples or getattr(train_dataset, "dataset_size", None)
            args.ignore_data_skip = True
        elif (
            train_dataset is not None
            and hasattr(train_dataset, "column_names")
            and hasattr(train_dataset, "__len__")
        ):
            train_dataset, num_samples = prepare_image_text_dataset(
                train_dataset,
                image_column,
                caption_column,
                index_column,
                args.num_samples,
                extra_columns=[label_column] if label_column else [],
            )
            train_dataset = defer_image_decoding(train_dataset, image_column)
        if data_collator is None:
            data_collator = ImageTextCollator(
                adapter.image_transform(train=True),
                adapter.tokenize,
                image_column,
                caption_column,
                index_column,
                label_column,
                seed=args.seed,
            )
        return train_dataset, data_collator, num_samples

    # -- temperature -------------------------------------------------------------------------
    def _temperature_parameters(self) -> list[torch.nn.Parameter]:
        params = [self.adapter.logit_scale_parameter()]
        bias = self.adapter.logit_bias_parameter()
        return params + ([bias] if bias is not None else [])

    def _prepare_temperature(self, args: GloFNDTrainingArguments) -> None:
        scale = self.adapter.logit_scale_parameter()
        with torch.no_grad():
            if args.temperature_init is not None:
                scale.fill_(math.log(1.0 / args.temperature_init))
            self._log_scale_cap = self._logit_scale_cap(args, float(scale))
            scale.clamp_(0.0, self._log_scale_cap)
        scale.requires_grad_(args.temperature_scheme != "fixed")

    @staticmethod
    def _logit_scale_cap(args: GloFNDTrainingArguments, start: float) -> float:
        """ln of the cap on ``logit_scale.exp()``: ``max_logit_scale`` where set, else CLIP's
        100 or the model's starting scale (``start``, ln) where higher, so a checkpoint's
        learned scale (a SigLIP one's is about 110) is never cut by default."""
        if args.max_logit_scale is None:
            return max(math.log(DEFAULT_MAX_LOGIT_SCALE), start)
        cap = math.log(args.max_logit_scale)
        if start > cap + 1e-6:
            logger.warning(
                "the model's logit scale %.4g is above max_logit_scale %g: it is cut to %g "
                "(leave max_logit_scale unset to keep the model's own scale)",
                math.exp(start),
                args.max_logit_scale,
                args.max_logit_scale,
            )
        return cap

    def _prepare_logit_bias(self, loss: BimodalContrastiveLoss) -> None:
        """The sigmoid loss needs the model's logit bias; a loss without one leaves it frozen
        (else it would get no gradient, which DDP refuses)."""
        bias = self.adapter.logit_bias_parameter()
        if loss.uses_logit_bias and bias is None:
            raise ValueError(
                f"{type(loss).__name__} needs a model with a logit bias (SigLIP-style); "
                f"{type(self.adapter.model).__name__} has none: use a loss_type without one "
                f"({', '.join(n for n in loss_registry.names() if not loss_registry.get(n).uses_logit_bias)})"
            )
        if bias is not None and not loss.uses_logit_bias:
            bias.requires_grad_(False)

    def get_decay_parameter_names(self, model: torch.nn.Module) -> list[str]:
        """The temperature (and a logit bias) is never weight-decayed."""
        excluded = {id(p) for p in self._temperature_parameters()}
        names = set(super().get_decay_parameter_names(model))
        return [n for n, p in model.named_parameters() if n in names and id(p) not in excluded]

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        fresh = self.optimizer is None
        optimizer = super().create_optimizer(model)
        lr = self.args.temperature_lr
        if fresh and lr is not None:
            temperature = [p for p in self._temperature_parameters() if p.requires_grad]
            ids = {id(p) for p in temperature}
            for group in optimizer.param_groups:
                group["params"] = [p for p in group["params"] if id(p) not in ids]
            optimizer.add_param_group({"params": temperature, "weight_decay": 0.0, "lr": lr})
        return optimizer

    # -- the loss ----------------------------------------------------------------------------
    def get_train_dataloader(self):
        if self.shard_loader is not None:
            return self.shard_loader
        return super().get_train_dataloader()

    def current_epoch(self) -> float:
        """Epoch driving start epochs and schedules: passes over the training data. Exact for
        map-style data and for the shard loader (whose epoch is a pass over its samples, kept
        in ``state.epoch`` after every step); other streaming data: samples seen / N."""
        if self.shard_loader is not None or hasattr(self.train_dataset, "__len__"):
            return float(self.state.epoch or 0.0)
        global_batch = (
            self.args.per_device_train_batch_size
            * self.args.world_size
            * self.args.gradient_accumulation_steps
        )
        return self.state.global_step * global_batch / float(self.num_samples)

    def _take_loss_inputs(self, inputs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Pop what the loss (not the model) reads: dataset indices and labels; count the
        batch's bad samples."""
        index = inputs.pop("dataset_index")
        labels = inputs.pop("fn_labels", None)
        bad = inputs.pop("bad_sample_counts", None)  # only in batches that had bad rows
        if bad is not None:
            for kind, count in zip(DATASETS_BAD_SAMPLE_KINDS, bad.tolist(), strict=True):
                self._bad_samples[kind] = self._bad_samples.get(kind, 0) + count
        return index, labels

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        index, labels = self._take_loss_inputs(inputs)
        outputs = self.adapter(model, inputs)
        result = self.contrastive_loss(
            outputs.image_embeds,
            outputs.text_embeds,
            outputs.logit_scale,
            index,
            epoch=self.current_epoch(),
            labels=labels,
            logit_bias=outputs.logit_bias,
        )
        if model.training:
            self._accumulate_stats(result.stats, outputs.logit_scale)
        return (result.loss, outputs) if return_outputs else result.loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        """The Trainer's step; with ``contrastive_chunk_size`` below the batch, the cached loss
        (:func:`glofnd_hf.losses.cached_contrastive_step`), which does its own backward."""
        chunk = self.args.contrastive_chunk_size
        batch = len(inputs["input_ids"])
        if chunk is None or chunk >= batch:
            return super().training_step(model, inputs, num_items_in_batch)
        # The cached loss: the Trainer's training step (train mode, input placement, the loss
        # scaled for gradient accumulation), with forward and backward done chunk by chunk.
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        index, labels = self._take_loss_inputs(inputs)
        bounds = chunk_bounds(batch, chunk)

        def encode(i: int) -> tuple[torch.Tensor, ...]:
            start, end = bounds[i]
            out = self.adapter(model, _rows(inputs, start, end, batch))
            return out.image_embeds, out.text_embeds, out.logit_scale, out.logit_bias

        with self.compute_loss_context_manager():
            result = cached_contrastive_step(
                self.contrastive_loss,
                encode,
                len(bounds),
                index,
                epoch=self.current_epoch(),
                labels=labels,
                backward=self.accelerator.backward,
                no_sync=lambda: self.accelerator.no_sync(model),
                loss_weight=1.0 / self.current_gradient_accumulation_steps,
                module=model,
            )
        self._accumulate_stats(result.output.stats, result.logit_scale)
        return result.output.loss / self.current_gradient_accumulation_steps

    def _accumulate_stats(self, stats: dict[str, torch.Tensor], logit_scale: torch.Tensor) -> None:
        # One stacked running sum per set of statistic names, on the device: nothing is read
        # (no host sync) until the Trainer logs.
        stats = {**stats, "temperature": 1.0 / logit_scale.detach().float()}
        device = logit_scale.device
        vector = torch.stack(
            [
                torch.as_tensor(v, dtype=torch.float32, device=device).reshape(())
                for v in stats.values()
            ]
        ).detach()
        names = tuple(stats)
        if names in self._stat_sums:
            total, count = self._stat_sums[names]
            self._stat_sums[names] = (total + vector, count + 1)
        else:
            self._stat_sums[names] = (vector, 1)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._stat_sums:
            names = sorted({n for group in self._stat_sums for n in group})
            position = {n: i for i, n in enumerate(names)}
            sums = torch.zeros(len(names), device=self.args.device)
            counts = torch.zeros(len(names), device=self.args.device)
            for group, (total, count) in self._stat_sums.items():
                where = torch.tensor([position[n] for n in group], device=self.args.device)
                sums.index_add_(0, where, total.to(self.args.device))
                counts.index_add_(
                    0, where, torch.full((len(group),), float(count), device=self.args.device)
                )
            if self.args.world_size > 1:
                # The loss's statistics are global already (the same on every rank); a
                # custom loss's local ones are averaged over the ranks.
                sums = self.accelerator.reduce(sums, reduction="sum")
                counts = self.accelerator.reduce(counts, reduction="sum")
            for key, value in zip(names, (sums / counts).tolist(), strict=True):
                logs[key] = round(value, 6)
            self._stat_sums.clear()
            for kind, count in self._global_bad_sample_counts().items():
                logs[f"bad_samples_{kind}"] = count
        super().log(logs, start_time)

    def _global_bad_sample_counts(self) -> dict[str, int]:
        """:meth:`bad_sample_counts` summed over the processes (a collective when
        distributed: every rank logs)."""
        local = self.bad_sample_counts()
        if self.args.world_size <= 1:
            return local
        # Counts and "this rank reports the kind", in one fixed order on every rank.
        vector = torch.tensor(
            [float(local.get(kind, 0)) for kind in BAD_SAMPLE_KINDS]
            + [float(kind in local) for kind in BAD_SAMPLE_KINDS],
            device=self.args.device,
        )
        vector = self.accelerator.reduce(vector, reduction="sum").tolist()
        n = len(BAD_SAMPLE_KINDS)
        return {
            kind: int(vector[i]) for i, kind in enumerate(BAD_SAMPLE_KINDS) if vector[n + i] > 0
        }

    def bad_sample_counts(self) -> dict[str, int]:
        """Training samples skipped so far, by kind (this process; the logged
        ``bad_samples_<kind>`` are summed over the processes)."""
        counts = dict(self._bad_samples)
        if self.shard_loader is not None:
            for kind, count in self.shard_loader.bad_sample_counts.items():
                counts[kind] = counts.get(kind, 0) + count
        return counts

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            # The training loss type, but evaluation must not move the per-sample state (and
            # eval indices are not training indices): the loss's stateless evaluation.
            index = inputs.pop("dataset_index")
            inputs.pop("fn_labels", None)
            inputs.pop("bad_sample_counts", None)
            out = self.adapter(model, inputs)
            loss = self.contrastive_loss.evaluate(
                out.image_embeds, out.text_embeds, out.logit_scale, index, out.logit_bias
            ).loss
        return loss.detach(), None, None

    # -- evaluation and the best model ---------------------------------------------------------
    def _check_metric_for_best_model(self) -> None:
        """``metric_for_best_model`` must name a metric the zero-shot evaluator reports (with
        or without ``eval_``): said now, not at the first evaluation hours into training."""
        name = self.args.metric_for_best_model
        names = getattr(self.evaluator, "metric_names", None)
        if name is None or not callable(names):
            return
        known = names()
        if name.removeprefix("eval_") not in known:
            raise ValueError(
                f"metric_for_best_model {name!r} is not a metric of the zero-shot evaluation; "
                f"it reports {', '.join(known)} (each also as eval_<name>; greater is better)"
            )

    def _load_best_model(self) -> None:
        """``load_best_model_at_end``: the best checkpoint's weights (the Trainer) and its
        per-sample state, so that training continued from the returned model continues
        from the state that was trained with it."""
        super()._load_best_model()
        self.load_fnd_state(self.state.best_model_checkpoint)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        if self.evaluator is None or eval_dataset is not None:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        raw = self.evaluator(self.adapter, self.model)
        metrics = {f"{metric_key_prefix}_{k}": float(v) for k, v in raw.items()}
        metrics["epoch"] = self.state.epoch or 0.0
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(
            self.args, self.state, self.control, metrics
        )
        return metrics

    # -- saving and resuming (checkpoints: trainer_checkpoints.CheckpointingMixin) ------------
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir or self.args.output_dir
        # HF models: save_pretrained + processor. open_clip models: the Trainer's weight file
        # (which resume_from_checkpoint reads) plus open_clip's own layout.
        try:
            super()._save(output_dir, state_dict)
            family = family_of_adapter(self.adapter)
            if family.saves_beside_trainer and self.args.should_save:
                self.adapter.save(output_dir, **family.release_save_kwargs)
        except Exception as err:
            # Inside a checkpoint, the checkpoint's own handler names the folder.
            in_checkpoint = is_checkpoint_folder(output_dir)
            full = None if in_checkpoint else disk_full_error(err, output_dir, final=True)
            if full is None:
                raise
            raise full from err

    def shard_steps_per_epoch(self) -> int:
        """Optimizer steps per epoch of the shard loader (the Trainer's count)."""
        gas = self.args.gradient_accumulation_steps
        return -(-self.shard_loader.batches_per_epoch // gas)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        self._shard_resume = None
        if checkpoint is not None:
            self.load_fnd_state(checkpoint)
            if self.shard_loader is not None:
                # The Trainer state is restored by now: continue the epoch where it stopped.
                epoch, steps = divmod(self.state.global_step, self.shard_steps_per_epoch())
                skip = steps * self.args.gradient_accumulation_steps
                self.shard_loader.resume_at(epoch, skip, checkpoint=checkpoint)
                self._shard_resume = (epoch, skip) if skip else None

    def _run_epoch(self, *args: Any, **kwargs: Any):
        # transformers >= 5 (one call per epoch). The shard loader skips the batches of a
        # resumed epoch itself, so the Trainer sees an epoch of B - skip batches: its last
        # (possibly partial) accumulation group must end there.
        resume = self._shard_resume
        if resume is not None and kwargs.get("epoch") == resume[0] and "steps_in_epoch" in kwargs:
            kwargs["steps_in_epoch"] = kwargs["steps_in_epoch"] - resume[1]
        self._shard_resume = None
        return super()._run_epoch(*args, **kwargs)

"""Arguments of a GloFND training run: model, data, and the training arguments of the Trainer
extended with the method's settings. YAML recipe keys equal these field names."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from transformers import TrainingArguments

from .fnd import GloFNDConfig, available_detectors
from .fnd.thresholds import UpdateRule
from .losses import GammaSchedule

# Bytes of per-sample state besides the thresholds table (whose size the update rule
# knows): u of the global loss (2 sides), IFND's feature bank.
GLOBAL_LOSS_BYTES_PER_SAMPLE = 2 * 4
IFND_BANK_BYTES_PER_SAMPLE = 2 * 1024 + 3 * 8
# "auto" placement keeps the state on the accelerator up to this size, else in host memory.
AUTO_DEVICE_STATE_LIMIT_BYTES = 2 * 1024**3


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="glofnd-tiny-hf-clip",
        metadata={"help": "HF CLIP-family checkpoint (Hub id or folder), an open_clip model name "
                  "(with --pretrained), 'hf-hub:ORG/NAME', or 'glofnd-tiny-hf-clip' / "
                  "'glofnd-tiny-open-clip' (tiny models built offline, for demos and tests)."},
    )
    model_family: Literal["auto", "hf", "open_clip"] = "auto"
    pretrained: str | None = field(
        default=None, metadata={"help": "open_clip pretrained tag or local checkpoint file."}
    )
    tiny_image_size: int = field(default=32, metadata={"help": "image size of the tiny models"})


@dataclass
class DataArguments:
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "'glofnd-digits' (the embedded demo data), a Hub dataset id, or a "
                  "folder written by datasets' save_to_disk."},
    )
    dataset_config_name: str | None = None
    train_split: str = "train"
    eval_split: str | None = "validation"
    image_column: str = "image"
    caption_column: str = "caption"
    index_column: str = field(
        default="dataset_index",
        metadata={"help": "Column with each pair's dataset index in [0, N); created as the row "
                  "number when the dataset has none."},
    )
    label_column: str | None = field(
        default=None,
        metadata={"help": "Column of ground-truth semantic labels (oracle detector, studies)."},
    )
    class_label_column: str | None = field(
        default=None, metadata={"help": "Column of class ids for zero-shot classification."}
    )
    class_names: list[str] | None = field(
        default=None, metadata={"help": "Class names for zero-shot classification."}
    )
    prompt_templates: list[str] | None = field(
        default=None, metadata={"help": "Prompt templates with '{}' for the class name."}
    )
    train_shards: str | None = field(
        default=None,
        metadata={"help": "Webdataset shards to stream instead of a datasets dataset: paths, "
                  "brace patterns (/data/{00000..00331}.tar), '::'-joined lists, pipe: URLs."},
    )
    train_num_samples: int | None = field(
        default=None, metadata={"help": "Samples per epoch over all ranks (default: sizes.json)."}
    )
    shard_resampled: bool = field(
        default=False, metadata={"help": "Draw shards with replacement (epoch = train_num_samples)."}
    )
    shard_shuffle_buffer: int = 1000
    shard_index_source: Literal["field", "key"] = field(
        default="field",
        metadata={"help": "Dataset index from the shard's index field, or from the numeric "
                  "img2dataset key (then num_samples must exceed the largest key)."},
    )
    shard_on_bad_index: Literal["raise", "skip"] = "raise"
    max_train_samples: int | None = None
    max_eval_samples: int | None = None


@dataclass
class GloFNDTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus GloFND and contrastive-loss settings."""

    detector: str = field(
        default="glofnd",
        metadata={"help": "False-negative detector: none, glofnd, batch_quantile, oracle, ifnd."},
    )
    fn_strategy: Literal["eliminate", "attract"] = field(
        default="eliminate", metadata={"help": "What to do with detected false negatives."}
    )
    loss_type: Literal["clip", "sogclr", "fastclip"] = field(
        default="clip",
        metadata={"help": "clip: CLIP InfoNCE; sogclr: global contrastive loss; fastclip: "
                  "global contrastive loss times the temperature (FastCLIP)."},
    )
    num_samples: int | None = field(
        default=None,
        metadata={"help": "N, the size of the dataset index space (default: largest index + 1 "
                  "of the training data; required for streaming data)."},
    )
    glofnd_alpha: float = 1e-3
    glofnd_update_rule: UpdateRule = field(
        default="tail",
        metadata={"help": "How thresholds learn: tail (steps in units of each anchor's tail "
                  "scale; tracks moving embeddings), adam (Adam, per-sample bias "
                  "correction), reference (Adam exactly as the GloFND reference code)."},
    )
    glofnd_tail_size: int = field(
        default=8, metadata={"help": "tail rule: top-k negatives that estimate each tail."}
    )
    glofnd_band: float = field(
        default=1.0,
        metadata={"help": "tail rule: offsets beyond ~band x tail scale from the batch's own "
                  "quantile estimate are pulled back to it."},
    )
    glofnd_step_floor: float = field(
        default=0.2, metadata={"help": "tail rule: smallest step weight (follows drift)."}
    )
    glofnd_lr: float = 0.05
    glofnd_beta1: float = 0.9
    glofnd_beta2: float = 0.98
    glofnd_eps: float = 1e-8
    glofnd_clip_grad_mult: float | None = None
    glofnd_init_quantile: bool = False
    glofnd_update_start_epoch: float = 0.0
    glofnd_mask_start_epoch: float = 0.0
    ifnd_num_clusters: list[int] | None = field(
        default=None,
        metadata={"help": "IFND: k of each k-means granularity (default: one, k = 1/alpha)."},
    )
    ifnd_cluster_every: float = field(default=1.0, metadata={"help": "IFND: epochs between rounds."})
    ifnd_accept_warmup_epochs: float = field(
        default=10.0,
        metadata={"help": "IFND: epochs over which the accepted fraction grows from 0 to 1."},
    )
    gamma: float = field(default=0.2, metadata={"help": "Final gamma of the global loss's u."})
    gamma_schedule: Literal["constant", "cosine"] = "cosine"
    gamma_decay_epochs: float = 18.0
    temperature_scheme: Literal["learnable", "fixed", "global_learnable"] = field(
        default="learnable",
        metadata={"help": "learnable: the model's logit_scale is trained (global_learnable is "
                  "the FastCLIP name of the same); fixed: it is frozen."},
    )
    temperature_init: float | None = field(
        default=None, metadata={"help": "Set the temperature (1 / logit_scale) at start."}
    )
    temperature_lr: float | None = field(
        default=None, metadata={"help": "Own learning rate for the temperature."}
    )
    rho: float = field(default=6.5, metadata={"help": "FastCLIP-v3 rho (learnable temperature)."})
    max_logit_scale: float = field(
        default=100.0, metadata={"help": "logit_scale.exp() is clamped to this after each step."}
    )
    state_device: Literal["auto", "device", "cpu"] = field(
        default="auto",
        metadata={"help": "Where the per-sample state lives: on the training device, in host "
                  "memory, or auto (device up to 2 GiB of state, else host)."},
    )
    check_inputs: bool = field(
        default=True,
        metadata={"help": "Validate indices and finiteness each step (one host sync per step)."},
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept False: the collator reads the raw columns."}
    )

    def __post_init__(self) -> None:
        # Every parameter takes part in the loss: no unused-parameter search under DDP.
        if self.ddp_find_unused_parameters is None:
            self.ddp_find_unused_parameters = False
        super().__post_init__()
        # All ranks gather equally sized batches: drop a ragged last batch when distributed.
        if self.world_size > 1:
            self.dataloader_drop_last = True
        if self.detector not in available_detectors():
            raise ValueError(
                f"unknown detector {self.detector!r}; choose from {available_detectors()}"
            )
        if self.temperature_scheme == "global_learnable":
            self.temperature_scheme = "learnable"
        if self.loss_type == "sogclr" and self.temperature_scheme != "fixed":
            raise ValueError(
                "loss_type 'sogclr' uses a fixed temperature: set temperature_scheme: fixed "
                "(or use loss_type 'fastclip' for a learnable one)"
            )
        if self.temperature_init is not None and not 0 < self.temperature_init:
            raise ValueError(f"temperature_init must be positive, got {self.temperature_init}")
        if self.max_logit_scale <= 0:
            raise ValueError("max_logit_scale must be positive")
        if self.num_samples is not None and self.num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {self.num_samples}")
        # Fail at start-up, not at the first step.
        self.glofnd_config()
        GammaSchedule(self.gamma, self.gamma_schedule, self.gamma_decay_epochs)

    def glofnd_config(self) -> GloFNDConfig:
        return GloFNDConfig(
            alpha=self.glofnd_alpha, update_rule=self.glofnd_update_rule,
            tail_size=self.glofnd_tail_size, band=self.glofnd_band,
            step_floor=self.glofnd_step_floor, lr=self.glofnd_lr,
            betas=(self.glofnd_beta1, self.glofnd_beta2), eps=self.glofnd_eps,
            clip_grad_mult=self.glofnd_clip_grad_mult, init_quantile=self.glofnd_init_quantile,
            update_start_epoch=self.glofnd_update_start_epoch,
            mask_start_epoch=self.glofnd_mask_start_epoch,
        )

    def detector_options(self) -> dict:
        """Settings of the chosen detector beyond the shared GloFND config."""
        if self.detector != "ifnd":
            return {}
        options = {"cluster_every": self.ifnd_cluster_every,
                   "accept_warmup_epochs": self.ifnd_accept_warmup_epochs, "seed": self.seed}
        if self.ifnd_num_clusters:
            options["num_clusters"] = tuple(self.ifnd_num_clusters)
        return options

    def gamma_schedule_obj(self) -> GammaSchedule:
        return GammaSchedule(self.gamma, self.gamma_schedule, self.gamma_decay_epochs)

    @property
    def max_log_logit_scale(self) -> float:
        return math.log(self.max_logit_scale)

    def state_bytes_per_sample(self) -> int:
        per = self.glofnd_config().rule().bytes_per_sample() if self.detector == "glofnd" else 0
        if self.detector == "ifnd":  # float16 feature bank (width unknown here: 1024) + labels
            per += IFND_BANK_BYTES_PER_SAMPLE
        if self.loss_type != "clip":
            per += GLOBAL_LOSS_BYTES_PER_SAMPLE
        return per

"""Arguments of a GloFND training run: model, data, and the training arguments of the Trainer
extended with the method's settings. YAML recipe keys equal these field names.

Every field carries its ``help``; fields come in sections (``help_sections``: first field of a
section -> its title) that ``glofnd-train --help`` and ``docs/settings.md`` show. Settings
shared by every detector are fields (``fn_alpha``, ``fn_start_epoch``); the chosen detector's
own settings are the ``detector_kwargs`` mapping, checked against the detector's settings
dataclass in the registry (:mod:`glofnd_hf.fnd.registry`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from transformers import TrainingArguments

from .fnd import registry
from .fnd.registry import DetectorSpec, SharedSettings
from .fnd.setting_types import setting
from .fnd.thresholds import UpdateRule
from .losses import (
    TEMPERATURE_GRADIENTS,
    GammaGranularity,
    GammaSchedule,
    TemperatureGradient,
    TemperatureScheme,
    temperature_scheme,
)
from .losses import registry as loss_registry
from .models import family_choices
from .renamed_settings import (  # the first two re-exported: where earlier releases had them
    RENAMED_SETTINGS,  # noqa: F401
    RenamedSetting,  # noqa: F401
    apply_renamed_settings,
)
from .secret_args import SecretsNotPickled
from .state_budget import check_state_fits

# "auto" placement keeps the state on the accelerator up to this size, else in host memory.
AUTO_DEVICE_STATE_LIMIT_BYTES = 2 * 1024**3


@dataclass
class ModelArguments:
    """The dual encoder to train."""

    help_sections: ClassVar[dict[str, str]] = {"model_name_or_path": "Model"}
    # The families the package knows (checked with the configuration, before loading).
    setting_choices: ClassVar[dict[str, Any]] = {"model_family": family_choices}

    model_name_or_path: str = setting(
        "glofnd-tiny-hf-clip",
        "HF CLIP-family or SigLIP checkpoint (Hub id or folder), an open_clip model name (with "
        "--pretrained), 'hf-hub:ORG/NAME', or 'glofnd-tiny-hf-clip' / 'glofnd-tiny-open-clip' "
        "/ 'glofnd-tiny-siglip' / 'glofnd-tiny-open-clip-siglip' (tiny models built offline, "
        "for demos and tests; the SigLIP ones for loss_type sigmoid).",
    )
    model_family: str = setting(
        "auto",
        "Library of the model: auto (inferred from the name or folder), hf "
        "(transformers) or open_clip.",
    )
    pretrained: str | None = setting(None, "open_clip pretrained tag or local checkpoint file.")
    tiny_image_size: int = setting(32, "Image size of the tiny models.")


@dataclass
class DataArguments:
    """The training and evaluation data."""

    help_sections: ClassVar[dict[str, str]] = {
        "dataset_name": "Data (datasets)",
        "train_shards": "Data (webdataset shards)",
        "max_train_samples": "Data (subsets)",
    }

    dataset_name: str | None = setting(
        None,
        "'glofnd-digits' (the embedded demo data), a Hub dataset id, or a folder "
        "written by datasets' save_to_disk.",
    )
    dataset_config_name: str | None = setting(None, "Configuration name of the Hub dataset.")
    train_split: str = setting("train", "Split to train on.")
    eval_split: str | None = setting(
        "validation", "Split for zero-shot evaluation before and after training (None: none)."
    )
    image_column: str = setting("image", "Column of the images.")
    caption_column: str = setting(
        "caption", "Column of the captions (a string, or a list of which one is drawn)."
    )
    index_column: str = setting(
        "dataset_index",
        "Column with each pair's dataset index in [0, N); created as the row "
        "number when the dataset has none.",
    )
    label_column: str | None = setting(
        None, "Column of ground-truth semantic labels (detectors that need labels, studies)."
    )
    class_label_column: str | None = setting(
        None, "Column of class ids for zero-shot classification."
    )
    class_names: list[str] | None = setting(None, "Class names for zero-shot classification.")
    prompt_templates: list[str] | None = setting(
        None, "Prompt templates with '{}' for the class name."
    )
    train_shards: str | None = setting(
        None,
        "Webdataset shards to stream instead of a datasets dataset: paths, brace "
        "patterns (/data/{00000..00331}.tar), '::'-joined lists, pipe: URLs.",
    )
    train_num_samples: int | None = setting(
        None, "Samples per epoch over all ranks (default: the shards' sizes.json)."
    )
    shard_resampled: bool = setting(
        False, "Draw shards with replacement (an epoch is then train_num_samples)."
    )
    shard_shuffle_buffer: int = setting(1000, "Samples in the streaming shuffle buffer.")
    shard_index_source: Literal["field", "key"] = setting(
        "field",
        "Dataset index from the shard's index field, or from the numeric img2dataset "
        "key (then num_samples must exceed the largest key).",
    )
    shard_on_bad_index: Literal["raise", "skip"] = setting(
        "raise",
        "A sample without a valid dataset index stops training (raise) or is "
        "skipped and counted (skip).",
    )
    max_train_samples: int | None = setting(None, "Train on the first rows only (datasets data).")
    max_eval_samples: int | None = setting(None, "Evaluate on the first rows only.")

    def __post_init__(self) -> None:
        # A flag cannot say None: "none" (or an empty value) means no evaluation split.
        if isinstance(self.eval_split, str) and self.eval_split.strip().lower() in ("", "none"):
            self.eval_split = None


def _deprecated(renamed_to: str) -> str:
    return f"Deprecated: use {renamed_to}."


@dataclass
class GloFNDTrainingArguments(SecretsNotPickled, TrainingArguments):
    """``TrainingArguments`` plus the contrastive loss and false-negative detection settings.

    Pickled (the Trainer's ``training_args.bin``), the arguments hold no access token
    (``hub_token`` and other secret-named settings are None there; ``secret_args``).

    Sections: the contrastive loss (loss_type ... max_logit_scale), false-negative detection
    (detector ... detector_kwargs), the per-sample state (num_samples ... check_inputs), the
    output folder (overwrite_output_dir), Trainer defaults changed for this method, and the deprecated flat names of earlier
    versions (each names its new spelling)."""

    help_sections: ClassVar[dict[str, str]] = {
        "loss_type": "Contrastive loss",
        "detector": "False-negative detection",
        "num_samples": "Per-sample state",
        "overwrite_output_dir": "Output folder",
        "remove_unused_columns": "Trainer defaults changed",
        "glofnd_alpha": "Deprecated names (each says its new spelling)",
    }
    # Older spellings of values still accepted (with a warning) though the type omits them.
    value_aliases: ClassVar[dict[str, tuple[str, ...]]] = {
        "temperature_scheme": ("global_learnable",)
    }
    # Settings whose values a registry holds (checked with the configuration, before loading).
    setting_choices: ClassVar[dict[str, Any]] = {"loss_type": loss_registry.names}

    # -- Contrastive loss ---------------------------------------------------------------------
    loss_type: str = setting("clip", loss_registry.help_text())
    gamma: float = setting(
        0.2, "Global losses: final weight of the newest estimate in each sample's moving average u."
    )
    gamma_schedule: Literal["constant", "cosine"] = setting(
        "cosine",
        "Global losses: gamma is constant, or falls from 1 to gamma over "
        "gamma_decay_epochs on a half cosine.",
    )
    gamma_decay_epochs: float = setting(18.0, "Global losses: epochs of the cosine gamma decay.")
    gamma_granularity: GammaGranularity = setting(
        "epoch",
        "Global losses, cosine gamma: epoch: evaluated at the integer epoch and held through it "
        "(FastCLIP's code); step: evaluated at each step's fractional epoch.",
    )
    temperature_scheme: TemperatureScheme = setting(
        "learnable",
        "learnable: the model's logit_scale is trained (FastCLIP's "
        "'global_learnable'); fixed: it is frozen (required by sogclr).",
    )
    temperature_init: float | None = setting(
        None, "Set the temperature (1 / logit_scale) at start (default: the model's)."
    )
    temperature_lr: float | None = setting(
        None, "Own learning rate for the temperature (default: learning_rate)."
    )
    rho: float = setting(
        6.5,
        "fastclip: FastCLIP-v3's rho, which moves a learnable temperature; with a fixed one it "
        "only adds tau * rho to the logged loss, as in FastCLIP's code.",
    )
    temperature_gradient: TemperatureGradient = setting(
        "fastclip",
        "fastclip with a learnable temperature: how the two sides weigh in its gradient. "
        "fastclip: the surrogate terms of the two sides summed, the rho and log u terms "
        "averaged, as FastCLIP's code (with which its rho = 6.5 was chosen); mean: all "
        "averaged (the gradient of the objective tau * (mean log g + rho)). The loss value "
        "and the embeddings' gradients are the same either way.",
    )
    max_logit_scale: float | None = setting(
        None,
        "logit_scale.exp() is clamped to this after each step. None: CLIP's cap of 100, or "
        "the model's own starting scale where that is higher (SigLIP checkpoints start "
        "near 110), so a checkpoint's learned scale is never cut.",
    )
    contrastive_chunk_size: int | None = setting(
        None,
        "Cached (GradCache-style) loss: encode each process's batch in chunks of this many "
        "pairs, first without gradients, run the loss and the detector once on the whole "
        "batch, then encode each chunk again and back-propagate the cached gradients. Peak "
        "memory of a chunk's activations, negatives of the whole batch; gradients equal the "
        "plain loss's (random state replayed per chunk); costs one more forward. None, or "
        "at least per_device_train_batch_size: the plain loss.",
    )

    # -- False-negative detection -------------------------------------------------------------
    detector: str = setting(
        "glofnd",
        "False-negative detector (see 'glofnd-train --help' or docs/settings.md "
        "for the registered ones).",
    )
    fn_strategy: Literal["eliminate", "attract"] = setting(
        "eliminate",
        "What the loss does with detected false negatives: drop them from the "
        "negatives (eliminate) or count them as extra positives (attract).",
    )
    fn_alpha: float = setting(
        1e-3,
        "Fraction of the data set taken as false negatives of each anchor (GloFND's "
        "quantile level, the in-batch quantile's, IFND's k = 1/alpha).",
    )
    fn_start_epoch: float = setting(
        0.0, "Epoch from which detected false negatives are acted on (every detector)."
    )
    detector_kwargs: dict | str | None = setting(
        help="Settings of the chosen detector as a mapping (YAML) or a JSON string (flag), "
        "e.g. {update_rule: adam, lr: 0.05} for glofnd, or keyed by detector name "
        "({glofnd: {...}, ifnd: {...}}: only the chosen detector's section applies, every "
        "section is checked); unknown keys are errors naming the valid ones. Each detector's "
        "settings: docs/settings.md.",
        default_factory=dict,
    )

    # -- Per-sample state ---------------------------------------------------------------------
    num_samples: int | None = setting(
        None,
        "N, the size of the dataset index space (default: largest index + 1 of the "
        "training data; required for streaming data without index files).",
    )
    state_device: Literal["auto", "device", "cpu"] = setting(
        "auto",
        "Where the per-sample state lives: on the training device, in host memory, "
        "or auto (device up to 2 GiB of state, else host).",
    )
    state_sharding: Literal["replicated", "sharded"] = setting(
        "replicated",
        "How the processes hold the per-sample state (GloFND's thresholds, a global loss's u, "
        "IFND's feature bank and clusters): replicated, every process every sample's; or "
        "sharded, each process the samples whose index modulo the world size is its rank "
        "(about N / world of them), read for a step with one all-reduce of the global batch's "
        "rows. The results are the same (IFND: as replicated with its kmeans: torch). A "
        "checkpoint then holds one state file per process (loads into any number of "
        "processes).",
    )
    check_inputs: bool = setting(
        True, "Validate indices and finiteness each step (one host sync per step)."
    )

    # -- Output folder ------------------------------------------------------------------------
    overwrite_output_dir: bool = setting(
        False,
        "A new run into an output_dir that holds an earlier run (checkpoint-N folders, "
        "trainer_state.json, model weights, glofnd_state.safetensors, ...) stops unless this "
        "is set; then that run's files are deleted before anything is written. Resuming the "
        "run in output_dir (resume_from_checkpoint) never deletes it. An empty folder or one "
        "with other files only is used as is.",
    )

    # -- Trainer defaults changed -------------------------------------------------------------
    remove_unused_columns: bool = setting(False, "Kept False: the collator reads the raw columns.")

    # -- Deprecated names ---------------------------------------------------------------------
    glofnd_alpha: float | None = setting(None, _deprecated("fn_alpha"))
    glofnd_mask_start_epoch: float | None = setting(None, _deprecated("fn_start_epoch"))
    glofnd_update_rule: UpdateRule | None = setting(
        None, _deprecated("detector_kwargs.update_rule")
    )
    glofnd_tail_size: int | None = setting(None, _deprecated("detector_kwargs.tail_size"))
    glofnd_band: float | None = setting(None, _deprecated("detector_kwargs.band"))
    glofnd_step_floor: float | None = setting(None, _deprecated("detector_kwargs.step_floor"))
    glofnd_lr: float | None = setting(None, _deprecated("detector_kwargs.lr"))
    glofnd_beta1: float | None = setting(None, _deprecated("detector_kwargs.betas[0]"))
    glofnd_beta2: float | None = setting(None, _deprecated("detector_kwargs.betas[1]"))
    glofnd_eps: float | None = setting(None, _deprecated("detector_kwargs.eps"))
    glofnd_clip_grad_mult: float | None = setting(
        None, _deprecated("detector_kwargs.clip_grad_mult")
    )
    glofnd_init_quantile: bool | None = setting(None, _deprecated("detector_kwargs.init_quantile"))
    glofnd_update_start_epoch: float | None = setting(
        None, _deprecated("detector_kwargs.update_start_epoch")
    )
    ifnd_num_clusters: list[int] | None = setting(None, _deprecated("detector_kwargs.num_clusters"))
    ifnd_cluster_every: float | None = setting(None, _deprecated("detector_kwargs.cluster_every"))
    ifnd_accept_warmup_epochs: float | None = setting(
        None, _deprecated("detector_kwargs.accept_warmup_epochs")
    )

    def __post_init__(self) -> None:
        # Every parameter takes part in the loss: no unused-parameter search under DDP.
        if self.ddp_find_unused_parameters is None:
            self.ddp_find_unused_parameters = False
        super().__post_init__()
        # All ranks gather equally sized batches: drop a ragged last batch when distributed.
        if self.world_size > 1:
            self.dataloader_drop_last = True
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size"):
            if getattr(self, name) < 1:  # before any model or data loads
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        spec = self.detector_spec()  # an unknown name fails here, listing the known ones
        self.detector_kwargs = self._read_detector_kwargs(self.detector_kwargs)
        sections = self._detector_sections(self.detector_kwargs)
        if sections is not None:
            self.detector_kwargs = dict(sections.get(self.detector) or {})
        self._apply_renamed_settings()
        if not 0.0 < self.fn_alpha < 1.0:  # named here, not as a detector's own setting
            raise ValueError(f"fn_alpha must lie in (0, 1), got {self.fn_alpha}")
        for name, section in (sections or {}).items():  # catch typos in every section
            try:
                registry.get(name).make_settings(section, self.shared_detector_settings())
            except (TypeError, ValueError) as err:
                raise ValueError(f"detector_kwargs.{name}: {err}") from err
        self.temperature_scheme = temperature_scheme(self.temperature_scheme)
        loss = loss_registry.get(self.loss_type)  # an unknown name lists the known ones
        if loss.fixed_temperature and self.temperature_scheme != "fixed":
            learnable = [
                n for n in loss_registry.names() if not loss_registry.get(n).fixed_temperature
            ]
            raise ValueError(
                f"loss_type {self.loss_type!r} uses a fixed temperature: set temperature_scheme: "
                f"fixed (or use a loss_type with a learnable one: {', '.join(learnable)})"
            )
        if self.temperature_gradient not in TEMPERATURE_GRADIENTS:
            raise ValueError(
                f"temperature_gradient must be one of {TEMPERATURE_GRADIENTS}, "
                f"got {self.temperature_gradient!r}"
            )
        if self.temperature_init is not None and not 0 < self.temperature_init:
            raise ValueError(f"temperature_init must be positive, got {self.temperature_init}")
        if self.max_logit_scale is not None and self.max_logit_scale <= 0:
            raise ValueError("max_logit_scale must be positive")
        if self.contrastive_chunk_size is not None and self.contrastive_chunk_size < 1:
            raise ValueError(
                f"contrastive_chunk_size must be positive (or None), got "
                f"{self.contrastive_chunk_size}"
            )
        if self.num_samples is not None and self.num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {self.num_samples}")
        # Fail at start-up, not at the first step.
        try:
            self.detector_settings()
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"invalid settings for the {spec.name!r} detector (detector_kwargs; its alpha is "
                f"fn_alpha and its mask_start_epoch is fn_start_epoch): {err}"
            ) from err
        self.gamma_schedule_obj()
        if self.state_sharding not in ("replicated", "sharded"):
            raise ValueError(
                f"state_sharding must be replicated or sharded, got {self.state_sharding!r}"
            )
        # A detector that cannot shard, or cannot with these settings (IFND's sklearn k-means).
        spec.check_sharding(self.detector_settings(), self.state_sharding)
        if self.num_samples is not None and self.state_device != "device":
            # Host memory bounds the state wherever "auto" puts it; checked before any load,
            # when the model's embedding width is not known: at a width of 1, what the state
            # needs at any width (the loss is checked again at the model's width).
            rows = self.state_rows_per_process()
            check_state_fits(rows, self.state_bytes_per_sample(embed_width=1), "cpu")

    @staticmethod
    def _read_detector_kwargs(value: Mapping[str, Any] | str | None) -> dict[str, Any]:
        if value is None:
            return {}
        if isinstance(value, str):  # a command-line flag: JSON, as transformers' dict fields
            try:
                value = json.loads(value) if value.strip() else {}
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"detector_kwargs is not valid JSON ({err.msg} at character {err.pos}): "
                    f'{value!r}; e.g. --detector_kwargs \'{{"update_rule": "adam"}}\''
                ) from err
        if not isinstance(value, Mapping):
            raise ValueError(f"detector_kwargs must be a mapping, got {value!r}")
        return dict(value)

    @staticmethod
    def _detector_sections(kwargs: dict[str, Any]) -> dict[str, Any] | None:
        """``detector_kwargs`` keyed by detector name, or None when it is flat (the chosen
        detector's settings). Keyed by name, one recipe carries the settings of several
        detectors and ``--detector`` switches between them: only the chosen section applies."""
        known = set(registry.names())
        by_detector = bool(kwargs) and all(
            key in known and (value is None or isinstance(value, Mapping))
            for key, value in kwargs.items()
        )
        return kwargs if by_detector else None

    def _apply_renamed_settings(self) -> None:
        """Move values given under deprecated flat names to their new place (with a warning
        naming it); settings of another detector than the chosen one are ignored, as before."""
        apply_renamed_settings(self, self.detector_spec().make_settings())

    # -- what the Trainer reads ---------------------------------------------------------------
    def detector_spec(self) -> DetectorSpec:
        """The registry's entry of the chosen detector."""
        return registry.get(self.detector)

    def shared_detector_settings(self) -> SharedSettings:
        return SharedSettings(
            alpha=self.fn_alpha, mask_start_epoch=self.fn_start_epoch, seed=self.seed
        )

    def detector_settings(self) -> Any:
        """The chosen detector's settings dataclass (``detector_kwargs`` + shared settings)."""
        return self.detector_spec().make_settings(
            self.detector_kwargs, self.shared_detector_settings()
        )

    def gamma_schedule_obj(self) -> GammaSchedule:
        return GammaSchedule(
            self.gamma, self.gamma_schedule, self.gamma_decay_epochs, self.gamma_granularity
        )

    def state_rows_per_process(self, num_samples: int | None = None) -> int:
        """The per-sample rows each process holds: N, or ceil(N / world size) sharded."""
        n = self.num_samples if num_samples is None else num_samples
        if n is None:
            raise ValueError("num_samples is not known yet")
        return -(-n // self.world_size) if self.state_sharding == "sharded" else n

    def state_bytes_per_sample(self, embed_width: int | None = None) -> int:
        """Per-sample state of the detector and of a global loss's u (``embed_width``: the
        model's, for a detector that stores embeddings; None: an assumed width)."""
        per = self.detector_spec().bytes_per_sample(self.detector_settings(), embed_width)
        return per + loss_registry.get(self.loss_type).state_bytes_per_sample

"""Training arguments for quick CPU runs in tests: offline, quiet, nothing saved unless asked."""

from glofnd_hf.args import GloFNDTrainingArguments


def cpu_args(tmp_path, **overrides) -> GloFNDTrainingArguments:
    """``GloFNDTrainingArguments`` on the CPU in ``tmp_path/out``; ``overrides`` win."""
    values = dict(
        output_dir=str(tmp_path / "out"),
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
        dataloader_num_workers=0,
    )
    return GloFNDTrainingArguments(**{**values, **overrides})

"""Repository ids on the Hugging Face Hub: one check for the model card and for pushing.

``huggingface_hub.utils.validate_repo_id`` holds the Hub's rules (characters, length, no ``--``
or ``..``); on top of it a *model* repository we push to must name its owner (``ORG/NAME``).
"""

from __future__ import annotations

from huggingface_hub.utils import HFValidationError, validate_repo_id

__all__ = ["check_hub_repo_id", "is_hub_repo_id"]


def is_hub_repo_id(name: object, *, require_namespace: bool = True) -> bool:
    """True when ``name`` is a valid Hub repository id: ``ORG/NAME`` (or a bare ``NAME`` when
    ``require_namespace`` is False, as for some datasets). Says nothing about local paths."""
    if not isinstance(name, str) or not name:
        return False
    if name.count("/") != 1 and (require_namespace or "/" in name):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def check_hub_repo_id(repo_id: object) -> None:
    """``ValueError`` unless ``repo_id`` is an ``ORG/NAME`` Hub repository id."""
    if not is_hub_repo_id(repo_id):
        raise ValueError(
            f"repo_id must look like ORG/NAME (letters, digits, '-', '_', '.'), got {repo_id!r}"
        )

"""The package as users import it: the public names, one version, type hints shipped."""

import importlib
import importlib.metadata
import importlib.resources
import subprocess
import sys

import glofnd_hf


def test_every_public_name_resolves_to_its_defining_module():
    assert set(glofnd_hf.__all__) == {"__version__", *glofnd_hf._EXPORTS}
    for name, module in glofnd_hf._EXPORTS.items():
        value = getattr(glofnd_hf, name)
        assert value is getattr(importlib.import_module(module), name), name


def test_import_is_light():
    # The public names load on first use: a bare import pulls in neither transformers nor torch.
    code = (
        "import sys, glofnd_hf; "
        "print(sorted(m for m in ('torch', 'transformers', 'open_clip') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_one_version_and_type_hints_ship():
    assert importlib.metadata.version("glofnd-hf") == glofnd_hf.__version__
    assert importlib.resources.files("glofnd_hf").joinpath("py.typed").is_file()

"""Private torch/DeepSpeed/transformers APIs: all in compat.py, and refused on versions
they were not checked on."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

from gptq_fsdp import compat

PACKAGE = Path(compat.__file__).parent
PRIVATE = re.compile(
    r"\._fully_shard|_fsdp_common|core_model_loading|conversion_mapping|\._get_fsdp_state|\._lazy_init|"
    r"_training_state|_forward_pre_hooks|_forward_hooks|_weight_conversions|_cdata"
)


def test_private_calls_live_in_compat_only():
    found = [
        f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "compat.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if PRIVATE.search(line)
    ]
    assert not found, "\n".join(found)


def test_installed_versions_are_the_checked_ones():
    for package in compat.CHECKED:
        compat.require.cache_clear()
        compat.require(package)  # raises otherwise: the suite runs on what it checks


@pytest.fixture
def torch_2_99(monkeypatch):
    monkeypatch.setattr(compat, "version", lambda package: "2.99.1+cpu" if package == "torch" else "0")
    compat.require.cache_clear()
    yield
    compat.require.cache_clear()


def test_an_unchecked_version_is_a_clear_error_before_any_private_call(torch_2_99, monkeypatch):
    monkeypatch.delenv(compat.UNCHECKED_ENV, raising=False)
    with pytest.raises(compat.CompatError, match=r"checked on torch 2\.13\.x; 2\.99\.1\+cpu is installed.*"
                       + compat.UNCHECKED_ENV):  # fmt: skip
        compat.fsdp_lazy_init(object())


def test_the_unchecked_version_switch_warns_instead(torch_2_99, monkeypatch):
    monkeypatch.setenv(compat.UNCHECKED_ENV, "1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compat.require("torch")
    assert any("2.99.1+cpu is installed" in str(w.message) for w in caught)

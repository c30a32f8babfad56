"""help() is a reference: every public function and class documents each of its parameters, and dir(pychop)
lists the public names only."""

import inspect
import re

import pytest

import pychop
from pychop.chopgrad import scan, stream
from pychop.chopgrad.memory import SavedActivationMeter
from pychop.memory import lean_frozen
from pychop.models import CausalVideoDecoder, VideoUNet
from pychop.nn import ParallelSTBlock, SerialSTBlock

PUBLIC = [pychop.parallel_st_attention, pychop.temporal_attention, pychop.spatial_attention,
          pychop.available_backends, stream, scan, lean_frozen, ParallelSTBlock, SerialSTBlock, VideoUNet,
          CausalVideoDecoder, SavedActivationMeter]


def diffusers_functions():
    pytest.importorskip("diffusers")
    from pychop.integrations import diffusers
    return [diffusers.patch_temporal_attention, diffusers.convert_to_parallel, diffusers.decoder_recurrence]


def undocumented(obj):
    """The parameters of obj (a function, or a class's __init__) that its help() text does not document: each
    must start an entry of an argument list, ``name: what it is`` (or ``a, b, c: what they are``)."""
    function = obj.__init__ if inspect.isclass(obj) else obj
    names = [name for name in inspect.signature(function).parameters if name != "self"]
    text = inspect.getdoc(obj) or ""
    if inspect.isclass(obj):
        text += "\n" + (inspect.getdoc(obj.__init__) or "")
    entries = re.findall(r"^ +(\w+(?:, \w+)*):", text, flags=re.M)
    documented = {name for entry in entries for name in entry.split(", ")}
    return [name for name in names if name not in documented]


@pytest.mark.parametrize("obj", PUBLIC, ids=[obj.__qualname__ for obj in PUBLIC])
def test_every_parameter_is_documented(obj):
    assert undocumented(obj) == [], f"{obj.__qualname__}'s docstring does not name these parameters"


def test_every_parameter_of_the_diffusers_adapters_is_documented():
    for function in diffusers_functions():
        assert undocumented(function) == [], f"{function.__qualname__}'s docstring does not name these parameters"


def test_dir_lists_public_names_only():
    names = dir(pychop)
    assert "importlib" not in names and "_import_module" not in names and "autocast_state" not in names
    assert set(names) == {*pychop.__all__, "__version__"}
    assert all(hasattr(pychop, name) for name in names)

"""Methods are found through the entry-point registry; the core names none of them."""

from __future__ import annotations

import ast
import dataclasses
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig

import torchrec_pss
from helpers import make_kjt
from torchrec_pss import CompressedEmbeddingBagCollection, MethodConfig, PSSMemory, register_method
from torchrec_pss.registry import ENTRY_POINT_GROUP, method_by_name, method_for_config, registered_methods


def test_robe_is_registered_through_its_entry_point() -> None:
    names = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    assert names["robe"] == "torchrec_pss_plugins.robe:RobeMemory"
    assert registered_methods()["robe"].__module__ == "torchrec_pss_plugins.robe.robe"
    assert torchrec_pss.RobeConfig is method_by_name("robe").config_cls
    with pytest.raises(ValueError, match="unknown compression method 'nope'"):
        method_by_name("nope")


def _code_words(tree: ast.AST) -> list[str]:
    """Identifiers, imported names and non-docstring string constants of a module."""
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and node.body
        and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)
    }
    words = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            words.append(node.id)
        elif isinstance(node, ast.Attribute):
            words.append(node.attr)
        elif isinstance(node, ast.alias):
            words.append(node.name)
        elif isinstance(node, ast.ImportFrom):
            words.append(node.module or "")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            words.append(node.value)
    return words


def test_core_has_no_method_specific_code() -> None:
    """The library core names no method; the DLRM application (``app/``) may pick a default flag."""
    core = Path(torchrec_pss.__file__).parent
    for path in core.rglob("*.py"):
        if path.parent.name == "app":
            continue
        for word in _code_words(ast.parse(path.read_text())):
            assert "robe" not in word.lower() and "plugins" not in word.lower(), (path, word)


@dataclasses.dataclass(frozen=True)
class ScaledIdConfig(MethodConfig):
    """A toy third-party method: embedding of id x is x * v for one learnable vector v."""


@register_method(ScaledIdConfig)
class ScaledIdMemory(PSSMemory):
    name = "test_scaled_id"

    def __init__(self, config, tables, device=None):
        super().__init__(config, tables, device)
        self.vector = torch.nn.Parameter(torch.ones(next(iter(self.tables.values())).embedding_dim, device=device))

    def recover(self, table, ids):
        return ids.to(self.vector.dtype).unsqueeze(1) * self.vector

    def num_bytes(self):
        return self.vector.numel() * 4

    def reset_parameters(self):
        torch.nn.init.ones_(self.vector)


def test_third_party_method_plugs_into_the_core() -> None:
    tables = [EmbeddingBagConfig(name="t", embedding_dim=3, num_embeddings=10, feature_names=["f"])]
    module = CompressedEmbeddingBagCollection(tables, {"t": ScaledIdConfig()})
    assert method_for_config(ScaledIdConfig()) is ScaledIdMemory
    out = module(make_kjt({"f": [[1, 2], [], [9]]})).values()
    torch.testing.assert_close(out, torch.tensor([[3.0] * 3, [0.0] * 3, [9.0] * 3]))
    assert module.num_bytes() == {"t": 12}


def test_a_method_class_without_a_name_is_refused_at_registration() -> None:
    with pytest.raises(TypeError, match="Nameless must set the class attribute `name`"):
        @register_method(ScaledIdConfig)
        class Nameless(PSSMemory):
            pass


BROKEN_PLUGINS = {
    "nameless_plugin.py": """
import dataclasses
from torchrec_pss import MethodConfig, PSSMemory, register_method

@dataclasses.dataclass(frozen=True)
class NamelessConfig(MethodConfig):
    pass

@register_method(NamelessConfig)
class NamelessMemory(PSSMemory):
    pass
""",
    "missing_plugin.py": "import a_module_that_is_not_installed\n",
}
ENTRY_POINTS = """[torchrec_pss.methods]
aaa_nameless = nameless_plugin:NamelessMemory
aab_missing = missing_plugin:Memory
"""
CHECK = """
import warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    from torchrec_pss import RobeConfig, failed_entry_points, parse_compression_flag, registered_methods
    import torchrec_pss
print(sorted(registered_methods()))
print(sorted(failed_entry_points()))
print([str(w.message) for w in caught if "entry point" in str(w.message)])
print(parse_compression_flag("robe:compression=10").default)
try:
    torchrec_pss.NamelessConfig
except AttributeError as error:
    print(error)
"""


def test_a_broken_third_party_plugin_is_reported_and_the_others_still_load(tmp_path: Path) -> None:
    """A plugin whose import fails (here: a memory class without ``name``, a missing dependency) is left out with
    a warning naming it; before, it hid every other method (``from torchrec_pss import RobeConfig`` failed)."""
    for file, text in BROKEN_PLUGINS.items():
        (tmp_path / file).write_text(text)
    info = tmp_path / "broken_plugins-0.0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugins\nVersion: 0.0.0\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    methods, failed, warned, flag, missing = run.stdout.strip().splitlines()[-5:]
    assert {"robe", "qr", "tt", "mlet", "hashing"} <= set(eval(methods))
    assert eval(failed) == ["aaa_nameless", "aab_missing"]
    warned = eval(warned)
    assert len(warned) == 2
    assert "aaa_nameless = nameless_plugin:NamelessMemory: TypeError: NamelessMemory must set the class" in warned[0]
    assert "aab_missing = missing_plugin:Memory: ModuleNotFoundError" in warned[1]
    assert flag.startswith("RobeConfig(")
    assert "no attribute 'NamelessConfig' (method entry points that failed to load: " in missing

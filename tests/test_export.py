"""torch.export of a DLRM holding compressed tables (every method): the program's outputs equal eager's
on batches of other sizes (1 and all-empty bags too); save and reload through the example."""

from __future__ import annotations

import importlib.util
import pathlib
import random

import pytest
import torch
from torchrec.datasets.utils import Batch
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from helpers import make_kjt, random_bags, random_weights
from torchrec_pss import (CompressedEmbeddingBagCollection, HashingConfig, MLETConfig, QRConfig, RobeConfig, TTConfig,
                          collapse)
from torchrec_pss.contract import MethodConfig
from torchrec_pss.export import export_for_inference

ROWS, DIM, DENSE = 1000, 8, 13
FEATURES = ["f0", "f1", "f2"]
BATCHES = [(5, 4), (9, 7), (1, 3), (3, 0)]  # (batch size, max bag length): the first one is traced
METHODS = {
    "robe": (RobeConfig(memory_size=500, chunk_size=4), "torchrec_pss.robe_pooled"),
    "qr": (QRConfig(collisions=40), "torchrec_pss.qr_pooled"),
    "tt": (TTConfig(ranks=4), "torchrec_pss.tt_pooled"),
    "hashing": (HashingConfig(num_buckets=100), None),
    "mlet": (MLETConfig(inner_dim=4), None),
}


def tables() -> list[EmbeddingBagConfig]:
    pooling = [PoolingType.SUM, PoolingType.MEAN, PoolingType.SUM]
    return [EmbeddingBagConfig(name=f"t{i}", embedding_dim=DIM, num_embeddings=ROWS, feature_names=[f], pooling=p)
            for i, (f, p) in enumerate(zip(FEATURES, pooling))]


def dlrm(compression: dict[str, MethodConfig], weighted: bool = False) -> DLRM:
    """t0 (SUM) and t1 (MEAN) as ``compression`` says, t2 plain."""
    ebc = CompressedEmbeddingBagCollection(tables(), compression, is_weighted=weighted)
    return DLRM(embedding_bag_collection=ebc, dense_in_features=DENSE, dense_arch_layer_sizes=[16, DIM],
                over_arch_layer_sizes=[16, 1])


def batches(weighted: bool, features: list[str] = FEATURES) -> list[tuple[torch.Tensor, KeyedJaggedTensor]]:
    rng = random.Random(0)
    out = []
    for size, max_len in BATCHES:
        bags = {f: random_bags(rng, ROWS, size, max_len) for f in features}
        weights = {f: random_weights(rng, b) for f, b in bags.items()} if weighted else None
        out.append((torch.randn(size, DENSE), make_kjt(bags, weights)))
    return out


def assert_program_matches(model: torch.nn.Module, inputs: list[tuple[torch.Tensor, KeyedJaggedTensor]]) -> set[str]:
    """Export on the first batch; every batch gives eager's output. Returns the graph's call targets."""
    was_training = model.training
    program = export_for_inference(model, inputs[0])
    assert model.training == was_training
    served = program.module()
    model.eval()
    with torch.no_grad():
        for dense, sparse in inputs:
            expected = model(dense, sparse)
            assert expected.shape == (dense.shape[0], 1)
            torch.testing.assert_close(served(dense, sparse), expected, rtol=1e-6, atol=1e-6)
    return {str(node.target) for node in program.graph.nodes}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_exported_dlrm_equals_eager(method: str) -> None:
    torch.manual_seed(0)
    config, op = METHODS[method]
    model = dlrm({"t0": config, "t1": config})
    model.train()
    targets = assert_program_matches(model, batches(weighted=False))
    if op is not None:
        assert any(target.startswith(op) for target in targets), targets
    ebc = model.sparse_arch.embedding_bag_collection
    assert ebc.validate_inputs  # switched off only while tracing


def test_exported_weighted_dlrm_with_every_method_equals_eager() -> None:
    """One weighted module with all five methods, SUM and MEAN, and a plain table."""
    torch.manual_seed(1)
    pooling = [PoolingType.SUM, PoolingType.MEAN] * 3
    configs = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=DIM, num_embeddings=ROWS, feature_names=[f"f{i}"],
                                  pooling=p) for i, p in enumerate(pooling)]
    compression = {f"t{i}": config for i, (config, _) in enumerate(METHODS.values())}
    ebc = CompressedEmbeddingBagCollection(configs, compression, is_weighted=True)
    model = DLRM(embedding_bag_collection=ebc, dense_in_features=DENSE, dense_arch_layer_sizes=[16, DIM],
                 over_arch_layer_sizes=[16, 1])
    assert_program_matches(model, batches(weighted=True, features=[f"f{i}" for i in range(6)]))


@pytest.mark.parametrize("weighted", [False, True])
def test_a_dlrm_whose_tables_share_one_robe_memory_exports(weighted: bool) -> None:
    """Every table in one ROBE memory, read in one stacked pass (``PSSMemory.pooled_stacked``): the program takes
    batches of 1 too (the block's layout once specialised the batch size to more than 1)."""
    torch.manual_seed(4)
    config = RobeConfig(memory_size=301, chunk_size=4)
    configs = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=DIM, num_embeddings=ROWS, feature_names=[f])
               for i, f in enumerate(FEATURES)]
    ebc = CompressedEmbeddingBagCollection(configs, {t.name: config for t in configs}, is_weighted=weighted)
    model = DLRM(embedding_bag_collection=ebc, dense_in_features=DENSE, dense_arch_layer_sizes=[16, DIM],
                 over_arch_layer_sizes=[16, 1])
    assert ebc._stacked_plan is not None  # the stacked pass is what this exports
    assert_program_matches(model, batches(weighted=weighted))


def test_export_restores_every_submodules_training_flag() -> None:
    """A model in training with a submodule the user put in eval mode keeps both flags after the export."""
    torch.manual_seed(5)
    model = dlrm({"t0": METHODS["qr"][0]})
    model.train()
    model.over_arch.eval()
    export_for_inference(model, batches(weighted=False)[0])
    assert model.training and model.sparse_arch.training and model.dense_arch.training
    assert not model.over_arch.training and not any(m.training for m in model.over_arch.modules())


def test_collapsed_mlet_dlrm_exports() -> None:
    torch.manual_seed(2)
    mlet = MLETConfig(inner_dim=4)
    model = dlrm({"t0": mlet, "t1": mlet})
    model.sparse_arch.embedding_bag_collection = collapse(model.sparse_arch.embedding_bag_collection)
    assert_program_matches(model, batches(weighted=False))


def test_save_and_reload_through_the_example(tmp_path: pathlib.Path) -> None:
    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "export_dlrm.py"
    spec = importlib.util.spec_from_file_location("export_dlrm", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    torch.manual_seed(3)
    model = dlrm({"t0": RobeConfig(memory_size=500, chunk_size=4), "t1": TTConfig(ranks=4)})
    inputs = batches(weighted=False)
    as_batch = [Batch(dense_features=d, sparse_features=s, labels=torch.zeros(d.shape[0])) for d, s in inputs]
    program = example.export_and_reload(model, as_batch[0], tmp_path / "dlrm.pt2")
    assert (tmp_path / "dlrm.pt2").stat().st_size > 0
    assert example.max_difference(model, program, as_batch) <= 1e-6


def test_a_variable_batch_example_is_refused() -> None:
    """The rebuilt KJT would lose the per-key batch sizes (the program gave 2 rows where eager gives 3)."""
    tables = [EmbeddingBagConfig(name=n, embedding_dim=8, num_embeddings=100, feature_names=[f"f_{n}"]) for n in "ab"]
    module = CompressedEmbeddingBagCollection(tables, {"a": RobeConfig(compression=4, chunk_size=4)}).eval()
    kjt = KeyedJaggedTensor(keys=["f_a", "f_b"], values=torch.tensor([1, 2, 3, 4, 5]), lengths=torch.tensor([2, 1, 1, 1]),
                            stride_per_key_per_rank=[[1], [3]],
                            inverse_indices=(["f_a", "f_b"], torch.tensor([[0, 0, 0], [0, 1, 2]])))
    assert module(kjt).values().shape == (3, 16)  # eager takes it
    with pytest.raises(ValueError, match=r"keys \['f_a', 'f_b'\] has variable batch sizes per key \(VBE\)"):
        export_for_inference(module, (kjt,))


@pytest.mark.parametrize("validate", [True, False])
def test_the_program_checks_inputs_as_the_module_does(validate: bool) -> None:
    """Checks on: asserts in the graph refuse a bad id, length or weight, naming table and feature; off: none."""
    torch.manual_seed(0)
    model = dlrm({"t0": METHODS["robe"][0], "t1": METHODS["qr"][0]}, weighted=True)
    model.sparse_arch.embedding_bag_collection.validate_inputs = validate
    dense, sparse = batches(weighted=True)[0]
    program = export_for_inference(model, (dense, sparse))
    asserts = [n for n in program.graph.nodes if n.target is torch.ops.aten._assert_async.msg]
    assert len(asserts) == (8 if validate else 0)  # lengths >= 0 and their sum; ids and weights of 3 features
    if not validate:
        return
    served = program.module()
    bad = {"id": (FEATURES[1], ROWS, r"table 't1', feature 'f1': an id is outside \[0, 1000\)"),
           "weight": (FEATURES[0], float("nan"), r"table 't0', feature 'f0': a weight is not finite")}
    for kind, (feature, value, message) in bad.items():
        bags = {f: [[], [1, 2], [3, 4], [5]] for f in FEATURES}
        weights = {f: [[0.5] * len(bag) for bag in b] for f, b in bags.items()}
        served(torch.randn(4, DENSE), make_kjt(bags, weights))  # good
        if kind == "id":
            bags[feature][2][0] = value
        else:
            weights[feature][1][0] = value
        with pytest.raises(RuntimeError, match=message):
            served(torch.randn(4, DENSE), make_kjt(bags, weights))
